"""Preempting an engine (moving its weights and KV off the device) and resuming it, with reports that
separate weight traffic from KV traffic (`reports.py`). `Engine.preempt` and `Engine.resume` call `preempt` and
`resume`; they work through the engine's public calls (`engine.batcher.park`/`unpark`, `engine.counters`,
`engine.step_ahead`).

Preempt, in order: settle swap-ins; move the KV of running requests to the host pool in one batched swap
("swap") or free it ("recompute": those requests are prefilled again after resume); release the device KV pool;
then the weights. "host" copies every device region (embeddings, head, resident layers) to one pinned
host arena in a single batched copy. "disk" keeps no copy, because resume reads the checkpoint again, and it
releases the host arena of the streamed layers too. "keep" leaves the weights where they are.

Resume, in order: read from disk if needed (before anything is allocated, so a bad file changes nothing);
allocate the device regions and the KV pool; enqueue the KV swap-in, then one copy per weight region, in
the order a forward reads them. Each region's copy has its own event, and `DecoderModel` makes the compute
wait on the event of the region it is about to read. So with `pipelined=True`, the first step after resume
starts as soon as the embeddings and the first layer are back, and the later layers arrive while the earlier
ones compute. With `pipelined=False`, everything is waited for before the first step. Either way, when
requests are in flight, resume runs that first step itself, to time the first token; its outputs come back
from the next `step()`.

Timing: transfers are timed on the copy queue (CUDA events, or the copy thread's clock); host work
(allocation, pinning, enqueueing, reading files) is timed where it runs. The parts of a report, less the
overlap that pipelining creates, add up to its total (`unaccounted_seconds` is the difference; the tests
bound it).
"""
from __future__ import annotations

import dataclasses
import logging
import time

from ..arena import HostArena, align_up
from ..checkpoint import Checkpoint
from ..errors import KVCacheError, OutOfBlocks, StateError, TransferError
from ..modes import check_modes
from ..streaming import LayerStreamer, StreamedLayer
from ..weights import copy_to_host, fresh_regions, host_copy_bytes, read_regions
from .reports import PreemptionReport, ResumeReport

log = logging.getLogger("tidal")


@dataclasses.dataclass
class Preempted:
    """What resume needs to undo a preemption."""

    weights: str
    kv: str
    swapped: list  # request ids whose KV went to the host pool at preemption


class _Clock:
    """Host time of the sections a caller marks, summed."""

    def __init__(self):
        self.seconds = 0.0
        self._t = None

    def __enter__(self):
        self._t = time.perf_counter()

    def __exit__(self, *exc):
        self.seconds += time.perf_counter() - self._t


def preempt(engine, weights: str, kv: str) -> PreemptionReport:
    check_modes(weights, kv)
    if engine.preempted is not None:
        raise StateError(f"{engine.name}: already preempted ({engine.preempted.weights}/{engine.preempted.kv}); "
                         "resume() it first")
    t0 = time.perf_counter()
    book = _Clock()
    cache, backend, w = engine.cache, engine.backend, engine.weights
    with book:
        engine.batcher.settle_swap_ins(block=True)
        running = list(engine.batcher.running)
        to_swap = []
        if kv == "swap":
            free = cache.host_pool.num_free
            for r in running:  # oldest first; the host pool may not take them all
                need = len(cache.block_ids(r.id))
                if need > free:
                    break
                to_swap.append(r)
                free -= need
    kv_bytes, kv_seconds = 0, 0.0
    if to_swap:
        try:
            handle = cache.swap_out([r.id for r in to_swap])
            handle.wait()
        except (OutOfBlocks, KVCacheError) as exc:  # blocks shared between requests can still fall short
            log.warning("tidal: %s: KV swap at preemption failed (%s); recomputing it instead", engine.name, exc)
            to_swap = []
        else:
            kv_bytes, kv_seconds = handle.bytes, handle.seconds()
    with book:
        dropped = [r for r in running if r not in to_swap]
        if dropped and kv == "swap":
            log.warning("tidal: %s: host KV pool too small for %d of %d running requests; they will be recomputed",
                        engine.name, len(dropped), len(running))
        dropped_tokens = sum(cache.num_tokens(r.id) for r in dropped)
        engine.batcher.park(to_swap, dropped)
        device_released = cache.release_device()
    weight_bytes, weight_seconds, host_released = 0, 0.0, 0
    host_copy_reused = weights == "host" and w.parked is not None  # keep_host_copy: the copy is there already
    if weights != "keep":
        if weights == "host" and not host_copy_reused:
            with book:
                arena, parked, transfer = copy_to_host(backend, w, w.device_keys, "host copy of the weights",
                                                       "preempt: weights to the host")
            try:
                transfer.wait()
            except BaseException:
                arena.release()
                raise
            weight_seconds = transfer.seconds()
            w.parked, w.parked_arena = parked, arena
        with book:
            weight_bytes = w.unbind_device()
            if engine.streamer is not None:
                device_released += engine.streamer.slot_bytes
                engine.streamer.close()
                engine.streamer = engine.model.streamer = None
            if weights == "disk":
                for name in ("arena", "parked_arena"):
                    arena = getattr(w, name)
                    if arena is not None:
                        host_released += arena.nbytes
                        arena.release()
                        setattr(w, name, None)
                host_released += w.drop_layer_copies()  # copies a live residency change made
                w.streamed.clear()
                w.parked = None
            device_released += weight_bytes
    engine.preempted = Preempted(weights, kv, [r.id for r in to_swap])
    return PreemptionReport(
        model=engine.name, weights=weights, kv=kv, weight_bytes=weight_bytes, weight_seconds=weight_seconds,
        kv_bytes=kv_bytes, kv_seconds=kv_seconds,
        host_copy_reused=host_copy_reused,
        kv_swapped_requests=len(to_swap), kv_recompute_requests=len(dropped), kv_recompute_tokens=dropped_tokens,
        device_bytes_released=device_released, host_bytes_released=host_released,
        bookkeeping_seconds=book.seconds, total_seconds=time.perf_counter() - t0)


def host_copy_growth(engine) -> int:
    """Host bytes `preempt(weights="host")` would add now: a copy of the device regions, unless the engine
    keeps one already (keep_host_copy)."""
    w = engine.weights
    return 0 if w.parked is not None else host_copy_bytes(w)


def staging_bytes(engine) -> int:
    """Host bytes a resume holds only while it runs: after weights="disk", the device regions are read from the
    checkpoint into a staging arena first (so that a bad file changes nothing on the device)."""
    state = engine.preempted
    return host_copy_bytes(engine.weights) if state is not None and state.weights == "disk" else 0


def resume(engine, pipelined: bool = True) -> ResumeReport:
    state = engine.preempted
    if state is None:
        raise StateError(f"{engine.name}: not preempted; nothing to resume")
    t0 = time.perf_counter()
    book = _Clock()
    cache, backend, w = engine.cache, engine.backend, engine.weights
    disk_bytes, disk_seconds, loader = 0, 0.0, "none"
    keys = w.device_keys if state.weights != "keep" else []
    host = w.parked
    staging = streamed_arena = kv_handle = None
    streamed_regions = {}
    transfers = {}  # region key -> Transfer, in the order a forward reads them
    try:
        if state.weights == "disk":  # read first: a bad file raises before anything else changes
            with book:
                ckpt = Checkpoint(engine.path)
                streamed = engine.plan.streamed_layers
                staging = HostArena(backend, staging_bytes(engine))
                host = {k: staging.alloc(w.region_bytes(k)) for k in keys}
                streamed_arena = HostArena(backend, len(streamed) * align_up(w.layer_bytes)) if streamed else None
                streamed_regions = {i: streamed_arena.alloc(w.layer_bytes) for i in streamed}
            t = time.perf_counter()
            backend.host_writes([*host.values(), *streamed_regions.values()], "resume: read the checkpoint")
            info = read_regions(ckpt, w, {**host, **streamed_regions})
            disk_seconds = time.perf_counter() - t  # with any dtype conversion: the read as resume pays it
            disk_bytes, loader = info.bytes, info.path
        with book:
            cache.restore_device()
            regions, allocated = fresh_regions(backend, w, keys)
            anchor_at = time.perf_counter()  # the copy queue is idle: what is enqueued now starts now
            if state.swapped:
                kv_handle = cache.swap_in(state.swapped)
            for k in keys:
                transfers[k] = backend.copy([regions[k]], [host[k]], after=[allocated],
                                            op=f"resume weights region {k!r}")
    except BaseException:
        _abandon(engine, staging, streamed_arena, kv_handle)
        raise
    # From here on the model is active again; a copy that fails now surfaces as TransferError from the step.
    with book:
        for k in keys:
            w.bind(k, regions[k])
        if streamed_arena is not None:
            w.arena = streamed_arena
            for i, region in streamed_regions.items():
                w.streamed[i] = StreamedLayer(i, region, w.layer_slots)
        if engine.plan.streamed_layers and engine.streamer is None:
            engine.streamer = engine.model.streamer = LayerStreamer(backend, engine.plan, w.streamed,
                                                                    engine.offload_config.prefetch_depth)
        engine.model.arriving = dict(transfers) if pipelined else {}
        engine.batcher.unpark(state.swapped, kv_handle)
        engine.preempted = None
    first_step, ttft, recompute_tokens, recompute_seconds = 0.0, None, 0, 0.0
    try:
        if not pipelined:
            for t in transfers.values():
                t.wait()
            if kv_handle is not None:
                kv_handle.wait()
        if engine.has_unfinished():
            counters = engine.counters
            before = (counters.prefill_seconds, counters.prefill_tokens)
            # the step may also prefill new requests (a scheduler hands its queue over first): recompute is
            # the share of the prefill, by tokens, of the requests that had output already (KV dropped)
            again = {r: len(r.tokens) for r in engine.batcher.waiting if r.output}
            t = time.perf_counter()
            engine.step_ahead()  # its outputs come from the next step(), after any not yet returned
            first_step = time.perf_counter() - t
            ttft = time.perf_counter() - t0
            prefilled = counters.prefill_tokens - before[1]
            recompute_tokens = sum(n for r, n in again.items() if not r.is_waiting)  # those it prefilled
            recompute_seconds = (counters.prefill_seconds - before[0]) * recompute_tokens / max(1, prefilled)
        for t in transfers.values():
            t.wait()
    except TransferError:
        _back_to_preempted(engine, state, staging)
        raise
    finally:
        engine.model.arriving = {}
    ttfl = None
    if keys:
        anchor = kv_handle.event if kv_handle is not None else transfers[keys[0]]
        first_layer = next((k for k in keys if isinstance(k, int)), keys[-1])
        ttfl = (anchor_at - t0) + transfers[first_layer].elapsed_from(anchor)
    with book:
        if engine.config.keep_host_copy:  # the copy stays for the next preemption (read from disk: it is new)
            if staging is not None:
                w.parked, w.parked_arena = host, staging
        else:
            for arena in (staging, w.parked_arena):
                if arena is not None:
                    arena.release()
            w.parked, w.parked_arena = None, None
    total = time.perf_counter() - t0
    weight_seconds = sum(t.seconds() for t in transfers.values())
    kv_seconds = kv_handle.seconds() if kv_handle is not None else 0.0
    parts = book.seconds + disk_seconds + weight_seconds + kv_seconds + first_step
    return ResumeReport(
        model=engine.name, weights=state.weights, pipelined=pipelined, loader=loader, disk_bytes=disk_bytes,
        disk_seconds=disk_seconds, weight_bytes=sum(t.nbytes for t in transfers.values()),
        weight_seconds=weight_seconds, kv_bytes=kv_handle.bytes if kv_handle is not None else 0,
        kv_seconds=kv_seconds, recompute_tokens=recompute_tokens, recompute_seconds=recompute_seconds,
        first_step_seconds=first_step, bookkeeping_seconds=book.seconds, total_seconds=total,
        overlap_seconds=max(0.0, parts - total) if pipelined else 0.0, time_to_first_layer=ttfl,
        time_to_first_token=ttft)


def _abandon(engine, staging, streamed_arena, kv_handle) -> None:
    """Undo a resume that failed before the model saw anything: it stays preempted, as it was."""
    engine.backend.synchronize()
    for arena in (staging, streamed_arena):
        if arena is not None:
            arena.release()
    cache = engine.cache
    if kv_handle is not None:
        try:
            kv_handle.wait()
        except Exception:
            pass  # a failed swap-in has put the sequences back in the host pool already
        else:
            cache.swap_out(list(kv_handle.seq_ids)).wait()
    if cache.kv is not None and cache.device_pool.num_used == 0:
        cache.release_device()


def _back_to_preempted(engine, state: Preempted, staging) -> None:
    """A weight or KV copy of a resume failed after the model was activated: preempt it again, as it was.
    Its host copies are still there (parked, or read from disk into `staging`), so it stays resumable."""
    backend, w, cache = engine.backend, engine.weights, engine.cache
    try:
        backend.synchronize()
    except TransferError:
        pass  # the failure being handled
    engine.model.arriving = {}
    batcher = engine.batcher
    batcher.settle_swap_ins(block=True, raise_errors=False)
    back = batcher.park_suspended(state.swapped)  # their swap-in failed: still on the host
    running = list(batcher.running)
    if running:
        cache.swap_out([r.id for r in running]).wait()
    batcher.park(running, [])
    if state.weights != "keep":
        w.unbind_device()
        if engine.streamer is not None:
            engine.streamer.close()
            engine.streamer = engine.model.streamer = None
    if state.weights == "disk":
        for arena in (staging, w.arena):
            if arena is not None:
                arena.release()
        w.arena = None
        w.streamed.clear()
    cache.release_device()
    engine.preempted = Preempted(state.weights, state.kv, sorted(r.id for r in running + back))
