"""tidal.kernels: decode kernels in Triton, each with a torch reference (kernels/reference.py).

Which implementation runs is a pure function of the tensor and the environment, named by `path_for`:
CUDA tensors take the Triton kernels. CPU tensors take the Triton kernels through Triton's interpreter when
TRITON_INTERPRET=1 is set, which is how this code is tested without a GPU, and the torch reference
otherwise. The Triton modules are imported on first use, because Triton reads TRITON_INTERPRET when a kernel
is defined: set it before the first call that needs it.
"""
from __future__ import annotations

import math
import os

import torch

from . import checks, reference

PAD_SLOT_ID = -1  # a slot_mapping entry write_kv skips
INTERPRETER_SMS = 4  # stands in for the multiprocessor count when the kernels run in the interpreter
MIN_BLOCKS_PER_SPLIT = 4  # a split shorter than this costs more in merging than it gains in parallelism
MAX_SPLITS = 64

__all__ = ["path_for", "resolve_path", "paged_decode_attention", "choose_num_splits", "write_kv", "rms_norm",
           "rotary_embedding", "silu_and_mul", "PAD_SLOT_ID", "reference"]


def path_for(t: torch.Tensor) -> str:
    """"triton" (CUDA), "triton-interpreter" (CPU with TRITON_INTERPRET=1) or "reference" (CPU otherwise)."""
    if t.device.type == "cuda":
        return "triton"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "triton-interpreter"
    return "reference"


def resolve_path(t: torch.Tensor, path: str | None = None) -> str:
    """The path a call on tensor `t` takes, as `path_for` names it. `path=None` lets the tensor and the
    environment decide; "reference" forces the torch reference (an engine that must not take the slow
    interpreter on CPU tensors passes it); "triton" forces the Triton kernels and raises BackendError where
    nothing can run them (a CPU tensor without TRITON_INTERPRET=1)."""
    from tidal.errors import BackendError, ConfigError

    natural = path_for(t)
    if path is None:
        return natural
    if path == "reference":
        return path
    if path != "triton":
        raise ConfigError(f"path={path!r}: expected None, 'triton' or 'reference'")
    if natural == "reference":
        raise BackendError(f"path='triton' for a {t.device} tensor: Triton runs CPU tensors only through its "
                           "interpreter, with TRITON_INTERPRET=1 set before Python starts")
    return natural


def _triton(name: str):
    """Import a Triton kernel module, checking that Triton can run it on this path."""
    import importlib

    module = importlib.import_module(f"{__name__}.{name}")
    if os.environ.get("TRITON_INTERPRET") == "1":
        import triton.language as tl
        from triton.runtime.jit import JITFunction

        if isinstance(tl.sum, JITFunction):  # Triton's library was defined before the variable was set
            from tidal.errors import BackendError

            raise BackendError("TRITON_INTERPRET=1 was set after Triton had been imported (torch._inductor "
                               "imports it); set it before Python starts to run the kernels on CPU tensors")
    return module


def choose_num_splits(batch: int, num_kv_heads: int, max_blocks: int, num_sms: int) -> int:
    """Splits of the sequence so that batch x kv heads x splits programs fill about two waves of the device's
    multiprocessors, with at least MIN_BLOCKS_PER_SPLIT blocks in each split. Uses the block table's width,
    not the lengths, so it needs no device-to-host read."""
    programs = batch * num_kv_heads
    wanted = math.ceil(2 * num_sms / programs)
    most = max(1, math.ceil(max_blocks / MIN_BLOCKS_PER_SPLIT))
    return max(1, min(wanted, most, MAX_SPLITS))


def _num_sms(t: torch.Tensor) -> int:
    if t.device.type == "cuda":
        return torch.cuda.get_device_properties(t.device).multi_processor_count
    return INTERPRETER_SMS


def paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale=None, out=None, *,
                           num_splits: int | None = None, check_lens: bool = True, path: str | None = None):
    """Attention of one new query token per sequence over its paged K/V.

    q `[batch, num_heads, head_dim]`; k_cache, v_cache `[num_blocks, block_size, num_kv_heads, head_dim]`
    (contiguous; num_heads a multiple of num_kv_heads); block_tables `[batch, max_blocks]` int32; seq_lens
    `[batch]` int32, each in [1, max_blocks x block_size]. fp16, bf16 or fp32, accumulated in fp32. Returns
    `[batch, num_heads, head_dim]` in q's dtype (into `out` if given). `scale` defaults to head_dim ** -0.5.
    `num_splits` forces the split-K factor (1: no split); by default `choose_num_splits`. `check_lens=False`
    skips the length check, which reads seq_lens on the host (a sync on CUDA), for callers that built them.
    `path` as in `resolve_path` (None: `path_for(q)`).
    """
    checks.paged_decode(q, k_cache, v_cache, block_tables, seq_lens, out)
    if check_lens:
        checks.seq_lens_fit(seq_lens, block_tables, k_cache.shape[1])
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int)
                                   or not 1 <= num_splits <= MAX_SPLITS):
        raise checks.ShapeError(f"num_splits={num_splits!r} must be an int in [1, {MAX_SPLITS}]")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    taken = resolve_path(q, path)
    if taken == "reference":
        return reference.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, out)
    attention = _triton("attention")
    if q.stride(-1) != 1:
        q = q.contiguous()
    out = torch.empty_like(q, memory_format=torch.contiguous_format) if out is None else out
    splits = num_splits or choose_num_splits(q.shape[0], k_cache.shape[2], block_tables.shape[1], _num_sms(q))
    for spec in attention.launches(q, k_cache, v_cache, block_tables, seq_lens, scale, out, splits,
                                   interpreted=taken == "triton-interpreter"):
        spec.run()
    return out


def write_kv(key, value, k_cache, v_cache, slot_mapping, *, path: str | None = None) -> None:
    """Scatter new tokens' key/value `[num_tokens, num_kv_heads, head_dim]` into the paged caches
    `[num_blocks, block_size, num_kv_heads, head_dim]` at flat slots `slot_mapping` `[num_tokens]`
    (block * block_size + offset; PAD_SLOT_ID entries are skipped). Slots are not range-checked (that would
    read them on the host). `path` as in `resolve_path`."""
    for name, t in (("key", key), ("value", value)):
        checks.rank(name, t, 3)
    checks.rank("k_cache", k_cache, 4)
    checks.rank("v_cache", v_cache, 4)
    checks.rank("slot_mapping", slot_mapping, 1)
    checks.same_device(key=key, value=value, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)
    checks.same_dtype(key=key, value=value, k_cache=k_cache, v_cache=v_cache)
    checks.integer("slot_mapping", slot_mapping)
    if key.shape != value.shape or key.shape[1:] != k_cache.shape[2:] or k_cache.shape != v_cache.shape:
        raise checks.ShapeError(f"key {tuple(key.shape)}, value {tuple(value.shape)}, k_cache "
                                f"{tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)} do not agree")
    if slot_mapping.shape[0] != key.shape[0]:
        raise checks.ShapeError(f"slot_mapping {tuple(slot_mapping.shape)} for {key.shape[0]} tokens")
    checks.contiguous("k_cache", k_cache)
    checks.contiguous("v_cache", v_cache)
    if resolve_path(key, path) == "reference":
        return reference.write_kv(key, value, k_cache, v_cache, slot_mapping)
    elementwise = _triton("elementwise")

    # the kernel walks each token's [Hkv, D] row with unit stride; tokens may be strided
    key, value = (t if t[0:1].is_contiguous() else t.contiguous() for t in (key, value))
    elementwise.write_kv_launch(key, value, k_cache, v_cache, slot_mapping).run()


def rms_norm(x, weight, eps: float, residual=None, *, path: str | None = None):
    """RMSNorm over the last dim of `x` `[..., hidden]` with `weight` `[hidden]`. With `residual` (same shape
    as x) it normalises x + residual and returns (out, x + residual). fp16/bf16/fp32, computed in fp32;
    outputs in x's dtype. `path` as in `resolve_path`."""
    checks.floating("x", x)
    checks.floating("weight", weight)
    checks.same_device(x=x, weight=weight, **({} if residual is None else {"residual": residual}))
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise checks.ShapeError(f"weight {tuple(weight.shape)} for x {tuple(x.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise checks.ShapeError(f"residual {tuple(residual.shape)} {residual.dtype} for x {tuple(x.shape)} "
                                f"{x.dtype}")
    if resolve_path(x, path) == "reference":
        return reference.rms_norm(x, weight, eps, residual)
    elementwise = _triton("elementwise")

    x = x.contiguous()
    residual = None if residual is None else residual.contiguous()
    out = torch.empty_like(x)
    residual_out = None if residual is None else torch.empty_like(x)
    elementwise.rms_norm_launch(x, weight.contiguous(), float(eps), residual, out, residual_out).run()
    return out if residual is None else (out, residual_out)


def rotary_embedding(positions, q, k, cos_sin_cache, is_neox: bool = True, *, path: str | None = None):
    """Rotate q `[num_tokens, num_heads, head_dim]` and k `[num_tokens, num_kv_heads, head_dim]` in place at
    `positions` `[num_tokens]`; cos_sin_cache `[max_position, rot_dim]` is cos then sin, rot_dim <= head_dim.
    `is_neox` rotates halves (Llama, Qwen2, Mistral); otherwise interleaved pairs (GPT-J). Returns (q, k).
    `path` as in `resolve_path`."""
    checks.rank("q", q, 3)
    checks.rank("k", k, 3)
    checks.rank("positions", positions, 1)
    checks.rank("cos_sin_cache", cos_sin_cache, 2)
    checks.same_device(positions=positions, q=q, k=k, cos_sin_cache=cos_sin_cache)
    checks.integer("positions", positions)
    checks.floating("q", q)
    checks.floating("k", k)
    rot = cos_sin_cache.shape[1]
    tokens_agree = positions.shape[0] == q.shape[0] == k.shape[0]
    if rot % 2 or rot > q.shape[2] or q.shape[2] != k.shape[2] or not tokens_agree:
        shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, cos_sin_cache {tuple(cos_sin_cache.shape)}"
        raise checks.ShapeError(f"positions {tuple(positions.shape)}, {shapes} do not agree")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise checks.ShapeError(f"q and k need a unit stride in head_dim, got {q.stride()} and {k.stride()}")
    if resolve_path(q, path) == "reference":
        return reference.rotary_embedding(positions, q, k, cos_sin_cache, is_neox)
    elementwise = _triton("elementwise")

    for x in (q, k):
        elementwise.rotary_launch(positions, x, cos_sin_cache.contiguous(), is_neox).run()
    return q, k


def silu_and_mul(x, *, path: str | None = None):
    """`silu(x[..., :d]) * x[..., d:]` for x `[..., 2 * d]` fp16/bf16/fp32; returns `[..., d]` in x's dtype.
    `path` as in `resolve_path`."""
    checks.floating("x", x)
    if x.shape[-1] % 2:
        raise checks.ShapeError(f"x's last dim must be even, got {tuple(x.shape)}")
    if resolve_path(x, path) == "reference":
        return reference.silu_and_mul(x)
    elementwise = _triton("elementwise")

    x = x.contiguous()
    out = torch.empty(*x.shape[:-1], x.shape[-1] // 2, dtype=x.dtype, device=x.device)
    elementwise.silu_and_mul_launch(x, out).run()
    return out
