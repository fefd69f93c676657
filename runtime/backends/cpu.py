"""CPU backend: device tensors are plain CPU tensors, a copy thread stands in for the copy stream and
threading events for CUDA events. It runs the same streaming and swap logic as the CUDA backend, so that
logic is exercised (and its overlap observable) on machines without a GPU."""
from __future__ import annotations

import logging
import mmap
import os
import queue
import threading
import time
import weakref
from typing import Callable, Sequence

import torch

from ..errors import TransferError
from .base import Backend, Event, Stall, Transfer
from .cpumem import MappingCache
from .link import LinkEmulation

log = logging.getLogger("tidal")

HUGE_PAGE_MIN_BYTES = 4 << 20
_HUGE_PAGES = hasattr(mmap, "MADV_HUGEPAGE")


def _mapping(nbytes: int) -> mmap.mmap:
    """An anonymous mapping of `nbytes`, advised to use transparent huge pages (a hint: where THP is "never"
    the pages are 4 KiB, as without it)."""
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if _HUGE_PAGES:
        buf.madvise(mmap.MADV_HUGEPAGE)
    return buf


def empty_host(nbytes: int) -> torch.Tensor:
    """`nbytes` uint8 of host memory; from HUGE_PAGE_MIN_BYTES up, an anonymous mapping advised to use
    transparent huge pages. Host arenas are allocated afresh at each preemption, and first-touch page faults on
    4 KiB pages dominated those copies here: 2 GiB copied into fresh memory at 2 GB/s, against 7 GB/s with huge
    pages and 16 GB/s into touched memory. (Device buffers come from DEVICE_MEMORY, which reuses its pages.)"""
    if nbytes < HUGE_PAGE_MIN_BYTES or not _HUGE_PAGES:
        return torch.empty(nbytes, dtype=torch.uint8)
    return torch.frombuffer(_mapping(nbytes), dtype=torch.uint8)  # the tensor holds the mapping; unmapped with it


# The emulated device's memory, one per process as torch's CUDA caching allocator is: a model's device buffers
# reuse the mappings another model (or its own preemption) gave back, instead of faulting in new pages.
DEVICE_MEMORY = MappingCache(_mapping)
DEVICE_CACHE_ENV = "TIDAL_CPU_DEVICE_CACHE"  # "0": each large device buffer a new mapping (for comparison)


def device_cache_enabled() -> bool:
    return os.environ.get(DEVICE_CACHE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


class CpuEvent(Event):
    __slots__ = ("_flag", "error")

    def __init__(self, done: bool = False):
        self._flag = threading.Event()
        self.error: BaseException | None = None
        if done:
            self._flag.set()

    def set(self, error: BaseException | None = None) -> None:
        self.error = error
        self._flag.set()

    def _wait(self) -> None:
        self._flag.wait()
        if self.error is not None:
            raise TransferError(f"copy failed: {self.error!r}") from self.error

    def _done(self) -> bool:
        return self._flag.is_set()


class CpuTransfer(CpuEvent, Transfer):
    __slots__ = ("nbytes", "start", "end")

    def __init__(self, nbytes: int):
        super().__init__()
        self.nbytes = nbytes
        self.start = self.end = 0.0

    def seconds(self) -> float:
        self.wait()
        return self.end - self.start

    def interval(self) -> tuple[float, float]:
        self.wait()
        return self.start, self.end

    def elapsed_from(self, earlier: "CpuTransfer") -> float:
        self.wait()
        earlier.wait()
        return self.end - earlier.start


class CpuStall(Stall):
    __slots__ = ("_seconds",)

    def __init__(self, seconds: float):
        self._seconds = seconds

    def ready(self) -> bool:
        return True

    def seconds(self) -> float:
        return self._seconds


_STOP = object()


def _copy_worker(jobs: queue.SimpleQueue, link: LinkEmulation | None) -> None:
    while True:
        job = jobs.get()
        if job is _STOP:
            return
        fn, after, transfer = job
        error = None
        for ev in after:
            ev._flag.wait()
            if ev.error is not None:  # what this work depends on failed: it must not run on stale data
                error = TransferError(f"a transfer this one waits for failed: {ev.error!r}")
        transfer.start = time.perf_counter()
        if error is None:
            try:
                fn()
            except BaseException as exc:  # reported through the event, re-raised by whoever waits on it
                error = exc
            if link is not None and error is None:
                # the copy engine of an emulated link: the work takes at least bytes / bandwidth, and the wait is
                # here, on the copy thread, so compute on the caller's thread overlaps it
                remaining = transfer.start + link.seconds(transfer.nbytes) - time.perf_counter()
                if remaining > 0:
                    time.sleep(remaining)
        transfer.end = time.perf_counter()
        # the job's tensors go now, not when the next job comes: a device buffer it copied into may be freed
        job = fn = None
        transfer.set(error)


def _stop_worker(jobs: queue.SimpleQueue, thread: threading.Thread) -> None:
    if thread.is_alive():
        jobs.put(_STOP)
        thread.join()


class CpuBackend(Backend):
    name = "cpu"

    def __init__(self, device: torch.device | str = "cpu", link: LinkEmulation | None = None,
                 check_ordering: bool | None = None, seed: int | None = None):
        self.device = torch.device(device)
        self.link = link
        self._init_checker(check_ordering, seed)
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=_copy_worker, args=(self._jobs, link), name="tidal-copy",
                                        daemon=True)
        self._thread.start()
        if not _HUGE_PAGES:
            log.info("tidal: no MADV_HUGEPAGE here; the CPU backend's large buffers use 4 KiB pages")
        self._last: CpuTransfer | None = None
        self._memory_owner = object()  # this backend's key in DEVICE_MEMORY (unique while a buffer holds it)
        self._cache_device_memory = device_cache_enabled()
        if not self._cache_device_memory:
            log.info("tidal: %s=0: the CPU backend maps each large device buffer anew (no reuse)", DEVICE_CACHE_ENV)
        # Runs at close, garbage collection or interpreter exit: a daemon thread still inside a copy when the
        # interpreter tears down would be killed mid-call.
        self._finalizer = weakref.finalize(self, _stop_worker, self._jobs, self._thread)

    def _host_buffer(self, nbytes: int) -> torch.Tensor:
        return empty_host(nbytes)

    def _empty(self, nbytes: int) -> torch.Tensor:
        if self._cache_device_memory and nbytes >= HUGE_PAGE_MIN_BYTES:
            return DEVICE_MEMORY.take(nbytes, owner=self._memory_owner)
        return empty_host(nbytes)

    def _release_host_buffer(self, buf: torch.Tensor) -> None:
        pass

    def host_memory(self) -> str:
        return "plain (CPU backend: no page-locking)"

    def _record(self) -> Event:
        return CpuEvent(done=True)  # compute runs synchronously in the caller's thread

    def _wait_for(self, event: Event) -> Stall:
        t0 = time.perf_counter()
        event._wait()  # compute (this thread) waits; the host seeing it is not what the ordering check models
        return CpuStall(time.perf_counter() - t0)

    def _pause(self, seconds: float) -> None:
        time.sleep(seconds)

    def _submit(self, fn: Callable[[], None], nbytes: int, after: Sequence[Event] = ()) -> Transfer:
        if not self._thread.is_alive():
            raise TransferError("the CPU backend's copy thread is closed")
        transfer = CpuTransfer(nbytes)
        self._jobs.put((fn, tuple(after), transfer))
        self._last = transfer
        return transfer

    def _copy_now(self, dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
        # torch's copy_ (vectorised, multi-threaded, GIL released) measured faster on this path than
        # tidal._C.copy_spans, for one large span and for many small ones alike (docs/BENCHMARKS.md).
        for d, s in zip(dst, src):
            d.copy_(s)

    def _synchronize(self) -> None:
        last = self._last
        if last is not None:
            last._flag.wait()

    def close(self) -> None:
        self.synchronize()
        self._finalizer()
        DEVICE_MEMORY.trim(owner=self._memory_owner)  # this backend's buffers go back to the OS, as torch.cuda.empty_cache
