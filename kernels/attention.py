"""Paged decode attention in Triton: split-K over the sequence, then a log-sum-exp merge.

Stage 1 runs one program per (sequence, kv head, split). It loads the query heads of the kv head's group as
one [GROUP, D] tile, so each K/V block tile is read once for the whole group. It walks its share of the
sequence's blocks with an online softmax. With one split it writes the normalised output directly; otherwise
it writes a partial output and its log-sum-exp, and stage 2 merges the splits.
"""
import triton
import triton.language as tl


@triton.jit
def _decode_stage1(
    q_ptr,  # [B, Hq, D], q dtype
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
    BLOCK_SIZE: tl.constexpr,
    DIRECT: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(lens_ptr + b).to(tl.int32)
    n_blocks = (seq_len + BLOCK_SIZE - 1) // BLOCK_SIZE
    first = split * blocks_per_split
    last = tl.minimum(first + blocks_per_split, n_blocks)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D_PAD)
    t = tl.arange(0, BLOCK_SIZE)
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    heads = kvh * GROUP + g
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)

    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
    for blk in range(first, last):
        block = tl.load(tables_ptr + b * stride_tb + blk).to(tl.int64)
        t_mask = blk * BLOCK_SIZE + t < seq_len
        kv_off = block * stride_kn + t[:, None] * stride_kt + kvh * stride_kh + d[None, :]
        kv_mask = t_mask[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)  # [BLOCK_SIZE, D_PAD]
        v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [GROUP_PAD, BLOCK_SIZE]
        s = tl.where(t_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: every visited block holds a token
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new

    out_mask = g_mask[:, None] & d_mask[None, :]
    has = l > 0
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


def launch(q, k_cache, v_cache, block_tables, seq_lens, scale, out, num_splits):
    import torch

    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    max_blocks = block_tables.shape[1]
    blocks_per_split = triton.cdiv(max_blocks, num_splits)
    direct = num_splits == 1
    if direct:
        part, lse = out, out  # lse unused
    else:
        part = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
    d_pad = triton.next_power_of_2(head_dim)
    _decode_stage1[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, part, lse, scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        blocks_per_split, num_splits,
        GROUP=group, GROUP_PAD=max(triton.next_power_of_2(group), 1), HEAD_DIM=head_dim, D_PAD=d_pad,
        BLOCK_SIZE=block_size, DIRECT=direct,
    )
    if not direct:
        _decode_merge[(batch, num_heads)](
            part, lse, out, out.stride(0), out.stride(1), num_splits,
            HEAD_DIM=head_dim, D_PAD=d_pad, S_PAD=triton.next_power_of_2(num_splits),
        )
    return out
