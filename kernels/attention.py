"""Paged decode attention in Triton: split-K over the sequence, then a log-sum-exp merge.

Stage 1 runs one program per (sequence, kv head, split). The query heads of the kv head's group form one
`[GROUP_PAD, D]` tile (padded to 16 rows, tl.dot's smallest M), so each K/V tile is read once for the whole
group and both products run on tensor cores. A tile spans TILE tokens (64, or 32 for wide rows) so that
each iteration keeps enough loads in flight; each token looks its block up in the table, so a tile may cross
blocks or cover part of one, and its shape never depends on the block size (any size works, shared memory
stays bounded). Tokens past the sequence or past the split are masked, never read. With one split, stage 1
writes the normalised output; otherwise it writes a partial output and its log-sum-exp, and stage 2 merges
the splits.

Every tl.dot dimension is at least MIN_DOT: the group's rows (GROUP_PAD), the head dim (D_PAD: K of q.K^T, N
of p.V) and the tile (TILE). The interpreter accepts smaller ones; the GPU compiler does not.
"""
import torch
import triton
import triton.language as tl

from .launch import LaunchSpec

MIN_DOT = 16  # the smallest tl.dot dimension every target accepts (K >= 16 for 16-bit inputs on NVIDIA)
TILE_TOKENS = 64  # tokens per stage-1 iteration; halved when a token's row of K is over 256 bytes, so that
# the pipelined K and V tiles stay well inside shared memory


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    # fp32 operands need "ieee": the default (tf32) keeps 10 mantissa bits, too few for fp32's tolerance
    if IEEE:
        c = tl.dot(a, b, input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


@triton.jit
def _decode_stage1(
    q_ptr,  # [B, Hq, D], q dtype, unit stride in D
    k_ptr, v_ptr,  # [N, BLOCK_SIZE, Hkv, D] each, contiguous
    tables_ptr,  # [B, max_blocks] int32/int64
    lens_ptr,  # [B] int32/int64
    out_ptr,  # DIRECT: [B, Hq, D] out dtype; else partials [B, Hq, S, D] fp32
    lse_ptr,  # [B, Hq, S] fp32 (unused when DIRECT)
    scale,
    stride_qb, stride_qh,
    stride_ob, stride_oh,  # of the output when DIRECT
    stride_tb,
    stride_kn, stride_kt, stride_kh,
    blocks_per_split,
    num_splits,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr,  # TILE: tokens per iteration, a power of two >= MIN_DOT
    DIRECT: tl.constexpr,
    DOT_FP32: tl.constexpr,  # products in fp32: fp32 inputs, or bf16 in the interpreter (numpy has no bf16)
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(lens_ptr + b).to(tl.int32)
    first = split * blocks_per_split * BLOCK_SIZE  # the split's first token
    end = tl.minimum(first + blocks_per_split * BLOCK_SIZE, seq_len)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D_PAD)
    j = tl.arange(0, TILE)
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    heads = kvh * GROUP + g
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # [GROUP_PAD, D_PAD]
    if DOT_FP32:
        q = q.to(tl.float32)

    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
    for start in range(first, end, TILE):
        token = start + j  # [TILE]
        t_mask = token < end
        slot = token % BLOCK_SIZE
        block = tl.load(tables_ptr + b * stride_tb + token // BLOCK_SIZE, mask=t_mask, other=0).to(tl.int64)
        kv_off = block[:, None] * stride_kn + slot[:, None] * stride_kt + kvh * stride_kh + d[None, :]
        kv_mask = t_mask[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0)  # [TILE, D_PAD]
        v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
        s = _dot(q, tl.trans(k), DOT_FP32) * scale  # [GROUP_PAD, TILE]
        s = tl.where(t_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: token `start` is in the sequence
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        p_op = p.to(v_ptr.dtype.element_ty)  # rounded as the GPU's fp16/bf16 product rounds it
        if DOT_FP32:
            p_op = p_op.to(tl.float32)
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + _dot(p_op, v, DOT_FP32)
        m = m_new

    out_mask = g_mask[:, None] & d_mask[None, :]
    has = l > 0  # false only for an empty split
    o = acc / tl.where(has, l, 1.0)[:, None]
    if DIRECT:
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        row = (b * GROUP * tl.num_programs(1) + heads) * num_splits + split  # [GROUP_PAD]
        tl.store(out_ptr + row[:, None] * HEAD_DIM + d[None, :], o, mask=out_mask)
        lse = tl.where(has, m + tl.log(tl.where(has, l, 1.0)), float("-inf"))
        tl.store(lse_ptr + row, lse, mask=g_mask)


@triton.jit
def _decode_merge(
    part_ptr,  # [B, Hq, S, D] fp32
    lse_ptr,  # [B, Hq, S] fp32
    out_ptr,  # [B, Hq, D] out dtype
    stride_ob, stride_oh,
    num_splits,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, S_PAD: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    row = b * tl.num_programs(1) + h
    s = tl.arange(0, S_PAD)
    d = tl.arange(0, D_PAD)
    s_mask = s < num_splits
    d_mask = d < HEAD_DIM
    lse = tl.load(lse_ptr + row * num_splits + s, mask=s_mask, other=float("-inf"))
    top = tl.max(lse, axis=0)  # finite: split 0 always holds the first token
    w = tl.where(s_mask, tl.exp(lse - top), 0.0)
    part = tl.load(part_ptr + (row * num_splits + s)[:, None] * HEAD_DIM + d[None, :],
                   mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    o = tl.sum(w[:, None] * part, axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, o.to(out_ptr.dtype.element_ty), mask=d_mask)


# One paged decode's launches (stage 1, then the merge when split), which `paged_decode_attention` runs and
# tests/test_kernels_compile.py compiles for the GPU, so that the two cannot drift. The split partials are
# allocated on q's device: meta tensors work.
def launches(q, k_cache, v_cache, block_tables, seq_lens, scale, out, num_splits, interpreted):
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    blocks_per_split = triton.cdiv(block_tables.shape[1], num_splits)
    d_pad = max(triton.next_power_of_2(head_dim), MIN_DOT)
    tile = TILE_TOKENS if d_pad * q.element_size() <= 256 else TILE_TOKENS // 2
    direct = num_splits == 1
    if direct:
        part, lse = out, out  # lse unused
    else:
        part = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
    stage1 = LaunchSpec(
        _decode_stage1, (batch, num_kv_heads, num_splits),
        (q, k_cache, v_cache, block_tables, seq_lens, part, lse, scale,
         q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
         k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), blocks_per_split, num_splits),
        dict(GROUP=group, GROUP_PAD=max(triton.next_power_of_2(group), MIN_DOT),
             HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_SIZE=block_size, TILE=tile, DIRECT=direct,
             DOT_FP32=q.dtype == torch.float32 or (interpreted and q.dtype == torch.bfloat16)),
        num_warps=4, num_stages=2)
    if direct:
        return [stage1]
    merge = LaunchSpec(_decode_merge, (batch, num_heads),
                       (part, lse, out, out.stride(0), out.stride(1), num_splits),
                       dict(HEAD_DIM=head_dim, D_PAD=d_pad, S_PAD=triton.next_power_of_2(num_splits)))
    return [stage1, merge]
