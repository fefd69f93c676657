"""Input checks run before any launch; each failure names the argument and the shapes."""
from __future__ import annotations

import torch

from tidal.errors import ShapeError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _desc(t) -> str:
    return f"{tuple(t.shape)} {t.dtype} on {t.device}"


def rank(name, t, n):
    if not isinstance(t, torch.Tensor):
        raise ShapeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() != n:
        raise ShapeError(f"{name} must have {n} dims, got {_desc(t)}")


def same_device(**tensors):
    if len({t.device for t in tensors.values()}) > 1:
        listed = ", ".join(f"{n} {_desc(t)}" for n, t in tensors.items())
        raise ShapeError(f"tensors on different devices: {listed}")


def same_dtype(**tensors):
    listed = ", ".join(f"{n} {_desc(t)}" for n, t in tensors.items())
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) > 1:
        raise ShapeError(f"mismatched dtypes: {listed}")
    if dtypes.pop() not in FLOAT_DTYPES:
        raise ShapeError(f"dtype unsupported (use fp16, bf16 or fp32): {listed}")


def floating(name, t):
    if not isinstance(t, torch.Tensor) or t.dim() < 1 or t.dtype not in FLOAT_DTYPES:
        got = _desc(t) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ShapeError(f"{name} must be an fp16, bf16 or fp32 tensor with at least 1 dim, got {got}")


def integer(name, t):
    if t.dtype not in (torch.int32, torch.int64):
        raise ShapeError(f"{name} must be int32 or int64, got {_desc(t)}")


def contiguous(name, t):
    if not t.is_contiguous():
        raise ShapeError(f"{name} must be contiguous, got {_desc(t)} with strides {t.stride()}")


def paged_decode(q, k_cache, v_cache, block_tables, seq_lens, out):
    rank("q", q, 3)
    rank("k_cache", k_cache, 4)
    rank("v_cache", v_cache, 4)
    rank("block_tables", block_tables, 2)
    rank("seq_lens", seq_lens, 1)
    same_device(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables, seq_lens=seq_lens)
    same_dtype(q=q, k_cache=k_cache, v_cache=v_cache)
    if k_cache.shape != v_cache.shape:
        raise ShapeError(f"k_cache {_desc(k_cache)} and v_cache {_desc(v_cache)} differ")
    contiguous("k_cache", k_cache)
    contiguous("v_cache", v_cache)
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, kv_dim = k_cache.shape
    if kv_dim != head_dim:
        raise ShapeError(f"q head_dim {head_dim} but k_cache {_desc(k_cache)}")
    if num_heads % num_kv_heads:
        raise ShapeError(f"q {_desc(q)} has {num_heads} heads, not a multiple of the {num_kv_heads} kv heads "
                         f"of k_cache {_desc(k_cache)}")
    if block_tables.shape[0] != batch or seq_lens.shape[0] != batch:
        raise ShapeError(f"batch {batch} from q, block_tables {_desc(block_tables)}, "
                         f"seq_lens {_desc(seq_lens)}")
    integer("block_tables", block_tables)
    integer("seq_lens", seq_lens)
    if out is not None:
        if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
            raise ShapeError(f"out must match q {_desc(q)}, got {_desc(out)}")
        contiguous("out", out)


def seq_lens_fit(seq_lens, block_tables, block_size):
    """Needs the lengths on the host: a sync on CUDA, so the public function does it only when asked."""
    capacity = block_tables.shape[1] * block_size
    lens = seq_lens.tolist()
    for i, n in enumerate(lens):
        if not 1 <= n <= capacity:
            raise ShapeError(f"seq_lens[{i}]={n} outside [1, {capacity}]: "
                             f"block_tables {tuple(block_tables.shape)} x block_size {block_size}")
