"""tidal's GPU check: the one command a session runs on a lent CUDA machine. It measures every GPU target,
runs the test suite on CUDA, and writes results.json and BENCHMARKS-fragment.md (each target's verdict beside
its number) into --out.

    pip install --no-deps --no-build-isolation -e . && python bench/gpu_check.py --out DIR

About 8 minutes on one H100/H200 (`--budget-s`, default 480); `--plan` prints what will run and the estimated
seconds of each section without running anything. Each section (`bench/gpu_<name>.py`, `run(ctx) -> dict`)
runs in a process of its own under a share of the budget (bench/gpu_plan.py: the cost model). At the end of
its share a section is sent SIGINT, and SIGKILL a few seconds later if it has not stopped (a hung CUDA call
cannot be interrupted in-process): it is then reported as timed out, with what it had measured by then, and
the script goes on. Checkpoints (random bf16 weights of real shapes) are written once into --cache-dir and
shared by the sections; nothing is downloaded.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import gpu_plan  # noqa: E402  (pure Python: --plan imports nothing heavier)

LOG = "gpu_check.log"
KILL_GRACE_S = (3.0, 15.0)  # SIGINT this long (10% of the share, within these bounds) before SIGKILL
STOP_MARGIN_S = (2.0, 10.0)  # a section's own deadline: this long (5%) before the SIGINT
PARENT_RESERVE_S = 3.0  # the report, after the last section


def default_cache_dir() -> Path:
    # outside --out: a lent machine sends --out back, and the checkpoints are 18 GB
    return Path(os.environ.get("TIDAL_CACHE_DIR") or Path.home() / ".cache" / "tidal") / "gpu-check"


# -- in a section's process ----------------------------------------------------------------------------------
@dataclasses.dataclass
class Context:
    """What a section gets: where to write, the device, its deadline (time.monotonic()), the rates its parts'
    estimates use, and `progress(result)` to save what it has measured so far."""

    work_dir: Path
    cache_dir: Path
    device: str
    deadline: float
    quick: bool
    rates: gpu_plan.Rates
    partial_path: Path
    partial: dict = dataclasses.field(default_factory=dict)

    def seconds_left(self) -> float:
        return self.deadline - time.monotonic()

    def fits(self, seconds: float) -> bool:
        return seconds <= self.seconds_left()

    def log(self, msg: str) -> None:
        print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def progress(self, result: dict) -> None:
        """Save `result` as the section's result so far: what is reported if the section is stopped."""
        self.partial = result
        _write_json(self.partial_path, result)

    def checkpoint(self, preset: str) -> Path | None:
        """The shared checkpoint the "checkpoints" section built for `preset`, or None."""
        return gpu_plan.built_checkpoint(self.cache_dir, preset)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)  # a reader never sees half a file


def machine_info() -> dict:
    import platform

    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "host": platform.node(),
            "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count()}
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


class _StopSignal:
    """gpu_check's SIGINT in a section's process. It raises KeyboardInterrupt only while the section runs,
    inside the handler that saves what it measured; arriving before, it stops the section as it starts;
    after, it is ignored. One request only: the time left is for saving the result."""

    def __init__(self):
        self.requested = self.armed = False

    def __call__(self, signum, frame):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.requested = True
        if self.armed:
            raise KeyboardInterrupt

    def arm(self) -> None:
        self.armed = True
        if self.requested:
            raise KeyboardInterrupt


def child_main(args) -> int:
    """Run one section and write its result (status ok, interrupted or error) to WORK/<name>.json."""
    import importlib
    import traceback

    stop = _StopSignal()
    signal.signal(signal.SIGINT, stop)
    work = Path(args.work_dir)
    ctx = Context(work_dir=work, cache_dir=Path(args.cache_dir), device=args.device, quick=args.quick,
                  deadline=time.monotonic() + (args.deadline - time.time()),
                  rates=gpu_plan.Rates.from_json(args.rates),
                  partial_path=work / f"{args.child}.partial.json")
    startup = None
    try:
        stop.arm()
        section = importlib.import_module(f"gpu_{args.child}")
        startup = time.time() - args.launched  # interpreter and imports: what Rates.start_s estimates
        res, status = dict(section.run(ctx)), "ok"
        stop.armed = False
    except KeyboardInterrupt:
        res, status = dict(ctx.partial), "interrupted"
    except Exception as exc:  # the section failed; what it measured before still counts
        stop.armed = False
        res = dict(ctx.partial, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        status = "error"
    try:
        res["machine"] = machine_info()
    except Exception as exc:
        res["machine"] = {"error": repr(exc)}
    res["status"] = status
    res["startup_s"] = None if startup is None else round(startup, 2)
    _write_json(work / f"{args.child}.json", res)
    return 0


# -- the supervisor ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Outcome:
    returncode: int
    seconds: float
    stopped: str | None  # None, "interrupted" (SIGINT at the share's end), "killed" (SIGKILL after the grace)


def supervise(cmd: list[str], env: dict, interrupt_after_s: float, kill_after_s: float, echo) -> Outcome:
    """Run `cmd` in a process group of its own, `echo` each line it prints; SIGINT the group after
    `interrupt_after_s`, SIGKILL it at `kill_after_s`. Nothing the child does can end this process."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True)
    pump = threading.Thread(target=lambda: [echo(line.rstrip("\n")) for line in proc.stdout], daemon=True)
    pump.start()
    stopped = None
    try:
        try:
            proc.wait(timeout=max(0.0, interrupt_after_s))
        except subprocess.TimeoutExpired:
            stopped = "interrupted"
            _signal_group(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=max(0.0, kill_after_s - (time.monotonic() - t0)))
            except subprocess.TimeoutExpired:
                stopped = "killed"
    finally:  # also when this process is interrupted: no section outlives gpu_check
        _signal_group(proc.pid, signal.SIGKILL)  # the section and anything it started (pytest, its workers)
        proc.wait()
        pump.join(timeout=5)
    return Outcome(proc.returncode, time.monotonic() - t0, stopped)


def _signal_group(pgid: int, sig) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def section_result(work: Path, name: str, out: Outcome, share: float, estimate: float) -> dict:
    """The section's own result file if it wrote one, else what it saved as it went, with a status."""
    final, partial = work / f"{name}.json", work / f"{name}.partial.json"
    wrote = final.exists()
    path, res = final if wrote else partial, {}
    if path.exists():
        try:
            res = json.loads(path.read_text())
        except ValueError as exc:
            res = {"error": f"unreadable {path.name}: {exc}"}
    status = res.get("status") if wrote else None
    if out.stopped or status == "interrupted":
        how = "killed after the grace period" if out.stopped == "killed" else "stopped by SIGINT"
        res["status"] = f"timed out after {out.seconds:.0f} s (share {share:.0f} s; {how}); partial results"
    elif status == "error":
        res["status"] = f"error: {res.get('error', '?')}"
    elif not wrote:
        res["status"] = f"failed: the section's process exited with code {out.returncode} and wrote no result"
    res.update(seconds=round(out.seconds, 1), share_s=round(share, 1), estimated_s=round(estimate, 1))
    return res


def measured_rates(rates: gpu_plan.Rates, res: dict) -> gpu_plan.Rates:
    """The rates the "checkpoints" section measured, in place of the assumed ones."""
    got = {k: v for k, v in (res.get("rates") or {}).items() if isinstance(v, (int, float)) and v > 0}
    if not got:
        return rates
    return dataclasses.replace(rates, **got, measured=tuple(sorted(set(rates.measured) | set(got))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="directory for results.json, BENCHMARKS-fragment.md and the log")
    ap.add_argument("--sections", default=",".join(gpu_plan.SECTIONS),
                    help=f"comma list of {gpu_plan.SECTIONS}")
    ap.add_argument("--budget-s", type=float, default=None,
                    help=f"total seconds (default {gpu_plan.DEFAULT_BUDGET_S:.0f}; 150 with --quick)")
    ap.add_argument("--quick", action="store_true", help="smallest sizes only: the CPU smoke run")
    ap.add_argument("--device", default="cuda", help="device to check (default cuda)")
    ap.add_argument("--cache-dir", help=f"shared checkpoints (default {default_cache_dir()})")
    ap.add_argument("--work-dir", help="per-section files, the study's documents (default CACHE_DIR/work)")
    ap.add_argument("--plan", action="store_true", help="print the plan and estimated seconds; run nothing")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one section in this process
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--rates", help=argparse.SUPPRESS)
    ap.add_argument("--launched", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child_main(args)

    sections = [s for s in args.sections.split(",") if s]
    unknown = [s for s in sections if s not in gpu_plan.SECTIONS]
    if unknown:
        ap.error(f"unknown sections {unknown}; choose from {gpu_plan.SECTIONS}")
    if gpu_plan.NEEDS_CHECKPOINTS & set(sections) and "checkpoints" not in sections:
        sections.insert(0, "checkpoints")  # cached: a rerun finds them written
    budget = args.budget_s or (150.0 if args.quick else gpu_plan.DEFAULT_BUDGET_S)
    cache = Path(args.cache_dir or default_cache_dir())
    rates = gpu_plan.CPU_RATES if args.device == "cpu" else gpu_plan.Rates()
    if args.plan:
        print(gpu_plan.format_plan(sections, args.quick, rates, budget - PARENT_RESERVE_S, cache))
        return 0
    if not args.out:
        ap.error("--out is required (or --plan)")
    import shlex

    import gpu_report

    words = sys.argv[1:] if argv is None else list(argv)
    command = "python bench/gpu_check.py " + " ".join(shlex.quote(w) for w in words)
    return run_all(args, sections, budget, cache, rates, gpu_report, command)


def run_all(args, sections, budget, cache, rates, gpu_report, command: str) -> int:
    out, t_start = Path(args.out), time.monotonic()
    work = Path(args.work_dir or cache / "work")
    for d in (out, work, cache):
        d.mkdir(parents=True, exist_ok=True)
    for old in work.glob("*.json"):  # a section that writes nothing must not show a previous run's result
        old.unlink()
    log_file = open(out / LOG, "w", buffering=1)

    def echo(line: str) -> None:
        print(line, flush=True)
        log_file.write(line + "\n")

    echo(gpu_plan.format_plan(sections, args.quick, rates, budget - PARENT_RESERVE_S, cache))
    results = {"command": command, "budget_s": budget, "device": args.device, "quick": args.quick,
               "sections": {}, "rates": {}}
    # transformers' loading bars would fill the log with carriage returns
    env = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", **os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        for i, name in enumerate(sections):
            left = budget - PARENT_RESERVE_S - (time.monotonic() - t_start)
            est = [gpu_plan.estimate(s, args.quick, rates, cache) for s in sections[i:]]
            share = gpu_plan.shares(est, left)[0]
            grace = min(max(0.1 * share, KILL_GRACE_S[0]), KILL_GRACE_S[1])
            margin = min(max(0.05 * share, STOP_MARGIN_S[0]), STOP_MARGIN_S[1])
            echo(f"\n== {name}: share {share:.0f} s (estimated {est[0]:.0f} s; {left:.0f} s left) ==")
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--device", args.device,
                   "--work-dir", str(work), "--cache-dir", str(cache), "--rates", rates.to_json(),
                   "--deadline", str(time.time() + share - grace - margin), "--launched", str(time.time())]
            cmd += ["--quick"] if args.quick else []
            outcome = supervise(cmd, env, share - grace, share, echo)
            res = section_result(work, name, outcome, share, est[0])
            results["sections"][name] = res
            if name == "checkpoints":
                rates = measured_rates(rates, res)
            echo(f"-- {name}: {res['status']} ({res['seconds']} s)")
            echo(res.get("table") or res.get("error") or "(no table)")
            results["rates"] = dataclasses.asdict(rates)
            gpu_report.write(out, results)  # after every section: a later failure keeps these
    finally:
        results["seconds"] = round(time.monotonic() - t_start, 1)
        paths = gpu_report.write(out, results)
        echo(f"\ntotal {results['seconds']} s of {budget:.0f}; wrote " + ", ".join(str(p) for p in paths))
        echo(gpu_report.verdict_lines(results))
        log_file.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
