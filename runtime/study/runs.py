"""Measurement primitives shared by `tidal profile` and the benchmarks in bench/: decode timing of a generator
and preemption round trips on an engine with synthetic context.

Decode: a generator is a callable `gen(prompts, n) -> list[list[int]]` that generates exactly `n` new tokens
greedily for every prompt (all prompts of one length, so no side pads). Decode tokens/s is

    batch * (n - 1) / (time of gen(prompts, n) - time of gen(prompts, 1))

Both runs pay the same prefill and the same first token, so the difference is n - 1 decode steps of the whole
batch; prefill leaves both sides of a comparison identically.

Preemption: long contexts are synthetic (`add_synthetic_context`): prefilling 16k tokens x 8 sequences is far
too slow on a CPU, and what preemption moves does not depend on what the KV blocks hold, only on how many
there are.
"""
from __future__ import annotations

import errno
import os
import random
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

Generator = Callable[[list, int], list]

# Bound on the new tokens of a synthetic request: far beyond the few tokens decoded after each resume.
SYNTHETIC_MAX_NEW_TOKENS = 32768


# -- decode --------------------------------------------------------------------------------------------------
def same_length_prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """`batch` random prompts of `length` tokens in [1, vocab), reproducible from `seed`."""
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
    """`engine.generate`, greedy, `n` new tokens."""
    def gen(prompts, n):
        return engine.generate(prompts, max_new_tokens=n)
    return gen


def _timed(gen: Generator, prompts, n):
    t0 = time.perf_counter()
    out = gen(prompts, n)
    return time.perf_counter() - t0, out


def relative_spread(values) -> float:
    """(max - min) / median of repeated measurements (0 for one)."""
    m = statistics.median(values)
    return (max(values) - min(values)) / m if m > 0 else float("inf")


def decode_rounds(gens: dict[str, Generator], prompts, n: int, rounds: int, warmup: bool = True,
                  deadline: float | None = None, warmup_tokens: int = 2, max_rounds: int | None = None,
                  max_spread: float = 0.0, extra_seconds: float = float("inf")) -> dict[str, dict]:
    """Time gen(prompts, 1) then gen(prompts, n) for every side in each round, the sides in rotating order so
    that the machine's noise hits all alike, after one unrecorded gen(prompts, warmup_tokens) per side if
    `warmup` (warmup_tokens=n: every shape the timed runs see has been seen once). Stops after `rounds`, or
    at `deadline` (time.monotonic()) once every side has one round. Past `rounds`, up to `max_rounds`, more
    rounds run while some side's `relative_spread` of decode seconds is above `max_spread`, for at most
    `extra_seconds` (and not past `deadline`). Per side: the per-round decode seconds (t_n - t_1), their
    min, max and relative spread, the median of t_1, decode tokens/s from the median decode seconds, and
    the last round's tokens."""
    names = list(gens)
    if warmup:
        for name in names:
            gens[name](prompts, warmup_tokens)
    res = {k: {"t1": [], "decode_s": [], "tokens": None} for k in names}
    extra_until = None
    for r in range(max(rounds, max_rounds or 0)):
        if r and deadline is not None and time.monotonic() > deadline:
            break
        if r >= rounds:
            extra_until = extra_until or time.monotonic() + extra_seconds
            if time.monotonic() >= extra_until or \
                    all(relative_spread(x["decode_s"]) <= max_spread for x in res.values()):
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
                 min_decode_s=min(r["decode_s"]), max_decode_s=max(r["decode_s"]),
                 spread=relative_spread(r["decode_s"]),
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


# -- synthetic context and preemption round trips ------------------------------------------------------------
def add_synthetic_context(engine, batch: int, context: int, token: int = 1,
                          max_new_tokens: int = SYNTHETIC_MAX_NEW_TOKENS) -> list[int]:
    """SYNTHETIC CONTEXT, for measurements only: `batch` running requests of `context` tokens each, placed
    without a forward pass (`Engine.add_synthetic_request`: blocks allocated in the device pool and written,
    the values meaningless; preemption moves the blocks, whatever they hold). Returns the request ids; if one
    cannot be placed, those already placed are aborted and the error propagates."""
    ids = []
    try:
        for _ in range(batch):
            ids.append(engine.add_synthetic_request(context, max_new_tokens=max_new_tokens, token=token))
    except BaseException:
        for rid in ids:
            engine.abort(rid)
        raise
    return ids


def drain(engine) -> None:
    """Collect the outputs of the step that resume() ran (the next step() returns them without computing).
    Needed between round trips: resume() runs its first step through step(), which, while such outputs are
    pending, returns them instead of computing (so a second resume would time no step at all)."""
    if engine.has_pending_outputs:
        engine.step()


def clear(engine, ids) -> None:
    """Drain the engine, then abort the requests `ids`."""
    drain(engine)
    for rid in ids:
        engine.abort(rid)


def warm_up(engine) -> None:
    """One unrecorded round trip with a short synthetic context (on CUDA this compiles the kernels). On the
    CPU backend the host KV pool is written once first, so that the first recorded swap-out is not charged for
    the first touch of its pages (a serving engine's pool is warm; on CUDA pinning has touched it already)."""
    if engine.backend.device.type == "cpu":
        engine.cache.host_kv.zero_()
    ids = add_synthetic_context(engine, 1, 64)
    try:
        round_trip(engine)
    finally:
        clear(engine, ids)


def round_trip(engine, pipelined: bool = False, weights: str = "host", kv: str = "swap"):
    """One `preempt(weights, kv)` + `resume(pipelined)`, drained. Returns (PreemptionReport, ResumeReport)."""
    pre = engine.preempt(weights=weights, kv=kv)
    res = engine.resume(pipelined=pipelined)
    drain(engine)
    return pre, res


def round_trips(engine, batch: int, context: int, reps: int, warmup: int = 1, pipelined: bool = False,
                weights: str = "host", kv: str = "swap", label: str = "",
                before: Callable[[], None] | None = None) -> list[tuple]:
    """`warmup` unrecorded then `reps` recorded round trips, each with `batch` synthetic sequences of
    `context` tokens of its own (the first step after resume adds a token, which may start a new block);
    `before()`, if given, runs before each. Returns the recorded (PreemptionReport, ResumeReport) pairs. With kv="swap", a
    request dropped instead of swapped (the host KV pool too small) is an error: the round trip would not
    measure what was asked."""
    got = []
    for i in range(warmup + reps):
        ids = add_synthetic_context(engine, batch, context)
        try:
            if before is not None:
                before()
            pre, res = round_trip(engine, pipelined=pipelined, weights=weights, kv=kv)
        finally:
            clear(engine, ids)
        if kv == "swap" and (pre.kv_swapped_requests != batch or pre.kv_recompute_requests):
            raise RuntimeError(f"{label + ' ' if label else ''}batch {batch} x {context}: "
                               f"{pre.kv_recompute_requests} requests dropped instead of swapped; the host KV "
                               f"pool is too small")
        if i >= warmup:
            got.append((pre, res))
    return got


# -- disk ----------------------------------------------------------------------------------------------------
def drop_from_cache(file) -> None:
    """Ask the kernel to drop `file`'s pages from the page cache (posix_fadvise DONTNEED), so that the next
    read comes from the disk. Dirty pages are not dropped, so the file is synced first."""
    fd = os.open(file, os.O_RDONLY)
    try:
        try:
            os.fsync(fd)
        except OSError as exc:
            # A read-only or special file system cannot sync, and has no dirty pages of this file to sync.
            if exc.errno not in (errno.EINVAL, errno.EROFS):
                raise
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def disk_read(files: list, max_bytes: int = 1 << 30, reps: int = 3):
    """Cold read bandwidth of `files` into host memory through tidal's loader (`native.read_spans`): up to
    `max_bytes` from their starts, each file's span into a buffer congruent to it modulo 4096, so that
    O_DIRECT (where the file system allows it) reads in place. Each of `reps` reads follows `drop_from_cache` of every
    file. Returns (median GB/s, bytes per read, the LoadInfo.path of the last read)."""
    from tidal import native

    sizes, left = [], max_bytes
    for f in files:
        n = min(Path(f).stat().st_size, left) // native.BLOCK * native.BLOCK
        if n:
            sizes.append((f, n))
            left -= n
    total = sum(n for _, n in sizes)
    if not total:
        raise ValueError(f"disk_read: nothing to read in {[str(f) for f in files]}")
    raw = torch.empty(total + native.BLOCK, dtype=torch.uint8)
    raw.fill_(0)  # touch every page now, so that page faults are not charged to the read
    base = (-raw.data_ptr()) % native.BLOCK
    spans, at = [], base
    for f, n in sizes:
        spans.append((f, 0, raw[at:at + n]))
        at += n
    gbps, path = [], ""
    for _ in range(reps):
        for f, _n in sizes:
            drop_from_cache(f)
        info = native.read_spans(spans)
        gbps.append(info.gbps)
        path = info.path
    return statistics.median(gbps), total, path
