"""Kernel benchmarks, reporting achieved GB/s (bytes of K/V and q read plus output written, over time).
On a machine without a GPU these time the torch reference path (what CPU tensors take); on a GPU, Triton.

    .venv/bin/python -m pytest bench/bench_kernels.py --benchmark-only
"""
import pytest
import torch

import tidal.kernels as K

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


def _paged(batch, context, num_heads=32, num_kv_heads=8, head_dim=128, block_size=16):
    blocks = (context + block_size - 1) // block_size
    k = torch.randn(batch * blocks, block_size, num_kv_heads, head_dim, dtype=DTYPE, device=DEVICE)
    v = torch.randn_like(k)
    tables = torch.randperm(batch * blocks, device=DEVICE).view(batch, blocks).to(torch.int32)
    lens = torch.full((batch,), context, dtype=torch.int32, device=DEVICE)
    q = torch.randn(batch, num_heads, head_dim, dtype=DTYPE, device=DEVICE)
    nbytes = 2 * batch * context * num_kv_heads * head_dim * k.element_size() + 2 * q.numel() * q.element_size()
    return (q, k, v, tables, lens), nbytes


def _gbps(benchmark, nbytes):
    benchmark.extra_info["path"] = K.path_for(torch.empty(1, device=DEVICE))
    if benchmark.stats is not None:
        benchmark.extra_info["GB/s"] = round(nbytes / benchmark.stats.stats.median / 1e9, 2)


@pytest.mark.benchmark(group="paged_decode_attention (32/8 heads, d128)")
@pytest.mark.parametrize("batch, context", [(1, 512), (1, 4096), (8, 4096)])
def bench_paged_decode(benchmark, batch, context):
    args, nbytes = _paged(batch, context)
    out = torch.empty_like(args[0])
    benchmark.pedantic(lambda: K.paged_decode_attention(*args, out=out, check_lens=False), rounds=10, warmup_rounds=1)
    _gbps(benchmark, nbytes)


@pytest.mark.benchmark(group="small ops")
@pytest.mark.parametrize("op", ["rms_norm", "rms_norm+residual", "silu_and_mul", "rotary", "write_kv"])
def bench_small_op(benchmark, op):
    tokens, hidden, heads, kv_heads, head_dim = 256, 4096, 32, 8, 128
    x = torch.randn(tokens, hidden, dtype=DTYPE, device=DEVICE)
    if op.startswith("rms_norm"):
        w, r = torch.randn(hidden, dtype=DTYPE, device=DEVICE), (x.clone() if "residual" in op else None)
        fn, nbytes = (lambda: K.rms_norm(x, w, 1e-6, r)), x.numel() * x.element_size() * (4 if r is not None else 2)
    elif op == "silu_and_mul":
        y = torch.randn(tokens, 2 * 14336, dtype=DTYPE, device=DEVICE)
        fn, nbytes = (lambda: K.silu_and_mul(y)), y.numel() * y.element_size() * 3 // 2
    elif op == "rotary":
        q = torch.randn(tokens, heads, head_dim, dtype=DTYPE, device=DEVICE)
        k = torch.randn(tokens, kv_heads, head_dim, dtype=DTYPE, device=DEVICE)
        cache = torch.randn(8192, head_dim, dtype=torch.float32, device=DEVICE)
        pos = torch.randint(0, 8192, (tokens,), device=DEVICE)
        fn, nbytes = (lambda: K.rotary_embedding(pos, q, k, cache)), 2 * (q.numel() + k.numel()) * q.element_size()
    else:
        kc = torch.empty(1024, 16, kv_heads, head_dim, dtype=DTYPE, device=DEVICE)
        vc, key = torch.empty_like(kc), torch.randn(tokens, kv_heads, head_dim, dtype=DTYPE, device=DEVICE)
        slots = torch.randperm(1024 * 16, device=DEVICE)[:tokens].to(torch.int32)
        fn, nbytes = (lambda: K.write_kv(key, key, kc, vc, slots)), 4 * key.numel() * key.element_size()
    benchmark.pedantic(fn, rounds=20, warmup_rounds=2)
    _gbps(benchmark, nbytes)
