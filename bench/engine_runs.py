"""Decode throughput of a generator, shared by engine_summary.py, bench_engine.py and gpu_engine.py.

A generator is a callable `gen(prompts, n) -> list[list[int]]` that generates exactly `n` new tokens greedily
for every prompt (all prompts of one length, so no side pads). Decode tokens/s is

    batch * (n - 1) / (time of gen(prompts, n) - time of gen(prompts, 1))

Both runs pay the same prefill and the same first token, so the difference is n - 1 decode steps of the whole
batch; prefill leaves both sides of a comparison identically.
"""
from __future__ import annotations

import random
import statistics
import time
from typing import Callable

import torch

Generator = Callable[[list, int], list]


def same_length_prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, vocab) for _ in range(length)] for _ in range(batch)]


def hf_generator(model, device) -> Generator:
    """transformers' `generate`, greedy, exactly `n` new tokens, as its users call it (no padding needed)."""
    def gen(prompts, n):
        ids = torch.tensor(prompts, device=device)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=0)
        return out[:, ids.shape[1]:].tolist()  # .tolist() waits for the device
    return gen


def tidal_generator(engine) -> Generator:
    def gen(prompts, n):
        return engine.generate(prompts, max_new_tokens=n)
    return gen


def _timed(gen: Generator, prompts, n):
    t0 = time.perf_counter()
    out = gen(prompts, n)
    return time.perf_counter() - t0, out


def decode_rounds(gens: dict[str, Generator], prompts, n: int, rounds: int, warmup: bool = True,
                  deadline: float | None = None) -> dict[str, dict]:
    """Time gen(prompts, 1) then gen(prompts, n) for every side in each round, the sides in rotating order so
    that the machine's noise hits all alike. Stops after `rounds`, or at `deadline` (time.monotonic()) once
    every side has one round. Per side: the per-round decode seconds (t_n - t_1), the median of t_1, decode
    tokens/s from the median decode seconds, and the last round's tokens."""
    names = list(gens)
    if warmup:
        for name in names:
            gens[name](prompts, 2)
    res = {k: {"t1": [], "decode_s": [], "tokens": None} for k in names}
    for r in range(rounds):
        if r and deadline is not None and time.monotonic() > deadline:
            break
        for name in names[r % len(names):] + names[:r % len(names)]:
            t1, _ = _timed(gens[name], prompts, 1)
            tn, out = _timed(gens[name], prompts, n)
            res[name]["t1"].append(t1)
            res[name]["decode_s"].append(tn - t1)
            res[name]["tokens"] = out
    batch = len(prompts)
    for r in res.values():
        d = statistics.median(r["decode_s"])
        r.update(rounds=len(r["decode_s"]), median_t1_s=statistics.median(r["t1"]),
                 step_s=d / (n - 1) if d > 0 else float("nan"),
                 tok_s=batch * (n - 1) / d if d > 0 else float("nan"))
    return res


def round_ratios(res: dict[str, dict], num: str, den: str) -> list[float]:
    """Per-round tokens/s ratio num/den (decode seconds den/num), for the spread across rounds."""
    return [d / u for u, d in zip(res[num]["decode_s"], res[den]["decode_s"]) if u > 0]


def token_agreement(a: list[list[int]], b: list[list[int]]) -> tuple[int, int, int | None]:
    """(matching tokens, total tokens, first diverging position of any row or None)."""
    same = total = 0
    first = None
    for ra, rb in zip(a, b):
        for i, (x, y) in enumerate(zip(ra, rb)):
            total += 1
            if x == y:
                same += 1
            elif first is None or i < first:
                first = i
        total += abs(len(ra) - len(rb))
    return same, total, first
