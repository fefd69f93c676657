"""gpu_check section "tests": the whole test suite (`pytest tests`) on the checked device, with
TIDAL_TEST_DEVICE set to it (tests taking the `device` fixture run there: CUDA tensors through the real
kernels) and TIDAL_CHECK_ORDERING=1 (the backends check the order of copies and events).

pytest runs in this section's process group under the section's share: at its end it gets SIGINT (pytest then
reports what ran), and gpu_check kills the group if that does not end it. Each test's outcome is appended to
a log as it finishes (bench/gpu_pytest_log.py), so a stopped run still says what passed and what failed.
tests/test_gpu_check.py and tests/test_kernels_gpu_section.py are left out on a GPU: they are CPU smoke runs
of this script. --quick runs tests/test_plan.py only (no recursion into this script's own tests).
"""
from __future__ import annotations

import collections
import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SELF_TESTS = ["tests/test_gpu_check.py", "tests/test_kernels_gpu_section.py"]
PER_TEST_TIMEOUT_S = 120  # pytest-timeout, where installed: one hung test fails alone
OPTIONAL = ("transformers", "accelerate", "triton", "jsonschema", "matplotlib", "tqdm", "hypothesis",
            "pytest_benchmark")


def _command(ctx, log: Path) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", "-p", "gpu_pytest_log",
           "--durations=15"]
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd += [f"--timeout={PER_TEST_TIMEOUT_S}"]
    if ctx.quick:
        return cmd + ["tests/test_plan.py"]
    return cmd + [f"--ignore={p}" for p in SELF_TESTS] + ["tests"]


def summarize(log: Path, out_text: str, returncode, stopped) -> dict:
    outcomes = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    counts = collections.Counter(o["outcome"] for o in outcomes)
    failures = [f"{o['nodeid']} ({o['outcome']} in {o['when']}): {o.get('message', '')[-300:]}"
                for o in outcomes if o["outcome"] in ("failed", "error")]
    lines = out_text.splitlines()
    summary = next((line.strip("= ") for line in reversed(lines)
                    if " in " in line and ("passed" in line or "failed" in line)),
                   "no pytest summary (stopped before the end)")
    slowest = [line for line in lines if line.strip().split(" ")[0].endswith("s") and " call " in line][:15]
    return {"returncode": returncode, "stopped": stopped, "counts": dict(counts), "summary": summary,
            "failures": failures, "slowest": slowest, "tail": out_text[-4000:]}


def _wait(proc, ctx) -> tuple[int, str | None]:
    """pytest's exit code, and why it was stopped (None if it finished within the section's time)."""
    try:
        return proc.wait(timeout=max(5.0, ctx.seconds_left())), None
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)  # pytest prints its summary of what ran
        try:
            return proc.wait(timeout=10), "the section's time ran out"
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(), "the section's time ran out; killed"


def run(ctx) -> dict:
    log, out_path = ctx.work_dir / "tests.jsonl", ctx.work_dir / "tests-pytest.log"
    log.unlink(missing_ok=True)
    missing = [m for m in OPTIONAL if importlib.util.find_spec(m) is None]
    path = os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])  # the plugin
    env = dict(os.environ, TIDAL_TEST_DEVICE=ctx.device, TIDAL_CHECK_ORDERING="1",
               GPU_CHECK_TEST_LOG=str(log), PYTHONPATH=path)
    cmd = _command(ctx, log)
    paths = " ".join(a for a in cmd if a.startswith("tests"))
    ctx.log(f"{' '.join(cmd[2:])} (TIDAL_TEST_DEVICE={ctx.device} TIDAL_CHECK_ORDERING=1)")
    with open(out_path, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            rc, stopped = _wait(proc, ctx)
        except KeyboardInterrupt:  # gpu_check's SIGINT reached pytest too; give it a moment for its summary
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
            so_far = summarize(log, out_path.read_text(errors="replace"), None, "gpu_check's SIGINT")
            ctx.progress(dict(so_far, paths=paths, missing_modules=missing, log=str(out_path)))
            raise
    res = dict(summarize(log, out_path.read_text(errors="replace"), rc, stopped), paths=paths,
               missing_modules=missing, log=str(out_path))
    c = res["counts"]
    res["table"] = "\n".join(
        [f"pytest {paths} on {ctx.device} (TIDAL_CHECK_ORDERING=1): {res['summary']}"
         + (f"; STOPPED: {stopped}" if stopped else ""),
         f"outcomes logged: {c.get('passed', 0)} passed, {c.get('failed', 0)} failed, "
         f"{c.get('error', 0)} errors, {c.get('skipped', 0)} skipped"]
        + (["modules not installed: " + ", ".join(missing)] if missing else [])
        + [f"  FAILED {f[:400]}" for f in res["failures"][:40]])
    return res
