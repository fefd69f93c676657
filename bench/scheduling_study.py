"""Where co-residency with partial offload beats time-slicing with preemption (docs/SCHEDULING.md, "The study's
question"): pairs and triples of published model shapes (0.5B to 14B) on GPU-shaped cost models
(`tidal.simulate.shapes`: an H100-class device behind the study's PCIe Gen4 link, or behind GH200's NVLink-C2C;
stated assumptions), across request rates and burstiness, simulated with `tidal simulate`'s simulator.

Per group, rate and cv, the same workload under
  time-slicing  `exclusive`: one model on the device at full residency, the others preempted (weights to the
                host, KV swapped), switching first come first served;
  co-residency  every model active at once, each at the resident fraction the cost policy's co-residency
                would give it in the budget (`scheduler.plans.greedy`), the rest of its layers streamed (`lru`,
                which then never preempts);
and SLO attainment of each, under interactive SLOs (TTFT 2 s, TPOT 100 ms) and relaxed ones (10 s, 500 ms);
aging in seconds (a model waiting 10 s takes the device), not the live loop's 32 ticks. Budget: 75% of the
group's footprint with every layer resident (weights and a 2 GiB KV pool each), so that the models cannot all be
resident, and at least 105% of its largest model's, so that time-slicing can run it.

    .venv/bin/python bench/scheduling_study.py --out out/study [--duration 300] [--cost]

`--cost` adds tidal's `cost` policy on the same traces (the same aging), which chooses per tick.
"""
from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

from tidal.simulate.report import simulate
from tidal.simulate.shapes import LINKS, gpu_model
from tidal.simulate.workload import WorkloadSpec, generate

GROUPS = {"0.5B+8B": ("qwen2.5-0.5b", "llama-3-8b"), "1B+8B": ("llama-3.2-1b", "llama-3-8b"),
          "3B+14B": ("qwen2.5-3b", "qwen2.5-14b"), "8B+14B": ("llama-3-8b", "qwen2.5-14b"),
          "0.5B+3B+8B": ("qwen2.5-0.5b", "qwen2.5-3b", "llama-3-8b"),
          "1B+8B+14B": ("llama-3.2-1b", "llama-3-8b", "qwen2.5-14b")}
RATES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
CVS = (1.0, 4.0)
KV = 2 << 30
BUDGET_OF_SUM = 0.75
LARGEST = 1.05  # and at least this much of the largest model alone: time-slicing must be able to run it
SLOS = {"interactive": dict(slo_ttft_s=2.0, slo_tpot_s=0.1), "relaxed": dict(slo_ttft_s=10.0, slo_tpot_s=0.5)}
# aging in seconds, not ticks: the scheduler's default (32 ticks) is a live CPU loop's, and GPU-fast steps pass
# 32 ticks in a fraction of a second, so time-slicing would switch models every few hundred milliseconds
AGING = dict(max_wait_s=10.0, max_skipped_ticks=1_000_000)


def group_models(presets, fractions=None, slo=None, link="pcie4"):
    fractions = fractions or [1.0] * len(presets)
    return [gpu_model(f"m{i}-{p}", p, KV, link, max_batch_size=16, resident_fraction=f,
                      **(slo or SLOS["interactive"])) for i, (p, f) in enumerate(zip(presets, fractions))]


def co_fractions(presets, budget: int, link: str) -> list[float]:
    """Each model's resident fraction when all share `budget`, as the cost policy's co-residency chooses them
    (`scheduler.plans.greedy`: one layer at a time to the model whose step shrinks most per byte)."""
    from tidal.scheduler.plans import greedy

    models = group_models(presets, link=link)
    room = budget - sum(m.device_bytes(0) for m in models)
    if room < 0:
        raise SystemExit(f"{presets}: not even the non-layer weights and KV pools fit the budget")
    step = lambda m, r: m.cost_model.predict_step(r, 1, 512)  # noqa: E731
    resident = greedy(step, models, {m.name: 0 for m in models}, room)
    return [resident[m.name] / m.num_layers for m in models]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--duration", type=float, default=300.0)
    ap.add_argument("--cost", action="store_true", help="also the cost policy (asked every tick: slower)")
    ap.add_argument("--slos", default=",".join(SLOS), help=f"which SLO settings (default: {','.join(SLOS)})")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    t0 = time.perf_counter()
    for gname, presets in GROUPS.items():
        full = group_models(presets)
        sizes = [m.device_bytes(m.num_layers) for m in full]
        budget = int(max(BUDGET_OF_SUM * sum(sizes), LARGEST * max(sizes)))
        names = [m.name for m in full]
        for link, sname, cv, rate in itertools.product(LINKS, args.slos.split(","), CVS, RATES):
            slo, frac = SLOS[sname], co_fractions(presets, budget, link)
            spec = WorkloadSpec(rate=rate, cv=cv, zipf=1.0, duration=args.duration, seed=0, prompt_mean=512,
                                output_mean=128, prompt_max=2048, output_max=512)
            trace = generate(spec, names)
            ts = simulate(group_models(presets, None, slo, link), trace, ["exclusive"], budget, **AGING)
            cr = simulate(group_models(presets, frac, slo, link), trace, ["lru"], budget, **AGING)
            ts, cr = ts["policies"]["exclusive"], cr["policies"]["lru"]
            assert cr["switches"]["Preempt"] == 0, (gname, rate, cv)  # co-residency never preempts
            row = {"group": gname, "presets": presets, "link": link, "slo": sname, "cv": cv, "rate": rate,
                   "budget": budget, "co_fraction": frac, "time_slicing": _keep(ts), "co_residency": _keep(cr)}
            if args.cost:
                c = simulate(group_models(presets, None, slo, link), trace, ["cost"], budget, **AGING)
                row["cost"] = _keep(c["policies"]["cost"]) | {"residency_changes": c["policies"]["cost"][
                    "residency_changes"]}
            rows.append(row)
            print(f"{gname:11s} {link:5s} {sname:11s} cv {cv:g} rate {rate:5g}: time-slicing "
                  f"{ts['slo_attainment']:.3f} co-residency ({'/'.join(f'{x:.2f}' for x in frac)} resident) "
                  f"{cr['slo_attainment']:.3f}" + (f" cost {row['cost']['slo_attainment']:.3f}" if args.cost else ""),
                  flush=True)
    from tidal.simulate import shapes

    assumptions = {k: getattr(shapes, k) for k in ("HBM_BYTES_S", "HBM_EFFICIENCY", "LAUNCH_S", "PER_SEQUENCE_S",
                                                    "PEAK_FLOPS", "MFU", "DISK_BYTES_S", "STREAM_OVERHEAD_S")}
    assumptions.update(links=shapes.LINKS, kv_cache_bytes=KV, budget_of_sum=BUDGET_OF_SUM, largest=LARGEST,
                       slos=SLOS, aging=AGING)
    doc = {"command": "bench/scheduling_study.py " + " ".join(argv or []),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "wall_s": round(time.perf_counter() - t0, 1),
           "assumptions": assumptions, "rows": rows}
    (out / "study.json").write_text(json.dumps(doc, indent=1))
    figure(doc, out / "study.png")


def _keep(r: dict) -> dict:
    return {k: r[k] for k in ("slo_attainment", "goodput_rps", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s",
                              "tpot_p99_s", "throughput_rps", "switches")}


def figure(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(r["group"] for r in doc["rows"]))
    panels = [(link, s) for link in LINKS for s in dict.fromkeys(r["slo"] for r in doc["rows"])]
    fig, axes = plt.subplots(len(panels), len(groups), figsize=(3.2 * len(groups), 2.8 * len(panels)),
                             sharey=True, squeeze=False)
    for i, (link, sname) in enumerate(panels):
        for j, g in enumerate(groups):
            ax = axes[i][j]
            for cv, style in zip(CVS, ("-", "--")):
                rs = [r for r in doc["rows"] if r["group"] == g and r["cv"] == cv and r["slo"] == sname and
                      r["link"] == link]
                xs = [r["rate"] for r in rs]
                ax.plot(xs, [r["time_slicing"]["slo_attainment"] for r in rs], "o" + style, color="C0",
                        label=f"time-slicing, cv {cv:g}")
                ax.plot(xs, [r["co_residency"]["slo_attainment"] for r in rs], "s" + style, color="C1",
                        label=f"co-residency, cv {cv:g}")
                if rs and "cost" in rs[0]:
                    ax.plot(xs, [r["cost"]["slo_attainment"] for r in rs], "^" + style, color="C2",
                            label=f"cost policy, cv {cv:g}")
            ax.set_xscale("log", base=2)
            frac = "/".join(f"{x:.2f}" for x in rs[0]["co_fraction"])
            ax.set_title(f"{g}, {link}, {sname}\nco-resident {frac}", fontsize=7)
            ax.set_ylim(0, 1.02)
            if i == len(panels) - 1:
                ax.set_xlabel("requests / s")
            if j == 0:
                ax.set_ylabel("SLO attainment")
            ax.legend(fontsize=6)
    fig.suptitle(f"SLO attainment, simulated on GPU-shaped cost models (H100-class; PCIe Gen4 or NVLink-C2C); "
                 f"{doc['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
