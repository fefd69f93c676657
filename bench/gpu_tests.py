"""gpu_check section "tests": the suite's device-facing tests (streaming, backends, KV cache) with
TIDAL_TEST_DEVICE set to the checked device; tests that take the `device` fixture run there."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = ["tests/test_offload.py", "tests/test_backends.py", "tests/test_plan.py", "tests/test_native.py",
         "tests/test_kv_cache.py", "tests/test_kv_support.py", "tests/test_kv_random.py", "tests/test_engine.py"]


def run(ctx) -> dict:
    env = dict(os.environ, TIDAL_TEST_DEVICE=ctx.device, TIDAL_ALLOW_NO_NATIVE="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=max(10.0, ctx.seconds_left()))
        out, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out, rc = (exc.stdout or b"").decode() + "\n(timed out)", -1
    summary = next((l for l in reversed(out.splitlines()) if re.search(r"\d+ (passed|failed)", l)), "no summary")
    failures = [l for l in out.splitlines() if l.startswith("FAILED")]
    return {"returncode": rc, "summary": summary, "failures": failures, "tail": out[-4000:],
            "table": f"pytest {' '.join(TESTS)} on {ctx.device}: {summary}" + "".join("\n  " + f for f in failures)}
