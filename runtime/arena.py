"""Host memory for streamed weights: one allocation per model, carved into aligned per-layer regions.

A streamed layer's tensors sit back to back in its region, so one copy moves the whole layer and the same
offsets address it in a device slot (see streaming.py).
"""
from __future__ import annotations

import dataclasses

import torch

from .backends import Backend
from .errors import TidalError

ALIGN = 256  # bytes; keeps every tensor view aligned for vectorised device loads


def align_up(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


@dataclasses.dataclass(frozen=True)
class TensorSlot:
    """Where one tensor lives inside a layer region."""

    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize

    def view(self, region: torch.Tensor) -> torch.Tensor:
        return region[self.offset:self.offset + self.nbytes].view(self.dtype).view(self.shape)


def layout(tensors: list[tuple[tuple[int, ...], torch.dtype]]) -> tuple[list[TensorSlot], int]:
    """Aligned offsets for tensors of the given shapes and dtypes; returns the slots and the bytes they span
    (up to the end of the last tensor: trailing padding is never copied)."""
    slots, offset, end = [], 0, 0
    for shape, dtype in tensors:
        slot = TensorSlot(offset, tuple(shape), dtype)
        slots.append(slot)
        end = offset + slot.nbytes
        offset = align_up(end)
    return slots, end


class HostArena:
    """One host buffer (pinned on CUDA) handed out by a bump allocator, released all at once."""

    def __init__(self, backend: Backend, nbytes: int, label: str = "host arena"):
        self.backend = backend
        self.buffer = backend.host_buffer(align_up(nbytes), label=label)
        self.used = 0

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()

    @property
    def pinned(self) -> bool:
        return getattr(self.backend, "is_pinned", lambda b: False)(self.buffer)

    def alloc(self, nbytes: int) -> torch.Tensor:
        size = align_up(nbytes)
        if self.used + size > self.nbytes:
            raise TidalError(f"host arena of {self.nbytes} bytes cannot fit {size} more after {self.used}")
        region = self.buffer[self.used:self.used + nbytes]
        self.used += size
        return region

    def release(self) -> None:
        if self.buffer is not None:
            self.backend.release_host_buffer(self.buffer)
            self.buffer = None

