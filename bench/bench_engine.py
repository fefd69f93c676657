"""Engine decode benchmarks (issue 5): tidal's engine beside transformers' `generate`, same checkpoint, dtype
(fp32), threads and prompts. `make bench` or:

    .venv/bin/python -m pytest bench/bench_engine.py --benchmark-only

Each benchmark times generating NEW_TOKENS tokens for a batch of same-length prompts; its extra_info holds
decode tokens/s (prefill removed: tidal.study.runs) from its median and the median of 1-token runs. One torch
thread for both, as in engine_summary.py. The two implementations of one batch size share a group, so
pytest-benchmark prints them side by side. A small model keeps `make bench` quick; `bench/engine_summary.py`
measures a larger one in alternating rounds and prints the ratios against the targets.
"""
import statistics
import time

import pytest
import torch

from tidal.study.runs import hf_generator, same_length_prompts, tidal_generator

SHAPE = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=4096, max_position_embeddings=512, tie_word_embeddings=False,
             rope_theta=10000.0, rms_norm_eps=1e-6)
PROMPT_LEN, NEW_TOKENS = 16, 16


@pytest.fixture(scope="module")
def generators():
    from transformers import AutoModelForCausalLM

    import tidal
    from tidal import presets

    path = presets.build(presets.Preset("bench-engine", "llama", **SHAPE), torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    engine = tidal.Engine.from_pretrained(path, device="cpu", dtype=torch.float32, max_batch_size=8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as engine_summary.py, for the reason its docstring gives
    yield {"tidal": tidal_generator(engine), "transformers": hf_generator(hf, "cpu")}
    torch.set_num_threads(threads)
    engine.close()


def _median_seconds(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("impl", ["tidal", "transformers"])
def bench_engine_decode(benchmark, generators, impl, batch):
    gen = generators[impl]
    prompts = same_length_prompts(batch, PROMPT_LEN, SHAPE["vocab_size"], seed=batch)
    benchmark.group = f"engine: generate {NEW_TOKENS} tokens, batch {batch}, fp32"
    gen(prompts, 2)  # warm-up
    t1 = _median_seconds(lambda: gen(prompts, 1), 5)
    out = benchmark.pedantic(gen, args=(prompts, NEW_TOKENS), rounds=10, warmup_rounds=1, iterations=1)
    assert [len(row) for row in out] == [NEW_TOKENS] * batch
    if benchmark.stats is not None:  # None under --benchmark-disable
        decode = benchmark.stats.stats.median - t1
        benchmark.extra_info.update(one_token_ms=t1 * 1e3, decode_tok_s=batch * (NEW_TOKENS - 1) / decode)
