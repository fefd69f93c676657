import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_kernels_section_runs_on_the_cpu(tmp_path):
    """A smoke run of gpu_check's kernels section on CPU tensors (through the Triton interpreter when the
    suite runs without a GPU: the subprocess inherits TRITON_INTERPRET), so the GPU script cannot rot
    unseen."""
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--out", str(tmp_path), "--device", "cpu",
                           "--quick", "--sections", "kernels", "--budget-s", "120"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]["kernels"]
    assert "error" not in res, res.get("traceback")
    assert res["path"] == ("triton-interpreter" if os.environ.get("TRITON_INTERPRET") == "1" else "reference")
    assert res["correctness"] and all(ok for *_, ok in res["correctness"]), res["correctness"]
    assert res["rows"][0]["rel_err"] < 2e-2 and res["rows"][0]["tidal_gbps"] > 0 and res["copy_gbps"] > 0
    assert "kernel check" in proc.stdout  # the table was printed
