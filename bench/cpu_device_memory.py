"""The CPU backend's device memory cache (`tidal.backends.cpumem`), side by side in one process: two engines of
the same model, one whose backend reuses freed device mappings (the default) and one that maps each device
buffer anew (`TIDAL_CPU_DEVICE_CACHE=0`, the behaviour before the cache). Each round, each engine in turn (the
order alternates): a request is added, `preempt(weights="host", kv="swap")` with `keep_host_copy` (nothing is
copied out), then `resume(pipelined=True)`, whose first step prefills the request while the weights arrive.
Reported per engine: the medians of the resume's weight copy (s, GB/s), its first step and its total, and the
ratio fresh / cached of the total.

    .venv/bin/python bench/cpu_device_memory.py [--model smollm2-135m] [--rounds 7] [--out out/cpu_device_memory]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import tidal
from tidal.backends.cpu import DEVICE_CACHE_ENV, DEVICE_MEMORY

PROMPT = [1, 504, 3458, 282, 4649, 314]  # any six token ids


def build(path: str, cached: bool) -> tidal.Engine:
    os.environ[DEVICE_CACHE_ENV] = "1" if cached else "0"  # read when the engine's backend is made
    try:
        return tidal.Engine.from_pretrained(path, device="cpu", dtype=torch.float32, kv_cache_bytes=16 << 20,
                                            kernels="reference", keep_host_copy=True)
    finally:
        os.environ.pop(DEVICE_CACHE_ENV)


def round_trip(engine: tidal.Engine) -> dict:
    engine.add_request(PROMPT, max_new_tokens=1)
    engine.preempt(weights="host", kv="swap")
    report = engine.resume(pipelined=True)
    while engine.has_unfinished():
        engine.step()
    return {"weight_s": report.weight_seconds, "gbps": report.weight_bytes / report.weight_seconds / 1e9,
            "first_step_s": report.first_step_seconds, "total_s": report.total_seconds,
            "weight_bytes": report.weight_bytes}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="a preset name or a checkpoint directory")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default="out/cpu_device_memory")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # one compute thread, the copy thread on the other core
    path = str(tidal.presets.resolve(args.model, dtype=torch.float32, log=lambda s: None))
    engines = {"cached": build(path, True), "fresh": build(path, False)}
    runs: dict[str, list[dict]] = {name: [] for name in engines}
    for name, engine in engines.items():  # a first round each, not timed: the first step's lazy set-up
        round_trip(engine)
    for k in range(args.rounds):
        for name in (("cached", "fresh") if k % 2 == 0 else ("fresh", "cached")):
            runs[name].append(round_trip(engines[name]))
    for engine in engines.values():
        engine.close()
    rows = {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for name, rs in runs.items()}
    ratio = rows["fresh"]["total_s"] / rows["cached"]["total_s"]
    doc = {"command": "bench/cpu_device_memory.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": f"{os.cpu_count()} CPUs, torch "
           f"{torch.__version__}", "model": path, "rows": rows, "runs": runs, "fresh_over_cached_total": ratio,
           "cache_stats_at_end": DEVICE_MEMORY.stats().__dict__}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cpu_device_memory.json").write_text(json.dumps(doc, indent=1))
    print("| device buffers | weights copied (MB) | copy s | copy GB/s | first step s | resume s |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['weight_bytes'] / 1e6:.0f} | {r['weight_s']:.4f} | {r['gbps']:.2f} | "
              f"{r['first_step_s']:.4f} | {r['total_s']:.4f} |")
    print(f"resume, fresh / cached: {ratio:.2f}x (medians of {args.rounds} rounds)")


if __name__ == "__main__":
    main()
