"""The small fused ops of a Llama-family layer, in Triton: KV write, RMSNorm (+ residual), rotary,
SiLU-and-mul. Every load is cast to fp32 before arithmetic (the interpreter has no bf16 arithmetic; the GPU
loses nothing)."""
import triton
import triton.language as tl

from .launch import LaunchSpec


@triton.jit
def _write_kv(key_ptr, value_ptr,  # [T, Hkv, D], rows contiguous
              k_ptr, v_ptr,  # [N, BLOCK_SIZE, Hkv, D] contiguous
              slots_ptr,  # [T] int32/int64; negative = skip
              stride_key, stride_value,
              ROW: tl.constexpr, ROW_PAD: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    if slot >= 0:
        i = tl.arange(0, ROW_PAD)
        mask = i < ROW
        k = tl.load(key_ptr + t * stride_key + i, mask=mask)
        v = tl.load(value_ptr + t * stride_value + i, mask=mask)
        tl.store(k_ptr + slot * ROW + i, k.to(k_ptr.dtype.element_ty), mask=mask)
        tl.store(v_ptr + slot * ROW + i, v.to(v_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm(x_ptr, w_ptr, out_ptr, res_ptr, res_out_ptr, eps, n,
              HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK)
    mask = i < n
    x = tl.load(x_ptr + row * n + i, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(res_ptr + row * n + i, mask=mask, other=0.0).to(tl.float32)
        tl.store(res_out_ptr + row * n + i, x.to(res_out_ptr.dtype.element_ty), mask=mask)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n + eps)
    w = tl.load(w_ptr + i, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n + i, (x * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary(pos_ptr, x_ptr, cache_ptr,
            stride_xt, stride_xh, num_heads,
            stride_cache,
            HALF: tl.constexpr, HALF_PAD: tl.constexpr, HEADS_PAD: tl.constexpr, IS_NEOX: tl.constexpr):
    t = tl.program_id(0)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    j = tl.arange(0, HALF_PAD)
    h = tl.arange(0, HEADS_PAD)
    j_mask = j < HALF
    mask = (h < num_heads)[:, None] & j_mask[None, :]
    cos = tl.load(cache_ptr + pos * stride_cache + j, mask=j_mask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(cache_ptr + pos * stride_cache + HALF + j, mask=j_mask, other=0.0).to(tl.float32)[None, :]
    base = x_ptr + t * stride_xt + h[:, None] * stride_xh
    if IS_NEOX:
        off1, off2 = j[None, :], j[None, :] + HALF
    else:
        off1, off2 = 2 * j[None, :], 2 * j[None, :] + 1
    x1 = tl.load(base + off1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + off2, mask=mask, other=0.0).to(tl.float32)
    tl.store(base + off1, (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(base + off2, (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_and_mul(x_ptr, out_ptr, d, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = i < d
    a = tl.load(x_ptr + row * 2 * d + i, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(x_ptr + row * 2 * d + d + i, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * d + i, (a / (1.0 + tl.exp(-a)) * b).to(out_ptr.dtype.element_ty), mask=mask)


# The launch of each kernel, which tidal.kernels runs and tests/test_kernels_compile.py compiles for the GPU.
def write_kv_launch(key, value, k_cache, v_cache, slot_mapping):
    row = k_cache.shape[2] * k_cache.shape[3]
    return LaunchSpec(_write_kv, (key.shape[0],),
                      (key, value, k_cache, v_cache, slot_mapping, key.stride(0), value.stride(0)),
                      dict(ROW=row, ROW_PAD=triton.next_power_of_2(row)))


def rms_norm_launch(x, weight, eps, residual, out, residual_out):
    n = x.shape[-1]
    return LaunchSpec(_rms_norm, (x.numel() // max(n, 1),),
                      (x, weight, out, residual if residual is not None else x,
                       residual_out if residual_out is not None else out, eps, n),
                      dict(HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(n)))


def rotary_launch(positions, x, cos_sin_cache, is_neox):
    num_tokens, num_heads, _ = x.shape
    half = cos_sin_cache.shape[1] // 2
    return LaunchSpec(_rotary, (num_tokens,),
                      (positions, x, cos_sin_cache, x.stride(0), x.stride(1), num_heads,
                       cos_sin_cache.stride(0)),
                      dict(HALF=half, HALF_PAD=triton.next_power_of_2(half),
                           HEADS_PAD=triton.next_power_of_2(num_heads), IS_NEOX=is_neox))


def silu_and_mul_launch(x, out):
    d = x.shape[-1] // 2
    rows = x.numel() // max(2 * d, 1)
    block = min(1024, triton.next_power_of_2(d))
    return LaunchSpec(_silu_and_mul, (rows, triton.cdiv(d, block)), (x, out, d), dict(BLOCK=block))
