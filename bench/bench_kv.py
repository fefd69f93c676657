"""KV swap bandwidth (issue 4): one sequence swapped out and back in, tidal's batched swap beside a per-block
copy loop (vLLM's `swap_blocks` pattern: one copy per block per layer, K and V) in the same run, on the same
pools. `make bench`, or for the table with ratios:

    .venv/bin/python bench/bench_kv.py [--device cpu] [--layers 4] [--tokens 1024,8192,32768]

Shape: Llama-3-8B's KV (8 kv heads, head_dim 128), block_size 16; bf16 on CUDA, fp32 on the CPU. The CPU run
keeps fewer layers (default 4 of 32) so that a 32k-token sequence (device pool twice its size, plus the host
pool) fits in memory; bandwidth per byte does not depend on the layer count beyond per-call overheads, which
only favour the per-block loop as layers shrink. The sequence's device blocks are every other block of the
pool (a fragmented pool, as after many steps); its host blocks are one contiguous run.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import pytest
import torch

from tidal.kv import PagedKVCache

HEADS, HEAD_DIM, BLOCK = 8, 128, 16


def make_cache(device: str, layers: int, tokens: int) -> PagedKVCache:
    """A cache whose device pool is twice the sequence, with "seq" on every other device block."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    blocks = -(-tokens // BLOCK)
    cache = PagedKVCache(layers, HEADS, HEAD_DIM, BLOCK, 2 * blocks, blocks, dtype, device)
    cache.allocate("seq", 0)
    cache.allocate("gap", 0)
    for _ in range(blocks):
        cache.append("seq", BLOCK)
        cache.append("gap", BLOCK)
    ids = torch.tensor(cache.block_ids("seq"), device=cache.kv.device)
    cache.kv[:, :, ids] = torch.randn(cache.kv[:, :, ids].shape, device=cache.kv.device).to(dtype)
    return cache


def per_block_loop(cache: PagedKVCache, direction: str, device_blocks: list[int], host_blocks: list[int]):
    """The swap_blocks pattern on the backend's copy queue: one copy call per block per layer, K and V."""
    kv, host, layers = cache.kv, cache.host_kv, cache.config.num_layers
    pairs = list(zip(device_blocks, host_blocks))

    def fn():
        for layer in range(layers):
            for k_or_v in (0, 1):
                for d, h in pairs:
                    if direction == "out":
                        host[h, layer, k_or_v].copy_(kv[layer, k_or_v, d], non_blocking=True)
                    else:
                        kv[layer, k_or_v, d].copy_(host[h, layer, k_or_v], non_blocking=True)
    nbytes = len(pairs) * cache.config.block_bytes
    return cache.backend.submit(fn, nbytes, after=[cache.backend.record()]), 2 * layers * len(pairs)


def one_swap(cache: PagedKVCache, kind: str, direction: str) -> dict:
    """Swap "seq" once (it must be on the other side first); wall seconds include enqueueing."""
    if kind == "tidal":
        t0 = time.perf_counter()
        handle = cache.swap_out(["seq"]) if direction == "out" else cache.swap_in(["seq"])
        handle.wait()
        wall = time.perf_counter() - t0
        return dict(wall=wall, queue=handle.event.seconds(), bytes=handle.bytes, calls=handle.copy_calls)
    dev = cache.block_ids("seq")
    t0 = time.perf_counter()
    transfer, calls = per_block_loop(cache, direction, dev, list(range(len(dev))))
    transfer.wait()
    wall = time.perf_counter() - t0
    return dict(wall=wall, queue=transfer.seconds(), bytes=transfer.nbytes, calls=calls)


def measure(device: str, layers: int, tokens: int, reps: int = 3, kinds=("tidal", "per-block")) -> list[dict]:
    """Median wall-clock GB/s of `reps` swap-outs and swap-ins per kind, checking the bytes after each."""
    cache = make_cache(device, layers, tokens)
    ref = cache.kv[:, :, torch.tensor(cache.block_ids("seq"), device=cache.kv.device)].clone()
    rows = []
    for kind in kinds:
        runs = {"out": [], "in": []}
        for direction in ("out", "in"):  # warm-up: first-touch page faults and allocator caches
            one_swap(cache, kind, direction)
        for _ in range(reps):
            for direction in ("out", "in"):
                runs[direction].append(one_swap(cache, kind, direction))
        got = cache.kv[:, :, torch.tensor(cache.block_ids("seq"), device=cache.kv.device)]
        if not torch.equal(got, ref):
            raise AssertionError(f"{kind}: KV bytes changed by a swap round trip")
        for direction, r in runs.items():
            wall = statistics.median(x["wall"] for x in r)
            queue = statistics.median(x["queue"] for x in r)
            rows.append(dict(kind=kind, direction=direction, tokens=tokens, layers=layers, bytes=r[0]["bytes"],
                             copy_calls=r[0]["calls"], wall_s=wall, gbps=r[0]["bytes"] / wall / 1e9,
                             queue_gbps=r[0]["bytes"] / queue / 1e9))
    cache.close()
    return rows


def table_rows(rows: list[dict]) -> list[list]:
    out = []
    for r in rows:
        base = next(x for x in rows if x["kind"] == "per-block" and x["direction"] == r["direction"]
                    and x["tokens"] == r["tokens"])
        out.append([r["tokens"], r["direction"], r["kind"], f"{r['bytes'] / 1e6:.1f}", r["copy_calls"],
                    f"{r['wall_s'] * 1e3:.2f}", f"{r['gbps']:.2f}", f"{r['gbps'] / base['gbps']:.2f}x"])
    return out


HEADERS = ["tokens", "dir", "kind", "MB", "copy calls", "ms", "GB/s", "vs per-block"]


# -- pytest-benchmark (make bench) ---------------------------------------------------------------------------
@pytest.mark.benchmark(group="kv swap: one sequence, 4 layers of Llama-3-8B KV, fp32, CPU backend")
@pytest.mark.parametrize("tokens", [1024, 8192])
@pytest.mark.parametrize("kind", ["tidal", "per-block"])
@pytest.mark.parametrize("direction", ["out", "in"])
def bench_kv_swap(benchmark, tokens, kind, direction):
    cache = make_cache("cpu", 4, tokens)
    if direction == "in" and kind == "tidal":  # the per-block loop copies without moving the bookkeeping
        cache.swap_out(["seq"]).wait()

    def reset():  # untimed: bring the sequence back to the side this direction starts from
        if kind == "tidal" and cache.where("seq") != ("device" if direction == "out" else "host"):
            (cache.swap_in if direction == "out" else cache.swap_out)(["seq"]).wait()

    result = benchmark.pedantic(lambda: one_swap(cache, kind, direction), setup=reset, rounds=5, iterations=1)
    benchmark.extra_info.update(copy_calls=result["calls"], bytes=result["bytes"])
    cache.close()


def main(argv=None) -> int:
    from tidal.tables import format_table

    ap = argparse.ArgumentParser(description="KV swap bandwidth: tidal vs a per-block copy loop")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", default="1024,8192,32768")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    rows = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        rows += measure(args.device, args.layers, tokens, args.reps)
    print(f"{args.device}, {args.layers} layers x {HEADS} kv heads x head_dim {HEAD_DIM}, block {BLOCK}, "
          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    print(format_table(HEADERS, table_rows(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
