"""gpu_check section "engine": decode tokens/s against the resident fraction, tidal's engine beside accelerate
offloading the same layers (issue 5).

Llama-3.2-1B-, Qwen2.5-0.5B- and Llama-3-8B-shaped checkpoints (random weights, bf16, written tensor by tensor
by shaped_checkpoint.py into a temporary directory, deleted afterwards). For each resident fraction 1.0, 0.75,
0.5, 0.25 and 0: tidal's engine (`Engine.from_pretrained(..., resident_fraction=f)`), and transformers'
`generate` on the same checkpoint with accelerate offloading the same decoder layers (tidal.baselines; at 1.0
that is plain transformers on the device). Decode tokens/s as in tidal.study.runs, at batch 1 and 8.

The bound on a step, in theory: max(the all-resident step, bytes streamed per step / the pinned copy
bandwidth measured in this run). tidal's bytes per step are measured (engine stats: bytes streamed over
forward passes); accelerate copies the same layers.

Time: the section fits the time gpu_check gives it (`--budget-s`). Each model gets a share, each variant a
share of its model's; rows run in order of interest (fractions 1.0, 0, 0.5, 0.75, 0.25) and those that do not
fit are listed as not run. The 8B model is skipped, with a note, when under MIN_8B_S seconds remain.
"""
from __future__ import annotations

import gc
import shutil
import tempfile
import time

import torch

from tidal.study.runs import decode_rounds, hf_generator, same_length_prompts, tidal_generator
from shaped_checkpoint import LLAMA_3_2_1B, LLAMA_3_8B, QWEN2_5_0_5B, TINY, write_checkpoint

# (name, shape, share of the time left when the model starts)
MODELS = [("Llama-3.2-1B", LLAMA_3_2_1B, 0.3), ("Qwen2.5-0.5B", QWEN2_5_0_5B, 0.35),
          ("Llama-3-8B", LLAMA_3_8B, 1.0)]
PRIORITY = [1.0, 0.0, 0.5, 0.75, 0.25]  # the order rows run in; the table sorts by fraction
MIN_8B_S = 90.0
KINDS = ("tidal", "accelerate")


def _settings(ctx, name: str) -> dict:
    if ctx.quick:
        return dict(fractions=[1.0, 0.0], batches=[1], new_tokens=8, prompt_len=8, rounds=2,
                    kv_bytes=16 << 20)
    return dict(fractions=PRIORITY, batches=[1, 8], new_tokens=16 if name == "Llama-3-8B" else 32,
                prompt_len=16, rounds=3, kv_bytes=1 << 30)


def _free(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _build(kind: str, path, fraction: float, ctx, s: dict):
    """(generator, close, engine or None) for one variant."""
    import tidal

    if kind == "tidal":
        engine = tidal.Engine.from_pretrained(path, device=ctx.device, dtype=torch.bfloat16,
                                              resident_fraction=fraction, prefetch_depth=2,
                                              kv_cache_bytes=s["kv_bytes"], max_batch_size=max(s["batches"]))
        return tidal_generator(engine), engine.close, engine
    from transformers import AutoModelForCausalLM

    from tidal.baselines import accelerate_offload

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    layers = model.config.num_hidden_layers
    streamed = tidal.ResidencyPlan.from_fraction(layers, fraction).streamed_layers
    accelerate_offload(model, streamed, device=ctx.device)
    return hf_generator(model, ctx.device), (lambda: None), None


def _variant(kind: str, path, fraction: float, ctx, s: dict, vocab: int, deadline: float) -> list[dict]:
    t0 = time.monotonic()
    gen, close, engine = _build(kind, path, fraction, ctx, s)
    load_s = time.monotonic() - t0
    rows = []
    try:
        for batch in s["batches"]:
            if rows and time.monotonic() > deadline:
                rows.append(dict(kind=kind, resident_fraction=fraction, batch=batch, skipped="time"))
                continue
            prompts = same_length_prompts(batch, s["prompt_len"], vocab, seed=batch)
            before = engine.stats() if engine else None
            res = decode_rounds({kind: gen}, prompts, s["new_tokens"], s["rounds"], deadline=deadline)[kind]
            r = dict(kind=kind, resident_fraction=fraction, batch=batch, new_tokens=s["new_tokens"],
                     rounds=res["rounds"], step_ms=res["step_s"] * 1e3, tok_s=res["tok_s"], load_s=load_s)
            if engine:
                after = engine.stats()
                passes = (after.prefill_passes - before.prefill_passes
                          + after.decode_steps - before.decode_steps)
                r.update(bytes_per_step=(after.bytes_streamed - before.bytes_streamed) / max(1, passes),
                         kernel_path=after.kernel_path, plan=after.plan)
            rows.append(r)
    finally:
        close()
        del gen, close, engine
        _free(ctx.device)
    return rows


def _model_rows(name: str, shape: dict, ctx, deadline: float) -> list[dict]:
    s = _settings(ctx, name)
    tmp = tempfile.mkdtemp(prefix="tidal-engine-")
    try:
        t0 = time.monotonic()
        path = write_checkpoint(tmp, shape, torch.bfloat16, device=ctx.device)
        ctx.log(f"{name}: checkpoint written in {time.monotonic() - t0:.1f} s")
        todo = [(f, k) for f in s["fractions"] for k in KINDS]
        rows = []
        for i, (fraction, kind) in enumerate(todo):
            share = (deadline - time.monotonic()) / (len(todo) - i)
            if share < 2.0:
                rows.append(dict(kind=kind, resident_fraction=fraction, batch=s["batches"][0],
                                 skipped="time"))
                continue
            ctx.log(f"{name}: {kind} at resident {fraction}, {share:.0f} s")
            try:
                rows += _variant(kind, path, fraction, ctx, s, shape["vocab_size"], time.monotonic() + share)
            except Exception as exc:  # e.g. out of memory: the row says so, the section goes on
                rows.append(dict(kind=kind, resident_fraction=fraction, batch=s["batches"][0],
                                 skipped=f"{type(exc).__name__}: {str(exc)[:120]}"))
                _free(ctx.device)
        for r in rows:
            r["model"] = name
        return rows
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def add_bounds(rows: list[dict], h2d_gbps: float) -> None:
    """Per row: the link time of the bytes tidal streams per step, the all-resident step of the same model and
    batch (tidal's), the bound (their max), tidal's fraction of it, and tidal / accelerate tokens/s."""
    done = [r for r in rows if "tok_s" in r]
    key = lambda r: (r["model"], r["resident_fraction"], r["batch"])  # noqa: E731
    by = {(r["kind"],) + key(r): r for r in done}
    for r in done:
        t = by.get(("tidal",) + key(r))
        base = by.get(("tidal", r["model"], 1.0, r["batch"]))
        if t is None or base is None or "bytes_per_step" not in t:
            continue
        link = t["bytes_per_step"] / (h2d_gbps * 1e9) * 1e3
        r.update(link_ms=link, resident_ms=base["step_ms"], bound_ms=max(link, base["step_ms"]))
        r["of_bound"] = r["bound_ms"] / r["step_ms"]
        a = by.get(("accelerate",) + key(r))
        if r["kind"] == "tidal" and a is not None:
            r["x_accelerate"] = r["tok_s"] / a["tok_s"]


def table(rows: list[dict], bw: dict) -> str:
    from tidal.report import format_table

    out = []
    for r in sorted(rows, key=lambda r: (r["model"], -r["resident_fraction"], r["batch"], r["kind"])):
        if "skipped" in r:
            out.append([r["model"], r["resident_fraction"], r["batch"], r["kind"], f"not run: {r['skipped']}"]
                       + [""] * 8)
            continue
        mb = r.get("bytes_per_step")
        out.append([r["model"], r["resident_fraction"], r["batch"], r["kind"], r["new_tokens"], r["step_ms"],
                    r["tok_s"], "" if mb is None else mb / 1e6, r.get("link_ms", ""),
                    r.get("resident_ms", ""), r.get("bound_ms", ""),
                    f"{r['of_bound']:.0%}" if "of_bound" in r else "",
                    f"{r['x_accelerate']:.2f}x" if "x_accelerate" in r else ""])
    return (f"pinned H2D {bw['h2d_gbps']:.1f} GB/s (the link bound uses it); bf16, random weights\n" +
            format_table(["model", "resident", "batch", "impl", "new tok", "step ms", "tok/s", "MB/step",
                          "link ms", "resident ms", "bound ms", "of bound", "tidal/acc"], out))


def run(ctx) -> dict:
    from tidal.measure import copy_bandwidth

    bw = copy_bandwidth(ctx.device, nbytes=(64 << 20) if ctx.quick else (1 << 30))
    ctx.log(f"pinned copy: {bw['h2d_gbps']:.1f} GB/s H2D")
    models = [("tiny-llama", TINY, 1.0)] if ctx.quick else MODELS
    rows, notes = [], []
    for name, shape, share in models:
        left = ctx.seconds_left() - 20  # a variant may overrun its share by a load and one round
        if name == "Llama-3-8B" and left < MIN_8B_S:
            notes.append(f"{name}: skipped, {left:.0f} s left (needs {MIN_8B_S:.0f}); "
                         "rerun with a larger --budget-s")
            continue
        if left < 10:
            notes.append(f"{name}: skipped, time budget spent")
            continue
        rows += _model_rows(name, shape, ctx, time.monotonic() + left * share)
    add_bounds(rows, bw["h2d_gbps"])
    text = table(rows, bw) + "".join(f"\nnote: {n}" for n in notes)
    return {"bandwidth": bw, "decode": rows, "notes": notes, "table": text}
