"""`tidal.Engine`: a Llama-family model served from a Hugging Face checkpoint, its weights placed by a residency
plan (streamed layers go through `LayerStreamer`), its KV in a `PagedKVCache`, decoded in batched steps.

This module builds the engine and runs what the batcher (`batcher.py`) decides: `step()` is decode the
running batch, prefill the admitted one, and hand back the tokens. Placement is in `placement.py`, the
counters in `stats.py`, a model's preemption and resume in `preemption.py`, live residency changes in
`residency.py`.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import torch

from .. import native, text
from ..backends import make_backend
from ..config import OffloadConfig
from ..errors import ConfigError, GenerationError, OutOfDeviceMemory, PromptError, StateError, TransferError
from ..kv import PagedKVCache
from ..model import DecoderModel
from ..sampling import SamplingParams, sample
from ..streaming import LayerStreamer, StepStats
from . import preemption, residency
from .batcher import Batcher
from .placement import EngineConfig, Footprint, Placement, check_int, place
from .reports import PreemptionReport, ResidencyReport, ResumeReport
from .request import Request, StepOutput, token_list
from .stats import Counters, EngineStats, counter_fields

log = logging.getLogger("tidal")

_SYNTHETIC_KV = 0.01  # what add_synthetic_request writes: any value would do, writing is what counts


class Engine:
    """A model served by tidal. Build with `Engine.from_pretrained`; drive with `generate`, or step by step
    with `add_request`, `step`, `abort` and `has_unfinished`. `close()` releases device and pinned memory.

    `batcher` holds the queues and decides each step's batches; `counters` the running counts behind
    `stats()`; `preempted` the state of a whole-model preemption (None while active); `eos_token_ids` the
    checkpoint's EOS ids (`tidal.text.eos_token_ids`), on which requests stop unless told otherwise."""

    def __init__(self, model: DecoderModel, cache: PagedKVCache, config: EngineConfig, offload: OffloadConfig,
                 plan, backend, weights, streamer: LayerStreamer | None, path: str = "", name: str | None = None,
                 eos_token_ids: tuple[int, ...] = ()):
        self.model, self.cache, self.config, self.offload_config = model, cache, config, offload
        self.path, self.name = str(path), name or Path(str(path)).name or "model"
        self.eos_token_ids = tuple(eos_token_ids)
        self.preempted = None  # a preemption.Preempted while preempted
        self.plan, self.backend, self.weights, self.streamer = plan, backend, weights, streamer
        self.max_batch_size = config.max_batch_size or 256
        self.max_model_len = model.config.max_position_embeddings
        self.counters = Counters()
        self.batcher = Batcher(cache, config, self.counters, self.max_batch_size, self.max_model_len,
                               model.config.vocab_size)
        self.capacity = self.batcher.capacity  # tokens the device pool holds
        self._carry: list[StepOutput] = []  # outputs of a step run ahead (by resume()), returned by the next step()
        self.promotion = None  # a residency.Promotion while the last set_residency's copies may be landing
        self.retired_streaming = StepStats()  # counters of the streamers set_residency replaced
        self._closed = False

    # -- construction ----------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, device=None, dtype: torch.dtype | None = None, resident_fraction: float = 1.0,
                        resident_layers=None, prefetch_depth: int = 2, block_size: int = 16,
                        kv_cache_bytes: int | None = None, max_batch_size: int | None = None, *,
                        host_kv_bytes: int | None = None, suspend: str = "swap", kernels: str = "auto",
                        max_prefill_tokens: int = 4096, device_budget_bytes: int | None = None,
                        keep_host_copy: bool = False, link=None) -> Engine:
        """Load a Hugging Face checkpoint directory (Llama, Qwen2, Mistral; `model.safetensors` or shards).

        Placement as in `tidal.offload`: `resident_fraction`, `resident_layers` or `device_budget_bytes` say
        which decoder layers stay on the device; the rest are read into pinned host memory and streamed
        `prefetch_depth` layers ahead. `dtype` defaults to the checkpoint's. The device KV pool takes
        `kv_cache_bytes` (default: most of the free device memory on CUDA, 512 MiB on the CPU), in blocks of
        `block_size` tokens. A request whose KV no longer fits is suspended: with `suspend="swap"` its blocks
        go to a host pool of `host_kv_bytes` (default: as large, at most 8 GiB); with "recompute" they are
        freed and it is prefilled again. `kernels`: "auto" (Triton on CUDA, torch references on the CPU),
        "triton" or "reference". `keep_host_copy`: hold a pinned host copy of the device-resident weights for
        the engine's lifetime (read once at load, then copied to the device), so that
        `preempt(weights="host")` copies nothing and only releases device memory; it costs that many host
        bytes while active. `link` (CPU backend only): an emulated host<->device link, a
        `tidal.backends.LinkEmulation` or GB/s. Raises CheckpointError naming the file and tensor for a
        missing or damaged checkpoint, ConfigError for a bad argument, before anything is allocated.
        """
        from .. import weights as W

        p = cls.placement(path, device=device, dtype=dtype, resident_fraction=resident_fraction,
                          resident_layers=resident_layers, prefetch_depth=prefetch_depth, block_size=block_size,
                          kv_cache_bytes=kv_cache_bytes, max_batch_size=max_batch_size, host_kv_bytes=host_kv_bytes,
                          suspend=suspend, kernels=kernels, max_prefill_tokens=max_prefill_tokens,
                          device_budget_bytes=device_budget_bytes, keep_host_copy=keep_host_copy, link=link)
        cfg, plan, kv = p.engine, p.plan, p.kv
        eos = text.eos_token_ids(path)  # read once, and before anything is allocated: it may raise
        backend = make_backend(p.device, link=p.offload.link)
        weights = streamer = cache = None
        try:
            weights = W.load(p.checkpoint, p.model, plan, backend, p.dtype, keep_host_copy=cfg.keep_host_copy)
            if weights.streamed:
                streamer = LayerStreamer(backend, plan, weights.streamed, prefetch_depth)
            model = DecoderModel(p.model, weights, cfg.kernels, streamer, backend)
            cache = PagedKVCache(kv.num_layers, kv.num_kv_heads, kv.head_dim, kv.block_size, kv.num_device_blocks,
                                 kv.num_host_blocks, dtype=kv.dtype, backend=backend)
        except BaseException as exc:
            for part in (cache, streamer):
                if part is not None:
                    part.close()
            if weights is not None:
                weights.release()
            backend.close()
            if isinstance(exc, torch.OutOfMemoryError):
                raise OutOfDeviceMemory(f"{path}: {backend.device} ran out of memory placing {plan} "
                                        f"({p.footprint.device} device bytes planned): {exc}") from exc
            raise
        engine = cls(model, cache, cfg, p.offload, plan, backend, weights, streamer, path, eos_token_ids=eos)
        log.info("tidal: engine %s on %s, %s, kernels %s, KV %d device / %d host blocks of %d tokens",
                 p.model.model_type, backend.device, plan, model.ops.path, kv.num_device_blocks,
                 kv.num_host_blocks, block_size)
        return engine

    @classmethod
    def placement(cls, path, device=None, dtype: torch.dtype | None = None, resident_fraction: float = 1.0,
                  resident_layers=None, prefetch_depth: int = 2, block_size: int = 16,
                  kv_cache_bytes: int | None = None, max_batch_size: int | None = None, *,
                  host_kv_bytes: int | None = None, suspend: str = "swap", kernels: str = "auto",
                  max_prefill_tokens: int = 4096, device_budget_bytes: int | None = None,
                  keep_host_copy: bool = False, link=None) -> Placement:
        """What `from_pretrained` with these arguments would place where, and the bytes it would hold on each
        tier, from the checkpoint's headers alone (nothing is allocated). Validates every argument."""
        cfg = EngineConfig(block_size=block_size, kv_cache_bytes=kv_cache_bytes, host_kv_bytes=host_kv_bytes,
                           max_batch_size=max_batch_size, max_prefill_tokens=max_prefill_tokens,
                           suspend=suspend, kernels=kernels, keep_host_copy=keep_host_copy)
        offload = OffloadConfig(resident_fraction=resident_fraction, resident_layers=resident_layers,
                                prefetch_depth=prefetch_depth, device=device, device_budget_bytes=device_budget_bytes,
                                link=link)
        return place(path, cfg, offload, dtype)

    # -- the step API ----------------------------------------------------------------------------------------
    def add_request(self, prompt, max_new_tokens: int = 16, temperature: float = 0.0, top_p: float = 1.0,
                    seed: int | None = None, stop_token_ids=None) -> int:
        """Queue a prompt (a list of token ids); returns its request id. The request stops on a token of
        `stop_token_ids`; None (the default) means the model's EOS ids (`eos_token_ids`), [] none. PromptError
        if this prompt can never run; ConfigError for bad sampling arguments."""
        self._check_open()
        params = SamplingParams(max_new_tokens, temperature, top_p, seed, self.stops(stop_token_ids))
        return self.batcher.add(token_list(prompt), params)

    def add_synthetic_request(self, context_tokens: int, max_new_tokens: int = 16, token: int = 1) -> int:
        """FOR MEASUREMENT ONLY: a running request whose KV cache holds `context_tokens` tokens, placed
        without a prefill; returns its id. What preemption moves depends on how many KV blocks there are, not
        on what they hold, so a benchmark can swap 8 x 16k tokens on a CPU that would take minutes to prefill
        them.

        The request is as a prefill would leave it (greedy): its prompt is `context_tokens` copies of `token`,
        its first output token is `token` (never returned by `step()`), and the next `step()` decodes it
        at position `context_tokens`. `max_new_tokens` counts that first token. Its device blocks are written
        with a constant, so that their pages are real memory (on the CPU backend an untouched page reads as
        the shared zero page, which would make a swap-out look faster than it is); the tokens it decodes from
        them mean nothing. Recomputed after a preemption, it is prefilled again like any request.

        ConfigError: `context_tokens` not an int >= 1, `max_new_tokens` not an int >= 2. PromptError: `token`
        outside the vocabulary, or a context that can never run (more than the KV cache holds, or no position
        left for the next token). StateError: preempted, or `max_batch_size` requests already running.
        OutOfBlocks: the device pool has no room for it now. A failed call changes nothing."""
        self._check_open()
        check_int("context_tokens", context_tokens, 1)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 2:
            raise ConfigError(f"max_new_tokens={max_new_tokens!r} must be an int >= 2 (a synthetic request "
                              f"has its first token already)")
        params = SamplingParams(max_new_tokens=max_new_tokens)
        (token,) = token_list([token])
        vocab = self.model.config.vocab_size
        if not 0 <= token < vocab:
            raise PromptError(f"token {token} outside the vocabulary [0, {vocab})")
        self.batcher.check_context(context_tokens)
        if context_tokens >= self.max_model_len:
            raise PromptError(f"context of {context_tokens} tokens: the model has {self.max_model_len} "
                              f"positions, none left for the next token")
        if self.preempted is not None:
            raise StateError(f"{self.name}: preempted; resume() it before adding requests")
        r, block_ids = self.batcher.add_running([token] * context_tokens, [token], params)
        blocks = torch.tensor(block_ids, device=self.cache.kv.device)
        for i in range(self.cache.config.num_layers):
            for part in self.cache.layer(i):
                part.index_fill_(0, blocks, _SYNTHETIC_KV)
        return r.id

    def step(self) -> list[StepOutput]:
        """Run one batching step; returns one StepOutput per request that produced a token or finished."""
        self._check_open()
        if self.preempted is not None:
            raise StateError(f"{self.name}: preempted; resume() it before stepping")
        if self._carry:
            carried, self._carry = self._carry, []
            return carried
        produced: dict[int, list[int]] = {}
        self.cache.poll()
        try:
            batch = self.batcher.decode_batch()
            if batch:
                self._emit(batch, self._decode(batch), produced)
            batch = self.batcher.prefill_batch()
            if batch:
                self._emit(batch, self._prefill(batch), produced)
        except TransferError:
            residency.recover(self)  # if a set_residency copy is what failed, those layers stream again
            raise
        self.counters.steps += 1
        return self.batcher.outputs(produced)

    def step_ahead(self) -> None:
        """Run one step now and hold its outputs (after any held already): the next `step()` returns them,
        computing nothing. `resume()` uses it to time the first token after a preemption."""
        carried, self._carry = self._carry, []
        self._carry = carried + self.step()

    def abort(self, request_id: int) -> bool:
        """Stop a request and free its blocks; False if it is unknown or already finished."""
        self._check_open()
        if not self.batcher.abort(request_id):
            return False
        self._carry = [o for o in self._carry if o.request_id != request_id]
        if self.preempted is not None and request_id in self.preempted.swapped:
            self.preempted.swapped.remove(request_id)  # its KV is freed: the resume must not swap it in
        return True

    def stops(self, stop_token_ids=None):
        """The stop ids a request asking for `stop_token_ids` gets: the model's EOS ids for None, else its
        own (an empty list: none)."""
        return self.eos_token_ids if stop_token_ids is None else stop_token_ids  # SamplingParams checks it

    def has_unfinished(self) -> bool:
        return bool(self.batcher.num_unfinished or self._carry)

    @property
    def num_unfinished(self) -> int:
        """Requests not finished yet: queued, running, swapping in, suspended, or parked by a preemption."""
        return self.batcher.num_unfinished

    @property
    def waiting(self) -> tuple[Request, ...]:
        """The requests waiting for a prefill, by id (a snapshot; the batcher owns the queue)."""
        return tuple(self.batcher.waiting)

    @property
    def running(self) -> tuple[Request, ...]:
        """The requests in the decode batch, by id (a snapshot; the batcher owns the queue)."""
        return tuple(self.batcher.running)

    @property
    def has_pending_outputs(self) -> bool:
        """Outputs already computed (by the step `resume()` ran) that the next `step()` returns at once,
        computing nothing; a measurement collects them first so that its next step is timed."""
        return bool(self._carry)

    def generate(self, prompts, max_new_tokens: int = 16, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, stop_token_ids=None) -> list[list[int]]:
        """Generate for every prompt (a list of token-id lists), batched; returns the generated ids per prompt.
        With `seed`, prompt i samples from seed + i. `stop_token_ids` as in `add_request` (None: the model's
        EOS ids). A prompt that can never run does not stop the others: they finish, then GenerationError
        carries every output and that prompt's error."""
        self._check_open()
        if not isinstance(prompts, (list, tuple)):
            raise ConfigError(f"prompts must be a list of token-id lists, got {type(prompts).__name__}")
        params = SamplingParams(max_new_tokens, temperature, top_p, seed, self.stops(stop_token_ids))
        ids: list[int | None] = []
        errors: dict[int, Exception] = {}
        for i, prompt in enumerate(prompts):
            p = params if seed is None else dataclasses.replace(params, seed=seed + i)
            try:
                ids.append(self.batcher.add(token_list(prompt), p))
            except PromptError as exc:
                ids.append(None)
                errors[i] = exc
        results = {rid: [] for rid in ids if rid is not None}
        pending = set(results)
        try:
            while pending:
                for o in self.step():
                    if o.request_id in results:
                        results[o.request_id] += o.token_ids
                        if o.finished:
                            pending.discard(o.request_id)
        except BaseException:
            for rid in pending:
                self.abort(rid)
            raise
        outputs = [results[rid] if rid is not None else None for rid in ids]
        if errors:
            raise GenerationError(outputs, errors)
        return outputs

    # -- running the batches ---------------------------------------------------------------------------------
    def _prefill(self, batch: list[Request]) -> torch.Tensor:
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                logits = self.model.prefill(self.cache, [r.id for r in batch], [r.tokens for r in batch])
            self.counters.prefill_seconds += time.perf_counter() - t0
        except BaseException:
            self.batcher.requeue(batch)
            raise
        self.batcher.prefilled(batch)
        return logits

    def _decode(self, batch: list[Request]) -> torch.Tensor:
        lengths = [self.cache.num_tokens(r.id) for r in batch]
        try:
            for r in batch:
                self.cache.append(r.id, 1)
            with torch.inference_mode():
                logits = self.model.decode_step(self.cache, [r.id for r in batch], [r.output[-1] for r in batch])
        except BaseException:  # nothing was produced: give back the room made for this step's tokens
            for r, n in zip(batch, lengths):
                if self.cache.num_tokens(r.id) > n:
                    self.cache.truncate(r.id, n)
            raise
        self.counters.decode_steps += 1
        self.counters.decode_tokens += len(batch)
        return logits

    def _emit(self, batch: list[Request], logits: torch.Tensor, produced: dict) -> None:
        tokens = sample(logits, [r.params for r in batch], [r.generator for r in batch])
        self.batcher.finish_tokens(batch, tokens, produced)

    # -- preemption (preemption.py) --------------------------------------------------------------------------
    def preempt(self, weights: str = "host", kv: str = "swap") -> PreemptionReport:
        """Move this model off the device; returns a PreemptionReport. `weights`: "host" (device copies
        released, a pinned host copy kept), "disk" (no copy kept; resume reads the checkpoint) or "keep".
        `kv`: "swap" (running requests' blocks to the host pool, in one batched copy) or "recompute" (freed;
        prefilled again after resume). Requests stay queued; `step()` raises StateError until `resume()`."""
        self._check_open()
        residency.settle(self)  # a change's promotion copies land (or are undone) before anything moves
        return preemption.preempt(self, weights, kv)

    def resume(self, pipelined: bool = True) -> ResumeReport:
        """Bring a preempted model back; returns a ResumeReport. With `pipelined`, the first step starts when
        the first layers are back and the rest arrive while it computes; otherwise everything is reloaded
        first. With requests in flight, resume runs their first step (timed as time to first token); the
        next `step()` returns its outputs. A failed read or copy leaves the model preempted and resumable."""
        self._check_open()
        return preemption.resume(self, pipelined)

    def set_residency(self, resident_fraction: float | None = None, resident_layers=None,
                      device_bytes: int | None = None, *, wait: bool = False) -> ResidencyReport:
        """Change which decoder layers live on the device, between steps, with requests in flight; give one of
        `resident_fraction`, `resident_layers`, `device_bytes` (weights and ring, as `device_budget_bytes`).
        Demoted layers' device bytes are released before it returns (copied to the host first unless a host
        copy exists); promoted layers are copied in on the copy queue, and each is read as resident once its
        own copy has landed, while decoding goes on (`wait=True`: return once they have). Returns a
        ResidencyReport. ConfigError for bad arguments, StateError while preempted; either, or a failed copy,
        leaves the old plan in force (residency.py)."""
        self._check_open()
        return residency.set_residency(self, resident_fraction, resident_layers, device_bytes, wait)

    def memory(self) -> Footprint:
        """Bytes this model holds now on the device, in host memory, and only on disk."""
        w = self.weights
        device = w.device_bytes + (self.streamer.slot_bytes if self.streamer else 0) + self.cache.device_bytes
        host = w.host_bytes + self.cache.arena.nbytes
        disk = 0
        if self.preempted is not None and self.preempted.weights == "disk":
            disk = sum(w.region_bytes(k) for k in w.device_keys) + w.layer_bytes * len(self.plan.streamed_layers)
        return Footprint(device, host, disk)

    # -- reporting and teardown ------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        """Counters since the engine was built (waits for the device to resolve stall times)."""
        self._check_open()
        streaming = self.streamer.summary()[1] if self.streamer is not None else StepStats()
        streaming.add(self.retired_streaming)
        arena = self.weights.arena
        kv = self.cache.config
        return EngineStats(
            backend=self.backend.name, kernel_path=self.model.ops.path, native_path=native.path(),
            load=self.weights.load_info, plan=str(self.plan),
            resident_layers=self.plan.resident_layers, streamed_layers=self.plan.streamed_layers,
            prefetch_depth=self.offload_config.prefetch_depth,
            host_weight_bytes=arena.nbytes if arena else 0,
            pinned_weight_bytes=arena.nbytes if arena and arena.pinned else 0,
            host_memory=self.backend.host_memory(),
            ring_bytes=self.streamer.slot_bytes if self.streamer else 0,
            kv_block_size=kv.block_size, kv_device_blocks=kv.num_device_blocks, kv_host_blocks=kv.num_host_blocks,
            kv_free_device_blocks=self.cache.device_pool.num_free,
            streaming=streaming, **counter_fields(self.counters))

    def close(self) -> None:
        """Release the KV pools, the streaming ring and the weights' pinned memory."""
        if self._closed:
            return
        self._closed = True
        try:
            residency.drain(self)  # promotion copies read host memory released below
            self.cache.close()
            if self.streamer is not None:
                self.streamer.close()
        finally:
            self.weights.release()
            self.backend.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ConfigError("engine is closed")
