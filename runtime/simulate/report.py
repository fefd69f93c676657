"""One workload through several policies (`simulate`): the document `tidal simulate` writes, its metrics keyed
as the live benchmark keys them; and its table (`table`)."""
from __future__ import annotations

import os
import time


def simulate(models, trace, policies, device_budget, host_budget=None, **aging) -> dict:
    """Each policy over `trace` (workload.TraceRequest) on simulated `models` (engine.SimModelConfig): the
    document `tidal simulate` writes, its `policies` keyed like the live benchmark's metrics. `aging`:
    max_wait_s, max_skipped_ticks of the named policies."""
    from . import workload as wl
    from .metrics import Served, summarize
    from .simulator import Simulator

    slos = {m.name: (m.slo_ttft_s, m.slo_tpot_s) for m in models}
    doc = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": f"{os.cpu_count()} CPUs",
           "workload": wl.summary(trace), "device_budget": device_budget, "host_budget": host_budget,
           "models": [{"name": m.name, "num_layers": m.num_layers, "layer_bytes": m.layer_bytes,
                       "top_bytes": m.top_bytes, "kv_cache_bytes": m.kv_cache_bytes, "slo_ttft_s": m.slo_ttft_s,
                       "slo_tpot_s": m.slo_tpot_s, "resident_fraction": m.resident_fraction} for m in models],
           "policies": {}}
    for policy in policies:
        t = time.perf_counter()
        result = Simulator(models, policy, device_budget, host_budget, **aging).run(trace)
        wall = time.perf_counter() - t
        served = [Served(r.model, r.arrival_s, r.first_token_s, r.finished_s, r.output_tokens, r.done)
                  for r in result.requests]
        start = min((r.arrival_s for r in result.requests), default=0.0)
        row = summarize(served, slos, start, result.end_s)
        kinds = [e["action"] for e in result.trace]
        moved: dict[str, int] = {}
        for e in result.trace:
            key = {"Preempt": f"preempt_{e['args'].get('weights')}", "Resume": "resume", "Load": "load",
                   "SetResidency": "residency"}.get(e["action"], e["action"].lower())
            moved[key] = moved.get(key, 0) + e["bytes"]
        row.update({"switches": {k: kinds.count(k) for k in ("Preempt", "Resume", "Load", "Unload")},
                    "residency_changes": kinds.count("SetResidency"), "steps": sum(result.steps.values()),
                    "bytes_moved": moved, "device_utilisation": result.busy_s / max(result.end_s - start, 1e-9),
                    "engine_preemptions": sum(r.engine_preemptions for r in result.requests),
                    "decisions": result.decisions, "ticks": result.ticks, "end_s": result.end_s,
                    "wall_s": round(wall, 3),
                    "timeline": [{k: e[k] for k in ("time", "action", "model", "args")} for e in result.trace]})
        doc["policies"][policy] = row
    return doc


def table(doc: dict) -> str:
    lines = ["| policy | SLO attainment | goodput req/s | TTFT p50 / p99 s | TPOT p50 / p99 ms | preempt / resume / "
             "load | residency changes | wall s |", "|---|---|---|---|---|---|---|---|"]
    for p, r in doc["policies"].items():
        f = lambda x, k=1.0: "-" if x is None else f"{x * k:.3g}"  # noqa: E731
        s = r["switches"]
        lines.append(f"| {p} | {f(r['slo_attainment'])} | {f(r['goodput_rps'])} | {f(r['ttft_p50_s'])} / "
                     f"{f(r['ttft_p99_s'])} | {f(r['tpot_p50_s'], 1e3)} / {f(r['tpot_p99_s'], 1e3)} | "
                     f"{s['Preempt']} / {s['Resume']} / {s['Load']} | {r['residency_changes']} | {r['wall_s']} |")
    return "\n".join(lines)
