import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_streaming_section_runs_on_the_cpu(tmp_path):
    """A smoke run of gpu_check's streaming section on the CPU backend (--quick), so the GPU script cannot rot
    unseen between GPU sessions."""
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--out", str(tmp_path), "--device", "cpu",
                           "--quick", "--sections", "streaming", "--budget-s", "120"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]["streaming"]
    assert "error" not in res, res.get("traceback")
    kinds = {(r["kind"], r["resident_fraction"]) for r in res["decode"]}
    assert ("tidal", 0.0) in kinds and ("accelerate", 0.0) in kinds
    zero = next(r for r in res["decode"] if r["kind"] == "tidal" and r["resident_fraction"] == 0.0)
    assert zero["mb_per_token"] > 0 and res["bandwidth"]["h2d_gbps"] > 0
    assert "resident" in proc.stdout  # the table was printed
