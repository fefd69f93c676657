"""How fast `tidal simulate` simulates (issue 16's target: one hour of traffic at 10 requests/s over 5 models
in under 10 s on this machine): the simulator over five GPU-shaped models (`tidal.simulate.shapes`: Qwen2.5-0.5B,
Llama-3.2-1B, Qwen2.5-3B, Llama-3-8B, Qwen2.5-14B on the assumed H100-class device behind `--link`, 2 GiB of KV
each, the device budget 75% of their all-resident footprint, as in bench/scheduling_study.py), a workload of
`--duration` seconds at `--rate` (Poisson, Zipf 1.1, the workload generator's default lengths: prompts of 512
tokens and outputs of 128 on average), interactive SLOs, each policy in turn on the same trace. Prints and
writes, per policy, the wall seconds of `Simulator.run`, the decisions asked of the policy, the ticks and the
SLO attainment; no profile or checkpoint needed.

    .venv/bin/python bench/simulate_speed.py --out out/sim_speed [--duration 3600] [--rate 10] [--link pcie4]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from tidal.simulate.metrics import Served, summarize
from tidal.simulate.shapes import LINKS, gpu_model
from tidal.simulate.simulator import Simulator
from tidal.simulate.workload import WorkloadSpec, generate

PRESETS = ("qwen2.5-0.5b", "llama-3.2-1b", "qwen2.5-3b", "llama-3-8b", "qwen2.5-14b")
KV = 2 << 30
SLO = dict(slo_ttft_s=2.0, slo_tpot_s=0.1)  # bench/scheduling_study.py's interactive SLOs
AGING = dict(max_wait_s=10.0, max_skipped_ticks=1_000_000)  # and its aging (seconds, not ticks)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--duration", type=float, default=3600.0, help="seconds of traffic (default 3600)")
    ap.add_argument("--rate", type=float, default=10.0, help="requests per second (default 10)")
    ap.add_argument("--link", default="pcie4", choices=sorted(LINKS))
    ap.add_argument("--policies", default="lru,exclusive,cost")
    args = ap.parse_args(argv)
    models = [gpu_model(f"m{i}-{p}", p, KV, args.link, max_batch_size=16, **SLO) for i, p in enumerate(PRESETS)]
    full = [m.device_bytes(m.num_layers) for m in models]
    budget = int(max(0.75 * sum(full), 1.05 * max(full)))
    trace = generate(WorkloadSpec(rate=args.rate, cv=1.0, zipf=1.1, duration=args.duration, seed=0),
                     [m.name for m in models])
    slos = {m.name: (m.slo_ttft_s, m.slo_tpot_s) for m in models}
    doc = {"command": "python bench/simulate_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": f"{os.cpu_count()} CPUs",
           "requests": len(trace), "duration_s": args.duration, "rate": args.rate, "link": args.link,
           "device_budget": budget, "policies": {}}
    print(f"{len(trace)} requests over {args.duration:g} s, 5 models, budget {budget / 1e9:.1f} GB, {args.link}")
    for policy in args.policies.split(","):
        t = time.perf_counter()
        result = Simulator(models, policy, budget, **AGING).run(trace)
        wall = time.perf_counter() - t
        served = [Served(r.model, r.arrival_s, r.first_token_s, r.finished_s, r.output_tokens, r.done)
                  for r in result.requests]
        attainment = summarize(served, slos, 0.0, result.end_s)["slo_attainment"]
        doc["policies"][policy] = {"wall_s": round(wall, 2), "decisions": result.decisions, "ticks": result.ticks,
                                   "simulated_s": round(result.end_s, 1), "slo_attainment": round(attainment, 4)}
        print(f"{policy:9s} {wall:6.2f} s wall  {result.decisions:7d} decisions  {result.ticks:8d} ticks  "
              f"{result.end_s:7.0f} s simulated  SLO attainment {attainment:.3f}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
