"""gpu_check section "engine": decode tokens/s of tidal's engine beside transformers' `generate` on the same
checkpoint (issue 5), all resident and with decoder layers offloaded (accelerate offloading the same layers as
tidal streams, `tidal.baselines.accelerate_offload`).

The shared Llama-3.2-1B- and Llama-3-8B-shaped bf16 checkpoints; the runs of each model are gpu_plan.ENGINE
(resident fractions, batches, new tokens, rounds), in order of interest: all resident first (the
tidal / transformers targets), then resident 0 (the accelerate comparison and the bound). Decode tokens/s as
in tidal.study.runs.decode_rounds: batch x (n - 1) / (time of n new tokens - time of 1).

The bound on tidal's step: max(its all-resident step at the same batch, the bytes it streams per step (engine
stats) / the pinned H2D bandwidth measured in this run). A run that does not fit in the time left is listed
as not run.
"""
from __future__ import annotations

import math
import time

import torch

import gpu_plan
from tidal.study.hf import free
from tidal.study.runs import decode_rounds, hf_generator, same_length_prompts, tidal_generator


def dtype_for(device: str):
    # bf16 on a GPU, as the targets are stated; the CPU smoke run takes fp32, which this CPU computes natively
    return torch.float32 if device == "cpu" else torch.bfloat16


def _build(kind: str, path, fraction: float, ctx, batches, layers: int):
    """(generator, close, engine or None) for one variant."""
    import tidal

    if kind == "tidal":
        kv = (16 << 20) if ctx.quick else (1 << 30)
        engine = tidal.Engine.from_pretrained(path, device=ctx.device, dtype=dtype_for(ctx.device),
                                              resident_fraction=fraction, prefetch_depth=2,
                                              kv_cache_bytes=kv, max_batch_size=max(batches))
        return tidal_generator(engine), engine.close, engine
    from transformers import AutoModelForCausalLM

    from tidal.baselines import accelerate_offload

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype_for(ctx.device)).eval()
    streamed = tidal.ResidencyPlan.from_fraction(layers, fraction).streamed_layers
    accelerate_offload(model, streamed, device=ctx.device)
    return hf_generator(model, ctx.device), (lambda: None), None


def _variant(m, kind, path, fraction, batches, g, ctx, deadline) -> list[dict]:
    name = gpu_plan.baseline(kind, fraction)
    t0 = time.monotonic()
    gen, close, engine = _build(kind, path, fraction, ctx, batches, m.layers)
    load_s = time.monotonic() - t0
    rows = []
    try:
        for batch in batches:
            base = dict(model=m.label, kind=name, resident_fraction=fraction, batch=batch)
            if rows and time.monotonic() > deadline:
                rows.append(dict(base, skipped="time"))
                continue
            prompts = same_length_prompts(batch, 16, m.vocab, seed=batch)
            before = engine.stats() if engine else None
            res = decode_rounds({name: gen}, prompts, g["new_tokens"], g["rounds"], deadline=deadline)[name]
            r = dict(base, new_tokens=g["new_tokens"], rounds=res["rounds"], step_ms=res["step_s"] * 1e3,
                     tok_s=res["tok_s"], load_s=load_s)
            if engine:
                after = engine.stats()
                passes = (after.prefill_passes - before.prefill_passes
                          + after.decode_steps - before.decode_steps)
                r.update(bytes_per_step=(after.bytes_streamed - before.bytes_streamed) / max(1, passes),
                         kernel_path=after.kernel_path, plan=str(after.plan))
            rows.append(r)
    finally:
        close()
        del gen, close, engine
        free(ctx.device)
    return rows


def add_bounds(rows: list[dict], h2d_gbps: float) -> None:
    """Per tidal row: the link time of the bytes it streamed per step, its all-resident step at the same
    batch, the bound (their max) and step / bound; every row: tidal's tokens/s over the baseline's."""
    # tok/s is NaN where a round's n-token run took no longer than its 1-token run
    done = [r for r in rows if "tok_s" in r and math.isfinite(r["tok_s"]) and r["tok_s"] > 0]
    by = {(r["kind"], r["model"], r["resident_fraction"], r["batch"]): r for r in done}
    for r in done:
        t = by.get(("tidal", r["model"], r["resident_fraction"], r["batch"]))
        b = by.get((gpu_plan.baseline("hf", r["resident_fraction"]), r["model"], r["resident_fraction"],
                    r["batch"]))
        if t is not None and b is not None:
            r["tidal_over_baseline"] = t["tok_s"] / b["tok_s"]
        base = by.get(("tidal", r["model"], 1.0, r["batch"]))
        if r["kind"] != "tidal" or base is None or "bytes_per_step" not in r:
            continue
        link = r["bytes_per_step"] / (h2d_gbps * 1e9) * 1e3
        r.update(link_ms=link, resident_ms=base["step_ms"], bound_ms=max(link, base["step_ms"]))
        r["step_over_bound"] = r["step_ms"] / r["bound_ms"]


def table(rows: list[dict], bw: dict, notes: list[str], dtype: str) -> str:
    from tidal.tables import format_table

    out = []
    for r in sorted(rows, key=lambda r: (r["model"], -r["resident_fraction"], r["batch"], r["kind"])):
        if "skipped" in r:
            out.append([r["model"], r["resident_fraction"], r["batch"], r["kind"], f"not run: {r['skipped']}"]
                       + [""] * 7)
            continue
        mb = r.get("bytes_per_step")
        out.append([r["model"], r["resident_fraction"], r["batch"], r["kind"], r["new_tokens"], r["step_ms"],
                    r["tok_s"], "" if mb is None else mb / 1e6, r.get("link_ms", ""), r.get("bound_ms", ""),
                    f"{r['step_over_bound']:.2f}" if "step_over_bound" in r else "",
                    f"{r['tidal_over_baseline']:.2f}x" if "tidal_over_baseline" in r else ""])
    return (f"pinned H2D {bw['h2d_gbps']:.1f} GB/s (same run; the link bound uses it); {dtype}, random "
            "weights\n"
            + format_table(["model", "resident", "batch", "impl", "new tok", "step ms", "tok/s", "MB/step",
                            "link ms", "bound ms", "step/bound", "tidal/base"], out)
            + "".join(f"\nnote: {n}" for n in notes))


def run(ctx) -> dict:
    from tidal.measure import copy_bandwidth

    bw = copy_bandwidth(ctx.device, nbytes=(64 << 20) if ctx.quick else gpu_plan.GIB)
    ctx.log(f"pinned copy: {bw['h2d_gbps']:.1f} GB/s H2D")
    rows, notes = [], []
    result = {"bandwidth": bw, "decode": rows, "notes": notes}
    for m, g in gpu_plan.grid(gpu_plan.ENGINE, ctx.quick):
        path = ctx.checkpoint(m.preset)
        if path is None:
            notes.append(f"{m.label}: not run, no checkpoint (see the checkpoints section)")
            continue
        for fraction, kind, batches in g["runs"]:
            name = gpu_plan.baseline(kind, fraction)
            est = gpu_plan.engine_variant_s(m, kind, fraction, batches, g["new_tokens"], g["rounds"],
                                            ctx.rates)
            if not ctx.fits(est):
                why = f"time: needs ~{est:.0f} s, {ctx.seconds_left():.0f} s left"
                rows += [dict(model=m.label, kind=name, resident_fraction=fraction, batch=b, skipped=why)
                         for b in batches]
                continue
            ctx.log(f"{m.label}: {name} at resident {fraction}, batches {batches} (~{est:.0f} s)")
            try:
                rows += _variant(m, kind, path, fraction, batches, g, ctx, time.monotonic() + 1.5 * est)
            except Exception as exc:  # e.g. out of memory: the row says so, the section goes on
                rows += [dict(model=m.label, kind=name, resident_fraction=fraction, batch=b,
                              skipped=f"{type(exc).__name__}: {str(exc)[:160]}") for b in batches]
                free(ctx.device)
            add_bounds(rows, bw["h2d_gbps"])
            ctx.progress(result)
    add_bounds(rows, bw["h2d_gbps"])
    result["table"] = table(rows, bw, notes, str(dtype_for(ctx.device)).removeprefix("torch."))
    return result
