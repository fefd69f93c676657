"""`tidal simulate`: the command's parser (`add_parser`) and `simulate(...)`, which runs each policy over the
same workload on simulated engines and writes `simulate.json`, `timeline.png` (which model is where, per
policy) and, with `--rates`, SLO attainment against request rate (`rates.png`)."""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from ..errors import ConfigError
from ..serve.config import parse_size

POLICIES = ("exclusive", "lru", "cost")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "simulate", help="replay a workload through the scheduler's policies on simulated engines",
        description="Run tidal's scheduling policies (the very objects the live scheduler runs) over a workload "
        "on simulated engines whose step, preemption, resume and residency-change times come from each model's "
        "profile (`tidal profile`). Writes OUT/simulate.json and OUT/timeline.png. See docs/SCHEDULING.md.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workload", metavar="SPEC", help="a synthetic workload: rate=10,cv=1,zipf=1.1,duration=3600,"
                     "seed=0 (and prompt_mean, prompt_sigma, output_mean, output_sigma, prompt_max, output_max, "
                     "lengths=FILE); models by popularity in --profile order")
    src.add_argument("--trace", metavar="FILE", help="a trace: .jsonl (timestamp, model, prompt_tokens, "
                     "output_tokens) or an Azure LLM inference .csv (models assigned by Zipf, --zipf/--seed)")
    src.add_argument("--validate", metavar="RUN_DIR", help="replay a live run of bench/scheduler_bench.py (its "
                     "scheduler.json: arrivals, budgets, engine settings, profiles) and compare; writes "
                     "OUT/validation.json")
    p.add_argument("--live", nargs="?", const="", metavar="BENCH_ARGS", help="with --validate: make the live run "
                   "first, into RUN_DIR (the repository's bench/scheduler_bench.py with the exclusive, lru and cost "
                   "policies, and these arguments of its own, e.g. \"--workloads nopay --seed 1 --link 0.18\")")
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
    from . import figures, workload as wl
    from .engine import SimModelConfig
    from .report import simulate, table

    out = Path(args.out)
    if args.live is not None and not args.validate:
        raise ConfigError("--live makes the live run for --validate RUN_DIR; give --validate")
    if args.validate:
        from . import validate

        if args.live is not None:
            validate.run_live(args.validate, args.live)
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
    figures.timeline_figure(doc, out / "timeline.png")
    if args.rates:
        figures.rates_figure(doc, out / "rates.png")
    print(f"wrote {out / 'simulate.json'} and the figures beside it")
    return 0
