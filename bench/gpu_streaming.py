"""gpu_check section "streaming": `tidal.offload` of a transformers model (the shared Llama-3.2-1B- and
Llama-3-8B-shaped bf16 checkpoints) at several resident fractions, beside accelerate offloading the same
decoder layers (the 1B model; the 8B model's accelerate rows are the engine section's), and the pinned copy
bandwidth measured in the same run.

A decode step is a one-token forward over a 128-token cache. Its bound is max(the all-resident step of the
same model in this run, the bytes tidal streamed in that step / the pinned H2D bandwidth of this run); the
target is a streamed step within gpu_report.STREAMED_BOUND of that bound.

The model is loaded once per shape and offloaded, measured and restored at each fraction in turn; accelerate's
variants each load the checkpoint afresh (its hooks replace the offloaded weights).
"""
from __future__ import annotations

import statistics
import time

import torch

import gpu_plan
from gpu_engine import dtype_for
from tidal.study.hf import free, sync

CONTEXT = 128


def load_hf(path, device, dtype):
    """The checkpoint as a transformers model on `device` (straight onto a GPU with `device_map`)."""
    from transformers import AutoModelForCausalLM

    kw = {} if device == "cpu" else {"device_map": device}
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw).eval()


def decode_step_time(model, device, steps: int, deadline: float) -> float:
    """Median wall time of a one-token forward over a CONTEXT-token prefix cache: `steps` timed after one
    untimed, fewer (at least 2) when `deadline` (time.monotonic()) comes first."""
    from transformers import DynamicCache

    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, CONTEXT), device=device)
    with torch.no_grad():
        prefix = model(ids, use_cache=True).past_key_values
    token, pos = torch.randint(0, vocab, (1, 1), device=device), torch.tensor([[CONTEXT]], device=device)
    times = []
    while len(times) < 3 or (len(times) < steps + 1 and time.monotonic() < deadline):
        cache = DynamicCache()
        for i, layer in enumerate(prefix.layers):
            cache.update(layer.keys, layer.values, i)
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            model(token, past_key_values=cache, position_ids=pos, use_cache=True)
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def _estimate_if_it_fits(m, kind, f, g, ctx, result) -> float | None:
    """The variant's estimated seconds, or None (and a skipped row saying why) when it does not fit."""
    est = gpu_plan.streaming_variant_s(m, kind, f, g["steps"], ctx.rates)
    if ctx.fits(est):
        return est
    why = f"time: needs ~{est:.0f} s, {ctx.seconds_left():.0f} s left"
    result["decode"].append(dict(model=m.label, kind=kind, resident_fraction=f, skipped=why))
    return None


def _tidal_rows(model, m, g, ctx, result) -> None:
    import tidal

    for f in g["tidal"]:
        est = _estimate_if_it_fits(m, "tidal", f, g, ctx, result)
        if est is None:
            continue
        tidal.offload(model, resident_fraction=f, prefetch_depth=2, device=ctx.device)
        try:
            step = decode_step_time(model, ctx.device, g["steps"], time.monotonic() + 2 * est)
            last = tidal.stats(model).last
        finally:
            tidal.restore(model)
        result["decode"].append(dict(model=m.label, kind="tidal", resident_fraction=f, step_ms=step * 1e3,
                                     tok_s=1 / step, mb_per_step=last.bytes_streamed / 1e6,
                                     stall_ms=last.stall_seconds * 1e3))
        ctx.log(f"{m.label} tidal {f}: {step * 1e3:.1f} ms/step, {last.bytes_streamed / 1e6:.0f} MB streamed")
        ctx.progress(result)


def _accelerate_rows(path, m, g, ctx, result) -> None:
    import tidal
    from tidal.baselines import accelerate_offload

    for f in g["accelerate"]:
        est = _estimate_if_it_fits(m, "accelerate", f, g, ctx, result)
        if est is None:
            continue
        model = load_hf(path, "cpu", dtype_for(ctx.device))
        streamed = tidal.ResidencyPlan.from_fraction(m.layers, f).streamed_layers
        accelerate_offload(model, streamed, device=ctx.device)
        step = decode_step_time(model, ctx.device, g["steps"], time.monotonic() + 2 * est)
        del model
        free(ctx.device)
        result["decode"].append(dict(model=m.label, kind="accelerate", resident_fraction=f,
                                     step_ms=step * 1e3, tok_s=1 / step))
        ctx.log(f"{m.label} accelerate {f}: {step * 1e3:.1f} ms/step")
        ctx.progress(result)


def add_bounds(rows: list[dict], h2d_gbps: float) -> None:
    """Per measured row: the all-resident step of its model (tidal at 1.0), and for tidal's rows the link time
    of the bytes streamed, the bound (the larger) and step / bound; every row: its step over the resident
    one."""
    resident = {r["model"]: r["step_ms"] for r in rows
                if r["kind"] == "tidal" and r["resident_fraction"] == 1.0 and "step_ms" in r}
    for r in rows:
        base = resident.get(r["model"])
        if "step_ms" not in r or base is None:
            continue
        r.update(resident_ms=base, x_resident=r["step_ms"] / base, h2d_gbps=h2d_gbps)
        if r["kind"] == "tidal":
            r["link_ms"] = r["mb_per_step"] * 1e6 / (h2d_gbps * 1e9) * 1e3
            r["bound_ms"] = max(base, r["link_ms"])
            r["step_over_bound"] = r["step_ms"] / r["bound_ms"]


def table(result: dict) -> str:
    from tidal.tables import format_table

    rows = []
    for r in sorted(result["decode"], key=lambda r: (r["model"], -r["resident_fraction"], r["kind"])):
        if "skipped" in r:
            rows.append([r["model"], r["resident_fraction"], r["kind"], f"not run: {r['skipped']}"]
                        + [""] * 6)
            continue
        rows.append([r["model"], r["resident_fraction"], r["kind"], r["step_ms"], r.get("mb_per_step", ""),
                     r.get("stall_ms", ""), r.get("link_ms", ""), r.get("bound_ms", ""),
                     f"{r['step_over_bound']:.2f}" if "step_over_bound" in r else "",
                     f"{r['x_resident']:.2f}x" if "x_resident" in r else ""])
    bw = result["bandwidth"]
    return (f"pinned H2D {bw['h2d_gbps']:.1f} GB/s, D2H {bw['d2h_gbps']:.1f} GB/s (same run); "
            f"{str(dtype_for(result['device'])).removeprefix('torch.')}, random weights; "
            f"one-token step over a {CONTEXT}-token cache\n"
            + format_table(["model", "resident", "impl", "step ms", "MB/step", "stall ms", "link ms",
                            "bound ms", "step/bound", "x resident"], rows)
            + "".join(f"\nnote: {n}" for n in result["notes"]))


def run(ctx) -> dict:
    from tidal.measure import copy_bandwidth

    bw = copy_bandwidth(ctx.device, nbytes=(64 << 20) if ctx.quick else gpu_plan.GIB)
    ctx.log(f"pinned copy: {bw['h2d_gbps']:.1f} GB/s H2D, {bw['d2h_gbps']:.1f} GB/s D2H")
    result = {"bandwidth": bw, "decode": [], "notes": [], "device": ctx.device}
    ctx.progress(result)
    for m, g in gpu_plan.grid(gpu_plan.STREAMING, ctx.quick):
        path = ctx.checkpoint(m.preset)
        if path is None:
            result["notes"].append(f"{m.label}: not run, no checkpoint (see the checkpoints section)")
            continue
        first = gpu_plan.streaming_variant_s(m, "tidal", g["tidal"][0], g["steps"], ctx.rates)
        if not ctx.fits(gpu_plan.hf_load_s(m, ctx.rates) + first):
            result["notes"].append(f"{m.label}: not run, {ctx.seconds_left():.0f} s left")
            continue
        model = load_hf(path, ctx.device, dtype_for(ctx.device))
        try:
            _tidal_rows(model, m, g, ctx, result)
        finally:
            del model
            free(ctx.device)
        _accelerate_rows(path, m, g, ctx, result)
        add_bounds(result["decode"], bw["h2d_gbps"])
        ctx.progress(result)
    add_bounds(result["decode"], bw["h2d_gbps"])
    result["table"] = table(result)
    return result
