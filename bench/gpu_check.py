"""tidal's GPU check: one script, run on a lent CUDA machine, that prints one table per section and writes JSON.

Install tidal offline on a machine with a stock torch + triton image and run it (one command line):

    pip install --no-deps --no-build-isolation -e . && python bench/gpu_check.py --out DIR

transformers and accelerate are needed for the streaming sections; when absent they are reported as skipped.
Each section is a module `bench/gpu_<name>.py` exposing `run(ctx) -> dict`; the dict's "table" (a string)
is printed and the whole dict lands in DIR/gpu_check.json. The whole script is budgeted to finish in
under 5 minutes on an H100/H200; each section gets a share and stops early when its share is spent.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import platform
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
SECTIONS = ["tests", "streaming", "kernels", "kv", "engine", "preemption", "study"]  # later issues append theirs


@dataclasses.dataclass
class Context:
    out_dir: str
    device: str
    deadline: float  # time.monotonic() by which the section should return
    quick: bool

    def seconds_left(self) -> float:
        return self.deadline - time.monotonic()

    def log(self, msg: str) -> None:
        print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def machine_info() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "host": platform.node(),
            "date": time.strftime("%Y-%m-%d")}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count,
                    cuda=torch.version.cuda)
    import tidal

    info["tidal_native"] = tidal.native.describe()
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="directory for gpu_check.json (created if missing)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {SECTIONS}")
    ap.add_argument("--budget-s", type=float, default=280.0, help="total time budget in seconds")
    ap.add_argument("--quick", action="store_true", help="smallest sizes only (smoke run)")
    ap.add_argument("--device", default="cuda", help="device to check (default cuda)")
    args = ap.parse_args(argv)

    sections = [s for s in args.sections.split(",") if s]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown sections {unknown}; choose from {SECTIONS}")
    os.makedirs(args.out, exist_ok=True)
    sys.path.insert(0, HERE)
    results = {"machine": machine_info(), "sections": {}}
    start = time.monotonic()
    for i, name in enumerate(sections):
        share = (args.budget_s - (time.monotonic() - start)) / (len(sections) - i)
        ctx = Context(out_dir=args.out, device=args.device, deadline=time.monotonic() + share, quick=args.quick)
        ctx.log(f"section {name}: {share:.0f} s")
        t0 = time.monotonic()
        try:
            res = importlib.import_module(f"gpu_{name}").run(ctx)
        except Exception as exc:  # one broken section must not hide the others' results
            res = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        res["seconds"] = round(time.monotonic() - t0, 1)
        results["sections"][name] = res
        print(f"\n== {name} ({res['seconds']} s) ==")
        print(res.get("table") or res.get("error") or "(no table)", flush=True)
        with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)
    print(f"\nwrote {os.path.join(args.out, 'gpu_check.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
