"""gpu_check section "preemption" (issue 6): where a preempt/resume round trip's time goes on the GPU, and
time to first token after a pipelined against a full resume, for the shared Llama-3.2-1B- and
Llama-3-8B-shaped bf16 checkpoints (32k positions), beside the pinned H2D bandwidth of a 1 GiB copy measured
in the same run (tidal.measure.copy_bandwidth).

1. Breakdown (preemption_runs.breakdown): every layer resident, `preempt(weights="host", kv="swap")` then
   `resume(pipelined=False)`, batch x SYNTHETIC contexts (KV blocks allocated and written, not prefilled;
   gpu_plan.PREEMPTION's cells, 8 x 16k first: where the 8B model's KV, 17 GB, matches its weights). Target:
   the weight reload at >= 90% of the pinned H2D bandwidth.
2. Pipelined against full resume (preemption_runs.ttft_rounds): one request with a 16-token prompt,
   interleaved rounds, at resident fraction 0 (target: pipelined TTFT <= 1/2 of reload-then-decode) and 1.0.
   Pipelined TTFT is at least max(copies, compute) and full TTFT is their sum, so the ratio cannot go below
   1/2; each row's "overlap bound (est.)" says how close perfect overlap could get.

Work runs in order of interest (the resident-0 TTFT, the breakdown cells, then the other fractions); each part
is started only when its estimate (gpu_plan) fits in the time left, and the rest is listed as not run.
`ctx.quick` runs the micro checkpoint on small contexts, so that the section runs on the CPU in a test.
"""
from __future__ import annotations

import os
import statistics

import torch

import gpu_plan
from gpu_report import RELOAD_PINNED as RELOAD_TARGET, TTFT_PIPELINED as TTFT_TARGET
from preemption_runs import (BREAKDOWN_HEADERS, TTFT_HEADERS, breakdown, breakdown_table_rows,
                             kv_pool_bytes, shape_bytes, skipped_lines, ttft_rounds, ttft_table_rows)
from shaped_checkpoint import LLAMA_3_2_1B, LLAMA_3_8B, TINY
from tidal.study.hf import free
from tidal.study.runs import warm_up

SHAPES = {"llama-3.2-1b": LLAMA_3_2_1B, "llama-3-8b": LLAMA_3_8B, "micro": TINY}
PROMPT_LEN = 16
GIB = 1 << 30


def _engine(path, ctx, fraction: float, kv_bytes: int, batch: int):
    import tidal

    return tidal.Engine.from_pretrained(path, device=ctx.device, dtype=torch.bfloat16,
                                        resident_fraction=fraction, prefetch_depth=2, kv_cache_bytes=kv_bytes,
                                        host_kv_bytes=kv_bytes, max_batch_size=batch)


def host_available() -> int:
    """Bytes of host memory available, page cache counted in: the shared checkpoints just written sit there,
    and the kernel gives those pages back on demand (free pages alone would undercount by their size)."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _room(ctx, shape: dict, cells: list) -> list:
    """The cells whose KV pool fits beside the weights, on the device and in host memory."""
    b = shape_bytes(shape)
    host_free = host_available()
    if torch.device(ctx.device).type == "cuda":
        device_free = torch.cuda.mem_get_info(torch.device(ctx.device))[0]
    else:
        device_free = host_free // 2
    out = []
    for batch, context in cells:
        kv = kv_pool_bytes(shape, [context] * batch)
        if b["weight_bytes"] + kv + 3 * GIB <= device_free and b["weight_bytes"] + kv + 4 * GIB <= host_free:
            out.append((batch, context))
    return out


def _ttft(m, path, ctx, g, fraction) -> dict:
    est = gpu_plan.ttft_s(m, fraction, g["ttft_reps"], ctx.rates)
    if not ctx.fits(est):
        return dict(model=m.label, resident_fraction=fraction,
                    skipped=f"time: needs ~{est:.0f} s, {ctx.seconds_left():.0f} s left")
    kv_bytes = kv_pool_bytes(SHAPES[m.preset], [PROMPT_LEN + 4 * g["ttft_reps"] + 16])
    engine = _engine(path, ctx, fraction, kv_bytes, 1)
    try:
        row = ttft_rounds(engine, m.label, fraction, 1, PROMPT_LEN, g["ttft_reps"])
        row["plan"] = str(engine.plan)
        ctx.log(f"{m.label}: resident {fraction}: pipelined / full TTFT {row['ratio']:.3f}")
        return row
    finally:
        engine.close()
        del engine
        free(ctx.device)


def _breakdown(m, path, ctx, g, result) -> None:
    shape = SHAPES[m.preset]
    fits = _room(ctx, shape, list(g["cells"]))
    rows = result["breakdown"]
    rows += [dict(model=m.label, batch=b, context=c, skipped="memory")
             for b, c in g["cells"] if (b, c) not in fits]
    first = (gpu_plan.breakdown_load_s(m, fits, ctx.rates)
             + gpu_plan.breakdown_cell_s(m, *fits[0], g["reps"], ctx.rates)) if fits else 0.0
    if not fits or not ctx.fits(first):
        rows += [dict(model=m.label, batch=b, context=c, skipped="time") for b, c in fits]
        return
    kv_bytes = max(kv_pool_bytes(shape, [c] * b) for b, c in fits)
    engine = _engine(path, ctx, 1.0, kv_bytes, max(b for b, _ in fits))
    try:
        warm_up(engine)
        for b, c in fits:
            est = gpu_plan.breakdown_cell_s(m, b, c, g["reps"], ctx.rates)
            if not ctx.fits(est):
                rows.append(dict(model=m.label, batch=b, context=c,
                                 skipped=f"time: needs ~{est:.0f} s, {ctx.seconds_left():.0f} s left"))
                continue
            rows.append(breakdown(engine, m.label, b, c, g["reps"], warmup=0))
            ctx.log(f"{m.label}: batch {b} x {c}: reload {rows[-1]['reload_gbps']:.1f} GB/s, "
                    f"KV in {rows[-1]['kv_in_gbps']:.1f} GB/s")
            ctx.progress(result)
    finally:
        engine.close()
        del engine
        free(ctx.device)


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
            v.update(reload_gbps=statistics.median(done), reload_of_pinned=frac)
            v["reload_target_met"] = frac >= RELOAD_TARGET
        if zero is not None:
            v["ttft_ratio_at_0"] = zero["ratio"]
            v["ttft_overlap_bound_at_0"] = zero["overlap_bound"]
            v["ttft_target_met"] = zero["ratio"] <= TTFT_TARGET
        out[model] = v
    return out


def table(rows, ttft, bw, verdict, notes) -> str:
    from tidal.tables import format_table

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
    result = {"bandwidth": bw, "breakdown": [], "ttft": [], "notes": []}
    for m, g in gpu_plan.grid(gpu_plan.PREEMPTION, ctx.quick):
        path = ctx.checkpoint(m.preset)
        if path is None:
            result["notes"].append(f"{m.label}: not run, no checkpoint (see the checkpoints section)")
            continue
        result["ttft"].append(_ttft(m, path, ctx, g, g["ttft"][0]))  # resident 0: the target
        ctx.progress(result)
        _breakdown(m, path, ctx, g, result)
        for f in g["ttft"][1:]:
            result["ttft"].append(_ttft(m, path, ctx, g, f))
            ctx.progress(result)
        result["targets"] = verdicts(result["breakdown"], result["ttft"], bw["h2d_gbps"])
    result["targets"] = verdicts(result["breakdown"], result["ttft"], bw["h2d_gbps"])
    result["table"] = table(result["breakdown"], result["ttft"], bw, result["targets"], result["notes"])
    return result
