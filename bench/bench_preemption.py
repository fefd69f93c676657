"""Preemption round trips of a tiny engine (issue 6), under pytest-benchmark (`make bench`).

One round = `preempt(weights="host", kv="swap")` + `resume(pipelined=...)` of a tiny Llama (4 layers, hidden
128, bf16) with two requests of 16-token prompts running, all layers resident. `extra_info` carries the
reports' bytes and medians. The tables (small and 1B-shaped models, long contexts, pipelined against full)
come from `bench/preemption_summary.py`; the GPU figures from `bench/gpu_check.py --sections preemption`.
"""
from __future__ import annotations

import statistics

import pytest
import torch

import tidal
from preemption_runs import kv_pool_bytes, write_shaped
from tidal.study.runs import drain
from shaped_checkpoint import TINY


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_shaped(tmp_path_factory.mktemp("tiny-preemption"), TINY, torch.bfloat16)


@pytest.mark.parametrize("pipelined", [False, True], ids=["full", "pipelined"])
def test_preempt_resume_round_trip(benchmark, tiny_path, pipelined):
    kv_bytes = kv_pool_bytes(TINY, [256, 256])
    with tidal.Engine.from_pretrained(tiny_path, device="cpu", dtype=torch.bfloat16, kv_cache_bytes=kv_bytes,
                                      host_kv_bytes=kv_bytes) as engine:
        ids = [engine.add_request(list(range(1 + b, 17 + b)), max_new_tokens=200) for b in range(2)]
        engine.step()  # prefill
        reports = []

        def round_trip():
            pre = engine.preempt(weights="host", kv="swap")
            res = engine.resume(pipelined=pipelined)
            drain(engine)
            reports.append((pre, res))

        benchmark.pedantic(round_trip, rounds=20, warmup_rounds=2)
        pre, res = reports[-1]
        assert pre.kv_swapped_requests == 2 and res.kv_bytes == pre.kv_bytes > 0
        assert res.weight_bytes == pre.weight_bytes > 0 and res.time_to_first_token is not None
        med = lambda f: statistics.median(getattr(r, f) for _, r in reports)  # noqa: E731
        benchmark.extra_info.update(weight_bytes=res.weight_bytes, kv_bytes=res.kv_bytes,
                                    reload_ms=med("weight_seconds") * 1e3, kv_in_ms=med("kv_seconds") * 1e3,
                                    ttft_ms=med("time_to_first_token") * 1e3, pipelined=pipelined)
        for rid in ids:
            engine.abort(rid)
