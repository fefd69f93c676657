"""One `bench/gpu_check.py --device cpu --quick` run of every section, shared by the tests of a pytest process
(tests/test_gpu_check.py, tests/test_kernels_gpu_section.py): the whole CPU smoke run, made once."""
import atexit
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 150


@functools.cache
def quick_run() -> tuple[Path, dict, str]:
    """(the --out directory, results.json, what the script printed). Fails the calling test if the script
    failed; sections are checked by the tests."""
    tmp = Path(tempfile.mkdtemp(prefix="tidal-gpu-check-"))
    atexit.register(shutil.rmtree, tmp, True)
    out = tmp / "out"
    # the subprocess inherits TRITON_INTERPRET from tests/conftest.py: kernels run through the interpreter
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--out", str(out), "--device", "cpu",
                           "--quick", "--cache-dir", str(tmp / "cache"), "--budget-s", str(BUDGET_S)],
                          cwd=ROOT, capture_output=True, text=True, timeout=3 * BUDGET_S,
                          env=dict(os.environ, TIDAL_CACHE_DIR=str(tmp / "cache")))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text()), proc.stdout


def section(name: str) -> tuple[dict, str]:
    """A section's result in the shared quick run, which must have completed."""
    _, results, stdout = quick_run()
    res = results["sections"][name]
    assert res["status"] == "ok", (name, res["status"], res.get("traceback"))
    return res, stdout
