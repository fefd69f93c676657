"""The transformers user's preemption protocol, measured as the baseline of tidal's preemption rows:
`model.to("cpu")` or `del model`, the KV tensors moved one by one, and back (see `tidal.study.compare`)."""
from __future__ import annotations

import inspect
import statistics
import time
from pathlib import Path
from typing import Callable, Iterator

from ..errors import ConfigError, TransferError
from . import runs
from .hf import free, quiet_loads, require_hf, resolve, sync
from .progress import Progress

PROTOCOL_TIERS = ("host", "disk")  # where the transformers protocol's weights go; its KV is always moved
PROTOCOL_SYSTEM = "transformers"


def weight_bytes(model) -> int:
    """Bytes of `model`'s parameters, tied ones once: the weights `model.to` moves. (It moves the buffers too,
    rotary tables of a few hundred bytes that are not weights; their time is in the weights' time.)"""
    return sum(p.nbytes for p in model.parameters())


class Protocol:
    """A transformers model and its KV cache, preempted and resumed the way transformers users do it (see the
    module's docstring). `emulated`: on the CPU backend, where the moves are copies into fresh tensors."""

    def __init__(self, path, device, dtype):
        from transformers import AutoModelForCausalLM

        from ..checkpoint import Checkpoint

        self.path, self.device, self.dtype = Path(path), device, dtype
        tensors = Checkpoint(path).tensors.values()
        # what from_pretrained reads back: the stored tensors (as tidal's disk_bytes counts them)
        self.files = sorted({t.file for t in tensors})
        self.disk_bytes = sum(t.nbytes for t in tensors)
        self.emulated = device.type == "cpu"
        self._load = lambda: AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype).eval()
        self.model = self._load().to(device)
        params = inspect.signature(self.model.forward).parameters
        # transformers 5 names the cache argument `cache`; older versions `past_key_values`
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._last_logits = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.cache = self.next_ids = self.expected = None
        self.context = 0

    # moves
    def _move(self, t, dst):
        return t.clone() if self.emulated else t.to(dst)

    def move_model(self, dst) -> int:
        """`model.to(dst)` (emulated: every parameter and buffer copied); returns the weight bytes moved."""
        import torch

        nbytes = weight_bytes(self.model)
        if not self.emulated:
            self.model.to(dst)
            return nbytes
        with torch.no_grad():
            for p in self.model.parameters():
                p.data = p.data.clone()
            for module in self.model.modules():
                for name, b in list(module.named_buffers(recurse=False)):
                    setattr(module, name, b.clone())
        return nbytes

    def move_kv(self, dst) -> int:
        """Every KV tensor of the cache to `dst`, one by one; returns the bytes moved."""
        nbytes = 0
        for layer in self.cache.layers:
            layer.keys = self._move(layer.keys, dst)
            layer.values = self._move(layer.values, dst)
            nbytes += layer.keys.nbytes + layer.values.nbytes
        return nbytes

    # decoding
    def _forward(self, ids):
        import torch

        with torch.no_grad():
            out = self.model(input_ids=ids, use_cache=True, **{self._cache_arg: self.cache},
                             **self._last_logits)
        return out.logits[:, -1].argmax(-1, keepdim=True)

    def start(self, prompts: list[list[int]]) -> None:
        """Prefill `prompts` (all of one length) into a fresh cache, then decode one step for the tokens a
        resumed run must give, and rewind the cache to the prompts."""
        import torch
        from transformers import DynamicCache

        self.cache = None
        free(self.device)
        self.cache = DynamicCache(config=self.model.config)
        if not hasattr(self.cache, "layers"):
            raise ConfigError("tidal compare's preemption protocol needs transformers >= 5 "
                              "(DynamicCache.layers)")
        self.context = len(prompts[0])
        self.next_ids = self._forward(torch.tensor(prompts, device=self.device))
        self.expected = self._forward(self.next_ids).tolist()
        self.rewind()

    def rewind(self) -> None:
        """Drop the tokens decoded after the prompts. Contiguous again, as a cache grown by decoding is (a
        sliced tensor would make the next moves strided copies)."""
        extra = self.cache.get_seq_length() - self.context
        if extra:
            self.cache.crop(-extra)
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys.contiguous(), layer.values.contiguous()

    def round_trip(self, weights: str) -> dict:
        """One preempt + resume with weights `weights` ("host" or "disk") and the KV moved, then the first
        decode step, checked against the uninterrupted one; rewinds the cache. Returns the row's fields."""
        import torch

        host, dev = torch.device("cpu"), self.device
        t0 = time.perf_counter()
        if weights == "host":
            released = self.move_model(host)
        else:
            released = weight_bytes(self.model)
            self.model = None  # a user's `del model`: nothing is kept, resume reads the checkpoint again
            if dev.type == "cuda":  # and, to give the memory back to the device, gc and empty_cache
                free(dev)
        sync(dev)
        t1 = time.perf_counter()
        kv_bytes = self.move_kv(host)
        sync(dev)
        t2 = time.perf_counter()
        if weights == "disk":
            for f in self.files:
                runs.drop_from_cache(f)  # so that from_pretrained reads from the disk
        r0 = r_disk = time.perf_counter()
        if weights == "disk":
            self.model = self._load()
            r_disk = time.perf_counter()
        self.move_model(dev)
        sync(dev)
        r1 = time.perf_counter()
        self.move_kv(dev)
        sync(dev)
        r2 = time.perf_counter()
        got = self._forward(self.next_ids).tolist()  # .tolist() waits for the device
        r3 = time.perf_counter()
        self.rewind()
        if got != self.expected:
            raise TransferError(f"transformers protocol, weights={weights}, context {self.context}: the "
                                f"tokens after resume {got} differ from the uninterrupted run's "
                                f"{self.expected}")
        return dict(weight_bytes=released, kv_bytes=kv_bytes,
                    disk_bytes=self.disk_bytes if weights == "disk" else 0,
                    weight_out_seconds=t1 - t0 if weights == "host" else 0.0, kv_out_seconds=t2 - t1,
                    disk_seconds=r_disk - r0, weight_in_seconds=r1 - r_disk, kv_in_seconds=r2 - r1,
                    preempt_seconds=t2 - t0, resume_seconds=r3 - r0, first_token_seconds=r3 - r0,
                    total_seconds=(t2 - t0) + (r3 - r0), same_tokens=True)

    def close(self) -> None:
        self.model = self.cache = None
        free(self.device)


def protocol_row(trips: list[dict], weights: str, batch: int, context: int) -> dict:
    """One preemption row (schema: preemption_row, system "transformers") from recorded round trips (dicts of
    `Protocol.round_trip`): bytes from the first (every trip moves the same), each time the median, and the
    weight and KV seconds the sums of their parts' medians, as tidal's rows are built."""
    def med(key):
        return statistics.median(t[key] for t in trips)

    row = dict(system=PROTOCOL_SYSTEM, weights=weights, kv="swap", pipelined=False, resident_fraction=1.0,
               batch=batch, context=context, synthetic_context=False, weight_bytes=trips[0]["weight_bytes"],
               kv_bytes=trips[0]["kv_bytes"], disk_bytes=trips[0]["disk_bytes"], recompute_tokens=0,
               recompute_seconds=0.0, repeats=len(trips))
    for key in ("weight_out_seconds", "disk_seconds", "weight_in_seconds", "kv_out_seconds", "kv_in_seconds",
                "preempt_seconds", "resume_seconds", "first_token_seconds", "total_seconds"):
        row[key] = med(key)
    row["weight_seconds"] = row["weight_out_seconds"] + row["disk_seconds"] + row["weight_in_seconds"]
    row["kv_seconds"] = row["kv_out_seconds"] + row["kv_in_seconds"]
    return row


def preemption_rows(path, settings, device, dtype, at: Callable[[str], None]) -> Iterator[dict]:
    at("transformers preemption: loading")
    proto = Protocol(path, device, dtype)
    try:
        settings.check_model(proto.model.config.max_position_embeddings)
        vocab, batch = proto.model.config.vocab_size, settings.preemption_batch
        for context in settings.contexts:
            at(f"transformers preemption: prefill of {batch} x {context} tokens")
            proto.start(runs.same_length_prompts(batch, context, vocab))
            for weights in PROTOCOL_TIERS:
                at(f"transformers preemption: weights {weights}, kv swap, context {context}")
                trips = [proto.round_trip(weights) for _ in range(1 + settings.repeats)][1:]  # first: warm-up
                yield protocol_row(trips, weights, batch, context)
    finally:
        proto.close()


def baseline_preemption(path, settings, device=None, dtype=None, progress: bool = True) -> list[dict]:
    """Preemption rows (schema: preemption_row, system "transformers") of the transformers user's protocol on
    checkpoint `path`: for each context of `settings` and each weight tier ("host", "disk"), with
    `settings.preemption_batch` sequences. TransferError if a resumed run's tokens differ from the
    uninterrupted run's."""
    require_hf()
    device, dtype = resolve(device, dtype)
    cells = Progress(len(settings.contexts) * len(PROTOCOL_TIERS), progress)
    rows = []
    try:
        with quiet_loads():
            for row in preemption_rows(path, settings, device, dtype, cells.at):
                rows.append(row)
                cells.done()
    finally:
        cells.close()
    return rows
