"""The simulator against a live run (`validate`): the same workload (the live run's own arrivals, lengths,
budgets, engine settings, and the profiles its cost policy was given) replayed in the simulator, each policy's
metrics compared with the live ones. The live run is `bench/scheduler_bench.py`'s output directory (its
scheduler.json): real engines through `tidal.Scheduler` behind the CPU backend's emulated link, made beforehand
or by `run_live` (`tidal simulate --validate DIR --live`)."""
from __future__ import annotations

import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

from ..errors import ConfigError

METRICS = ("ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s", "throughput_rps")
POLICIES = ("exclusive", "lru", "cost")  # the scheduler's (the bench's `static` is its own reference)
TARGET = 0.15  # the issue's: median relative error at most 15%


def _rel(sim: float | None, live: float | None) -> float | None:
    if sim is None or live is None:
        return None
    return abs(sim - live) / live if live else (0.0 if sim == live else None)


def swapped(attainment: dict) -> list[tuple[str, str]]:
    """The pairs of policies (better live first) that the simulator ranks the other way by SLO attainment
    (`attainment`: policy -> {"live", "sim"}). Equal attainment is no ranking: a tie on one side agrees with
    either order on the other (the live run without the link meets every SLO under all three policies)."""
    return [(p, q) for p in attainment for q in attainment
            if attainment[p]["live"] > attainment[q]["live"] and attainment[p]["sim"] < attainment[q]["sim"]]


def run_live(run_dir, bench_args: str = "") -> None:
    """The live run `validate` compares with, made now: the repository's bench/scheduler_bench.py with the
    scheduler's three policies into `run_dir`, `bench_args` passed on (its own options: --workloads, --seed,
    --duration, --link, --quick, ...). ConfigError when the bench is not beside the package (an installed wheel
    has no bench/) or the run fails."""
    bench = Path(__file__).resolve().parents[2] / "bench" / "scheduler_bench.py"
    if not bench.is_file():
        raise ConfigError(f"--live runs {bench}, which is not there: validate from a checkout of tidal's repository, "
                          "or give --validate the directory of a run made there")
    cmd = [sys.executable, str(bench), "--out", str(run_dir), "--policies", ",".join(POLICIES), *shlex.split(bench_args)]
    print("live run: " + " ".join(cmd), flush=True)
    if subprocess.run(cmd).returncode != 0:
        raise ConfigError(f"the live run failed: {' '.join(cmd)}")


def validate(run_dir) -> dict:
    """The comparison document: per workload and policy, each metric live and simulated with its relative
    error (and preemptions: the switches), the median relative error, and whether the policies rank the same
    by SLO attainment (no pair ordered one way live and the other simulated: `swapped`)."""
    from .engine import SimModelConfig
    from .report import simulate
    from .workload import TraceRequest

    path = Path(run_dir) / "scheduler.json"
    try:
        live_doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"--validate {run_dir}: no readable scheduler.json ({exc})") from None
    engine = {k: int(v) for k, v in live_doc["settings"]["engine"].items()
              if k in ("kv_cache_bytes", "block_size", "max_batch_size", "prefetch_depth")}
    out, errors, same = {"live_run": str(path), "live_command": live_doc.get("command"), "workloads": {}}, [], True
    for name, w in live_doc["workloads"].items():
        profiles = w["policies"].get("cost", {}).get("cost_models")
        if not profiles:
            raise ConfigError(f"--validate {run_dir}: workload {name!r} has no profiles (run it with the cost policy)")
        models = [SimModelConfig.from_profile(
            m["name"], profiles[m["name"]], kv_cache_bytes=engine["kv_cache_bytes"], block_size=engine["block_size"],
            max_batch_size=engine["max_batch_size"], ring_slots=engine["prefetch_depth"] + 1,
            slo_ttft_s=m["slo_ttft_s"], slo_tpot_s=m["slo_tpot_s"]) for m in w["models"]]
        trace = [TraceRequest(a["t"], a["model"], a["prompt_len"], a["max_new_tokens"]) for a in w["arrivals"]]
        policies = [p for p in POLICIES if w["policies"].get(p, {}).get("available")]
        sim = simulate(models, trace, policies, w["device_budget_bytes"])
        rows = {}
        for p in policies:
            live, simulated = w["policies"][p], sim["policies"][p]
            row = {k: {"live": live[k], "sim": simulated[k], "error": _rel(simulated[k], live[k])} for k in METRICS}
            lp, sp = live["switches"]["Preempt"], simulated["switches"]["Preempt"]
            row["preemptions"] = {"live": lp, "sim": sp, "error": abs(sp - lp) / max(lp, 1)}
            row["slo_attainment"] = {"live": live["slo_attainment"], "sim": simulated["slo_attainment"]}
            errors += [v["error"] for v in row.values() if v.get("error") is not None]
            rows[p] = row
        rank = {k: sorted(policies, key=lambda p: -rows[p]["slo_attainment"][k]) for k in ("live", "sim")}
        same &= not swapped({p: rows[p]["slo_attainment"] for p in policies})
        out["workloads"][name] = {"link_gbps": w["link"].get("gbps"), "policies": rows, "ranking": rank,
                                  "median_error": statistics.median(
                                      [v["error"] for r in rows.values() for v in r.values()
                                       if v.get("error") is not None])}
    out.update(median_error=statistics.median(errors) if errors else None, target=TARGET, ranking_same=same,
               target_met=bool(errors) and statistics.median(errors) <= TARGET and same)
    return out


def table(doc: dict) -> str:
    lines = ["| workload | policy | " + " | ".join(f"{k} live / sim (error)" for k in METRICS) +
             " | preemptions | SLO attainment live / sim |", "|---|---|" + "---|" * (len(METRICS) + 2)]
    for name, w in doc["workloads"].items():
        for p, r in w["policies"].items():
            cells = [f"{r[k]['live']:.3g} / {r[k]['sim']:.3g} ({r[k]['error']:.0%})" for k in METRICS]
            pre, att = r["preemptions"], r["slo_attainment"]
            switches = f"{pre['live']} / {pre['sim']} ({pre['error']:.0%})"
            lines.append(f"| {name} | {p} | " + " | ".join(cells) +
                         f" | {switches} | {att['live']:.3f} / {att['sim']:.3f} |")
    lines.append(f"\nmedian relative error {doc['median_error']:.1%} (target {doc['target']:.0%}); policies ranked "
                 f"the same by SLO attainment: {doc['ranking_same']}")
    return "\n".join(lines)
