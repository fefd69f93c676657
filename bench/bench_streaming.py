"""Weight streaming benchmarks (issue 2), tidal beside accelerate in one run. `make bench` or:

    .venv/bin/python -m pytest bench/bench_streaming.py --benchmark-only

(a) host overhead per streamed layer per decode step, on a model whose layers are so small that bookkeeping
    dominates: (offloaded step - all-resident step) / streamed layers, tidal against accelerate.
(b) decode step time at resident_fraction 0.5: tidal prefetch_depth 2, tidal prefetch_depth 0, accelerate.
A decode step here is one forward of one new token over a 32-token KV cache (transformers' DynamicCache).
"""
import statistics
import time

import pytest
import torch

import tidal
from hf_models import make_model
from tidal.baselines import accelerate_offload

TINY = dict(num_layers=16, hidden=64, intermediate=128, heads=4, kv_heads=2)
MEDIUM = dict(num_layers=8, hidden=1024, intermediate=2816, heads=16, kv_heads=4)


def _decode_step(model):
    """A callable running one decode step: a one-token forward over a fixed 32-token prefix cache."""
    from transformers import DynamicCache

    ids = torch.randint(1, 128, (1, 32))
    with torch.no_grad():
        out = model(ids, use_cache=True)
    prefix = out.past_key_values
    token = torch.randint(1, 128, (1, 1))
    position = torch.tensor([[32]])

    def step():
        cache = DynamicCache()
        for layer in range(len(prefix.layers)):  # same prefix each time, so every step does the same work
            cache.update(prefix.layers[layer].keys, prefix.layers[layer].values, layer)
        with torch.no_grad():
            return model(token, past_key_values=cache, position_ids=position, use_cache=True)
    return step


def _variant(kind: str, shape: dict, fraction: float, depth: int):
    model = make_model("llama", **shape)
    n = shape["num_layers"]
    streamed = tidal.ResidencyPlan.from_fraction(n, fraction).streamed_layers
    if kind == "tidal":
        tidal.offload(model, resident_fraction=fraction, prefetch_depth=depth, device="cpu")
    elif kind == "accelerate":
        accelerate_offload(model, streamed, device="cpu")
    return model, len(streamed)


@pytest.mark.benchmark(group="a: host overhead per streamed layer (tiny layers)")
def bench_overhead_per_layer(benchmark, record_interleaved):
    """One round runs one step of each variant, in rotating order, so that the machine's noise (two shared
    cores) hits all three alike; the overhead is the median over rounds of (variant - plain) / layers."""
    kinds = ["plain", "tidal", "accelerate"]
    variants = {k: _variant(k, TINY, 1.0 if k == "plain" else 0.0, 2) for k in kinds}
    steps = {k: _decode_step(m) for k, (m, _) in variants.items()}
    times = {k: [] for k in kinds}
    rounds = iter(range(10**9))

    def one_round():
        r = next(rounds)
        for k in kinds[r % 3:] + kinds[:r % 3]:
            t0 = time.perf_counter()
            steps[k]()
            times[k].append(time.perf_counter() - t0)

    benchmark.pedantic(one_round, rounds=300, warmup_rounds=10, iterations=1)
    n = variants["tidal"][1]
    over = {k: statistics.median((t - p) / n for t, p in zip(times[k][10:], times["plain"][10:]))
            for k in ("tidal", "accelerate")}
    info = {"plain_step_ms": statistics.median(times["plain"]) * 1e3, "streamed_layers": n,
            **{f"{k}_us_per_layer": v * 1e6 for k, v in over.items()}, "ratio": over["tidal"] / over["accelerate"]}
    benchmark.extra_info.update(info)
    record_interleaved("a", info)


@pytest.mark.benchmark(group="b: decode step at resident_fraction 0.5")
@pytest.mark.parametrize("kind, depth", [("plain", 0), ("tidal", 2), ("tidal", 0), ("accelerate", 0)])
def bench_decode_half_resident(benchmark, record_median, kind, depth):
    model, streamed = _variant(kind, MEDIUM, 1.0 if kind == "plain" else 0.5, depth)
    step = _decode_step(model)
    benchmark.pedantic(step, rounds=30, warmup_rounds=3, iterations=1)
    name = f"b/tidal-depth{depth}" if kind == "tidal" else f"b/{kind}"
    record_median(name, benchmark, streamed_layers=streamed)
    if kind == "tidal":
        st = tidal.stats(model)
        benchmark.extra_info.update(stall_ms=st.last.stall_seconds * 1e3, mb_streamed=st.last.bytes_streamed / 1e6)
