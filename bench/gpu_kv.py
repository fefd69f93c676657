"""gpu_check section "kv": KV swap bandwidth for one sequence of 1k, 8k and 32k tokens with Llama-3-8B's KV
shape (32 layers, 8 kv heads, head_dim 128, bf16, block 16), tidal beside a per-block copy loop, and the
pinned copy bandwidth of one large buffer measured in the same run. Target at 8k tokens: tidal reaches at
least 80% of the pinned bandwidth in each direction."""
from __future__ import annotations

import torch

from bench_kv import HEADERS, measure, table_rows
from tidal.measure import copy_bandwidth
from tidal.report import format_table

LAYERS = 32
TARGET = 0.8


def run(ctx) -> dict:
    bw = copy_bandwidth(ctx.device)
    peak = {"in": bw["h2d_gbps"], "out": bw["d2h_gbps"]}
    ctx.log(f"pinned copy: {peak['in']:.1f} GB/s H2D, {peak['out']:.1f} GB/s D2H")
    sizes = [1024, 8192] if ctx.quick else [1024, 8192, 32768]
    rows, skipped = [], []
    for tokens in sizes:
        # a 32k sequence is 4.3 GB: pool, host pool and staging take ~15 s to set up and pin
        if ctx.seconds_left() < (25 if tokens > 8192 else 8):
            skipped.append(tokens)
            continue
        rows += measure(ctx.device, LAYERS, tokens, reps=3)
        torch.cuda.empty_cache()
        ctx.log(f"{tokens} tokens done")
    table = table_rows(rows)
    for r, t in zip(rows, table):
        t.append(f"{r['gbps'] / peak[r['direction']]:.0%}")
    at_8k = {r["direction"]: r["gbps"] / peak[r["direction"]] for r in rows
             if r["tokens"] == 8192 and r["kind"] == "tidal"}
    verdict = {d: f >= TARGET for d, f in at_8k.items()}
    text = format_table(HEADERS + ["of pinned"], table)
    text += (f"\npinned copy, same run: {peak['in']:.1f} GB/s H2D (swap in), {peak['out']:.1f} GB/s D2H (swap out)"
             f"\ntarget at 8k tokens, tidal >= {TARGET:.0%} of pinned: "
             + ", ".join(f"{d} {at_8k[d]:.0%} {'met' if ok else 'MISSED'}" for d, ok in verdict.items()))
    if skipped:
        text += f"\nskipped for time: {skipped} tokens"
    return {"table": text, "pinned_gbps": peak, "rows": rows, "fraction_of_pinned_at_8k": at_8k,
            "target_met": verdict, "skipped_tokens": skipped}
