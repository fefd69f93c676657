"""The CPU backend's device memory. A GPU's device buffers come from torch's caching allocator: memory a
preempted model gives back is reused by the next allocation, split to size, without a new cudaMalloc, and its
pages are mapped already. On the CPU backend every device buffer used to be a new mapping, so each resume paid
a page fault per page on top of its copy (538 MB copied at 4.2 GB/s into fresh huge pages against 6.3 GB/s
into touched ones on the Intel VM of docs/BENCHMARKS.md, "CPU device memory"). `MappingCache` keeps the
mappings of freed large buffers and hands them out again, bounded so that the process holds no more device
memory than it once had in use at the same time (fragmentation aside).

Bookkeeping (plain Python; the mappings themselves come from `make`):
  - a buffer of n bytes takes a segment of `align_up(n, MAPPING_ALIGN)` bytes: the smallest free segment that
    holds it, split when larger, else a new mapping of that size;
  - a segment returns to the free list when the last tensor viewing it is gone (a finalizer on the memoryview
    the tensor holds: it only appends, so it is safe in any thread and inside the lock's holder), and merges
    with its free neighbours in the same mapping;
  - wholly free mappings are dropped, oldest first, while the mapped bytes exceed the peak of live bytes;
  - `trim(owner)` drops every wholly free mapping and sets the peak to the live bytes; the buffers `owner`
    still holds lower the peak as they come back, so their memory goes too (a backend's close calls it: a
    closed engine or a removed model gives its memory back to the OS, as `torch.cuda.empty_cache` would)."""
from __future__ import annotations

import bisect
import collections
import dataclasses
import itertools
import threading
import weakref
from typing import Callable

import torch

MAPPING_ALIGN = 2 << 20  # a transparent huge page: segments start and end on one


def align_up(n: int, align: int = MAPPING_ALIGN) -> int:
    return -(-n // align) * align


@dataclasses.dataclass(frozen=True)
class CacheStats:
    live_bytes: int  # segments in use by a tensor
    free_bytes: int  # mapped, not in use
    peak_bytes: int  # the most live bytes since the last trim, less what trimmed owners gave back since
    reused: int  # buffers served from an existing mapping
    mapped: int  # buffers served from a new mapping


class MappingCache:
    """Large device buffers for the CPU backend (see the module docstring). `make(nbytes)` returns a new
    mapping: any object exporting a writable buffer of `nbytes` bytes."""

    def __init__(self, make: Callable[[int], object]):
        self._make = make
        self._lock = threading.Lock()
        self._keys = itertools.count()  # mapping keys, in the order they were made
        self._mappings: dict[int, object] = {}  # key -> mapping
        self._sizes: dict[int, int] = {}  # key -> its bytes
        self._free: list[tuple[int, int, int]] = []  # (key, offset, length), sorted
        self._returned: collections.deque = collections.deque()  # (key, offset, length, owner) not yet booked
        self._live = self._mapped_bytes = self._peak = 0
        self._owned: collections.Counter = collections.Counter()  # owner -> live bytes
        self._closed: set = set()  # owners trimmed while holding live bytes
        self._reused = self._new = 0

    def take(self, nbytes: int, owner: object = None) -> torch.Tensor:
        """`nbytes` uint8 on a mapping of this cache, on behalf of `owner` (a hashable key, see `trim`); its
        contents are whatever an earlier owner left."""
        size = align_up(nbytes)
        with self._lock:
            self._book_returns()
            fits = [i for i, seg in enumerate(self._free) if seg[2] >= size]
            if fits:
                key, offset, length = self._free.pop(min(fits, key=lambda i: (self._free[i][2], i)))
                if length > size:
                    bisect.insort(self._free, (key, offset + size, length - size))
                mapping = self._mappings[key]
                self._reused += 1
            else:
                key = mapping = None
            self._live += size
            self._owned[owner] += size
            if mapping is not None:
                self._peak = max(self._peak, self._live)
        if mapping is None:  # made outside the lock; the peak rises, and free mappings make room, once it exists
            try:
                mapping = self._make(size)
            except BaseException:
                with self._lock:
                    self._live -= size
                    self._owned -= collections.Counter({owner: size})
                raise
            with self._lock:
                key, offset = next(self._keys), 0
                self._mappings[key], self._sizes[key] = mapping, size
                self._mapped_bytes += size
                self._new += 1
                self._peak = max(self._peak, self._live)
                self._drop_over_peak()
        view = memoryview(mapping)[offset:offset + nbytes]
        done = weakref.finalize(view, self._returned.append, (key, offset, size, owner))
        done.atexit = False
        return torch.frombuffer(view, dtype=torch.uint8)

    def trim(self, owner: object = None) -> None:
        """Drop every wholly free mapping (the OS gets its memory back) and set the peak to the live bytes; the
        buffers `owner` (unless None) still holds are dropped as they come back."""
        with self._lock:
            self._book_returns()
            self._peak = self._live
            if owner is not None and self._owned[owner]:
                self._closed.add(owner)
            self._drop_over_peak(everything=True)

    def stats(self) -> CacheStats:
        with self._lock:
            self._book_returns()
            return CacheStats(self._live, self._mapped_bytes - self._live, self._peak, self._reused, self._new)

    def _book_returns(self) -> None:
        while self._returned:
            key, offset, size, owner = self._returned.popleft()
            self._live -= size
            self._owned -= collections.Counter({owner: size})
            if owner in self._closed:  # its memory is to go: the peak comes down with it
                self._peak -= size
                if not self._owned[owner]:
                    self._closed.discard(owner)
            self._release(key, offset, size)
        self._drop_over_peak()

    def _release(self, key: int, offset: int, size: int) -> None:
        """Put a segment back on the free list, merged with its free neighbours in the same mapping."""
        i = bisect.bisect_left(self._free, (key, offset, 0))
        if i < len(self._free) and self._free[i][0] == key and self._free[i][1] == offset + size:
            size += self._free.pop(i)[2]
        if i > 0 and self._free[i - 1][0] == key and sum(self._free[i - 1][1:]) == offset:
            _, offset, before = self._free.pop(i - 1)
            size += before
            i -= 1
        self._free.insert(i, (key, offset, size))

    def _drop_over_peak(self, everything: bool = False) -> None:
        """Drop wholly free mappings, oldest first, while the mapped bytes exceed the peak (or all of them)."""
        whole = [seg for seg in self._free if seg[1] == 0 and seg[2] == self._sizes[seg[0]]]
        for seg in whole:  # sorted by key: oldest first
            if not everything and self._mapped_bytes <= self._peak:
                break
            self._free.remove(seg)
            del self._mappings[seg[0]]
            self._mapped_bytes -= self._sizes.pop(seg[0])
