"""The engine's counters: `Counters`, mutable, bumped where the work happens; `EngineStats`, the frozen
snapshot `Engine.stats()` returns."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the counters import without torch
    from ..native import LoadInfo
    from ..streaming import StepStats


@dataclasses.dataclass
class Counters:
    """Since the engine was built. The `suspend_*` counters are the batcher's own suspensions (a request's KV
    moved out to make room in this engine); a model preemption's KV moves are in its PreemptionReport and
    ResumeReport instead."""

    steps: int = 0
    prefill_passes: int = 0
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0  # host time of the prefill passes (resume reads it to time a recompute)
    decode_steps: int = 0
    decode_tokens: int = 0
    suspend_swap_outs: int = 0
    suspend_swap_ins: int = 0
    suspend_swap_bytes: int = 0
    suspend_swap_seconds: float = 0.0
    recomputes: int = 0  # requests whose KV was freed, to be prefilled again (suspended, or a preemption's)
    recompute_fallbacks: int = 0  # suspend="swap" suspensions that had to recompute: the host pool was full
    residency_changes: int = 0  # Engine.set_residency calls that moved layers
    residency_to_device_bytes: int = 0  # promoted layers copied in
    residency_to_host_bytes: int = 0  # demoted layers copied out (those with no host copy yet)


# Counters that EngineStats reports (all of them but the prefill seconds, which resume reports as recompute time)
_REPORTED = tuple(f.name for f in dataclasses.fields(Counters) if f.name != "prefill_seconds")


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
    suspend_swap_outs: int
    suspend_swap_ins: int
    suspend_swap_bytes: int
    suspend_swap_seconds: float  # the suspensions' swap-outs and swap-ins; preempt()/resume() report their own
    recomputes: int
    recompute_fallbacks: int  # suspend="swap" suspensions that had to recompute: the host pool was full
    residency_changes: int
    residency_to_device_bytes: int
    residency_to_host_bytes: int
    streaming: StepStats

    @property
    def bytes_streamed(self) -> int:
        return self.streaming.bytes_streamed


def counter_fields(counters: Counters) -> dict:
    """The counters EngineStats carries, by name."""
    return {name: getattr(counters, name) for name in _REPORTED}
