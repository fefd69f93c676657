"""The interface every device backend implements. Logic above it (streaming, KV swap) is backend-agnostic.

A backend has two queues: the compute queue (the caller's thread, or the current CUDA stream) and one copy
queue (a copy thread, or a dedicated CUDA stream). Work on the copy queue runs in submission order.

The public methods here are the only way in; each backend implements the underscored ones. With the
ordering check on (ordering.py), every allocation, event, wait and copy also goes through the checker, and
the code above the backend declares what compute reads and writes (`compute_reads`, `compute_writes`) and
what the host rewrites (`host_writes`); without it those calls cost one attribute test.
"""
from __future__ import annotations

import abc
from typing import Callable, Iterable, Sequence

import torch

from ..errors import ShapeError
from .ordering import Mark, OrderingChecker, Span, enabled_by_env, memory_span


class Event(abc.ABC):
    """A point in one queue's work. `wait()` blocks the host; `done()` never blocks."""

    mark: Mark | None = None  # where the ordering check places it
    checker: OrderingChecker | None = None

    def wait(self) -> None:
        try:
            self._wait()
        finally:  # a failed copy is over too: the host may reuse what it touched
            if self.checker is not None and self._done():
                self.checker.host_saw(self.mark)

    def done(self) -> bool:
        finished = self._done()
        if finished and self.checker is not None:
            self.checker.host_saw(self.mark)
        return finished

    @abc.abstractmethod
    def _wait(self) -> None: ...

    @abc.abstractmethod
    def _done(self) -> bool: ...


class Transfer(Event):
    """Work submitted to the copy queue: an event plus the bytes moved and the seconds the copy queue spent."""

    nbytes: int

    @abc.abstractmethod
    def seconds(self) -> float:
        """Time the copy queue spent on this work; waits for it to finish."""

    @abc.abstractmethod
    def interval(self) -> tuple[float, float] | None:
        """(start, end) in time.perf_counter() seconds when the backend can tell (the CPU backend), else None."""

    @abc.abstractmethod
    def elapsed_from(self, earlier: "Transfer") -> float:
        """Seconds from `earlier`'s start to this transfer's end, on the copy queue's clock; waits for both."""


class Stall(abc.ABC):
    """How long compute waited for a transfer. May need the device to finish before it can be read."""

    @abc.abstractmethod
    def ready(self) -> bool: ...

    @abc.abstractmethod
    def seconds(self) -> float: ...


class Backend(abc.ABC):
    name: str
    device: torch.device
    checker: OrderingChecker | None = None

    def _init_checker(self, check_ordering: bool | None, seed: int | None = None) -> None:
        """`check_ordering=None` follows TIDAL_CHECK_ORDERING."""
        if check_ordering is None:
            check_ordering = enabled_by_env()
        self.checker = OrderingChecker(seed) if check_ordering else None

    # -- memory ----------------------------------------------------------------------------------------------
    def host_buffer(self, nbytes: int, label: str = "host buffer") -> torch.Tensor:
        """One host allocation of exactly `nbytes` (uint8), page-locked where the backend supports it."""
        buf = self._host_buffer(nbytes)
        if self.checker is not None:
            self.checker.allocated([memory_span(buf, label)], f"allocate {label}", compute=False)
        return buf

    def release_host_buffer(self, buf: torch.Tensor) -> None:
        """Undo what `host_buffer` did beyond the allocation (e.g. unpin); the caller then drops the tensor.
        No copy may still use the buffer: the host must have seen each one complete."""
        if self.checker is not None:
            self.checker.host_changes([memory_span(buf, "a released host buffer")], "release a host buffer")
        self._release_host_buffer(buf)

    def empty(self, nbytes: int, label: str = "device buffer") -> torch.Tensor:
        """A device buffer of `nbytes` uint8. Compute may still be using this memory for an earlier owner:
        a copy into it must wait on an event recorded after this call (`after=[backend.record()]`)."""
        buf = self._empty(nbytes)
        if self.checker is not None:
            self.checker.allocated([memory_span(buf, label)], f"allocate {label}")
        return buf

    def _empty(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    @abc.abstractmethod
    def _host_buffer(self, nbytes: int) -> torch.Tensor: ...

    @abc.abstractmethod
    def _release_host_buffer(self, buf: torch.Tensor) -> None: ...

    @abc.abstractmethod
    def host_memory(self) -> str:
        """What host buffers are: "pinned", "pageable (why)" when page-locking failed, or the CPU backend's."""

    # -- the two queues --------------------------------------------------------------------------------------
    def record(self) -> Event:
        """An event after all compute issued so far."""
        event = self._record()
        if self.checker is not None:
            event.checker, event.mark = self.checker, self.checker.compute_event()
        return event

    def wait_for(self, event: Event) -> Stall:
        """Make subsequent compute wait for `event`; the returned probe measures how long it waited."""
        if self.checker is not None:
            self.checker.compute_waits(event.mark)
        return self._wait_for(event)

    def submit(self, fn: Callable[[], None], nbytes: int, after: Sequence[Event] = (), *,
               reads: Iterable = (), writes: Iterable = (), op: str = "copy") -> Transfer:
        """Run `fn` on the copy queue once every event in `after` has completed; returns at once. `reads` and
        `writes` declare the regions `fn` touches, for the ordering check; `op` names the work in its errors."""
        checker = self.checker
        if checker is None:
            return self._submit(fn, nbytes, after)
        mark = checker.copy_submitted([e.mark for e in after], _spans(reads, f"{op} source"),
                                      _spans(writes, f"{op} destination"), op)
        pause, inner = checker.delay(), fn

        def delayed():  # a copy that starts late shows a missing wait as wrong bytes, not only as a check
            self._pause(pause)
            inner()
        transfer = self._submit(delayed, nbytes, after)
        transfer.checker, transfer.mark = checker, mark
        return transfer

    def copy(self, dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor],
             after: Sequence[Event] = (), *, op: str = "copy") -> Transfer:
        """Asynchronously copy src[i] into dst[i] (same shapes) on the copy queue."""
        dst, src = list(dst), list(src)
        if len(dst) != len(src):
            raise ShapeError(f"copy: {len(dst)} destinations but {len(src)} sources")
        for i, (d, s) in enumerate(zip(dst, src)):
            if d.shape != s.shape or d.dtype != s.dtype:
                raise ShapeError(f"copy: pair {i} is dst {tuple(d.shape)} {d.dtype}, src {tuple(s.shape)} {s.dtype}")
        nbytes = sum(s.numel() * s.element_size() for s in src)
        return self.submit(lambda: self._copy_now(dst, src), nbytes, after, reads=src, writes=dst, op=op)

    def synchronize(self) -> None:
        """Wait for all work on both queues."""
        self._synchronize()
        if self.checker is not None:
            self.checker.synchronized()

    # -- what compute and the host touch (for the ordering check) --------------------------------------------
    def compute_reads(self, regions: Iterable, op: str) -> None:
        """Compute issued from now on reads these regions."""
        if self.checker is not None:
            self.checker.compute_uses(_spans(regions, op), op)

    def compute_writes(self, regions: Iterable, op: str) -> None:
        """Compute issued from now on writes (and may read) these regions."""
        if self.checker is not None:
            self.checker.compute_uses(_spans(regions, op), op, write=True)

    def host_writes(self, regions: Iterable, op: str) -> None:
        """The host is about to rewrite (or free) these host regions."""
        if self.checker is not None:
            self.checker.host_changes(_spans(regions, op), op)

    def fresh(self, regions: Iterable, op: str) -> None:
        """These regions (of a logical pool) were just allocated: see `empty`."""
        if self.checker is not None:
            self.checker.allocated(_spans(regions, op), op)

    # -- what each backend implements ------------------------------------------------------------------------
    @abc.abstractmethod
    def _record(self) -> Event: ...

    @abc.abstractmethod
    def _wait_for(self, event: Event) -> Stall: ...

    @abc.abstractmethod
    def _submit(self, fn: Callable[[], None], nbytes: int, after: Sequence[Event]) -> Transfer: ...

    @abc.abstractmethod
    def _pause(self, seconds: float) -> None:
        """Delay the copy queue by about `seconds`, from inside work already on it."""

    @abc.abstractmethod
    def _copy_now(self, dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
        """The copy itself, already on the copy queue."""

    @abc.abstractmethod
    def _synchronize(self) -> None: ...

    def close(self) -> None:
        """Finish outstanding work and release the copy queue."""
        self.synchronize()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={self.device})"


def _spans(regions, label: str) -> list[Span]:
    if isinstance(regions, (torch.Tensor, Span)):
        regions = (regions,)
    return [r if isinstance(r, Span) else memory_span(r, label) for r in regions]
