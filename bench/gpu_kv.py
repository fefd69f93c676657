"""gpu_check section "kv": KV swap bandwidth for one sequence of 1k, 8k and 32k tokens with Llama-3-8B's KV
shape (32 layers, 8 kv heads, head_dim 128, bf16, block 16), tidal beside a per-block copy loop (bench_kv.py),
and the pinned copy bandwidth of one 1 GiB buffer measured in the same run. Target at 8k tokens: tidal at
>= gpu_report.KV_PINNED of the pinned bandwidth in each direction (out: D2H, in: H2D)."""
from __future__ import annotations

import torch

import gpu_plan
from bench_kv import HEADERS, measure, table_rows
from gpu_report import KV_PINNED
from tidal.measure import copy_bandwidth
from tidal.tables import format_table


def run(ctx) -> dict:
    g = gpu_plan.grid(gpu_plan.KV, ctx.quick)
    bw = copy_bandwidth(ctx.device, nbytes=(64 << 20) if ctx.quick else gpu_plan.GIB)
    peak = {"in": bw["h2d_gbps"], "out": bw["d2h_gbps"]}
    ctx.log(f"pinned copy: {peak['in']:.1f} GB/s H2D, {peak['out']:.1f} GB/s D2H")
    rows, skipped = [], []
    result = {"pinned_gbps": peak, "rows": rows, "skipped_tokens": skipped, "layers": g["layers"]}
    for tokens in g["tokens"]:
        est = gpu_plan.kv_tokens_s(g["layers"], tokens, g["reps"], ctx.rates)
        if not ctx.fits(est):
            skipped.append(tokens)
            continue
        rows += measure(ctx.device, g["layers"], tokens, reps=g["reps"])
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        ctx.log(f"{tokens} tokens done")
        ctx.progress(result)
    table = table_rows(rows)
    for r, t in zip(rows, table):
        t.append(f"{r['gbps'] / peak[r['direction']]:.0%}")
    at_8k = {r["direction"]: r["gbps"] / peak[r["direction"]] for r in rows
             if r["tokens"] == 8192 and r["kind"] == "tidal"}
    result["fraction_of_pinned_at_8k"] = at_8k
    text = format_table(HEADERS + ["of pinned"], table)
    text += (f"\n{g['layers']} layers; pinned copy, same run: {peak['in']:.1f} GB/s H2D (swap in), "
             f"{peak['out']:.1f} GB/s D2H (swap out)\n"
             f"target at 8k tokens, tidal >= {KV_PINNED:.0%} of pinned: "
             + (", ".join(f"{d} {f:.0%} {'MET' if f >= KV_PINNED else 'MISSED'}" for d, f in at_8k.items())
                or "not measured"))
    if skipped:
        text += f"\nnot run for time: {skipped} tokens"
    result["table"] = text
    return result
