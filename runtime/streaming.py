"""Layer weight streaming: a ring of device slots fed by the copy queue, `prefetch_depth` layers ahead.

Each streamed layer is one contiguous host region (arena.py). `acquire(i)` makes compute wait on layer i's own
copy event and returns device views of its tensors; it also tops up the lookahead, so the copies of the next
`prefetch_depth` streamed layers (wrapping into the next forward pass) are in flight while layer i computes.
`release(i)` records a compute event for i's slot; a copy into that slot waits on that event, so a slot is
overwritten only after the compute that read it has finished. A new slot starts with an event recorded
after its allocation, so its first fill waits for whatever compute used that memory before (the caching
allocator recycles it). Nothing here blocks the host on CUDA.

A streamed layer is dropped from its slot after its compute: every forward pass copies every streamed layer
once. Keeping it cached while slots are spare would make residency depend on ring size, not on the plan.
"""
from __future__ import annotations

import collections
import dataclasses
import time

import torch

from .arena import TensorSlot
from .backends import Backend, Event, Stall, Transfer
from .errors import TidalError, TransferError
from .plan import ResidencyPlan


@dataclasses.dataclass(frozen=True)
class StreamedLayer:
    """A streamed layer's host region and where each of its tensors sits in it."""

    index: int
    host: torch.Tensor  # [nbytes] uint8, in the host arena
    tensors: tuple[TensorSlot, ...]

    @property
    def nbytes(self) -> int:
        return self.host.numel()


@dataclasses.dataclass
class StepStats:
    """Counters for one forward pass (or a sum over several)."""

    bytes_streamed: int = 0
    copies: int = 0
    stall_seconds: float = 0.0
    bookkeeping_seconds: float = 0.0
    layers_streamed: int = 0

    def add(self, other: "StepStats") -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclasses.dataclass
class _Slot:
    buffer: torch.Tensor  # device, uint8
    layer: int | None = None  # the layer copied (or being copied) in, until its compute releases it
    copy: Transfer | None = None
    released: Event | None = None  # compute that last read this slot
    in_use: bool = False


class _Step:
    """Open counters of the step in progress; stalls are resolved later (on CUDA that needs the device)."""

    def __init__(self):
        self.stats = StepStats()
        self.stalls: list[Stall] = []


class LayerStreamer:
    def __init__(self, backend: Backend, plan: ResidencyPlan, layers: dict[int, StreamedLayer],
                 prefetch_depth: int, record_timeline: bool = False, history: int = 64):
        if set(layers) != set(plan.streamed_layers):
            raise TidalError(f"streamed layers {sorted(layers)} differ from the plan's {plan.streamed_layers}")
        self.backend, self.plan, self.layers = backend, plan, layers
        self.prefetch_depth = prefetch_depth
        slot_bytes = max((l.nbytes for l in layers.values()), default=0)
        num_slots = min(prefetch_depth + 1, len(layers))
        self.slots = [_Slot(backend.empty(slot_bytes, label=f"ring slot {k}")) for k in range(num_slots)]
        for slot in self.slots:
            slot.released = backend.record()
        self._views: dict[tuple[int, int], list[torch.Tensor]] = {}  # (slot, layer) -> tensor views
        self._dst: dict[tuple[int, int], torch.Tensor] = {}  # (slot, layer) -> the bytes a copy fills
        self._step: _Step | None = None
        self.history: collections.deque[_Step] = collections.deque(maxlen=history)
        self._unfolded: collections.deque[_Step] = collections.deque()  # ended, not yet in self.total
        self.total = StepStats()
        self.steps = 0
        self.timeline: list[tuple[str, int, object]] | None = [] if record_timeline else None

    @property
    def slot_bytes(self) -> int:
        return sum(s.buffer.numel() for s in self.slots)

    # -- step boundaries -------------------------------------------------------------------------------------
    def begin_step(self) -> None:
        if self._step is not None:  # the previous forward raised before end_step
            self.end_step()
        self._step = _Step()

    def end_step(self) -> None:
        step, self._step = self._step, None
        if step is None:
            return
        self.history.append(step)
        self._unfolded.append(step)
        self.steps += 1
        # Fold finished steps now, without waiting, so stall probes do not pile up between stats() calls.
        while self._unfolded and all(s.ready() for s in self._unfolded[0].stalls):
            self.total.add(self.resolve(self._unfolded.popleft()))

    # -- the hot path ----------------------------------------------------------------------------------------
    def acquire(self, layer: int) -> list[torch.Tensor]:
        """Device views of `layer`'s tensors, valid for compute issued until `release(layer)`."""
        t0 = time.perf_counter()
        step = self._step if self._step is not None else self._implicit_step()
        slot_index = self._slot_of(layer)
        if slot_index is None:
            slot_index = self._load(layer, step, avoid=())
            if slot_index is None:
                raise TidalError(f"no ring slot free for layer {layer}: release() was not called")
        slot = self.slots[slot_index]
        slot.in_use = True
        for ahead in self.plan.next_streamed(layer, self.prefetch_depth):
            if self._slot_of(ahead) is None and self._load(ahead, step, avoid=(slot_index,)) is None:
                break
        t1 = time.perf_counter()
        stall = self._wait_copy(slot)
        t2 = time.perf_counter()
        if self.backend.checker is not None:
            self.backend.compute_reads(self._dst[(slot_index, layer)], f"layer {layer}'s compute")
        step.stalls.append(stall)
        step.stats.layers_streamed += 1
        views = self._views.get((slot_index, layer))
        if views is None:
            views = [t.view(slot.buffer) for t in self.layers[layer].tensors]
            self._views[(slot_index, layer)] = views
        # host time spent blocked in wait_for is stall, not bookkeeping
        step.stats.bookkeeping_seconds += (t1 - t0) + (time.perf_counter() - t2)
        return views

    def release(self, layer: int) -> None:
        t0 = time.perf_counter()
        slot_index = self._slot_of(layer)
        if slot_index is None or not self.slots[slot_index].in_use:
            raise TidalError(f"release({layer}) without a matching acquire")
        slot = self.slots[slot_index]
        slot.released = self.backend.record()
        slot.layer, slot.in_use = None, False
        if self._step is not None:
            self._step.stats.bookkeeping_seconds += time.perf_counter() - t0

    def _wait_copy(self, slot: _Slot) -> Stall:
        return self.backend.wait_for(slot.copy)

    @staticmethod
    def _copy_after(slot: _Slot) -> tuple[Event, ...]:
        return (slot.released,) if slot.released is not None else ()

    def _slot_of(self, layer: int) -> int | None:
        for i, s in enumerate(self.slots):
            if s.layer == layer:
                return i
        return None

    def _load(self, layer: int, step: _Step, avoid: tuple[int, ...]) -> int | None:
        victim = self._victim(layer, avoid)
        if victim is None:
            return None
        slot, src = self.slots[victim], self.layers[layer]
        dst = self._dst.get((victim, layer))
        if dst is None:
            dst = self._dst[(victim, layer)] = slot.buffer[:src.nbytes]
        slot.copy = self.backend.copy([dst], [src.host], after=self._copy_after(slot),
                                      op=f"stream layer {layer} into ring slot {victim}")
        slot.layer = layer
        step.stats.copies += 1
        step.stats.bytes_streamed += src.nbytes
        if self.timeline is not None:
            self.timeline.append(("copy", layer, slot.copy))
        return victim

    def _victim(self, layer: int, avoid: tuple[int, ...]) -> int | None:
        """A free slot; failing that, one holding a prefetched layer needed furthest in the future."""
        candidates = [i for i, s in enumerate(self.slots) if i not in avoid and not s.in_use]
        free = [i for i in candidates if self.slots[i].layer is None]
        if free:
            return free[0]
        if avoid:  # a lookahead copy never displaces another lookahead copy
            return None
        order = self.plan.next_streamed(layer, len(self.plan.streamed_layers))
        held = [i for i in candidates if self.slots[i].layer in order]
        return max(held, key=lambda i: order.index(self.slots[i].layer), default=None)

    def _implicit_step(self) -> _Step:
        self.begin_step()
        return self._step

    # -- stats -----------------------------------------------------------------------------------------------
    def resolve(self, step: _Step) -> StepStats:
        """Fold the step's stall probes into its stats (waits for the device on CUDA)."""
        if step.stalls:
            step.stats.stall_seconds += sum(s.seconds() for s in step.stalls)
            step.stalls = []
        return step.stats

    def summary(self) -> tuple[StepStats, StepStats]:
        """(last completed step, all steps so far); waits for the device on CUDA."""
        while self._unfolded:
            self.total.add(self.resolve(self._unfolded.popleft()))
        last = self.resolve(self.history[-1]) if self.history else StepStats()
        return dataclasses.replace(last), dataclasses.replace(self.total)

    def add_timing(self, stall_seconds: float = 0.0, bookkeeping_seconds: float = 0.0) -> None:
        """Charge time measured by the caller (e.g. binding parameters) to the step in progress."""
        if self._step is not None:
            self._step.stats.bookkeeping_seconds += bookkeeping_seconds
            self._step.stats.stall_seconds += stall_seconds

    def retire(self) -> StepStats:
        """Give the ring back without a blanket synchronize (a live residency change replaces the streamer
        while promotion copies are in flight): wait for the ring's own copies (a failed prefetch is dropped
        with its slot), drop the slots, and return the counters of every step so far."""
        for slot in self.slots:
            if slot.copy is not None:
                try:
                    slot.copy.wait()
                except TransferError:
                    pass
        total = self.summary()[1]
        self.slots = []
        self._views.clear()
        self._dst.clear()
        return total

    def close(self) -> None:
        self.backend.synchronize()
        self.summary()
        self.slots = []
        self._views.clear()
        self._dst.clear()
