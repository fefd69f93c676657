"""CUDA backend: one dedicated copy stream, CUDA events, and host memory page-locked whole pages at a time.

Host buffers come from pinning.py (their own pages, registered through the driver, unregistered when the
memory dies); `pin_memory()` would go through torch's caching host allocator, which rounds every allocation
up to a power of two.
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch

from ..errors import BackendError, TransferError
from .base import Backend, Event, Stall, Transfer
from .pinning import DriverRegistrar, PinnedHostAllocator

CLOCK_HZ_FOR_PAUSE = 1.5e9  # torch.cuda._sleep counts cycles; about right for the GPUs tidal targets

log = logging.getLogger("tidal")


class CudaEvent(Event):
    __slots__ = ("event",)

    def __init__(self, event: torch.cuda.Event):
        self.event = event

    def _wait(self) -> None:
        self.event.synchronize()

    def _done(self) -> bool:
        return self.event.query()


class CudaTransfer(CudaEvent, Transfer):
    __slots__ = ("nbytes", "start")

    def __init__(self, start: torch.cuda.Event, end: torch.cuda.Event, nbytes: int):
        super().__init__(end)
        self.start, self.nbytes = start, nbytes

    def seconds(self) -> float:
        self.wait()
        return self.start.elapsed_time(self.event) / 1e3

    def interval(self) -> None:
        return None

    def elapsed_from(self, earlier: "CudaTransfer") -> float:
        self.wait()
        earlier.wait()
        return earlier.start.elapsed_time(self.event) / 1e3


class CudaStall(Stall):
    """Compute reached the wait at `need`; the transfer finished at `ready_at`. The stall is the gap, if any."""

    __slots__ = ("need", "ready_at")

    def __init__(self, need: torch.cuda.Event, ready_at: torch.cuda.Event | None):
        self.need, self.ready_at = need, ready_at

    def ready(self) -> bool:
        # both ends: seconds() synchronizes on each, and the streamer folds a step only when that cannot block
        return self.need.query() and (self.ready_at is None or self.ready_at.query())

    def seconds(self) -> float:
        if self.ready_at is None:
            return 0.0
        self.need.synchronize()
        self.ready_at.synchronize()
        return max(0.0, self.need.elapsed_time(self.ready_at) / 1e3)


class CudaBackend(Backend):
    name = "cuda"

    def __init__(self, device: torch.device | str = "cuda", check_ordering: bool | None = None,
                 seed: int | None = None):
        if not torch.cuda.is_available():
            raise BackendError("CUDA backend requested but torch.cuda.is_available() is False")
        device = torch.device(device)
        self.device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        self.copy_stream = torch.cuda.Stream(self.device)
        self._init_checker(check_ordering, seed)
        try:
            registrar = DriverRegistrar()
        except OSError as exc:
            log.warning("tidal: the CUDA driver library cannot be loaded here (%s); host buffers will be pageable",
                        exc)
            registrar = None
        stream = self.copy_stream  # the finalizers must not keep the backend alive
        self.pinned = PinnedHostAllocator(registrar, drain=stream.synchronize)

    def _host_buffer(self, nbytes: int) -> torch.Tensor:
        with torch.cuda.device(self.device):  # the driver call needs a context current in this thread
            return self.pinned.allocate(nbytes)

    def _release_host_buffer(self, buf: torch.Tensor) -> None:
        self.pinned.release(buf)

    def is_pinned(self, buf: torch.Tensor) -> bool:
        return self.pinned.is_pinned(buf)

    def host_memory(self) -> str:
        """"pinned", or "pageable (...)" naming the bytes that could not be page-locked and why."""
        return self.pinned.report()

    def _record(self) -> Event:
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        return CudaEvent(ev)

    def _pause(self, seconds: float) -> None:
        torch.cuda._sleep(max(1, int(seconds * CLOCK_HZ_FOR_PAUSE)))  # runs on the copy stream (see _submit)

    def _wait_for(self, event: Event) -> Stall:
        stream = torch.cuda.current_stream(self.device)
        need = torch.cuda.Event(enable_timing=True)
        need.record(stream)
        stream.wait_event(event.event)
        return CudaStall(need, event.event if isinstance(event, CudaTransfer) else None)

    def _submit(self, fn: Callable[[], None], nbytes: int, after: Sequence[Event] = ()) -> Transfer:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self.copy_stream):
            for ev in after:
                self.copy_stream.wait_event(ev.event)
            start.record(self.copy_stream)
            try:
                fn()
            except RuntimeError as exc:
                raise TransferError(f"enqueueing a copy failed: {exc}") from exc
            end.record(self.copy_stream)
        return CudaTransfer(start, end, nbytes)

    def _copy_now(self, dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
        for d, s in zip(dst, src):
            d.copy_(s, non_blocking=True)

    def _synchronize(self) -> None:
        self.copy_stream.synchronize()
        torch.cuda.current_stream(self.device).synchronize()
