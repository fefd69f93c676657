"""Cold-cache checkpoint load into host memory: tidal's loader against safetensors and against the disk.

    .venv/bin/python bench/loader_summary.py [--reps 3] [--layers 13] [--threads N] [--json out.json]

The checkpoint (Llama-3.2-1B shapes, bf16 random bytes, 13 decoder layers by default: 2.11 GB in 119
tensors, one `model.safetensors`) is written once under tidal's cache dir ($TIDAL_CACHE_DIR, else ~/.cache/tidal). Each round
runs every variant once, in a rotated order, each after `posix_fadvise(POSIX_FADV_DONTNEED)` on the file (so
the file's pages are out of this machine's page cache; the rest of the cache is left alone). Medians over
rounds. Every variant ends with every tensor in one host arena (pinned on CUDA, plain memory on the CPU
backend), laid out as tidal's `arena.layout` lays out weights (256-byte aligned):

- direct-read: O_DIRECT `os.preadv` of the whole file in `chunk` pieces on N Python threads (GIL released)
  into the (4096-aligned) arena, file byte i to arena byte i: the disk's bandwidth into host memory,
  measured in the same run. The reference is the larger median of N threads and 1 thread.
- tidal: `Checkpoint.read_many` of all tensors into the arena (one native call).
- tidal (file-congruent): the same into a layout where each tensor's address is congruent to its file
  offset modulo 4096, so O_DIRECT lands in place with no bounce copy.
- tidal (buffered): the same as tidal, O_DIRECT off (`direct=False`): every byte through the page cache.
- tidal python fallback: the path taken without tidal._C (one buffered `os.preadv` per tensor, one thread).
- safetensors: `safetensors.torch.load_file`, then each tensor copied into the arena: the copy that pinning
  (`Tensor.pin_memory()` / a copy into a registered buffer) does on a GPU machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from tidal import native
from tidal.arena import layout
from tidal.backends import make_backend
from tidal.checkpoint import Checkpoint
from tidal.presets import cache_root
from tidal.study.runs import drop_from_cache

HIDDEN, INTER, KV, VOCAB = 2048, 8192, 512, 128256  # Llama-3.2-1B


def llama_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,)}
    layer = {"input_layernorm": (HIDDEN,), "post_attention_layernorm": (HIDDEN,),
             "self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (KV, HIDDEN),
             "self_attn.v_proj": (KV, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
             "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN),
             "mlp.down_proj": (HIDDEN, INTER)}
    for i in range(layers):
        shapes |= {f"model.layers.{i}.{n}.weight": s for n, s in layer.items()}
    return shapes


def bench_checkpoint(layers: int) -> Path:
    """A checkpoint directory of `layers` Llama-3.2-1B-shaped layers, written once and reused."""
    from safetensors.torch import save_file

    path = cache_root() / f"loader-bench-llama1b-{layers}l"
    if (path / "model.safetensors").exists():
        return path
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(layers)
    tensors = {n: torch.randint(-(1 << 15), 1 << 15, s, dtype=torch.int16, generator=g).view(torch.bfloat16)
               for n, s in llama_shapes(layers).items()}
    save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": layers,
                                                 "note": "tidal loader benchmark: random bf16 bytes"}))
    fd = os.open(tmp / "model.safetensors", os.O_RDONLY)
    os.fsync(fd)  # clean pages, so that DONTNEED can drop them
    os.close(fd)
    tmp.rename(path)
    return path


def direct_read(file: Path, threads: int, chunk: int, into: torch.Tensor) -> int:
    """Reads the whole file with O_DIRECT on `threads` threads, byte i of the file to byte i of `into` (a
    4096-aligned host buffer of at least file size + chunk bytes); returns the bytes read."""
    size = file.stat().st_size
    assert into.data_ptr() % native.BLOCK == 0 and into.numel() >= size + chunk
    view = memoryview(into.numpy())
    counter, lock, total = iter(range(0, size, chunk)), threading.Lock(), []
    fd = os.open(file, os.O_RDONLY | os.O_DIRECT)

    def run():
        got = 0
        while True:
            with lock:
                offset = next(counter, None)
            if offset is None:
                break
            got += os.preadv(fd, [view[offset:offset + chunk]], offset)  # the last one comes back short
        total.append(got)

    try:
        pool = [threading.Thread(target=run) for _ in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    finally:
        os.close(fd)
    assert sum(total) == size, (sum(total), size)
    return size


def congruent_layout(ckpt: Checkpoint, names: list[str]) -> tuple[list[int], int]:
    """Offsets where each tensor's address (from a 4096-aligned base) is congruent to its file offset."""
    offsets, end = [], 0
    for n in names:
        info = ckpt.info(n)
        end += (info.offset - end) % native.BLOCK
        offsets.append(end)
        end += info.nbytes
    return offsets, end


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--layers", type=int, default=13)
    ap.add_argument("--threads", type=int, default=native.load_threads())
    ap.add_argument("--chunk-mib", type=int, default=8)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    path = bench_checkpoint(args.layers)
    file = path / "model.safetensors"
    ckpt, size = Checkpoint(path), file.stat().st_size
    names = sorted(ckpt.tensors, key=lambda n: ckpt.info(n).offset)
    slots, arena_bytes = layout([(ckpt.info(n).shape, ckpt.info(n).dtype) for n in names])
    cong, cong_bytes = congruent_layout(ckpt, names)
    backend = make_backend()
    chunk, infos = args.chunk_mib << 20, {}
    raw = backend.host_buffer(max(arena_bytes, cong_bytes, size + chunk) + native.BLOCK)
    raw.fill_(0)  # touch every page now: a pinned arena is resident before any load
    arena = raw[(-raw.data_ptr()) % native.BLOCK:]
    arena_items = [(n, s.view(arena)) for n, s in zip(names, slots)]
    cong_items = [(n, arena[o:o + ckpt.info(n).nbytes].view(ckpt.info(n).dtype).view(ckpt.info(n).shape))
                  for n, o in zip(names, cong)]

    def safetensors_then_copy():
        from safetensors.torch import load_file

        tensors = load_file(file)
        for n, dst in arena_items:
            dst.copy_(tensors[n])

    def tidal(items, key, direct=True):
        infos[key] = ckpt.read_many(items, threads=args.threads, direct=direct)

    def python_fallback():
        saved, native._C = native._C, None
        try:
            infos["tidal python fallback"] = ckpt.read_many(arena_items)
        finally:
            native._C = saved

    variants = {
        f"direct-read ({args.threads} threads)": lambda: direct_read(file, args.threads, chunk, arena),
        "direct-read (1 thread)": lambda: direct_read(file, 1, chunk, arena),
        "tidal read_many": lambda: tidal(arena_items, "tidal read_many"),
        "tidal read_many (file-congruent)": lambda: tidal(cong_items, "tidal read_many (file-congruent)"),
        "tidal read_many (buffered)": lambda: tidal(arena_items, "tidal read_many (buffered)", direct=False),
        "tidal python fallback": python_fallback,
        "safetensors load_file + copy": safetensors_then_copy,
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    order = list(variants)
    for rep in range(args.reps):
        for name in order[rep % len(order):] + order[:rep % len(order)]:
            drop_from_cache(file)
            t0 = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - t0)
            print(f"  round {rep}: {name:<36} {times[name][-1]:7.3f} s", file=sys.stderr, flush=True)
    _verify(file, ckpt, arena_items)
    med = {k: statistics.median(v) for k, v in times.items()}
    disk = min(med[f"direct-read ({args.threads} threads)"], med["direct-read (1 thread)"])
    result = {"file_bytes": size, "tensors": len(names), "reps": args.reps, "threads": args.threads,
              "chunk_bytes": chunk, "device": str(backend.device),
              "pinned": getattr(backend, "is_pinned", lambda b: False)(raw),
              "tidal_path": infos["tidal read_many"].path, "machine": _machine(),
              "seconds": times, "median_s": med, "median_gbps": {k: size / v / 1e9 for k, v in med.items()},
              "tidal_split": {k: {"direct": i.direct_bytes, "bounce": i.bounce_bytes,
                                  "buffered": i.buffered_bytes} for k, i in infos.items()},
              "tidal_vs_direct_read": disk / med["tidal read_many"],
              "tidal_congruent_vs_direct_read": disk / med["tidal read_many (file-congruent)"],
              "tidal_speedup_vs_safetensors": med["safetensors load_file + copy"] / med["tidal read_many"]}
    _print(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    backend.release_host_buffer(raw)
    return result


def _verify(file: Path, ckpt: Checkpoint, items) -> None:
    """Every tensor tidal read equals safetensors' own, byte for byte (warm cache, untimed)."""
    from safetensors.torch import load_file

    ckpt.read_many(items)
    ref = load_file(file)
    for n, dst in items:
        assert torch.equal(dst.view(torch.uint8), ref[n].view(torch.uint8)), n


def _machine() -> str:
    import platform

    with open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    system = f"{platform.system()} {platform.release()}"
    return f"{cpu}, {os.cpu_count()} CPUs, {system}, torch {torch.__version__}"


def _print(r: dict) -> None:
    print(f"cold load of {r['file_bytes'] / 1e9:.2f} GB ({r['tensors']} tensors), median of {r['reps']}, "
          f"{r['threads']} threads, {r['chunk_bytes'] >> 20} MiB chunks, {r['device']} "
          f"({'pinned' if r['pinned'] else 'unpinned'} arena); tidal path: {r['tidal_path']}")
    for k, s in r["median_s"].items():
        print(f"  {k:<36} {s:7.3f} s  {r['median_gbps'][k]:6.2f} GB/s")
    for k, split in r["tidal_split"].items():
        print(f"  {k}: bytes by O_DIRECT in place {split['direct']:,}, via bounce {split['bounce']:,}, "
              f"buffered {split['buffered']:,}")
    print(f"tidal / direct-read bandwidth = {r['tidal_vs_direct_read']:.1%} (target >= 90%); file-congruent: "
          f"{r['tidal_congruent_vs_direct_read']:.1%}")
    print(f"tidal speed-up over safetensors load_file + copy = {r['tidal_speedup_vs_safetensors']:.2f}x "
          f"(target >= 1.5x)")


if __name__ == "__main__":
    main()
