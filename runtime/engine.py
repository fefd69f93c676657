"""`tidal.Engine`: a Llama-family model served from a Hugging Face checkpoint, its weights placed by a residency
plan (streamed layers go through `LayerStreamer`), its KV in a `PagedKVCache`, decoded in batched steps.

The step loop (continuous batching, one `step()` at a time):
1. settle finished swap-ins (those requests rejoin the batch);
2. make room for one more token per running request: while the device pool is short, preempt the most
   recently added running request: swap its blocks out to the host pool (or free them, with
   `preemption="recompute"`, or when the host pool is full, which is logged and counted);
3. decode every running request one token, in one batch;
4. admit: first swap preempted requests back in (asynchronously: they rejoin once the copy is done), oldest
   first; then, only when none is waiting to come back, prefill new (or recomputed) requests in one pass.
A request that finishes frees its blocks and its place in the batch at once.

Invariant of a running request: the cache holds every token of prompt + output except the last output token,
which the next decode step feeds.
"""
from __future__ import annotations

import bisect
import dataclasses
import logging
import operator
import time
from pathlib import Path
from typing import Optional

import torch

from . import native
from .native import LoadInfo
from .arena import align_up
from .backends import make_backend, resolve_device
from .checkpoint import Checkpoint
from .config import OffloadConfig
from .errors import ConfigError, GenerationError, OutOfBlocks, OutOfDeviceMemory, PromptError, StateError, TransferError
from .kv import PagedKVCache
from .model import KERNEL_CHOICES, DecoderModel, ModelConfig
from .sampling import SamplingParams, sample
from .streaming import LayerStreamer, StepStats

log = logging.getLogger("tidal")

PREEMPTION_MODES = ("swap", "recompute")
CPU_KV_BYTES = 512 << 20  # default KV pool on the CPU backend
HOST_KV_CAP = 8 << 30  # default host (swap) pool: as large as the device pool, at most this
CUDA_KV_FRACTION = 0.85  # of the device memory free after the weights, by default
CUDA_HEADROOM = 1 << 30  # left for activations and the allocator when sizing the default KV pool
_SYNTHETIC_KV = 0.01  # what add_synthetic_request writes: any value would do, writing is what counts


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """The engine's own settings (the model's come from its config.json, placement from OffloadConfig)."""

    block_size: int = 16
    kv_cache_bytes: Optional[int] = None
    host_kv_bytes: Optional[int] = None
    max_batch_size: Optional[int] = None
    max_prefill_tokens: int = 4096
    preemption: str = "swap"
    kernels: str = "auto"
    keep_host_copy: bool = False

    def __post_init__(self):
        for name in ("block_size", "max_prefill_tokens"):
            _check_int(name, getattr(self, name), 1)
        for name in ("kv_cache_bytes", "host_kv_bytes", "max_batch_size"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1 if name == "max_batch_size" else 0)
        if self.preemption not in PREEMPTION_MODES:
            raise ConfigError(f"preemption={self.preemption!r} must be one of {PREEMPTION_MODES}")
        if self.kernels not in KERNEL_CHOICES:
            raise ConfigError(f"kernels={self.kernels!r} must be one of {KERNEL_CHOICES}")
        if not isinstance(self.keep_host_copy, bool):
            raise ConfigError(f"keep_host_copy={self.keep_host_copy!r} must be a bool")


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}={value!r} must be an int >= {minimum}")


@dataclasses.dataclass(frozen=True)
class Footprint:
    """Bytes a model holds on each tier: `device` (weights, streaming ring, KV pool), `host` (streamed and
    parked weights, KV host pool) and `disk` (weights that are only in the checkpoint files right now)."""

    device: int
    host: int
    disk: int


@dataclasses.dataclass(frozen=True)
class Placement:
    """`Engine.placement`: the validated settings, the residency plan, the KV cache's shape, and the bytes
    the engine will hold on each tier once loaded and active."""

    engine: EngineConfig
    offload: OffloadConfig
    device: torch.device
    checkpoint: Checkpoint
    model: ModelConfig
    dtype: torch.dtype
    plan: object
    kv: object  # KVCacheConfig
    footprint: Footprint


@dataclasses.dataclass(frozen=True)
class StepOutput:
    """What one `step()` produced for one request: its new tokens (none, or one), and whether it is done.
    `finish_reason`: "stop" (a stop token, included in the output), "length" (max_new_tokens), "max_model_len"
    (the model's positions are used up), "cache_full" (alone on the device, the KV cache cannot grow) or
    "aborted"."""

    request_id: int
    token_ids: tuple[int, ...]
    finished: bool
    finish_reason: Optional[str] = None


@dataclasses.dataclass
class _Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    generator: Optional[torch.Generator]
    output: list[int] = dataclasses.field(default_factory=list)
    state: str = "waiting"  # waiting | running | swapping_in | swapped | finished
    swap: object = None  # the SwapHandle of a swap-in in flight
    swap_timed: bool = True  # its seconds go to EngineStats.swap_seconds (resume's batched swap-in is reported by resume)
    finish_reason: Optional[str] = None
    preemptions: int = 0

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output


@dataclasses.dataclass(frozen=True)
class EngineStats:
    """Counters since the engine was built. `streaming` sums the weight-streaming counters of every forward."""

    backend: str
    kernel_path: str
    native_path: str
    load: LoadInfo  # the checkpoint read at load: bytes, seconds, loader path (native O_DIRECT, buffered, python)
    plan: str
    resident_layers: tuple[int, ...]
    streamed_layers: tuple[int, ...]
    prefetch_depth: int
    host_weight_bytes: int
    pinned_weight_bytes: int
    host_memory: str  # "pinned"; "pageable (...)" where page-locking failed, saying why; or the CPU backend's
    ring_bytes: int
    kv_block_size: int
    kv_device_blocks: int
    kv_host_blocks: int
    kv_free_device_blocks: int
    steps: int
    prefill_passes: int
    prefill_tokens: int
    decode_steps: int
    decode_tokens: int
    swap_outs: int
    swap_ins: int
    recomputes: int
    recompute_fallbacks: int  # swap preemptions that had to recompute: the host pool was full
    swap_bytes: int
    swap_seconds: float  # swap_outs and swap_ins above; preempt()/resume() report their own KV moves
    streaming: StepStats

    @property
    def bytes_streamed(self) -> int:
        return self.streaming.bytes_streamed


class Engine:
    """A model served by tidal. Build with `Engine.from_pretrained`; drive with `generate`, or step by step
    with `add_request`, `step`, `abort` and `has_unfinished`. `close()` releases device and pinned memory."""

    def __init__(self, model: DecoderModel, cache: PagedKVCache, config: EngineConfig, offload: OffloadConfig,
                 plan, backend, weights, streamer: LayerStreamer | None, path: str = "", name: str | None = None):
        self.model, self.cache, self.config, self.offload_config = model, cache, config, offload
        self.path, self.name = str(path), name or Path(str(path)).name or "model"
        self.preempted = None  # a preemption.Preempted while preempted
        self._parked: dict[int, _Request] = {}  # requests whose KV was swapped out by preempt()
        self._carry: list[StepOutput] = []  # outputs of the step resume() ran, returned by the next step()
        self._prefill_seconds = 0.0
        self.plan, self.backend, self.weights, self.streamer = plan, backend, weights, streamer
        self.max_batch_size = config.max_batch_size or 256
        self.max_model_len = model.config.max_position_embeddings
        self.capacity = cache.config.num_device_blocks * config.block_size  # tokens the device pool holds
        self._next_id = 0
        self._requests: dict[int, _Request] = {}
        self.waiting: list[_Request] = []  # by id: recomputed requests come back before newer ones
        self.running: list[_Request] = []  # by id: the last is the most recently added
        self.swapping_in: list[_Request] = []
        self.swapped: list[_Request] = []  # by id
        self._finished_now: list[tuple[int, str]] = []  # (request id, reason) finished in this step
        self._counts = dict(steps=0, prefill_passes=0, prefill_tokens=0, decode_steps=0, decode_tokens=0,
                            swap_outs=0, swap_ins=0, recomputes=0, recompute_fallbacks=0, swap_bytes=0)
        self._swap_seconds = 0.0
        self._closed = False

    # -- construction ----------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, device=None, dtype: torch.dtype | None = None, resident_fraction: float = 1.0,
                        resident_layers=None, prefetch_depth: int = 2, block_size: int = 16,
                        kv_cache_bytes: int | None = None, max_batch_size: int | None = None, *,
                        host_kv_bytes: int | None = None, preemption: str = "swap", kernels: str = "auto",
                        max_prefill_tokens: int = 4096, device_budget_bytes: int | None = None,
                        keep_host_copy: bool = False, link=None) -> "Engine":
        """Load a Hugging Face checkpoint directory (Llama, Qwen2, Mistral; `model.safetensors` or shards).

        Placement as in `tidal.offload`: `resident_fraction`, `resident_layers` or `device_budget_bytes` say
        which decoder layers stay on the device; the rest are read into pinned host memory and streamed
        `prefetch_depth` layers ahead. `dtype` defaults to the checkpoint's. The device KV pool takes
        `kv_cache_bytes` (default: most of the free device memory on CUDA, 512 MiB on the CPU), in blocks of
        `block_size` tokens; preempted requests swap to a host pool of `host_kv_bytes` (default: as large, at
        most 8 GiB). `kernels`: "auto" (Triton on CUDA, torch references on the CPU), "triton" or
        "reference". `keep_host_copy`: hold a pinned host copy of the device-resident weights for the engine's
        lifetime (read once at load, then copied to the device), so that `preempt(weights="host")` copies
        nothing and only releases device memory; it costs that many host bytes while active. `link` (CPU
        backend only): an emulated host<->device link, a `tidal.backends.LinkEmulation` or GB/s. Raises
        CheckpointError naming the file and tensor for a missing or damaged checkpoint, ConfigError for a bad
        argument, before anything is allocated.
        """
        from . import weights as W

        p = cls.placement(path, device=device, dtype=dtype, resident_fraction=resident_fraction,
                          resident_layers=resident_layers, prefetch_depth=prefetch_depth, block_size=block_size,
                          kv_cache_bytes=kv_cache_bytes, max_batch_size=max_batch_size, host_kv_bytes=host_kv_bytes,
                          preemption=preemption, kernels=kernels, max_prefill_tokens=max_prefill_tokens,
                          device_budget_bytes=device_budget_bytes, keep_host_copy=keep_host_copy, link=link)
        cfg, plan, kv = p.engine, p.plan, p.kv
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
        engine = cls(model, cache, cfg, p.offload, plan, backend, weights, streamer, path)
        log.info("tidal: engine %s on %s, %s, kernels %s, KV %d device / %d host blocks of %d tokens",
                 p.model.model_type, backend.device, plan, model.ops.path, kv.num_device_blocks,
                 kv.num_host_blocks, block_size)
        return engine

    @classmethod
    def placement(cls, path, device=None, dtype: torch.dtype | None = None, resident_fraction: float = 1.0,
                  resident_layers=None, prefetch_depth: int = 2, block_size: int = 16,
                  kv_cache_bytes: int | None = None, max_batch_size: int | None = None, *,
                  host_kv_bytes: int | None = None, preemption: str = "swap", kernels: str = "auto",
                  max_prefill_tokens: int = 4096, device_budget_bytes: int | None = None,
                  keep_host_copy: bool = False, link=None) -> "Placement":
        """What `from_pretrained` with these arguments would place where, and the bytes it would hold on each
        tier, from the checkpoint's headers alone (nothing is allocated). Validates every argument."""
        from . import weights as W
        from .kv import KVCacheConfig

        cfg = EngineConfig(block_size=block_size, kv_cache_bytes=kv_cache_bytes, host_kv_bytes=host_kv_bytes,
                           max_batch_size=max_batch_size, max_prefill_tokens=max_prefill_tokens,
                           preemption=preemption, kernels=kernels, keep_host_copy=keep_host_copy)
        offload = OffloadConfig(resident_fraction=resident_fraction, resident_layers=resident_layers,
                                prefetch_depth=prefetch_depth, device=device, device_budget_bytes=device_budget_bytes,
                                link=link)
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise ConfigError(f"dtype={dtype!r} must be a floating-point torch dtype")
        target = resolve_device(offload.device)
        ckpt = Checkpoint(path)
        config = ModelConfig.from_hf(ckpt.config, str(ckpt.path / "config.json"))
        W.check(ckpt, config)
        dtype = dtype or ckpt.info("model.embed_tokens.weight").dtype
        plan = offload.plan([W.layer_bytes(config, dtype)] * config.num_layers, W.top_bytes(config, dtype))
        layout = W.empty(config, plan, dtype)
        streamed = len(plan.streamed_layers)
        weight_device = sum(layout.region_bytes(k) for k in layout.device_keys)
        ring = min(prefetch_depth + 1, streamed) * layout.layer_bytes if streamed else 0
        device_kv = cfg.kv_cache_bytes if cfg.kv_cache_bytes is not None else \
            _default_kv_bytes(target, weight_device + ring)
        host_kv = cfg.host_kv_bytes if cfg.host_kv_bytes is not None else min(device_kv, HOST_KV_CAP)
        kv = KVCacheConfig(config.num_layers, config.num_kv_heads, config.head_dim, block_size, dtype=dtype,
                           device=str(target), device_bytes=device_kv, host_bytes=host_kv)
        if kv.num_device_blocks < 1:
            raise ConfigError(f"kv_cache_bytes={device_kv} holds no KV block of {kv.block_bytes} bytes")
        staging = kv.staging_blocks * kv.block_bytes if target.type != "cpu" else 0
        footprint = Footprint(
            device=weight_device + ring + kv.num_device_blocks * kv.block_bytes + staging,
            host=(align_up(streamed * align_up(layout.layer_bytes)) if streamed else 0) +
            align_up(max(1, kv.num_host_blocks * kv.block_bytes)) +
            (W.host_copy_bytes(layout) if cfg.keep_host_copy else 0),
            disk=0)
        return Placement(cfg, offload, target, ckpt, config, dtype, plan, kv, footprint)

    # -- the step API ----------------------------------------------------------------------------------------
    def add_request(self, prompt, max_new_tokens: int = 16, temperature: float = 0.0, top_p: float = 1.0,
                    seed: int | None = None, stop_token_ids=None) -> int:
        """Queue a prompt (a list of token ids); returns its request id. PromptError if this prompt can never
        run; ConfigError for bad sampling arguments."""
        self._check_open()
        params = SamplingParams(max_new_tokens, temperature, top_p, seed, tuple(stop_token_ids or ()))
        return self._add(prompt, params)

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
        them mean nothing. Dropped by a preemption, it is prefilled again like any request.

        ConfigError: `context_tokens` not an int >= 1, `max_new_tokens` not an int >= 2. PromptError: `token`
        outside the vocabulary, or a context that can never run (more than the KV cache holds, or no position
        left for the next token). StateError: preempted, or `max_batch_size` requests already running.
        OutOfBlocks: the device pool has no room for it now. A failed call changes nothing."""
        self._check_open()
        _check_int("context_tokens", context_tokens, 1)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 2:
            raise ConfigError(f"max_new_tokens={max_new_tokens!r} must be an int >= 2 (a synthetic request "
                              f"has its first token already)")
        params = SamplingParams(max_new_tokens=max_new_tokens)
        (token,) = _token_list([token])
        vocab = self.model.config.vocab_size
        if not 0 <= token < vocab:
            raise PromptError(f"token {token} outside the vocabulary [0, {vocab})")
        if context_tokens > self.capacity:
            raise PromptError(f"context of {context_tokens} tokens: the KV cache holds {self.capacity} "
                              f"({self.cache.config.num_device_blocks} blocks of {self.config.block_size})")
        if context_tokens >= self.max_model_len:
            raise PromptError(f"context of {context_tokens} tokens: the model has {self.max_model_len} "
                              f"positions, none left for the next token")
        if self.preempted is not None:
            raise StateError(f"{self.name}: preempted; resume() it before adding requests")
        if len(self.running) + len(self.swapping_in) >= self.max_batch_size:
            raise StateError(f"{self.max_batch_size} requests running (max_batch_size); no seat for another")
        r = _Request(self._next_id, [token] * context_tokens, params, params.generator(), output=[token],
                     state="running")
        blocks = torch.tensor(self.cache.allocate(r.id, context_tokens), device=self.cache.kv.device)
        self._next_id += 1
        self._requests[r.id] = r
        bisect.insort(self.running, r, key=lambda q: q.id)
        for i in range(self.cache.config.num_layers):
            for part in self.cache.layer(i):
                part.index_fill_(0, blocks, _SYNTHETIC_KV)
        return r.id

    def step(self) -> list[StepOutput]:
        """Run one scheduling step; returns one StepOutput per request that produced a token or finished."""
        self._check_open()
        if self.preempted is not None:
            raise StateError(f"{self.name}: preempted; resume() it before stepping")
        if self._carry:
            carried, self._carry = self._carry, []
            return carried
        produced: dict[int, list[int]] = {}
        self.cache.poll()
        self._settle_swap_ins(block=not self.running)  # with nothing to decode, there is nothing to overlap
        self._make_room()
        if self.running:
            self._decode(produced)
        self._admit(produced)
        self._counts["steps"] += 1
        done, self._finished_now = dict(self._finished_now), []
        outputs = [StepOutput(rid, tuple(toks), rid in done, done.pop(rid, None)) for rid, toks in produced.items()]
        return outputs + [StepOutput(rid, (), True, reason) for rid, reason in done.items()]

    def abort(self, request_id: int) -> bool:
        """Stop a request and free its blocks; False if it is unknown or already finished."""
        self._check_open()
        r = self._requests.pop(request_id, None)
        if r is None:
            return False
        if r.state == "swapping_in":
            self._wait_swap_in(r)  # a sequence with a copy in flight cannot be freed
        for queue in (self.waiting, self.running, self.swapped):
            if r in queue:
                queue.remove(r)
        self._parked.pop(r.id, None)
        if r.state in ("running", "swapped"):
            self.cache.free(r.id)
        self._carry = [o for o in self._carry if o.request_id != request_id]
        r.state, r.finish_reason = "finished", "aborted"
        return True

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapping_in or self.swapped or self._parked or self._carry)

    @property
    def has_pending_outputs(self) -> bool:
        """Outputs already computed (by the step `resume()` ran) that the next `step()` returns at once,
        computing nothing; a measurement collects them first so that its next step is timed."""
        return bool(self._carry)

    def generate(self, prompts, max_new_tokens: int = 16, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, stop_token_ids=None) -> list[list[int]]:
        """Generate for every prompt (a list of token-id lists), batched; returns the generated ids per prompt.
        With `seed`, prompt i samples from seed + i. A prompt that can never run does not stop the others:
        they finish, then GenerationError carries every output and that prompt's error."""
        self._check_open()
        if not isinstance(prompts, (list, tuple)):
            raise ConfigError(f"prompts must be a list of token-id lists, got {type(prompts).__name__}")
        params = SamplingParams(max_new_tokens, temperature, top_p, seed, tuple(stop_token_ids or ()))
        ids: list[int | None] = []
        errors: dict[int, Exception] = {}
        for i, prompt in enumerate(prompts):
            p = params if seed is None else dataclasses.replace(params, seed=seed + i)
            try:
                ids.append(self._add(prompt, p))
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

    # -- scheduling ------------------------------------------------------------------------------------------
    def _add(self, prompt, params: SamplingParams) -> int:
        tokens = _token_list(prompt)
        vocab = self.model.config.vocab_size
        if not tokens:
            raise PromptError("prompt is empty")
        bad = [t for t in tokens if not 0 <= t < vocab]
        if bad:
            raise PromptError(f"prompt token {bad[0]} outside the vocabulary [0, {vocab})")
        if len(tokens) > self.capacity:
            raise PromptError(f"prompt of {len(tokens)} tokens: the KV cache holds {self.capacity} "
                              f"({self.cache.config.num_device_blocks} blocks of {self.config.block_size})")
        if len(tokens) > self.max_model_len:
            raise PromptError(f"prompt of {len(tokens)} tokens: the model has {self.max_model_len} positions")
        r = _Request(self._next_id, tokens, params, params.generator())
        self._next_id += 1
        self._requests[r.id] = r
        self.waiting.append(r)
        return r.id

    def _blocks(self, num_tokens: int) -> int:
        return -(-num_tokens // self.config.block_size)

    def _growth(self) -> int:
        """Device blocks the running requests need for one more token each."""
        return sum(1 for r in self.running if self.cache.num_tokens(r.id) % self.config.block_size == 0)

    def _make_room(self) -> None:
        while self.running or self.swapping_in:
            if self._growth() <= self.cache.device_pool.num_free:
                return
            if self.swapping_in:  # they hold device blocks too; once back they can be preempted like the rest
                self._settle_swap_ins(block=True)
                continue
            victim = self.running[-1]
            if len(self.running) == 1:
                log.warning("tidal: request %d alone fills the KV cache (%d tokens); finishing it", victim.id,
                            self.cache.num_tokens(victim.id))
                self._finish(victim, "cache_full")
                continue
            self._preempt(victim)

    def _preempt(self, r: _Request) -> None:
        self.running.remove(r)
        r.preemptions += 1
        if self.config.preemption == "swap":
            try:
                handle = self.cache.swap_out([r.id])
                handle.wait()  # the device blocks are free only once the copy has read them
            except (OutOfBlocks, TransferError) as exc:
                log.warning("tidal: request %d: swap-out failed (%s); recomputing it instead", r.id, exc)
                self._counts["recompute_fallbacks"] += 1
            else:
                self._swap_seconds += handle.seconds()
                self._counts["swap_outs"] += 1
                self._counts["swap_bytes"] += handle.bytes
                r.state = "swapped"
                bisect.insort(self.swapped, r, key=lambda q: q.id)
                return
        self.cache.free(r.id)
        self._counts["recomputes"] += 1
        r.state = "waiting"
        bisect.insort(self.waiting, r, key=lambda q: q.id)

    def _settle_swap_ins(self, block: bool, raise_errors: bool = True) -> None:
        for r in list(self.swapping_in):
            if block or r.swap.done():
                try:
                    self._wait_swap_in(r)
                except TransferError:
                    if raise_errors:
                        raise

    def _wait_swap_in(self, r: _Request) -> None:
        """Wait for r's swap-in; r runs from the next decode on. On a failed copy the cache has put r back
        in the host pool: it stays swapped, and the error propagates."""
        handle, r.swap = r.swap, None
        self.swapping_in.remove(r)
        try:
            handle.wait()
        except TransferError:
            r.state = "swapped"
            bisect.insort(self.swapped, r, key=lambda q: q.id)
            raise
        if r.swap_timed:
            self._swap_seconds += handle.seconds()
        r.state = "running"
        bisect.insort(self.running, r, key=lambda q: q.id)

    def _admit(self, produced: dict) -> None:
        free = self.cache.device_pool.num_free - self._growth()
        seats = self.max_batch_size - len(self.running) - len(self.swapping_in)
        while self.swapped and seats > 0:
            r = self.swapped[0]
            need = min(self._blocks(self.cache.num_tokens(r.id) + 1), self.cache.config.num_device_blocks)
            if need > free:
                break
            handle = self.cache.swap_in([r.id])
            self.swapped.pop(0)
            r.state, r.swap, r.swap_timed = "swapping_in", handle, True
            self.swapping_in.append(r)
            self._counts["swap_ins"] += 1
            self._counts["swap_bytes"] += handle.bytes
            free -= need
            seats -= 1
        if self.swapped or self.swapping_in:
            return  # first come, first served: new prompts wait until preempted requests are back
        batch, tokens = [], 0
        while self.waiting and seats > 0:
            r = self.waiting[0]
            n = len(r.tokens)
            if n > self.capacity:  # a recomputed request that grew to the whole cache
                self.waiting.pop(0)
                self._finish(r, "cache_full")
                continue
            need = min(self._blocks(n + 1), self.cache.config.num_device_blocks)
            if need > free:
                break
            if batch and tokens + n > self.config.max_prefill_tokens:
                break
            self.waiting.pop(0)
            self.cache.allocate(r.id, n)
            batch.append(r)
            tokens += n
            free -= need
            seats -= 1
        if batch:
            self._prefill(batch, produced)

    def _prefill(self, batch: list[_Request], produced: dict) -> None:
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                logits = self.model.prefill(self.cache, [r.id for r in batch], [r.tokens for r in batch])
            self._prefill_seconds += time.perf_counter() - t0
        except BaseException:
            for r in batch:
                self.cache.free(r.id)
                bisect.insort(self.waiting, r, key=lambda q: q.id)
            raise
        self._counts["prefill_passes"] += 1
        self._counts["prefill_tokens"] += sum(len(r.tokens) for r in batch)
        for r in batch:
            r.state = "running"
            bisect.insort(self.running, r, key=lambda q: q.id)
        self._emit(batch, logits, produced)

    def _decode(self, produced: dict) -> None:
        batch = list(self.running)
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
        self._counts["decode_steps"] += 1
        self._counts["decode_tokens"] += len(batch)
        self._emit(batch, logits, produced)

    def _emit(self, batch: list[_Request], logits: torch.Tensor, produced: dict) -> None:
        tokens = sample(logits, [r.params for r in batch], [r.generator for r in batch])
        for r, t in zip(batch, tokens):
            r.output.append(t)
            produced.setdefault(r.id, []).append(t)
            p = r.params
            if t in p.stop_token_ids:
                self._finish(r, "stop")
            elif len(r.output) >= p.max_new_tokens:
                self._finish(r, "length")
            elif len(r.tokens) > self.max_model_len:  # the next token would be fed at an unknown position
                self._finish(r, "max_model_len")

    def _finish(self, r: _Request, reason: str) -> None:
        if r in self.running:
            self.running.remove(r)
            self.cache.free(r.id)
        r.state, r.finish_reason = "finished", reason
        del self._requests[r.id]
        self._finished_now.append((r.id, reason))

    # -- preemption (preemption.py) --------------------------------------------------------------------------
    def preempt(self, weights: str = "host", kv: str = "swap"):
        """Move this model off the device; returns a PreemptionReport. `weights`: "host" (device copies
        released, a pinned host copy kept), "disk" (no copy kept; resume reads the checkpoint) or "keep".
        `kv`: "swap" (running requests' blocks to the host pool, in one batched copy) or "drop" (freed;
        recomputed by prefill after resume). Requests stay queued; `step()` raises StateError until `resume()`."""
        from .preemption import preempt

        self._check_open()
        return preempt(self, weights, kv)

    def resume(self, pipelined: bool = True):
        """Bring a preempted model back; returns a ResumeReport. With `pipelined`, the first step starts when
        the first layers are back and the rest arrive while it computes; otherwise everything is reloaded
        first. With requests in flight, resume runs their first step (timed as time to first token); the
        next `step()` returns its outputs. A failed read or copy leaves the model preempted and resumable."""
        from .preemption import resume

        self._check_open()
        return resume(self, pipelined)

    def _park(self, swapped: list, dropped: list) -> None:
        """preempt(): `swapped` requests' KV went to the host pool, `dropped` requests' KV is to be freed."""
        for r in swapped:
            self.running.remove(r)
            r.state = "swapped"
            self._parked[r.id] = r
        for r in dropped:
            self.running.remove(r)
            self.cache.free(r.id)
            self._counts["recomputes"] += 1
            r.state = "waiting"
            bisect.insort(self.waiting, r, key=lambda q: q.id)

    def _unpark(self, ids: list, handle) -> None:
        """resume(): the parked requests `ids` come back with the one batched swap-in `handle`."""
        for rid in ids:
            r = self._parked.pop(rid)
            r.state, r.swap, r.swap_timed = "swapping_in", handle, False
            self.swapping_in.append(r)

    def memory(self) -> "Footprint":
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
            kv_free_device_blocks=self.cache.device_pool.num_free, swap_seconds=self._swap_seconds,
            streaming=streaming, **self._counts)

    def close(self) -> None:
        """Release the KV pools, the streaming ring and the weights' pinned memory."""
        if self._closed:
            return
        self._closed = True
        try:
            self.cache.close()
            if self.streamer is not None:
                self.streamer.close()
        finally:
            self.weights.release()
            self.backend.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ConfigError("engine is closed")


def _token_list(prompt) -> list[int]:
    if isinstance(prompt, torch.Tensor):
        if prompt.dim() != 1 or prompt.dtype.is_floating_point:
            raise PromptError(f"prompt tensor must be 1-D integer ids, got {tuple(prompt.shape)} {prompt.dtype}")
        return prompt.tolist()
    if isinstance(prompt, (str, bytes)) or not hasattr(prompt, "__iter__"):
        raise PromptError(f"prompt must be a list of token ids, got {type(prompt).__name__}")
    tokens = list(prompt)
    for t in tokens:
        if isinstance(t, bool) or not hasattr(t, "__index__"):
            raise PromptError(f"prompt must hold integer token ids, got {t!r}")
    return [operator.index(t) for t in tokens]


def _default_kv_bytes(device: torch.device, weight_bytes: int) -> int:
    """Most of the device memory left once `weight_bytes` of weights are placed; 512 MiB on the CPU."""
    if device.type != "cuda":
        return CPU_KV_BYTES
    free, _ = torch.cuda.mem_get_info(device)
    return max(0, int((free - weight_bytes) * CUDA_KV_FRACTION) - CUDA_HEADROOM)
