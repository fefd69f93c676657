"""gpu_check section "switch" (issue 17): the time from a request to its first token when the serving process
must switch to the request's model, for the shared Llama-3-8B-shaped bf16 checkpoint switched with the
Llama-3.2-1B-shaped one (--quick: the micro checkpoint under two names), side by side in one run. The arms are
those of bench/ray_switch.py without Ray's HTTP layer, which adds the same few milliseconds to each:

  tidal          a tidal.Scheduler (policy lru) owning both models with keep_host_copy, under a device budget
                 that fits one: the switch is its preemption of the other model and the pipelined resume of
                 this one, whose first step prefills the request (what a tidal.ray replica does).
  rebuild-hf     Ray Serve's multiplexing as users write it, one model per replica: the other model deleted
                 (its memory given back to the device), this one built anew with transformers
                 (`from_pretrained(..., device_map=device)`, the checkpoint in the page cache) and `generate`.
  rebuild-tidal  the same pattern with a tidal.Engine built anew.

Each arm: `rounds` (the rebuilds on the GPU: one, for time) times B and A (the requests to A timed: each a
switch; tidal's arm first asks B and A once each, untimed, as its first request of a model loads it), then A
twice more (no switch); one 16-token prompt, one new token. On the GPU grid rebuild-tidal is left out for time
(bench/ray_switch.py has it). Target: tidal's median switch at least gpu_report.SWITCH_VS_REBUILD times
shorter than rebuild-hf's. Arms are started only when their estimate
(gpu_plan.switch_arm_s) fits in the time left.
"""
from __future__ import annotations

import statistics
import time

import torch

import gpu_plan
from gpu_engine import dtype_for
from gpu_report import SWITCH_VS_REBUILD
from gpu_streaming import load_hf
from tidal.study.hf import free, quiet_loads, sync

PROMPT = [1] + [(7 * i + 3) % 500 + 2 for i in range(15)]  # 16 ids inside every preset's vocabulary
KV_BYTES = {"gpu": 1 << 30, "quick": 16 << 20}


def _sequence(ask, rounds: int, load_first: bool) -> tuple[list[float], list[float]]:
    """(switch seconds, no-switch seconds) of the arm's `ask(name) -> seconds`; `load_first`: B and A are
    asked once each first, untimed (tidal's first request of a model loads it; a rebuild is a rebuild)."""
    if load_first:
        ask("B")
        ask("A")
    switch = []
    for _ in range(rounds):
        ask("B")
        switch.append(ask("A"))
    return switch, [ask("A") for _ in range(2)]


def _tidal(paths: dict, ctx, kv: int, rounds: int):
    import tidal

    kw = dict(dtype=dtype_for(ctx.device), kv_cache_bytes=kv, keep_host_copy=True)
    sizes = [tidal.Engine.placement(p, device=ctx.device, **kw).footprint.device for p in paths.values()]
    rt = tidal.Runtime(device=ctx.device, device_budget_bytes=max(sizes) + 1)  # one model at a time
    sched = tidal.Scheduler(rt, policy="lru")
    try:
        for name, path in paths.items():
            sched.add_model(name, path, **kw)

        def ask(name: str) -> float:
            req = sched.submit(name, PROMPT, max_new_tokens=1, stop_token_ids=[])
            sched.run_until_idle()
            req.wait()
            return req.first_token_at - req.submitted_at

        return _sequence(ask, rounds, load_first=True)
    finally:
        sched.close()
        rt.close()
        free(ctx.device)


def _rebuild(kind: str, paths: dict, ctx, kv: int, rounds: int):
    """Ray's multiplexing pattern with one model per replica: at a switch the model is deleted, then the next
    built anew; the request's time covers both and its generation."""
    held: dict = {}

    def build(path):
        if kind == "rebuild-tidal":
            import tidal

            return tidal.Engine.from_pretrained(path, device=ctx.device, dtype=dtype_for(ctx.device),
                                                kv_cache_bytes=kv)
        with quiet_loads():
            return load_hf(path, ctx.device, dtype_for(ctx.device))

    def drop() -> None:  # Ray's eviction: the model object goes, and its memory with it
        old = held.pop("model", None)
        if old is not None:
            if kind == "rebuild-tidal":
                old.close()
            del old
            free(ctx.device)

    def ask(name: str) -> float:
        t0 = time.perf_counter()
        if held.get("name") != name:
            drop()
            held.update(name=name, model=build(paths[name]))
        model = held["model"]
        if kind == "rebuild-tidal":
            model.generate([PROMPT], max_new_tokens=1, stop_token_ids=[])
        else:
            with torch.inference_mode():
                model.generate(torch.tensor([PROMPT], device=ctx.device), max_new_tokens=1, do_sample=False)
        sync(ctx.device)
        return time.perf_counter() - t0

    try:
        return _sequence(ask, rounds, load_first=False)
    finally:
        drop()


def _row(m, other, arm: str, switch: list[float], stay: list[float]) -> dict:
    return {"model": m.label, "other": other.label, "arm": arm, "switch_s": switch,
            "switch_median_s": statistics.median(switch), "switch_min_s": min(switch),
            "switch_max_s": max(switch), "stay_median_s": statistics.median(stay)}


def targets(rows: list[dict]) -> dict:
    """Per model: rebuild-hf's median switch over tidal's, against the target (and rebuild-tidal's, for
    the switch alone)."""
    out = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        by = {r["arm"]: r for r in rows if r["model"] == model and "switch_median_s" in r}
        if "tidal" not in by:
            continue
        v = {}
        for arm in ("rebuild-hf", "rebuild-tidal"):
            if arm in by:
                v[f"speedup_vs_{arm}"] = by[arm]["switch_median_s"] / by["tidal"]["switch_median_s"]
        if "speedup_vs_rebuild-hf" in v:
            v["target_met"] = v["speedup_vs_rebuild-hf"] >= SWITCH_VS_REBUILD
            # a switch that cost nothing: tidal's request without one
            v["free_switch_bound"] = by["rebuild-hf"]["switch_median_s"] / by["tidal"]["stay_median_s"]
        out[model] = v
    return out


def table(rows: list[dict], verdict: dict, notes: list[str]) -> str:
    from tidal.tables import format_table

    done = [r for r in rows if "switch_median_s" in r]
    body = [[r["model"], r["other"], r["arm"], f"{r['switch_median_s']:.3f}",
             f"{r['switch_min_s']:.3f}-{r['switch_max_s']:.3f}", f"{r['stay_median_s']:.3f}"] for r in done]
    lines = [format_table(["A", "B", "arm", "switch to A s (median)", "min-max", "A, no switch s"], body)]
    for model, v in verdict.items():
        parts = [f"{v[k]:.1f}x vs {k.removeprefix('speedup_vs_')}" for k in v if k.startswith("speedup_vs_")]
        if "target_met" in v:
            parts.append(f"target >= {SWITCH_VS_REBUILD:g}x vs rebuild-hf: " + ("met" if v["target_met"] else
                         "MISSED") + f" (a free switch would be {v['free_switch_bound']:.1f}x)")
        lines.append(f"{model}: tidal " + "; ".join(parts))
    lines += [f"not run: {r['model']} {r['arm']} ({r['skipped']})" for r in rows if "skipped" in r]
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)


def run(ctx) -> dict:
    result = {"rows": [], "notes": [], "prompt_tokens": len(PROMPT)}
    kv = KV_BYTES["quick" if ctx.quick else "gpu"]
    for m, g in gpu_plan.grid(gpu_plan.SWITCH, ctx.quick):
        other = g["other"]
        paths = {"A": ctx.checkpoint(m.preset), "B": ctx.checkpoint(other.preset)}
        if None in paths.values():
            result["notes"].append(f"{m.label}: not run, no checkpoint (see the checkpoints section)")
            continue
        for arm in g["arms"]:
            rounds = gpu_plan.switch_rounds(g, arm)
            est = gpu_plan.switch_arm_s(m, other, arm, rounds, ctx.rates)
            if not ctx.fits(est):
                result["rows"].append({"model": m.label, "other": other.label, "arm": arm,
                                       "skipped": f"time: needs ~{est:.0f} s, {ctx.seconds_left():.0f} s left"})
                continue
            if arm == "tidal":
                switch, stay = _tidal(paths, ctx, kv, rounds)
            else:
                switch, stay = _rebuild(arm, paths, ctx, kv, rounds)
            result["rows"].append(_row(m, other, arm, switch, stay))
            ctx.log(f"{m.label} {arm}: switch median {statistics.median(switch):.3f} s, "
                    f"no switch {statistics.median(stay):.3f} s")
            result["targets"] = targets(result["rows"])
            ctx.progress(result)
    result["targets"] = targets(result["rows"])
    result["table"] = table(result["rows"], result["targets"], result["notes"])
    return result
