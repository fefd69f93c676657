"""gpu_check section "preemption" (issue 6): where a preempt/resume round trip's time goes on the GPU, and
time to first token after a pipelined against a full resume, for Llama-3.2-1B- and Llama-3-8B-shaped models.

Checkpoints: random weights, bf16, written tensor by tensor (shaped_checkpoint.py, with room for 32k
positions) into a temporary directory, deleted afterwards. Measured in the same run: the pinned
host-to-device bandwidth of one 1 GiB copy (tidal.measure.copy_bandwidth).

1. Breakdown (preemption_runs.breakdown): every layer resident, `preempt(weights="host", kv="swap")` then
   `resume(pipelined=False)`, batch 1 and 8 x SYNTHETIC contexts of 1k, 4k and 16k tokens (KV blocks allocated
   and written, not prefilled). Target: the weight reload at >= 90% of the pinned H2D bandwidth.
2. Pipelined against full resume (preemption_runs.ttft_rounds): one request with a 16-token prompt,
   interleaved rounds, at resident fractions 0 (target: pipelined TTFT <= 1/2 of reload-then-decode), 0.5
   and 1.0. Pipelined TTFT is at least max(copies, compute) and full TTFT is their sum, so the ratio cannot
   go below 1/2; each row's "overlap bound (est.)" says how close perfect overlap could get.

Time: the section fits `ctx.seconds_left()`; about 3 to 4 minutes for both models (`--budget-s 240` when run
alone). Work runs in order of interest (the two targets first) and what does not fit is listed as not run.
The 8B model is skipped, with a note, when under MIN_8B_S seconds remain. `ctx.quick` runs a tiny model on
small contexts, so that the section runs on the CPU in a test.
"""
from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time

import torch

from preemption_runs import (BREAKDOWN_HEADERS, TTFT_HEADERS, breakdown, breakdown_table_rows, free_memory,
                             kv_pool_bytes, shape_bytes, skipped_lines, ttft_rounds, ttft_table_rows, write_shaped)
from shaped_checkpoint import LLAMA_3_2_1B, LLAMA_3_8B, TINY
from tidal.study.runs import warm_up

RELOAD_TARGET = 0.9  # weight reload GB/s over pinned H2D GB/s
TTFT_TARGET = 0.5  # pipelined over full time to first token, at resident fraction 0
MIN_8B_S = 100.0
FULL = dict(contexts=[1024, 4096, 16384], batches=[1, 8], fractions=[0.0, 0.5, 1.0], prompt_len=16)
QUICK = dict(contexts=[64, 256], batches=[1, 2], fractions=[0.0, 0.5], prompt_len=8)
# per model: breakdown repeats, TTFT rounds, and a rough cost of one unit of work (seconds), to stop in time
COSTS = {"Llama-3.2-1B": dict(reps=3, ttft_reps=5, unit_s=8.0),
         "Llama-3-8B": dict(reps=1, ttft_reps=3, unit_s=25.0),
         "tiny": dict(reps=1, ttft_reps=1, unit_s=0.5)}
# breakdown cells in order of interest: 8 x 16k is where an 8B model's KV matches its weights
CELL_ORDER = [(8, 16384), (1, 1024), (8, 4096), (1, 16384), (8, 1024), (1, 4096), (1, 64), (2, 64), (1, 256),
              (2, 256)]
GIB = 1 << 30


def _engine(path, ctx, fraction: float, kv_bytes: int, batch: int):
    import tidal

    return tidal.Engine.from_pretrained(path, device=ctx.device, dtype=torch.bfloat16,
                                        resident_fraction=fraction, prefetch_depth=2, kv_cache_bytes=kv_bytes,
                                        host_kv_bytes=kv_bytes, max_batch_size=batch)


def _room(ctx, shape: dict, cells: list) -> list:
    """The cells whose KV pool fits beside the weights, on the device and in host memory."""
    b = shape_bytes(shape)
    if torch.device(ctx.device).type == "cuda":
        device_free = torch.cuda.mem_get_info(torch.device(ctx.device))[0]
    else:
        device_free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    host_free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    out = []
    for batch, context in cells:
        kv = kv_pool_bytes(shape, [context] * batch)
        if b["weight_bytes"] + kv + 3 * GIB <= device_free and b["weight_bytes"] + kv + 4 * GIB <= host_free:
            out.append((batch, context))
    return out


def _ttft(name, path, ctx, s, fraction, cost, deadline) -> dict:
    if time.monotonic() + 2 * cost["unit_s"] > deadline:
        return dict(model=name, resident_fraction=fraction, skipped="time")
    kv_bytes = kv_pool_bytes(shape_of(name), [s["prompt_len"] + 4 * cost["ttft_reps"] + 16])
    engine = _engine(path, ctx, fraction, kv_bytes, 1)
    try:
        row = ttft_rounds(engine, name, fraction, 1, s["prompt_len"], cost["ttft_reps"])
        row["plan"] = str(engine.plan)
        return row
    finally:
        engine.close()
        del engine
        free_memory(ctx.device)


def _breakdown(name, path, ctx, s, cost, deadline) -> list[dict]:
    shape = shape_of(name)
    cells = [c for c in CELL_ORDER if c[0] in s["batches"] and c[1] in s["contexts"]]
    fits = _room(ctx, shape, cells)
    rows = [dict(model=name, batch=b, context=c, skipped="memory") for b, c in cells if (b, c) not in fits]
    if not fits or time.monotonic() + 2 * cost["unit_s"] > deadline:
        return rows + [dict(model=name, batch=b, context=c, skipped="time") for b, c in fits]
    kv_bytes = max(kv_pool_bytes(shape, [c] * b) for b, c in fits)
    engine = _engine(path, ctx, 1.0, kv_bytes, max(s["batches"]))
    try:
        warm_up(engine)
        for b, c in fits:
            if rows and time.monotonic() + cost["unit_s"] > deadline:
                rows.append(dict(model=name, batch=b, context=c, skipped="time"))
                continue
            rows.append(breakdown(engine, name, b, c, cost["reps"], warmup=0))
            ctx.log(f"{name}: batch {b} x {c}: reload {rows[-1]['reload_gbps']:.1f} GB/s, "
                    f"KV in {rows[-1]['kv_in_gbps']:.1f} GB/s")
    finally:
        engine.close()
        del engine
        free_memory(ctx.device)
    return rows


def shape_of(name: str) -> dict:
    return {"Llama-3.2-1B": LLAMA_3_2_1B, "Llama-3-8B": LLAMA_3_8B, "tiny": TINY}[name]


def _model(name: str, ctx, s: dict, deadline: float) -> tuple[list, list]:
    cost = COSTS[name]
    tmp = tempfile.mkdtemp(prefix="tidal-preemption-")
    try:
        t0 = time.monotonic()
        path = write_shaped(tmp, shape_of(name), torch.bfloat16, device=ctx.device)
        ctx.log(f"{name}: checkpoint written in {time.monotonic() - t0:.1f} s")
        ttft = [_ttft(name, path, ctx, s, s["fractions"][0], cost, deadline)]  # resident 0: the target
        rows = _breakdown(name, path, ctx, s, cost, deadline)
        ttft += [_ttft(name, path, ctx, s, f, cost, deadline) for f in s["fractions"][1:]]
        return rows, ttft
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def verdicts(rows: list[dict], ttft: list[dict], h2d_gbps: float) -> dict:
    """Per model: the median weight-reload GB/s over its breakdown rows as a fraction of pinned H2D, and the
    pipelined/full TTFT ratio at resident fraction 0, each against its target."""
    out = {}
    for model in dict.fromkeys(r["model"] for r in rows + ttft):
        done = [r["reload_gbps"] for r in rows if r["model"] == model and "reload_gbps" in r]
        zero = [r for r in ttft if r["model"] == model and r["resident_fraction"] == 0.0 and "ratio" in r]
        zero = zero[0] if zero else None
        v = {}
        if done:
            frac = statistics.median(done) / h2d_gbps
            v["reload_of_pinned"] = frac
            v["reload_target_met"] = frac >= RELOAD_TARGET
        if zero is not None:
            v["ttft_ratio_at_0"] = zero["ratio"]
            v["ttft_overlap_bound_at_0"] = zero["overlap_bound"]
            v["ttft_target_met"] = zero["ratio"] <= TTFT_TARGET
        out[model] = v
    return out


def table(rows, ttft, bw, verdict, notes) -> str:
    from tidal.report import format_table

    done, done_ttft = [r for r in rows if "skipped" not in r], [r for r in ttft if "skipped" not in r]
    b_rows = breakdown_table_rows(done)
    for r, t in zip(done, b_rows):
        if "reload_gbps" in r:
            frac = r["reload_gbps"] / bw["h2d_gbps"]
            t += [f"{frac:.0%}", "met" if frac >= RELOAD_TARGET else "MISSED"]
        else:
            t += ["", ""]
    t_rows = ttft_table_rows(done_ttft)
    for r, t in zip(done_ttft, t_rows):
        at_zero = r["resident_fraction"] == 0.0
        t.append(("met" if r["ratio"] <= TTFT_TARGET else "MISSED") if at_zero else "")
    lines = [f"pinned copy, same run: {bw['h2d_gbps']:.1f} GB/s H2D, {bw['d2h_gbps']:.1f} GB/s D2H; bf16, "
             "random weights;\nbreakdown contexts are SYNTHETIC (KV blocks allocated and written, "
             "not prefilled)",
             format_table(BREAKDOWN_HEADERS + ["reload of pinned", f">= {RELOAD_TARGET:.0%}"], b_rows), "",
             format_table(TTFT_HEADERS + [f"<= {TTFT_TARGET} at resident 0"], t_rows)]
    for model, v in verdict.items():
        parts = []
        if "reload_of_pinned" in v:
            parts.append(f"reload {v['reload_of_pinned']:.0%} of pinned (target >= {RELOAD_TARGET:.0%}): "
                         + ("met" if v["reload_target_met"] else "MISSED"))
        if "ttft_ratio_at_0" in v:
            parts.append(f"pipelined/full TTFT at resident 0 {v['ttft_ratio_at_0']:.2f} (target <= "
                         f"{TTFT_TARGET}; overlap bound est. {v['ttft_overlap_bound_at_0']:.2f}): "
                         + ("met" if v["ttft_target_met"] else "MISSED"))
        lines.append(f"{model}: " + "; ".join(parts))
    lines += skipped_lines(rows + ttft) + [f"note: {n}" for n in notes]
    return "\n".join(lines)


def run(ctx) -> dict:
    from tidal.measure import copy_bandwidth

    bw = copy_bandwidth(ctx.device, nbytes=(64 << 20) if ctx.quick else GIB)
    ctx.log(f"pinned copy: {bw['h2d_gbps']:.1f} GB/s H2D, {bw['d2h_gbps']:.1f} GB/s D2H")
    s = QUICK if ctx.quick else FULL
    models = [("tiny", 1.0)] if ctx.quick else [("Llama-3.2-1B", 0.3), ("Llama-3-8B", 1.0)]
    rows, ttft, notes = [], [], []
    for name, share in models:
        left = ctx.seconds_left() - 3
        if name == "Llama-3-8B" and left < MIN_8B_S:
            notes.append(f"{name}: skipped, {left:.0f} s left (needs {MIN_8B_S:.0f}); rerun with "
                         f"--sections preemption --budget-s 240")
            continue
        if left < 5:
            notes.append(f"{name}: skipped, time budget spent")
            continue
        # the 1B model takes its share when the 8B model can follow, else all that is left
        if name == "Llama-3.2-1B" and left * (1 - share) < MIN_8B_S:
            share = 1.0
        deadline = time.monotonic() + left * share
        r, t = _model(name, ctx, s, deadline)
        rows += r
        ttft += t
    verdict = verdicts(rows, ttft, bw["h2d_gbps"])
    return {"bandwidth": bw, "breakdown": rows, "ttft": ttft, "targets": verdict, "notes": notes,
            "table": table(rows, ttft, bw, verdict, notes)}
