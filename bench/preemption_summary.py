"""Preemption on this machine (issue 6): where the time of a preempt/resume round trip goes, and time to first
token after a pipelined against a full resume. Prints two tables.

    .venv/bin/python bench/preemption_summary.py [--quick] [--models SmolLM2-135M,Llama-3.2-1B] [--json FILE]

1. Breakdown. An engine with every decoder layer resident (resident_fraction 1.0), bf16, `batch` sequences of
   `context` tokens in its KV cache; `preempt(weights="host", kv="swap")` then `resume(pipelined=False)`. From
   the two reports: weight bytes and KV bytes, the seconds each took on the copy queue in each direction, and
   the KV share of the transfer time. The contexts are SYNTHETIC (preemption_runs.add_synthetic_context): the
   blocks are allocated and written without a prefill, because prefilling 16k tokens x 8 on a CPU takes far
   too long and what preemption moves does not depend on what the blocks hold. Cells whose estimated peak
   memory exceeds --max-gib are listed as not run.
2. Pipelined against full resume. Requests with a short real prompt, prefilled; rounds of one preempt +
   resume, the two modes interleaved (alternating which goes first); medians of time to first token and their
   ratio, at resident fractions 0, 0.5 (and 1.0: the case where the whole model is reloaded).

Reference bandwidths measured in the same run: the CPU backend's copy between two warm buffers
(tidal.measure.copy_bandwidth) and a copy into freshly allocated memory (what a resume does on the CPU
backend: its device regions and KV pool are new allocations, so every page is faulted in by the copy).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from preemption_runs import (BREAKDOWN_HEADERS, MODELS, TTFT_HEADERS, breakdown,  # noqa: E402
                             breakdown_table_rows, cached_shaped, describe, kv_pool_bytes,
                             shape_bytes, skipped_lines, ttft_rounds, ttft_table_rows)
from tidal.study.hf import free  # noqa: E402
from tidal.study.runs import warm_up  # noqa: E402

GIB = 1 << 30


def fresh_copy_gbps(nbytes: int = 256 << 20, reps: int = 3) -> float:
    """GB/s of allocating `nbytes` and copying a warm buffer into it (page faults included), median of
    `reps`."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        dst = torch.empty(nbytes, dtype=torch.uint8)
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
        del dst
    return nbytes / statistics.median(times) / 1e9


def peak_estimate(shape: dict, batch: int, context: int) -> int:
    """Bytes held at the peak of a round trip: weights on the "device" and parked on the host, the KV on both
    sides (the host pool, and the device pool resume allocates again)."""
    b = shape_bytes(shape)
    return 2 * b["weight_bytes"] + 2 * kv_pool_bytes(shape, [context] * batch)


def run_breakdown(name: str, contexts, batches, reps: int, max_bytes: int) -> list[dict]:
    import tidal

    shape = MODELS[name]
    cells = [(b, c) for c in contexts for b in batches]
    fits = [(b, c) for b, c in cells if peak_estimate(shape, b, c) <= max_bytes]
    rows = [dict(model=name, batch=b, context=c,
                 skipped=f"est. peak {peak_estimate(shape, b, c) / GIB:.1f} GiB > {max_bytes / GIB:.0f} GiB")
            for b, c in cells if (b, c) not in fits]
    if not fits:
        return rows
    path = cached_shaped(name)
    kv_bytes = max(kv_pool_bytes(shape, [c] * b) for b, c in fits)
    engine = tidal.Engine.from_pretrained(path, device="cpu", dtype=torch.bfloat16, resident_fraction=1.0,
                                          kv_cache_bytes=kv_bytes, host_kv_bytes=kv_bytes,
                                          max_batch_size=max(batches))
    try:
        warm_up(engine)
        for b, c in fits:
            t0 = time.perf_counter()
            rows.append(breakdown(engine, name, b, c, reps, warmup=0))
            print(f"  {name} batch {b} context {c}: {time.perf_counter() - t0:.1f} s", file=sys.stderr,
                  flush=True)
    finally:
        engine.close()
        del engine
        free("cpu")
    return rows


def run_ttft(name: str, fractions, batch: int, prompt_len: int, reps: int) -> list[dict]:
    import tidal

    path = cached_shaped(name)
    kv_bytes = kv_pool_bytes(MODELS[name], [prompt_len + 4 * reps + 16] * batch)
    rows = []
    for f in fractions:
        t0 = time.perf_counter()
        engine = tidal.Engine.from_pretrained(path, device="cpu", dtype=torch.bfloat16, resident_fraction=f,
                                              prefetch_depth=2, kv_cache_bytes=kv_bytes,
                                              host_kv_bytes=kv_bytes, max_batch_size=batch)
        try:
            rows.append(ttft_rounds(engine, name, f, batch, prompt_len, reps))
            rows[-1]["plan"] = str(engine.plan)
        finally:
            engine.close()
            del engine
            free("cpu")
        print(f"  {name} resident {f}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return rows


def crossover_lines(names) -> list[str]:
    out = []
    for name in names:
        b = shape_bytes(MODELS[name])
        tokens = b["weight_bytes"] / b["kv_per_token"]
        out.append(f"{name}: KV bytes equal the weight bytes at {tokens:,.0f} tokens in all "
                   f"(batch 1: {tokens:,.0f} tokens per sequence; batch 8: {tokens / 8:,.0f})")
    return out


def main(argv=None) -> int:
    from tidal.measure import copy_bandwidth
    from tidal.tables import format_table

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the small model, contexts 1k and 4k, one repeat")
    ap.add_argument("--models", default="SmolLM2-135M,Llama-3.2-1B", help=f"comma list of {sorted(MODELS)}")
    ap.add_argument("--contexts", default="1024,4096,16384")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--reps", type=int, default=3, help="round trips per breakdown cell (medians)")
    ap.add_argument("--fractions", default="0,0.5,1", help="resident fractions of the TTFT table")
    ap.add_argument("--ttft-batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--ttft-reps", type=int, default=4, help="rounds per mode (after one warm-up round)")
    ap.add_argument("--max-gib", type=float, default=8.0,
                    help="skip breakdown cells whose estimated peak memory exceeds it")
    ap.add_argument("--parts", default="breakdown,ttft")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--json", help="write every row to this file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.models, args.contexts, args.reps = "SmolLM2-135M", "1024,4096", 1
        args.fractions, args.ttft_reps = "0,0.5", 2
    names = args.models.split(",")
    contexts = [int(c) for c in args.contexts.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    fractions = [float(f) for f in args.fractions.split(",")]
    parts = args.parts.split(",")

    warm = copy_bandwidth("cpu", nbytes=256 << 20)
    fresh = fresh_copy_gbps()
    header = (f"{time.strftime('%Y-%m-%d %H:%M')}; {platform.machine()}, {os.cpu_count()} CPUs; "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads; CPU backend, bf16, block 16\n"
              f"copy bandwidth, same run: {warm['h2d_gbps']:.2f} GB/s between warm buffers (tidal.measure), "
              f"{fresh:.2f} GB/s into fresh memory (allocation and page faults included)\n"
              + "\n".join(describe(n) for n in names))
    print(header, flush=True)
    result = {"machine": header, "copy_gbps": warm, "fresh_copy_gbps": fresh, "breakdown": [], "ttft": []}
    if "breakdown" in parts:
        for name in names:
            result["breakdown"] += run_breakdown(name, contexts, batches, args.reps, int(args.max_gib * GIB))
        print("\n1. Breakdown: preempt(weights='host', kv='swap') + resume(pipelined=False), all layers "
              "resident; SYNTHETIC contexts (KV blocks allocated and written, not prefilled); "
              f"median of {args.reps}")
        print(format_table(BREAKDOWN_HEADERS, breakdown_table_rows(result["breakdown"])))
        print("\n".join(skipped_lines(result["breakdown"]) + crossover_lines(names)))
    if "ttft" in parts:
        for name in names:
            result["ttft"] += run_ttft(name, fractions, args.ttft_batch, args.prompt_len, args.ttft_reps)
        print(f"\n2. Time to first token after resume: pipelined against full (reload, then decode); "
              f"batch {args.ttft_batch}, {args.prompt_len}-token prompts; medians of {args.ttft_reps} "
              "interleaved rounds")
        print(format_table(TTFT_HEADERS, ttft_table_rows(result["ttft"])))
        print("overlap bound (est.): (full TTFT - min(reload copies, first step)) / full TTFT, from the full "
              "resume's own parts,\nwhat perfect overlap could reach; below resident 1.0 the first step also "
              "streams layers through the same copy queue")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
