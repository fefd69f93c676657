"""gpu_check's report: every target's verdict, computed from numbers measured in the same run; results.json;
and BENCHMARKS-fragment.md, a markdown fragment for docs/BENCHMARKS.md. Pure Python: the sections' JSON in,
files out.

A target is a ratio of two numbers measured side by side, against a threshold. Every target the run was meant
to measure is listed; one whose numbers are missing reads NOT MEASURED, with the reason (the section's
status, or why the row did not run).
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import gpu_plan

STREAMED_BOUND = 1.15  # streamed decode step / max(all-resident step, streamed bytes / pinned H2D) (issue 12)
KERNEL_COPY, KERNEL_MIN_WORK = 0.70, 16 * 4096  # paged attention >= 70% of device copy GB/s (issue 3)
KV_PINNED = 0.80  # KV swap at 8k tokens >= 80% of pinned, each direction (issue 4)
RELOAD_PINNED = 0.90  # weight reload >= 90% of pinned H2D (issue 6)
TTFT_PIPELINED = 0.5  # pipelined / full time to first token at resident 0 (issue 6)
ENGINE_VS_HF = {1: 1.0, 8: 2.0}  # tidal / transformers decode tok/s, all resident, per batch (issue 5)
ENGINE_VS_ACCELERATE = 1.0  # tidal / accelerate decode tok/s at resident 0, batch 1 (issue 12)
SWITCH_VS_REBUILD = 5.0  # a model rebuilt at each switch / tidal's preempt + resume, time to first token (issue 17)
MET, MISSED, NOT_MEASURED = "MET", "MISSED", "NOT MEASURED"
_OPS = {"<=": lambda a, b: a <= b, ">=": lambda a, b: a >= b, ">": lambda a, b: a > b,
        "==": lambda a, b: a == b}


def _verdict(target, where, value, op, threshold, section, detail="", why=""):
    if value is not None and not math.isfinite(value):
        value, why = None, f"not finite ({value}): {detail}"
    verdict = NOT_MEASURED if value is None else MET if _OPS[op](value, threshold) else MISSED
    return {"target": target, "where": where, "value": value, "op": op, "threshold": threshold,
            "verdict": verdict, "section": section, "detail": detail if value is not None else why}


def _below_bound(value) -> str:
    # a bound the step beats is no bound: say so rather than call it a result
    if value is None or value >= 0.95:
        return ""
    return "; BELOW the bound: the all-resident reference step was the slower one (noise, or a warm-up in it)"


def _why(results, section) -> str:
    res = results["sections"].get(section)
    return f"section {section} not run" if res is None else f"section {section}: {res.get('status', '?')}"


def _streaming(results, quick):
    res = results["sections"].get("streaming", {})
    rows = {(r.get("model"), r.get("kind"), r.get("resident_fraction")): r for r in res.get("decode", [])}
    out = []
    for m, g in gpu_plan.grid(gpu_plan.STREAMING, quick):
        for f in (0.0, 0.5):
            if f not in g["tidal"]:
                continue
            r = rows.get((m.label, "tidal", f), {})
            value, detail = r.get("step_over_bound"), ""
            if value is not None:
                detail = (f"step {r['step_ms']:.1f} ms; bound {r['bound_ms']:.1f} ms = max(all resident "
                          f"{r['resident_ms']:.1f} ms, {r['mb_per_step']:.0f} MB / {r['h2d_gbps']:.1f} GB/s)"
                          + _below_bound(value))
            out.append(_verdict("streamed decode step / bound (tidal.offload)", f"{m.label}, resident {f:g}",
                                value, "<=", STREAMED_BOUND, "streaming", detail,
                                r.get("skipped") or _why(results, "streaming")))
    return out


def _kernels(results, quick):
    res = results["sections"].get("kernels", {})
    why = _why(results, "kernels")
    checks = res.get("correctness") or []
    ok = sum(1 for c in checks if c[-1])
    out = [_verdict("compiled kernels within tolerance of float64 / kernels checked", "all dtypes and shapes",
                    ok / len(checks) if checks else None, "==", 1.0, "kernels", f"{ok} of {len(checks)}",
                    why)]
    rows = {(r["batch"], r["context"]): r for r in res.get("rows", [])}
    for b, c in gpu_plan.grid(gpu_plan.KERNEL_CASES, quick):
        if b * c < KERNEL_MIN_WORK:
            continue
        r, where = rows.get((b, c), {}), f"batch {b} x context {c}"
        out.append(_verdict("paged attention GB/s / device copy GB/s", where, r.get("of_copy"), ">=",
                            KERNEL_COPY, "kernels",
                            f"{r.get('tidal_gbps', 0):.0f} / {res.get('copy_gbps', 0):.0f} GB/s", why))
        sdpa, ours = r.get("sdpa_us"), r.get("tidal_us")
        speed = sdpa / ours if ours and sdpa and math.isfinite(sdpa) else None  # NaN: SDPA did not fit
        out.append(_verdict("SDPA time / paged attention time", where, speed, ">", 1.0, "kernels",
                            f"{sdpa or 0:.0f} / {ours or 0:.0f} us", "SDPA not run (memory)" if r else why))
    return out


def _kv(results, quick):
    res = results["sections"].get("kv", {})
    at8k, pinned = res.get("fraction_of_pinned_at_8k") or {}, res.get("pinned_gbps") or {}
    if 8192 not in gpu_plan.grid(gpu_plan.KV, quick)["tokens"]:
        return []
    out = []
    for d, link in (("out", "D2H"), ("in", "H2D")):
        gbps = next((r["gbps"] for r in res.get("rows", []) if r["tokens"] == 8192 and r["kind"] == "tidal"
                     and r["direction"] == d), 0)
        out.append(_verdict(f"KV swap-{d} GB/s / pinned {link} GB/s",
                            f"8k tokens, {res.get('layers', '?')} layers", at8k.get(d), ">=", KV_PINNED, "kv",
                            f"{gbps:.1f} / {pinned.get(d, 0):.1f} GB/s", _why(results, "kv")))
    return out


def _preemption(results, quick):
    res = results["sections"].get("preemption", {})
    targets, why = res.get("targets") or {}, _why(results, "preemption")
    h2d = (res.get("bandwidth") or {}).get("h2d_gbps", 0)
    out = []
    for m, _ in gpu_plan.grid(gpu_plan.PREEMPTION, quick):
        v = targets.get(m.label, {})
        out.append(_verdict("weight reload GB/s / pinned H2D GB/s (median over cells)", m.label,
                            v.get("reload_of_pinned"), ">=", RELOAD_PINNED, "preemption",
                            f"{v.get('reload_gbps', 0):.1f} / {h2d:.1f} GB/s", why))
        out.append(_verdict("pipelined TTFT / full TTFT", f"{m.label}, resident 0", v.get("ttft_ratio_at_0"),
                            "<=", TTFT_PIPELINED, "preemption",
                            f"overlap bound (est.) {v.get('ttft_overlap_bound_at_0', 0):.2f}; at best 1/2, "
                            "met only with equality", why))
    return out


def _engine(results, quick):
    res = results["sections"].get("engine", {})
    rows = {(r.get("model"), r.get("kind"), r.get("resident_fraction"), r.get("batch")): r
            for r in res.get("decode", []) if "tok_s" in r}
    why = _why(results, "engine")
    out = []
    for m, g in gpu_plan.grid(gpu_plan.ENGINE, quick):
        planned = next((b for f, k, b in g["runs"] if f == 1.0 and k == "tidal"), ())
        for batch in (b for b in ENGINE_VS_HF if b in planned):
            t, h = rows.get((m.label, "tidal", 1.0, batch)), rows.get((m.label, "transformers", 1.0, batch))
            value = t["tok_s"] / h["tok_s"] if t and h else None
            detail = f"{t['tok_s']:.1f} / {h['tok_s']:.1f} tok/s" if value is not None else ""
            where = f"{m.label}, all resident, batch {batch}"
            out.append(_verdict("tidal / transformers decode tok/s", where, value, ">=", ENGINE_VS_HF[batch],
                                "engine", detail, why))
        t, a = rows.get((m.label, "tidal", 0.0, 1)), rows.get((m.label, "accelerate", 0.0, 1))
        value = t["tok_s"] / a["tok_s"] if t and a else None
        out.append(_verdict("tidal / accelerate decode tok/s", f"{m.label}, resident 0, batch 1", value, ">=",
                            ENGINE_VS_ACCELERATE, "engine",
                            f"{t['tok_s']:.2f} / {a['tok_s']:.2f} tok/s" if value is not None else "", why))
        value, detail = (t or {}).get("step_over_bound"), ""
        if value is not None:
            detail = (f"step {t['step_ms']:.1f} ms; bound {t['bound_ms']:.1f} ms = max(all resident "
                      f"{t['resident_ms']:.1f} ms, {t['link_ms']:.1f} ms of link)" + _below_bound(value))
        out.append(_verdict("engine decode step / bound", f"{m.label}, resident 0, batch 1", value, "<=",
                            STREAMED_BOUND, "engine", detail, why))
    return out


def _switch(results, quick):
    res = results["sections"].get("switch", {})
    targets, why = res.get("targets") or {}, _why(results, "switch")
    rows = {(r["model"], r["arm"]): r for r in res.get("rows", []) if "switch_median_s" in r}
    out = []
    for m, g in gpu_plan.grid(gpu_plan.SWITCH, quick):
        v = targets.get(m.label, {})
        t, h = rows.get((m.label, "tidal")), rows.get((m.label, "rebuild-hf"))
        detail = ""
        if t and h:
            detail = (f"{h['switch_median_s']:.3f} / {t['switch_median_s']:.3f} s, from {g['other'].label}; a "
                      f"free switch would be {v.get('free_switch_bound', 0):.1f}x")
        out.append(_verdict("time to first token after a switch, model rebuilt (transformers) / tidal",
                            m.label, v.get("speedup_vs_rebuild-hf"), ">=", SWITCH_VS_REBUILD, "switch", detail,
                            why))
    return out


def _tests(results, quick):
    res = results["sections"].get("tests", {})
    c = res.get("counts") or {}
    ran = c.get("passed", 0) + c.get("failed", 0) + c.get("error", 0)
    complete = res.get("status") == "ok" and not res.get("stopped") and res.get("returncode") in (0, 1)
    why = f"stopped: {res['stopped']}" if res.get("stopped") else _why(results, "tests")
    if c:
        why += (f" ({c.get('passed', 0)} passed, {c.get('failed', 0)} failed, {c.get('error', 0)} errors "
                "so far)")
    where = f"pytest {res.get('paths', 'tests')} on {results.get('device')}"
    value = c.get("passed", 0) / ran if ran and complete else None
    return [_verdict("tests passed / tests run", where, value, "==", 1.0, "tests", res.get("summary", ""),
                     why)]


VERDICTS = [_tests, _kernels, _kv, _streaming, _engine, _preemption, _switch]


def verdicts(results: dict) -> list[dict]:
    return [v for f in VERDICTS for v in f(results, results.get("quick", False))]


def verdict_lines(results: dict) -> str:
    """One line per target: 'where: target = 1.08 (target <= 1.15): MET'."""
    lines = []
    for v in results.get("verdicts", []):
        value = "-" if v["value"] is None else f"{v['value']:.2f}"
        lines.append(f"{v['where']}: {v['target']} = {value} (target {v['op']} {v['threshold']:g}): "
                     f"{v['verdict']}")
    return "\n".join(lines)


def _machine(results) -> dict:
    return next((r["machine"] for r in results["sections"].values()
                 if isinstance(r.get("machine"), dict) and "error" not in r["machine"]), {})


def fragment(results: dict) -> str:
    m, rates = _machine(results), results.get("rates") or {}
    gpu = m.get("gpu") or f"no GPU ({results.get('device')})"
    if m.get("gpu"):
        gpu += f" ({m.get('gpu_memory_gib')} GiB, {m.get('sms')} SMs, CUDA {m.get('cuda')})"
    measured = ", ".join(f"{k} {rates[k]:.2f}" for k in rates.get("measured", ())) or "none"
    lines = [f"### GPU check: {gpu}, {m.get('date', '?')}", "",
             f"Command: `{results.get('command')}` (budget {results.get('budget_s', 0):.0f} s, took "
             f"{results.get('seconds', 0):.0f} s). Machine: {gpu}, {m.get('cpus')} CPUs; torch "
             f"{m.get('torch')}, triton {m.get('triton')}; {m.get('tidal_native')}.", "",
             f"Rates measured in this run (the plan's estimates use them): {measured}.", "",
             "| section | status | seconds | share | estimated |", "|---|---|---:|---:|---:|"]
    for name, r in results["sections"].items():
        lines.append(f"| {name} | {r.get('status')} | {r.get('seconds')} | {r.get('share_s')} | "
                     f"{r.get('estimated_s')} |")
    lines += ["", "Targets: each a ratio of numbers measured side by side in this run.", "",
              "| target | where | ratio | target | verdict | measured |", "|---|---|---:|---|---|---|"]
    for v in results.get("verdicts", []):
        value = "-" if v["value"] is None else f"{v['value']:.2f}"
        lines.append(f"| {v['target']} | {v['where']} | {value} | {v['op']} {v['threshold']:g} | "
                     f"**{v['verdict']}** | {v['detail']} |")
    for name, r in results["sections"].items():
        if r.get("table"):
            lines += ["", f"#### {name}", "", "```text", r["table"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def write(out: Path, results: dict) -> list[Path]:
    """results.json and BENCHMARKS-fragment.md in `out`, with the verdicts computed now; returns the paths."""
    results["verdicts"] = verdicts(results)
    results["machine"] = _machine(results)
    tally = [v["verdict"] for v in results["verdicts"]]
    results["verdict_counts"] = {k: tally.count(k) for k in (MET, MISSED, NOT_MEASURED)}
    paths = [out / "results.json", out / "BENCHMARKS-fragment.md"]
    tmp = paths[0].with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str))
    tmp.replace(paths[0])
    paths[1].write_text(fragment(results))
    # beside them the study's report and pytest's whole output, which live in the work dir, outside --out
    for key, section, name in (("report", "study", "STUDY-REPORT.md"), ("log", "tests", "tests-pytest.log")):
        src = (results["sections"].get(section) or {}).get(key)
        if src and Path(src).is_file():
            paths.append(Path(shutil.copyfile(src, out / name)))
    return paths
