"""bench/scheduler_bench.py --quick, made by `tidal simulate --validate DIR --live` end to end: tiny models, a few
seconds of arrivals per policy on the CPU, then the simulator's replay of it. The JSON has every metric for every
policy that ran (a policy tidal.scheduler does not resolve is "not available"), every policy saw the same
arrivals, the figure is written, and the validation compares every metric of every policy."""
import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_quick_run_writes_every_metric_and_the_figure(tmp_path):
    sys.path.insert(0, str(BENCH))
    try:
        import scheduler_bench
    finally:
        sys.path.remove(str(BENCH))
    run, val = tmp_path / "run", tmp_path / "val"
    r = subprocess.run([sys.executable, "-m", "tidal", "simulate", "--validate", str(run), "--live",
                        "--quick --quiet --duration 1.5", "--out", str(val)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "median relative error" in r.stdout
    doc = json.loads((run / "scheduler.json").read_text())
    png = run / "scheduler.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert {"command", "date", "machine", "settings", "arrivals"} <= set(doc)
    assert set(doc["workloads"]) == {"copay", "nopay"}
    for w in doc["workloads"].values():
        assert len(w["models"]) == 3 and w["device_budget_bytes"] < sum(w["device_bytes"].values())
        assert all(m["slo_ttft_s"] > 0 and m["slo_tpot_s"] > 0 for m in w["models"])
        assert w["arrivals"] and w["link"]["gbps"] > 0
        assert set(w["policies"]) == {"exclusive", "lru", "cost"}
        for name, r in w["policies"].items():
            if name != "cost":
                assert r["available"], r
            if not r["available"]:
                assert "not available" in r["why"]
                continue
            assert r["error"] is None
            for key in scheduler_bench.METRICS:
                assert key in r, (name, key)
            assert r["requests"] == len(w["arrivals"]) and r["finished"] == r["requests"]
            assert 0.0 <= r["slo_attainment"] <= 1.0 and r["goodput_rps"] <= r["throughput_rps"] + 1e-9
            assert r["ttft_p50_s"] <= r["ttft_p99_s"] and r["tpot_p50_s"] <= r["tpot_p99_s"]
            assert set(r["switches"]) >= {"Preempt", "Resume", "Load"} and r["switches"]["Load"] >= 1
            if name == "exclusive" and len({a["model"] for a in w["arrivals"]}) > 1:
                assert r["switches"]["Preempt"] >= 1  # one model on the device at a time
            assert r["bytes_moved"]["total_switching"] > 0 and isinstance(r["residency_changes"], int)
            assert [q["arrival_s"] for q in r["requests_detail"]] == [a["t"] for a in w["arrivals"]]
    # the simulator replayed the same run: every policy, every metric compared
    from tidal.simulate.validate import METRICS

    v = json.loads((val / "validation.json").read_text())
    assert set(v["workloads"]) == {"copay", "nopay"} and v["median_error"] is not None
    for w in v["workloads"].values():
        assert set(w["policies"]) == {"exclusive", "lru", "cost"}
        for row in w["policies"].values():
            for key in METRICS:
                assert row[key]["live"] > 0 and row[key]["sim"] > 0 and row[key]["error"] >= 0, (key, row[key])
        assert sorted(w["ranking"]["live"]) == sorted(w["ranking"]["sim"])
