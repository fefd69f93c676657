"""gpu_check section "kernels": paged_decode_attention at batch 1/16/64 x context 512/4096/32768 with
Llama-3-8B heads (32 query, 8 kv, head_dim 128), bf16, block 16. Timed with CUDA events, median of many runs,
rotating among copies of the cache that together exceed L2. Beside it: torch's scaled_dot_product_attention
on the same K/V gathered into contiguous tensors (the gather is not timed), and the device-to-device copy
bandwidth of the same run. Target at batch x context >= 16 x 4096: >= 70% of copy bandwidth, faster than SDPA.
"""
import math
import statistics

import torch

import tidal.kernels as K
from tidal.report import format_table

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16
CASES = [(b, c) for b in (1, 16, 64) for c in (512, 4096, 32768)]
ROTATE_BYTES = 512 << 20  # well over any L2 (50-60 MB on H100/H200)
TARGET = 0.7


def _time(fn_for, copies: int, runs: int) -> float:
    """Median seconds of fn_for(i % copies)() over `runs`, each bracketed by CUDA events."""
    fn_for(0)()
    torch.cuda.synchronize()
    times = []
    for i in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        fn = fn_for(i % copies)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def copy_bandwidth(nbytes=1 << 30) -> float:
    """Device-to-device copy GB/s, counting bytes read and written."""
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    return 2 * nbytes / _time(lambda i: (lambda: b.copy_(a)), 1, 20) / 1e9


def _case(batch, context, copies):
    blocks = math.ceil(context / BLOCK)
    caches = []
    for _ in range(copies):
        k = torch.randn(batch * blocks, BLOCK, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
        caches.append((k, torch.randn_like(k)))
    tables = torch.randperm(batch * blocks, device="cuda").view(batch, blocks).to(torch.int32)
    lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    return q, caches, tables, lens


def run(ctx) -> dict:
    if not torch.cuda.is_available():
        return {"table": "skipped: no CUDA device", "skipped": True}
    copy_gbps = copy_bandwidth()
    ctx.log(f"device copy: {copy_gbps:.0f} GB/s (read + write)")
    rows, results = [], []
    cases = CASES[:2] if ctx.quick else CASES
    for batch, context in cases:
        if ctx.seconds_left() < 10:
            ctx.log("time budget spent; stopping early")
            break
        kv_bytes = 2 * batch * context * KV_HEADS * HEAD_DIM * 2
        copies = max(1, min(8, math.ceil(ROTATE_BYTES / kv_bytes)))
        q, caches, tables, lens = _case(batch, context, copies)
        out = torch.empty_like(q)
        splits = K.choose_num_splits(batch, KV_HEADS, tables.shape[1],
                                     torch.cuda.get_device_properties(0).multi_processor_count)
        t_tidal = _time(lambda i: (lambda: K.paged_decode_attention(q, *caches[i], tables, lens, out=out,
                                                                   check_lens=False)), copies, 50)
        ref = K.reference.paged_decode_attention(q, *caches[0], tables, lens, HEAD_DIM ** -0.5)
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        del caches[1:]
        # SDPA on the same K/V, gathered contiguous: [B, Hkv, context, D]
        k, v = caches[0]
        kc = k[tables.long()].reshape(batch, -1, KV_HEADS, HEAD_DIM)[:, :context].transpose(1, 2).contiguous()
        vc = v[tables.long()].reshape(batch, -1, KV_HEADS, HEAD_DIM)[:, :context].transpose(1, 2).contiguous()
        qs = q[:, :, None, :]
        sdpa = lambda i: (lambda: torch.nn.functional.scaled_dot_product_attention(qs, kc, vc, enable_gqa=True))  # noqa: E731
        t_sdpa = _time(sdpa, 1, 50)
        nbytes = kv_bytes + 2 * q.numel() * 2
        gbps = nbytes / t_tidal / 1e9
        r = dict(batch=batch, context=context, splits=splits, tidal_us=t_tidal * 1e6, sdpa_us=t_sdpa * 1e6,
                 tidal_gbps=gbps, of_copy=gbps / copy_gbps, rel_err=err,
                 target_applies=batch * context >= 16 * 4096)
        r["target_met"] = (r["of_copy"] >= TARGET and t_tidal < t_sdpa) if r["target_applies"] else None
        results.append(r)
        rows.append([batch, context, splits, r["tidal_us"], r["sdpa_us"], gbps, f"{r['of_copy']:.0%}",
                     f"{t_sdpa / t_tidal:.2f}x", f"{err:.1e}",
                     {None: "", True: "met", False: "MISSED"}[r["target_met"]]])
        del q, caches, kc, vc, out
        torch.cuda.empty_cache()
    table = (f"device copy bandwidth (read + write): {copy_gbps:.0f} GB/s\n" +
             format_table(["batch", "context", "splits", "tidal us", "sdpa us", "tidal GB/s", "of copy",
                           "sdpa/tidal", "rel err", "target"], rows))
    return {"copy_gbps": copy_gbps, "rows": results, "table": table}
