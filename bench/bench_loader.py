"""Checkpoint loading into a host arena, small and cold: tidal's loader paths against safetensors.

    .venv/bin/python -m pytest bench/bench_loader.py --benchmark-only

A 56 MB safetensors checkpoint (4 small Llama-like layers, bf16), dropped from the page
cache (`posix_fadvise(DONTNEED)`) before every round. GB/s and the path taken are in `extra_info`. The
~2 GB comparison against the disk's direct-read bandwidth is bench/loader_summary.py.
"""
import json
import os

import pytest
import torch
from loader_summary import drop_from_cache
from safetensors.torch import load_file, save_file

from tidal import native
from tidal.arena import layout
from tidal.checkpoint import Checkpoint

PATHS = ["tidal-native-direct", "tidal-native-buffered", "tidal-python-fallback",
         "safetensors-load_file+copy"]


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("loader-bench")
    g = torch.Generator().manual_seed(0)
    shapes = {f"model.layers.{i}.{n}": s for i in range(4) for n, s in
              [("input_layernorm.weight", (1024,)), ("self_attn.q_proj.weight", (1024, 1024)),
               ("self_attn.k_proj.weight", (256, 1024)), ("mlp.up_proj.weight", (2816, 1024)),
               ("mlp.down_proj.weight", (1024, 2816))]}
    tensors = {n: torch.randint(-(1 << 15), 1 << 15, s, dtype=torch.int16, generator=g).view(torch.bfloat16)
               for n, s in shapes.items()}
    save_file(tensors, path / "model.safetensors")
    fd = os.open(path / "model.safetensors", os.O_RDONLY)
    os.fsync(fd)  # clean pages, so that DONTNEED can drop them
    os.close(fd)
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return path


@pytest.mark.parametrize("path", PATHS)
def bench_load_small_checkpoint(benchmark, small_checkpoint, monkeypatch, path):
    if path.startswith("tidal-native") and not native.available():
        pytest.skip("tidal._C not built")
    if path == "tidal-python-fallback":
        monkeypatch.setattr(native, "_C", None)
    ckpt = Checkpoint(small_checkpoint)
    file = small_checkpoint / "model.safetensors"
    names = sorted(ckpt.tensors)
    slots, nbytes = layout([(ckpt.info(n).shape, ckpt.info(n).dtype) for n in names])
    arena = torch.zeros(nbytes, dtype=torch.uint8)
    data_bytes = sum(ckpt.info(n).nbytes for n in names)
    items = [(n, s.view(arena)) for n, s in zip(names, slots)]
    infos = []

    def tidal():
        infos.append(ckpt.read_many(items, threads=None))

    def safetensors():
        tensors = load_file(file)
        for n, dst in items:
            dst.copy_(tensors[n])

    if path == "tidal-native-buffered":
        monkeypatch.setenv("TIDAL_LOAD_DIRECT", "0")
    benchmark.group = "cold load, 56 MB checkpoint"
    benchmark.pedantic(safetensors if path.startswith("safetensors") else tidal,
                       setup=lambda: drop_from_cache(file), rounds=5, warmup_rounds=0)
    benchmark.extra_info["GB/s"] = data_bytes / benchmark.stats.stats.median / 1e9
    if infos:
        benchmark.extra_info["path"] = infos[-1].path
    ref = load_file(file)
    assert all(torch.equal(d.view(torch.uint8), ref[n].view(torch.uint8)) for n, d in items)
