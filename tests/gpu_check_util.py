"""Running one section of bench/gpu_check.py on the CPU, as the smoke tests of each section do."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_section(tmp_path, name: str) -> tuple[dict, str]:
    """`gpu_check.py --quick --device cpu --sections name`; returns the section's JSON and the printed output.
    Fails the test if the script failed or the section reported an error."""
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--out", str(tmp_path), "--device", "cpu",
                           "--quick", "--sections", name, "--budget-s", "120"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((Path(tmp_path) / "gpu_check.json").read_text())["sections"][name]
    assert "error" not in res, res.get("traceback")
    return res, proc.stdout
