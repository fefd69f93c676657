"""`tidal simulate`: the command's parser (`add_parser`) and `simulate(...)`, which runs each policy over the
same workload on simulated engines and writes `simulate.json` (and, with `--rates`, SLO attainment against
request rate)."""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from ..errors import ConfigError
from ..serve.config import parse_size

POLICIES = ("exclusive", "lru", "cost")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "simulate", help="replay a workload through the scheduler's policies on simulated engines",
        description="Run tidal's scheduling policies (the very objects the live scheduler runs) over a workload "
        "on simulated engines whose step, preemption, resume and residency-change times come from each model's "
        "profile (`tidal profile`). Writes OUT/simulate.json. See docs/SCHEDULING.md.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workload", metavar="SPEC", help="a synthetic workload: rate=10,cv=1,zipf=1.1,duration=3600,"
                     "seed=0 (and prompt_mean, prompt_sigma, output_mean, output_sigma, prompt_max, output_max, "
                     "lengths=FILE); models by popularity in --profile order")
    src.add_argument("--trace", metavar="FILE", help="a trace: .jsonl (timestamp, model, prompt_tokens, "
                     "output_tokens) or an Azure LLM inference .csv (models assigned by Zipf, --zipf/--seed)")
    src.add_argument("--validate", metavar="RUN_DIR", help="replay a live run of bench/scheduler_bench.py (its "
                     "scheduler.json: arrivals, budgets, engine settings, profiles) and compare; writes "
                     "OUT/validation.json")
    p.add_argument("--profile", action="append", default=[], metavar="NAME=PROFILE",
                   help="a model and its profile.json (repeat; the first is the most popular)")
    p.add_argument("--policy", default="all", help=f"{', '.join(POLICIES)} or all (default)")
    p.add_argument("--device-budget", metavar="SIZE", help="device bytes the models share, e.g. 40GiB")
    p.add_argument("--host-budget", metavar="SIZE", help="host bytes the models share (default: no limit)")
    p.add_argument("--kv-cache", default="1GiB", metavar="SIZE", help="each model's device KV pool (default 1GiB)")
    p.add_argument("--max-batch-size", type=int, default=8, help="each engine's running batch (default 8)")
    p.add_argument("--block-size", type=int, default=16, help="KV block tokens (default 16)")
    p.add_argument("--slo", action="append", default=[], metavar="[NAME:]ttft=S,tpot=S",
                   help="SLOs in seconds, for every model or (NAME:...) one")
    p.add_argument("--zipf", type=float, default=1.0, help="an Azure trace's model popularity (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="an Azure trace's model assignment seed (default 0)")
    p.add_argument("--rates", metavar="R1,R2,...", help="with --workload: also sweep these request rates "
                   "(SLO attainment per policy against rate, in simulate.json and rates.png)")
    p.add_argument("--out", required=True, metavar="DIR")
    p.set_defaults(func=simulate_command)


def parse_slos(values, names) -> dict:
    """`--slo` values -> name -> (slo_ttft_s, slo_tpot_s)."""
    out = {n: (None, None) for n in names}
    for value in values:
        who, _, spec = value.rpartition(":") if ":" in value.split("=")[0] else ("", "", value)
        if who and who not in out:
            raise ConfigError(f"--slo {value!r}: no model {who!r} (models: {', '.join(names)})")
        slo = {}
        for part in spec.split(","):
            key, sep, number = part.partition("=")
            if not sep or key not in ("ttft", "tpot"):
                raise ConfigError(f"--slo {value!r}: write ttft=SECONDS,tpot=SECONDS")
            try:
                slo[key] = float(number)
            except ValueError:
                raise ConfigError(f"--slo {value!r}: {number!r} is not a number of seconds") from None
        for n in [who] if who else names:
            ttft, tpot = out[n]
            out[n] = (slo.get("ttft", ttft), slo.get("tpot", tpot))
    return out


def simulate_command(args) -> int:
    from .engine import SimModelConfig
    from . import workload as wl

    out = Path(args.out)
    if args.validate:
        from . import validate

        doc = validate.validate(args.validate)
        out.mkdir(parents=True, exist_ok=True)
        (out / "validation.json").write_text(json.dumps(doc, indent=1))
        print(validate.table(doc))
        print(f"wrote {out / 'validation.json'}")
        return 0
    if not args.profile or args.device_budget is None:
        raise ConfigError("give --profile NAME=PROFILE (one per model) and --device-budget")
    profiles = []
    for value in args.profile:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--profile {value!r}: write NAME=PROFILE.json")
        profiles.append((name, path))
    names = [n for n, _ in profiles]
    slos = parse_slos(args.slo, names)
    kv = parse_size(args.kv_cache, "--kv-cache")
    models = [SimModelConfig.from_profile(n, p, kv_cache_bytes=kv, max_batch_size=args.max_batch_size,
                                          block_size=args.block_size, slo_ttft_s=slos[n][0], slo_tpot_s=slos[n][1])
              for n, p in profiles]
    policies = POLICIES if args.policy == "all" else tuple(args.policy.split(","))
    bad = [p for p in policies if p not in POLICIES]
    if bad:
        raise ConfigError(f"--policy {bad[0]!r}: one of {', '.join(POLICIES)} or all")
    if args.workload:
        spec = wl.WorkloadSpec.parse(args.workload)
        trace = wl.generate(spec, names)
    else:
        trace = wl.load(args.trace, names, zipf=args.zipf, seed=args.seed)
    budgets = (parse_size(args.device_budget, "--device-budget"),
               None if args.host_budget is None else parse_size(args.host_budget, "--host-budget"))
    doc = simulate(models, trace, policies, *budgets)
    doc["command"] = "tidal simulate " + " ".join(sys.argv[2:])
    if args.rates:
        if not args.workload:
            raise ConfigError("--rates needs --workload (a trace has its own rate)")
        rates = [float(r) for r in args.rates.split(",")]
        doc["rates"] = {"rates": rates, "slo_attainment": {p: [] for p in policies}}
        for rate in rates:
            swept = simulate(models, wl.generate(dataclasses.replace(spec, rate=rate), names), policies, *budgets)
            for p in policies:
                doc["rates"]["slo_attainment"][p].append(swept["policies"][p]["slo_attainment"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "simulate.json").write_text(json.dumps(doc, indent=1))
    print(table(doc))
    if args.rates:
        _rates_figure(doc, out / "rates.png")
    print(f"wrote {out / 'simulate.json'}")
    return 0


def simulate(models, trace, policies, device_budget, host_budget=None) -> dict:
    """Each policy over `trace` (workload.TraceRequest) on simulated `models` (engine.SimModelConfig): the
    document `tidal simulate` writes, its `policies` keyed like the live benchmark's metrics."""
    from . import workload as wl
    from .metrics import Served, summarize
    from .simulator import Simulator

    slos = {m.name: (m.slo_ttft_s, m.slo_tpot_s) for m in models}
    doc = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": f"{os.cpu_count()} CPUs",
           "workload": wl.summary(trace), "device_budget": device_budget, "host_budget": host_budget,
           "models": [{"name": m.name, "num_layers": m.num_layers, "layer_bytes": m.layer_bytes,
                       "top_bytes": m.top_bytes, "kv_cache_bytes": m.kv_cache_bytes, "slo_ttft_s": m.slo_ttft_s,
                       "slo_tpot_s": m.slo_tpot_s} for m in models], "policies": {}}
    for policy in policies:
        t = time.perf_counter()
        result = Simulator(models, policy, device_budget, host_budget).run(trace)
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
                    "decisions": result.decisions, "ticks": result.ticks, "wall_s": round(wall, 3),
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


def _rates_figure(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    rates = doc["rates"]["rates"]
    for p, ys in doc["rates"]["slo_attainment"].items():
        ax.plot(rates, ys, marker="o", label=p)
    ax.set(xlabel="requests / s", ylabel="SLO attainment", ylim=(0, 1.02), title="tidal simulate")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
