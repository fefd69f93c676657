"""Live residency: `Engine.set_residency` moves decoder layers between the device and streaming between
steps, with requests in flight. `Runtime.set_residency` checks the budgets first (`new_plan`, `footprint`).

Demotion (resident -> streamed). A layer streams from a host copy: the engine's own when it has one (the
parked copy `keep_host_copy` holds, or the host region of a layer that streamed before: `weights.spare`;
weights never change, so a copy once made stays valid), otherwise its device region is copied into a new
host arena, in one batched copy on the copy queue that waits on an event recorded after the compute issued
so far (the last reads of those regions), and the host waits for it. The device regions are dropped when the
call returns: no in-flight work reads them any more (on CUDA the allocator orders their reuse after the
compute stream's work; the copy queue's last use is the demotion copy, which the host saw complete).

Promotion (streamed -> resident). Each layer gets a fresh device region (`backend.empty`), and after all of
them one event is recorded; each layer's copy from its host region waits on that event, and has its own
Transfer. The call returns at once (decoding goes on while they land): the layer is resident from now on, and
the forward waits on its own copy's event the first time it reads it (`DecoderModel.arriving`, as a
pipelined resume does) and declares the read (`compute_reads`). The host region stays (`weights.spare`), so
the copy never reads freed memory and a later demotion copies nothing.

The ring is rebuilt over the new plan (a new `LayerStreamer`; the old one hands back its slots once its own
prefetch copies are done, and its counters carry over in `Engine.retired_streaming`). While the call runs,
both rings and the promoted regions are allocated at once: the transient device peak is the larger plan's
bytes plus one ring.

Failures. Bad arguments raise ConfigError before anything moves. A copy that fails or cannot be enqueued
during the call leaves the old plan in force. A promotion copy that fails later (on the copy queue) raises
TransferError from the step that first reads the layer, or from the next `set_residency`/`preempt`; those
layers go back to streaming from their host copies (`undo`), the rest of that change stands, and the engine
goes on (the failed step's tokens are recomputed by the next step).
"""
from __future__ import annotations

import dataclasses
import time

import torch

from ..arena import align_up
from ..config import OffloadConfig
from ..errors import ConfigError, OutOfDeviceMemory, StateError, TransferError
from ..plan import ResidencyPlan
from ..streaming import LayerStreamer, StreamedLayer
from ..weights import TOP_REGIONS, copy_to_host, fresh_regions
from .placement import Footprint
from .reports import ResidencyReport


@dataclasses.dataclass
class Promotion:
    """The promotion copies of the last change, until the host has seen them land."""

    transfers: dict  # layer -> Transfer
    parked: tuple[int, ...]  # layers whose host copy this change added to `weights.parked`


def new_plan(engine, resident_fraction=None, resident_layers=None, device_bytes=None) -> ResidencyPlan:
    """The plan one of the three arguments asks for (validated as `OffloadConfig` and `ResidencyPlan` do;
    `device_bytes` bounds the weights and the ring, as `device_budget_bytes` does at load)."""
    given = [n for n, v in (("resident_fraction", resident_fraction), ("resident_layers", resident_layers),
                            ("device_bytes", device_bytes)) if v is not None]
    if len(given) != 1:
        raise ConfigError(f"give exactly one of resident_fraction, resident_layers, device_bytes; got "
                          f"{', '.join(given) or 'none'}")
    w = engine.weights
    offload = OffloadConfig(resident_fraction=1.0 if resident_fraction is None else resident_fraction,
                            resident_layers=resident_layers, device_budget_bytes=device_bytes,
                            prefetch_depth=engine.offload_config.prefetch_depth)
    fixed = sum(w.region_bytes(k) for k in TOP_REGIONS)
    return offload.plan([w.layer_bytes] * engine.model.config.num_layers, fixed)


def _ring_bytes(engine, plan: ResidencyPlan) -> int:
    streamed = len(plan.streamed_layers)
    return min(engine.offload_config.prefetch_depth + 1, streamed) * engine.weights.layer_bytes if streamed else 0


def _host_copy(w, layer: int):
    """The host region holding `layer`'s bytes already, or None."""
    if w.parked is not None and layer in w.parked:
        return w.parked[layer]
    return w.spare.get(layer)


def footprint(engine, plan: ResidencyPlan) -> Footprint:
    """The bytes the engine will hold on each tier once a change to `plan` has landed (allocates nothing)."""
    w, old, now = engine.weights, engine.plan, engine.memory()
    device = (now.device + w.layer_bytes * (len(plan.resident_layers) - len(old.resident_layers))
              + _ring_bytes(engine, plan) - (engine.streamer.slot_bytes if engine.streamer else 0))
    copies = sum(1 for i in old.resident_layers if not plan.resident[i] and _host_copy(w, i) is None)
    return Footprint(device, now.host + (align_up(copies * align_up(w.layer_bytes)) if copies else 0), now.disk)


def set_residency(engine, resident_fraction, resident_layers, device_bytes, wait: bool) -> ResidencyReport:
    if engine.preempted is not None:
        raise StateError(f"{engine.name}: preempted; resume() it before changing its residency")
    plan = new_plan(engine, resident_fraction, resident_layers, device_bytes)
    settle(engine)  # the last change's promotions: landed, or undone (TransferError)
    t0 = time.perf_counter()
    old, w, backend = engine.plan, engine.weights, engine.backend
    before = engine.memory().device
    ring_before = engine.streamer.slot_bytes if engine.streamer else 0
    promoted = tuple(i for i in plan.resident_layers if not old.resident[i])
    demoted = tuple(i for i in old.resident_layers if not plan.resident[i])
    if not promoted and not demoted:
        return ResidencyReport(engine.name, old, plan, (), (), 0, 0, 0.0, 0.0, ring_before, ring_before, before,
                               before, time.perf_counter() - t0)
    hosts = {i: _host_copy(w, i) for i in demoted}
    to_copy = [i for i in demoted if hosts[i] is None]
    arena, streamer, to_host_seconds, transfers = None, None, 0.0, {}
    try:
        if to_copy:  # device -> new host memory, after the compute that reads these regions; the host waits
            arena, copies, down = copy_to_host(backend, w, to_copy, "host copies of demoted layers",
                                               f"demote layers {to_copy} to the host")
            hosts.update(copies)
            down.wait()
            to_host_seconds = down.seconds()
        layers = {i: s for i, s in w.streamed.items() if not plan.resident[i]}
        layers.update({i: StreamedLayer(i, hosts[i], w.layer_slots) for i in demoted})
        try:
            regions, allocated = fresh_regions(backend, w, promoted)
            if layers:
                streamer = LayerStreamer(backend, plan, layers, engine.offload_config.prefetch_depth)
        except torch.OutOfMemoryError as exc:
            raise OutOfDeviceMemory(f"{engine.name}: {backend.device} ran out of memory changing {old} to "
                                    f"{plan}: {exc}") from exc
        for i in promoted:
            transfers[i] = backend.copy([regions[i]], [w.streamed[i].host], after=[allocated],
                                        op=f"promote layer {i} to the device")
    except BaseException:
        _quiesce(backend)  # nothing copies into or out of what is dropped here any more
        if streamer is not None:
            streamer.retire()
        if arena is not None:
            arena.release()
        raise
    # Commit: nothing below fails. The demoted regions are dropped, the promoted ones bound.
    for i in demoted:
        del w.device[i]
        w.layers[i] = None
        w.spare.pop(i, None)
    if arena is not None:
        w.copy_arenas.append(arena)
    for i in promoted:
        w.spare[i] = w.streamed[i].host
        w.bind(i, regions[i])
    parked = ()
    if w.parked is not None:  # keep_host_copy: the copy a preemption reuses covers every resident layer
        parked = tuple(i for i in promoted if i not in w.parked)
        w.parked.update({i: w.spare[i] for i in parked})
    w.streamed = layers
    _restream(engine, plan, streamer)
    engine.model.arriving.update(transfers)
    engine.promotion = Promotion(transfers, parked) if transfers else None
    c = engine.counters
    c.residency_changes += 1
    c.residency_to_device_bytes += w.layer_bytes * len(promoted)
    c.residency_to_host_bytes += w.layer_bytes * len(to_copy)
    to_device_seconds = None
    if wait or not transfers:
        settle(engine)
        to_device_seconds = sum(t.seconds() for t in transfers.values())
    return ResidencyReport(
        model=engine.name, old_plan=old, new_plan=plan, promoted=promoted, demoted=demoted,
        to_device_bytes=w.layer_bytes * len(promoted), to_host_bytes=w.layer_bytes * len(to_copy),
        to_device_seconds=to_device_seconds, to_host_seconds=to_host_seconds, ring_bytes_before=ring_before,
        ring_bytes_after=streamer.slot_bytes if streamer else 0, device_bytes_before=before,
        device_bytes_after=engine.memory().device, total_seconds=time.perf_counter() - t0)


def settle(engine) -> None:
    """Wait (on the host) for the last change's promotion copies. If one failed, undo its promotions and
    raise its TransferError; the engine stays usable."""
    p = engine.promotion
    if p is None:
        return
    failed = None
    for t in p.transfers.values():
        try:
            t.wait()
        except TransferError as exc:
            failed = failed or exc
    if failed is not None:
        undo(engine)
        raise failed
    for i in p.transfers:  # the host saw them land: compute needs no wait on them
        engine.model.arriving.pop(i, None)
    engine.promotion = None


def recover(engine) -> None:
    """A step raised TransferError: settle the last change's promotions, undoing them if one of their copies
    is what failed (the step's own error is the one raised)."""
    try:
        settle(engine)
    except TransferError:
        pass


def undo(engine) -> None:
    """A promotion copy of the last change failed: its layers stream again from their host copies (still
    there), over a new ring; the rest of that change stands."""
    p, w, backend = engine.promotion, engine.weights, engine.backend
    engine.promotion = None
    _quiesce(backend)
    for i in p.transfers:
        engine.model.arriving.pop(i, None)
        del w.device[i]
        w.layers[i] = None
        w.streamed[i] = StreamedLayer(i, w.spare.pop(i), w.layer_slots)
    for i in p.parked:
        w.parked.pop(i, None)
    plan = ResidencyPlan(tuple(r and i not in p.transfers for i, r in enumerate(engine.plan.resident)))
    streamer = LayerStreamer(backend, plan, w.streamed, engine.offload_config.prefetch_depth)
    _restream(engine, plan, streamer)


def drain(engine) -> None:
    """Wait for the last change's promotion copies, failed or not (before host memory is released)."""
    p, engine.promotion = engine.promotion, None
    for t in p.transfers.values() if p is not None else ():
        try:
            t.wait()
        except TransferError:
            pass


def _restream(engine, plan: ResidencyPlan, streamer: LayerStreamer | None) -> None:
    """Make `plan` the engine's, streamed through `streamer`; the old ring goes back, its counters kept."""
    if engine.streamer is not None:
        engine.retired_streaming.add(engine.streamer.retire())
    w = engine.weights
    w.resident = plan.resident_layers
    engine.plan = plan
    engine.offload_config = dataclasses.replace(engine.offload_config, resident_fraction=1.0,
                                                resident_layers=plan.resident_layers, device_budget_bytes=None)
    engine.streamer = engine.model.streamer = streamer
    engine.model.streamed = frozenset(w.streamed)


def _quiesce(backend) -> None:
    try:
        backend.synchronize()
    except TransferError:
        pass  # the failure being handled
