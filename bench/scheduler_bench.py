"""tidal.Scheduler's policies side by side on a live workload, on this machine (issue 14).

    .venv/bin/python bench/scheduler_bench.py --out DIR [--policies exclusive,lru,cost] [--workloads copay,nopay]
        [--duration S] [--rate R] [--seed N] [--link TARGET|GBPS] [--time-scale X|auto] [--quick]
    .venv/bin/python bench/scheduler_bench.py --out DIR --merge A/scheduler.json B/scheduler.json  # no run

Per workload (bench/scheduler_workload.py): three random-weight fp32 Llama checkpoints of different sizes
(`tidal.presets.build`, cached), a device budget that cannot hold all three, and one arrival trace drawn once
from a seeded numpy Generator: Poisson arrivals at `--rate` per second (default: the workload's own) for
`--duration` s, each request's model
by Zipf popularity, prompt and output lengths uniform. Every policy runs the same trace, live: the scheduler's
loop in its thread (`sched.start()`) and a feeder thread submitting each request at its timestamp (wall clock,
not a tick-driven replay), then up to max(30 s, duration) for the rest to finish (an unfinished request misses
its SLOs). All engines run on the CPU backend behind an emulated host<->device link of one bandwidth (`--link`:
a target of `tidal.backends.link.TARGETS` or gh200-c2c, calibrated by `tidal.study.emulation.calibrate_link`
on the workload's largest model, or GB/s; default each workload's own), one torch thread. The workloads' SLOs
and rates were set on one machine; `--time-scale auto` dilates them to this one (SLOs times, the rate divided
by, the workload's reference GB/s over the link calibrated here, which tracks the decode speed). Each engine
paces its own copies: the three models do not contend for one link.

Per policy: p50/p99 TTFT and TPOT (TPOT: (last token - first token) / (tokens - 1) per request), SLO attainment
(requests meeting both of their model's SLOs / requests), goodput (those per second of the run's span, first
arrival to last finish), throughput, switches (Preempt/Resume/Load in the trace), residency changes
(SetResidency) and bytes moved (the Runtime's preempt/resume reports, load bytes, the engines' residency and
streaming counters). Writes DIR/scheduler.json and DIR/scheduler.png (per policy a timeline of where each model
is, and the TTFT/TPOT CDFs). A policy `tidal.scheduler` does not resolve is reported "not available". For the
`cost` policy, when it resolves, each model's profile.json is made first with `tidal profile DIR --quick --link`
(in DIR/profiles/) and passed as its cost_model with the SLOs. `static` is the bench's own reference, not a
tidal policy (scheduler_workload.StaticCoResidency): all three models loaded once at the largest common
resident fraction that fits the budget, never moved, all stepped: pure co-residency with partial offload.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scheduler_workload as W
import tidal
from tidal.simulate.figures import LEGEND, draw_timeline, segments

METRICS = ("requests", "finished", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s", "slo_attainment",
           "goodput_rps", "throughput_rps", "throughput_tok_s", "switches", "residency_changes", "bytes_moved")


QUICK_PROFILE = ["--fractions", "1", "0.5", "0", "--batches", "1", "2", "--output-lengths", "3", "--contexts", "8",
                 "--repeats", "1", "--max-repeats", "1"]  # --quick: a profile in seconds, for the smoke run


def profile_for(path, link, out: Path, log, quick: bool = False) -> str | None:
    """DIR/profiles/<checkpoint>-link<GB/s>/profile.json for the cost policy, made with `tidal profile --quick` behind the
    same link (reused when present); None when it fails or takes over 10 minutes."""
    name = f"link{link.gbps:.3g}" if link is not None else "nolink"
    dest = out / "profiles" / f"{Path(path).name}-{name}"  # a profile per checkpoint and link
    if (dest / "profile.json").is_file():
        return str(dest / "profile.json")
    cmd = [sys.executable, "-m", "tidal", "profile", str(path), "--quick", "--device", "cpu", "--dtype", "float32",
           "--threads", "1", "--no-progress", "--out", str(dest)] + (QUICK_PROFILE if quick else []) + \
        (["--link", f"{link.gbps:.6g}"] if link is not None else [])
    log(f"profiling for the cost policy: {' '.join(cmd)}")
    try:
        subprocess.run(cmd, check=True, timeout=600, capture_output=True)
    except (subprocess.SubprocessError, OSError) as exc:
        log(f"  profile failed: {exc!r}")
        return None
    return str(dest / "profile.json")


def time_scale(spec: str, w, link, link_spec: str) -> float:
    """The factor by which the workload is dilated in time: SLOs multiplied, the arrival rate divided. `spec`
    a number, or "auto": the workload's reference GB/s over this run's calibrated link (calibration scales the
    link with the machine's decode speed, so a machine that decodes 1.7x slower gets 1.7x the SLOs and
    1/1.7 the requests per second: the same workload in its own time)."""
    if spec == "auto":
        if link is None or w.reference_gbps is None or _is_number(link_spec):  # "none" makes no link
            raise SystemExit(f"--time-scale auto needs a calibrated link (a target, not {link_spec!r}) and a "
                             f"workload with reference_gbps")
        return w.reference_gbps / link.gbps
    if not _is_number(spec) or not float(spec) > 0:
        raise SystemExit(f"--time-scale {spec!r}: a positive number or auto")
    return float(spec)


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def run(args) -> dict:
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    kw = W.engine_kwargs(args.quick)
    policies = [p for p in args.policies.split(",") if p]
    doc = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
           "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
           "machine": {"nproc": os.cpu_count(), "cpu": _cpu_model(), "platform": platform.platform(),
                       "torch": torch.__version__, "torch_threads": 1, "device": "cpu (no GPU)"},
           "arrivals": "feeder thread, wall clock, while the loop runs in its thread (sched.start())",
           "settings": {"duration_s": args.duration, "rate_rps": args.rate, "seed": args.seed, "link": args.link,
                        "quick": args.quick, "engine": {k: str(v) for k, v in kw.items()}},
           "workloads": {}}
    for wname in args.workloads.split(","):
        w = W.workloads(args.quick)[wname]
        paths = W.build_models(w)
        big = max(w.models, key=lambda m: m.preset.param_count())
        link_spec = args.link or w.link
        link = W.make_link(link_spec, paths[big.name], kw)
        log(f"[{wname}] link: " + (f"{link.gbps:.4g} GB/s ({link.label})" if link is not None else "none"))
        scale = time_scale(args.time_scale, w, link, link_spec)
        w = w.scaled(scale)
        foot = {m.name: tidal.Engine.placement(paths[m.name], device="cpu", **kw).footprint.device for m in w.models}
        budget = int(w.budget_of_sum * sum(foot.values()))
        assert budget < sum(foot.values()) and budget >= max(foot.values()), (budget, foot)
        rate = (args.rate or w.rate) / scale
        trace = W.arrivals(w, args.duration, rate, args.seed)
        wdoc = {**w.describe(), "time_scale": scale, "rate_rps": rate,
                "link": {"gbps": link.gbps if link else None,
                                                           "label": link.label if link else "none", "target": link_spec},
                "device_bytes": foot, "device_budget_bytes": budget,
                "arrivals": [{k: a[k] for k in ("t", "model", "max_new_tokens")} | {"prompt_len": len(a["prompt"])}
                             for a in trace], "policies": {}}
        for policy in policies:
            why = W.policy_available(policy)
            if why:
                log(f"[{wname}] {policy}: {why}")
                wdoc["policies"][policy] = {"available": False, "why": why}
                continue
            costs, fractions = None, None
            if policy == W.STATIC:
                fractions = W.static_fractions(w, paths, kw, budget)
            if policy == "cost":
                costs = {m.name: profile_for(paths[m.name], link, out, log, args.quick) for m in w.models}
            log(f"[{wname}] {policy}: {len(trace)} requests over {args.duration} s, budget {budget / 2**20:.1f} MiB "
                f"of {sum(foot.values()) / 2**20:.1f}")
            t = time.monotonic()
            res = W.run_policy(policy, w, paths, kw, link, budget, trace, max(30.0, args.duration), costs,
                               fractions)
            res["available"], res["wall_s"] = True, round(time.monotonic() - t, 1)
            if costs is not None:
                res["cost_models"] = costs
            if fractions is not None:
                res["resident_fractions"] = fractions
            wdoc["policies"][policy] = res
            log(f"  {summary_line(res)}")
        doc["workloads"][wname] = wdoc
    (out / "scheduler.json").write_text(json.dumps(doc, indent=1))
    figure(doc, out / "scheduler.png")
    for line in table(doc):
        print(line)
    return doc


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _f(x, scale=1.0, digits=3):
    return "-" if x is None else f"{x * scale:.{digits}g}"


def summary_line(r: dict) -> str:
    s = r["switches"]
    return (f"SLO {_f(r['slo_attainment'])}, goodput {_f(r['goodput_rps'])}/s, TTFT p50/p99 "
            f"{_f(r['ttft_p50_s'])}/{_f(r['ttft_p99_s'])} s, TPOT p50/p99 {_f(r['tpot_p50_s'], 1e3)}/"
            f"{_f(r['tpot_p99_s'], 1e3)} ms, {r['finished']}/{r['requests']} done, switches P/R/L "
            f"{s['Preempt']}/{s['Resume']}/{s['Load']}, residency {r['residency_changes']}, moved "
            f"{r['bytes_moved']['total_switching'] / 2**20:.0f} MiB (+{r['bytes_moved']['streamed'] / 2**20:.0f} "
            f"MiB streamed){'; ERROR ' + r['error'] if r.get('error') else ''}")


def table(doc: dict) -> list[str]:
    lines = [("| workload | policy | SLO attainment | goodput req/s | throughput req/s (tok/s) | TTFT p50 / p99 s | "
             "TPOT p50 / p99 ms | done | preempt / resume / load | residency changes | MiB moved (+streamed) |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for wname, w in doc["workloads"].items():
        for p, r in w["policies"].items():
            if not r["available"]:
                lines.append(f"| {wname} | {p} | not available | | | | | | | | |")
                continue
            s, b = r["switches"], r["bytes_moved"]
            lines.append(
                f"| {wname} | {p} | {_f(r['slo_attainment'])} | {_f(r['goodput_rps'])} | {_f(r['throughput_rps'])} "
                f"({_f(r['throughput_tok_s'])}) | {_f(r['ttft_p50_s'])} / {_f(r['ttft_p99_s'])} | "
                f"{_f(r['tpot_p50_s'], 1e3)} / {_f(r['tpot_p99_s'], 1e3)} | {r['finished']}/{r['requests']} | "
                f"{s['Preempt']} / {s['Resume']} / {s['Load']} | {r['residency_changes']} | "
                f"{b['total_switching'] / 2**20:.0f} (+{b['streamed'] / 2**20:.0f}) |")
    return lines


def figure(doc: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [(wn, p, r) for wn, w in doc["workloads"].items() for p, r in w["policies"].items() if r["available"]]
    nw = len(doc["workloads"])
    fig = plt.figure(figsize=(14, 1.6 * max(1, len(rows)) + 3.2 * nw))
    gs = fig.add_gridspec(len(rows) + nw, 2, height_ratios=[1.6] * len(rows) + [3.2] * nw)
    for i, (wn, p, r) in enumerate(rows):
        ax = fig.add_subplot(gs[i, :])
        models = [m["name"] for m in doc["workloads"][wn]["models"]]
        off = r["trace_offset_s"]
        segs = segments(r["trace"], models, r["span_s"], r.get("resident_fractions"), offset=off)
        draw_timeline(ax, models, segs, {m: [t - off for t in r["step_times"].get(m, [])] for m in models},
                      [(a["t"], a["model"]) for a in doc["workloads"][wn]["arrivals"]])
        ax.set_title(f"{wn} / {p}: {LEGEND}; | steps, v arrivals; SLO attainment {_f(r['slo_attainment'])}",
                     fontsize=8, loc="left")
        if i == len(rows) - 1:
            ax.set_xlabel("seconds since the first arrival could come")
    for k, wn in enumerate(doc["workloads"]):
        for c, (key, label) in enumerate((("ttft_s", "TTFT (s)"), ("tpot_s", "TPOT (s)"))):
            ax = fig.add_subplot(gs[len(rows) + k, c])
            for p, r in doc["workloads"][wn]["policies"].items():
                if not r["available"]:
                    continue
                xs = np.sort([q[key] for q in r["requests_detail"] if q[key] is not None])
                if len(xs):
                    ax.step(xs, np.arange(1, len(xs) + 1) / len(r["requests_detail"]), where="post", label=p)
            ax.set_xscale("log")
            ax.set_ylim(0, 1)
            ax.set_xlabel(label)
            ax.set_ylabel("fraction of requests")
            ax.set_title(f"{wn}: CDF of {label} (unfinished requests never reach 1)", fontsize=9)
            ax.legend(fontsize=8)
    fig.suptitle(f"tidal.Scheduler, {doc['date']}, {doc['machine']['nproc']}-core CPU, links " +
                 ", ".join(f"{n}: {w['link']['target']}" for n, w in doc["workloads"].items()),
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def merge(paths, out: Path) -> dict:
    docs = [json.loads(Path(p).read_text()) for p in paths]
    doc = {**docs[0], "merged_from": [{"command": d["command"], "date": d["date"]} for d in docs]}
    for d in docs[1:]:
        for n, w in d["workloads"].items():
            if n in doc["workloads"] and doc["workloads"][n]["arrivals"] != w["arrivals"]:
                raise SystemExit(f"{n}: the runs' arrival traces differ; not merged")
            doc["workloads"].setdefault(n, w)["policies"].update(w["policies"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "scheduler.json").write_text(json.dumps(doc, indent=1))
    figure(doc, out / "scheduler.png")
    for line in table(doc):
        print(line)
    return doc


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--policies", default="exclusive,lru,cost,static")
    ap.add_argument("--workloads", default="copay,nopay")
    ap.add_argument("--duration", type=float, default=None, help="seconds of arrivals per policy (default 30, "
                    "--quick 3)")
    ap.add_argument("--rate", type=float, default=None, help="arrivals per second, for every workload (default: "
                    "each workload's own: copay 10, nopay 6; --quick 4)")
    ap.add_argument("--time-scale", default="1", help="dilate the workload in time: SLOs times it, the "
                    "rate divided by it; a number, or auto (the workload's reference GB/s over the "
                    "calibrated link's: the same workload in a slower or faster machine's own time)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--link", default=None, help="a link target (tidal.backends.link.TARGETS, or gh200-c2c), "
                    "GB/s, or none (no emulation), for every workload (default: each workload's own: copay gh200-c2c, nopay a6000-pcie4)")
    ap.add_argument("--quick", action="store_true", help="tiny models, 3 s of arrivals: a smoke run")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="no run: merge these scheduler.json files "
                    "(per workload, a later file's policies replace an earlier's) into DIR and redraw the figure")
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.merge, Path(args.out))
    args.duration = args.duration if args.duration is not None else (3.0 if args.quick else 30.0)
    run(args)


if __name__ == "__main__":
    main()
