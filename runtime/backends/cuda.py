"""CUDA backend: one dedicated copy stream, CUDA events, and host memory pinned with cudaHostRegister.

Pinning a plain allocation with cudaHostRegister pins exactly the bytes asked for; `pin_memory()` goes through
torch's caching host allocator, which rounds every allocation up to a power of two.
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch

from ..errors import BackendError, TransferError
from .base import Backend, Event, Stall, Transfer

log = logging.getLogger("tidal")


class CudaEvent(Event):
    __slots__ = ("event",)

    def __init__(self, event: torch.cuda.Event):
        self.event = event

    def wait(self) -> None:
        self.event.synchronize()

    def done(self) -> bool:
        return self.event.query()


class CudaTransfer(CudaEvent, Transfer):
    __slots__ = ("nbytes", "start")

    def __init__(self, start: torch.cuda.Event, end: torch.cuda.Event, nbytes: int):
        super().__init__(end)
        self.start, self.nbytes = start, nbytes

    def seconds(self) -> float:
        self.event.synchronize()
        return self.start.elapsed_time(self.event) / 1e3

    def interval(self) -> None:
        return None

    def elapsed_from(self, earlier: "CudaTransfer") -> float:
        self.event.synchronize()
        return earlier.start.elapsed_time(self.event) / 1e3


class CudaStall(Stall):
    """Compute reached the wait at `need`; the transfer finished at `ready_at`. The stall is the gap, if any."""

    __slots__ = ("need", "ready_at")

    def __init__(self, need: torch.cuda.Event, ready_at: torch.cuda.Event | None):
        self.need, self.ready_at = need, ready_at

    def ready(self) -> bool:
        return self.need.query()

    def seconds(self) -> float:
        if self.ready_at is None:
            return 0.0
        self.need.synchronize()
        self.ready_at.synchronize()
        return max(0.0, self.need.elapsed_time(self.ready_at) / 1e3)


class CudaBackend(Backend):
    name = "cuda"

    def __init__(self, device: torch.device | str = "cuda"):
        if not torch.cuda.is_available():
            raise BackendError("CUDA backend requested but torch.cuda.is_available() is False")
        device = torch.device(device)
        self.device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        self.copy_stream = torch.cuda.Stream(self.device)
        self._registered: dict[int, int] = {}

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        buf = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        err = torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), buf.numel(), 0)
        if int(err) != 0:
            # Still correct, only slower: copies from pageable memory are staged by the driver. Say so.
            log.warning("tidal: cudaHostRegister(%d bytes) failed (%s); host buffer is pageable", nbytes, err)
        else:
            self._registered[buf.data_ptr()] = buf.numel()
        return buf[:nbytes]

    def release_host_buffer(self, buf: torch.Tensor) -> None:
        if self._registered.pop(buf.data_ptr(), None) is not None:
            self.synchronize()  # no copy may still read it
            torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())

    def is_pinned(self, buf: torch.Tensor) -> bool:
        return buf.data_ptr() in self._registered

    def record(self) -> Event:
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        return CudaEvent(ev)

    def wait_for(self, event: Event) -> Stall:
        stream = torch.cuda.current_stream(self.device)
        need = torch.cuda.Event(enable_timing=True)
        need.record(stream)
        stream.wait_event(event.event)
        return CudaStall(need, event.event if isinstance(event, CudaTransfer) else None)

    def submit(self, fn: Callable[[], None], nbytes: int, after: Sequence[Event] = ()) -> Transfer:
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

    def synchronize(self) -> None:
        self.copy_stream.synchronize()
        torch.cuda.current_stream(self.device).synchronize()
