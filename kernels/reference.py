"""Plain torch references for every kernel in tidal.kernels. They define the semantics; the Triton kernels are
tested against them (in float64) and they are the CPU path when the Triton interpreter is off."""
from __future__ import annotations

import torch


def paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, out=None,
                           compute_dtype=torch.float32):
    """q `[B, Hq, D]`; caches `[N, block_size, Hkv, D]`; block_tables `[B, max_blocks]`; seq_lens `[B]`.
    The whole batch at once: each sequence's blocks gathered up to the longest sequence, the rest masked."""
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    lens = seq_lens.long()
    width = (int(lens.max()) + block_size - 1) // block_size
    blocks = block_tables[:, :width].long().clamp_min(0)  # padding entries point at block 0, masked below
    k = k_cache[blocks].reshape(batch, width * block_size, num_kv_heads, head_dim).to(compute_dtype)
    v = v_cache[blocks].reshape(batch, width * block_size, num_kv_heads, head_dim).to(compute_dtype)
    qg = q.to(compute_dtype).view(batch, num_kv_heads, group, head_dim)  # a group's heads share one K/V head
    scores = torch.einsum("bhgd,bnhd->bhgn", qg, k) * scale
    valid = torch.arange(width * block_size, device=q.device)[None, :] < lens[:, None]  # [B, n]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    v = v.masked_fill(~valid[:, :, None, None], 0.0)  # slots past a sequence may hold anything, even NaN
    result = torch.einsum("bhgn,bnhd->bhgd", probs, v).reshape(batch, num_heads, head_dim)
    if out is None:
        return result.to(q.dtype)
    return out.copy_(result)


def write_kv(key, value, k_cache, v_cache, slot_mapping):
    """key/value `[T, Hkv, D]` into the caches at flat slots `slot_mapping` `[T]` (negative: skipped)."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, num_kv_heads, head_dim)[slots] = key[keep].to(k_cache.dtype)
    v_cache.view(-1, num_kv_heads, head_dim)[slots] = value[keep].to(v_cache.dtype)


def rms_norm(x, weight, eps, residual=None, compute_dtype=torch.float32):
    """`x * rsqrt(mean(x^2) + eps) * weight` over the last dim; with `residual`, normalises x + residual and
    also returns that sum (the new residual)."""
    h = x.to(compute_dtype)
    if residual is not None:
        h = h + residual.to(compute_dtype)
    out = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.to(compute_dtype)
    if residual is None:
        return out.to(x.dtype)
    return out.to(x.dtype), h.to(x.dtype)


def rotary_embedding(positions, q, k, cos_sin_cache, is_neox=True):
    """In place on q `[T, Hq, D]` and k `[T, Hkv, D]`: rotate the first `rot_dim` dims of each head, where
    cos_sin_cache `[max_position, rot_dim]` holds cos in its first half and sin in its second."""
    rot = cos_sin_cache.shape[1]
    cs = cos_sin_cache[positions.long()].float()  # [T, rot]
    cos, sin = cs[:, None, : rot // 2], cs[:, None, rot // 2:]
    for x in (q, k):
        part = x[..., :rot].float()
        if is_neox:
            x1, x2 = part[..., : rot // 2], part[..., rot // 2:]
            x[..., :rot] = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)
        else:
            x1, x2 = part[..., 0::2], part[..., 1::2]
            x[..., :rot] = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).flatten(-2).to(x.dtype)
    return q, k


def silu_and_mul(x, compute_dtype=torch.float32):
    """`silu(x[..., :d]) * x[..., d:]` with d = x.shape[-1] // 2."""
    d = x.shape[-1] // 2
    h = x.to(compute_dtype)
    return (torch.nn.functional.silu(h[..., :d]) * h[..., d:]).to(x.dtype)
