"""The interface every device backend implements. Logic above it (streaming, KV swap) is backend-agnostic.

A backend has two queues: the compute queue (the caller's thread, or the current CUDA stream) and one copy
queue (a copy thread, or a dedicated CUDA stream). Work on the copy queue runs in submission order.
"""
from __future__ import annotations

import abc
from typing import Callable, Sequence

import torch

from ..errors import ShapeError


class Event(abc.ABC):
    """A point in one queue's work. `wait()` blocks the host; `done()` never blocks."""

    @abc.abstractmethod
    def wait(self) -> None: ...

    @abc.abstractmethod
    def done(self) -> bool: ...


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

    @abc.abstractmethod
    def host_buffer(self, nbytes: int) -> torch.Tensor:
        """One host allocation of exactly `nbytes` (uint8), page-locked where the backend supports it."""

    @abc.abstractmethod
    def release_host_buffer(self, buf: torch.Tensor) -> None:
        """Undo what `host_buffer` did beyond the allocation (e.g. unpin); the caller then drops the tensor."""

    def empty(self, nbytes: int) -> torch.Tensor:
        """A device buffer of `nbytes` uint8."""
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    @abc.abstractmethod
    def record(self) -> Event:
        """An event after all compute issued so far."""

    @abc.abstractmethod
    def wait_for(self, event: Event) -> Stall:
        """Make subsequent compute wait for `event`; the returned probe measures how long it waited."""

    @abc.abstractmethod
    def submit(self, fn: Callable[[], None], nbytes: int, after: Sequence[Event] = ()) -> Transfer:
        """Run `fn` on the copy queue once every event in `after` has completed; returns at once."""

    def copy(self, dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor],
             after: Sequence[Event] = ()) -> Transfer:
        """Asynchronously copy src[i] into dst[i] (same shapes) on the copy queue."""
        dst, src = list(dst), list(src)
        if len(dst) != len(src):
            raise ShapeError(f"copy: {len(dst)} destinations but {len(src)} sources")
        for i, (d, s) in enumerate(zip(dst, src)):
            if d.shape != s.shape or d.dtype != s.dtype:
                raise ShapeError(f"copy: pair {i} is dst {tuple(d.shape)} {d.dtype}, src {tuple(s.shape)} {s.dtype}")
        nbytes = sum(s.numel() * s.element_size() for s in src)
        return self.submit(lambda: self._copy_now(dst, src), nbytes, after)

    @abc.abstractmethod
    def _copy_now(self, dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
        """The copy itself, already on the copy queue."""

    @abc.abstractmethod
    def synchronize(self) -> None:
        """Wait for all work on both queues."""

    def close(self) -> None:
        """Finish outstanding work and release the copy queue."""
        self.synchronize()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={self.device})"
