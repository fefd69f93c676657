"""Swap plans, the two ways of moving blocks (movers), and the handle a swap returns.

A swap moves a set of distinct blocks between the device pool (`[L, 2, N, block_size, H, D]`, viewed as
`[N, L, 2, block_size, H, D]`) and the host pool (`[N_host, L, 2, block_size, H, D]`, one contiguous
region per block). The plan pairs device and host block ids, sorted by host id, so that consecutive host ids
form runs; every run is one contiguous host range.

* `StagedMover` (device memory is not host memory, i.e. CUDA): swap-out gathers the device blocks of a chunk
  into a persistent device staging buffer with one `index_select` kernel, then copies each host run with one
  copy call. Swap-in is the reverse: one copy per run into staging, one `index_copy_` scatter kernel. All of
  it runs on the copy queue. Copy calls per swap = runs per chunk, summed: one for a sequence whose host
  blocks are contiguous (the usual case, see allocator.py) and the swap fits in staging.
* `DirectMover` (the CPU backend, where "device" memory is host memory): the gather/scatter kernel writes
  straight into/out of the host run, so each run is moved by one call and its bytes are touched once.
"""
from __future__ import annotations

import abc
import dataclasses
import time
from typing import Callable

import torch

from ..backends import Backend, Transfer
from ..errors import TransferError


@dataclasses.dataclass(frozen=True)
class SwapPlan:
    """Distinct blocks to move: device_blocks[i] <-> host_blocks[i], sorted by host block id."""

    device_blocks: tuple[int, ...]
    host_blocks: tuple[int, ...]

    @classmethod
    def build(cls, device_blocks, host_blocks) -> "SwapPlan":
        pairs = sorted(zip(host_blocks, device_blocks))
        return cls(tuple(d for _, d in pairs), tuple(h for h, _ in pairs))

    def chunks(self, size: int) -> list[tuple[int, int, list[tuple[int, int, int]]]]:
        """[(start, stop, runs)] over the plan in pieces of at most `size` blocks; runs are
        (offset in the chunk, first host block, length)."""
        out = []
        for start in range(0, len(self.host_blocks), size):
            stop = min(start + size, len(self.host_blocks))
            runs, i = [], start
            while i < stop:
                j = i + 1
                while j < stop and self.host_blocks[j] == self.host_blocks[j - 1] + 1:
                    j += 1
                runs.append((i - start, self.host_blocks[i], j - i))
                i = j
            out.append((start, stop, runs))
        return out


class Mover(abc.ABC):
    """Builds the function a swap runs on the copy queue; returns it with the number of copy calls it makes."""

    def __init__(self, backend: Backend, device_kv: torch.Tensor, host_kv: torch.Tensor):
        self.backend = backend
        self.device_blocks = device_kv.permute(2, 0, 1, 3, 4, 5)  # [N, L, 2, bs, H, D], a view
        self.host_kv = host_kv  # [N_host, L, 2, bs, H, D]

    def _index(self, blocks: tuple[int, ...]) -> torch.Tensor:
        """Block ids as an int64 tensor on the device; called on the copy queue."""
        idx = torch.tensor(blocks, dtype=torch.int64)
        if self.backend.device.type == "cpu":
            return idx
        # pinned, so the upload is stream-ordered on the copy stream and never a hidden host sync
        return idx.pin_memory().to(self.backend.device, non_blocking=True)

    @abc.abstractmethod
    def swap_out(self, plan: SwapPlan) -> tuple[Callable[[], None], int]: ...

    @abc.abstractmethod
    def swap_in(self, plan: SwapPlan) -> tuple[Callable[[], None], int]: ...


class DirectMover(Mover):
    def _runs(self, plan: SwapPlan):
        return plan.chunks(max(1, len(plan.host_blocks)))[0][2] if plan.host_blocks else []

    def swap_out(self, plan):
        runs = self._runs(plan)

        def fn():
            idx = self._index(plan.device_blocks)
            for off, h0, n in runs:
                torch.index_select(self.device_blocks, 0, idx[off:off + n], out=self.host_kv[h0:h0 + n])
        return fn, len(runs)

    def swap_in(self, plan):
        runs = self._runs(plan)

        def fn():
            idx = self._index(plan.device_blocks)
            for off, h0, n in runs:
                self.device_blocks.index_copy_(0, idx[off:off + n], self.host_kv[h0:h0 + n])
        return fn, len(runs)


class StagedMover(Mover):
    def __init__(self, backend: Backend, device_kv: torch.Tensor, host_kv: torch.Tensor, staging_blocks: int):
        super().__init__(backend, device_kv, host_kv)
        block = host_kv.shape[1:]
        nbytes = staging_blocks * host_kv[0].numel() * host_kv.element_size()
        # persistent: nothing is allocated per swap, and it is only ever touched on the copy queue
        self.staging = backend.empty(nbytes).view(host_kv.dtype).view(staging_blocks, *block)

    def swap_out(self, plan):
        chunks = plan.chunks(self.staging.shape[0])

        def fn():
            idx = self._index(plan.device_blocks)
            for start, stop, runs in chunks:
                torch.index_select(self.device_blocks, 0, idx[start:stop], out=self.staging[:stop - start])
                self.backend._copy_now([self.host_kv[h0:h0 + n] for _, h0, n in runs],
                                       [self.staging[off:off + n] for off, _, n in runs])
        return fn, sum(len(runs) for _, _, runs in chunks)

    def swap_in(self, plan):
        chunks = plan.chunks(self.staging.shape[0])

        def fn():
            idx = self._index(plan.device_blocks)
            for start, stop, runs in chunks:
                self.backend._copy_now([self.staging[off:off + n] for off, _, n in runs],
                                       [self.host_kv[h0:h0 + n] for _, h0, n in runs])
                self.device_blocks.index_copy_(0, idx[start:stop], self.staging[:stop - start])
        return fn, sum(len(runs) for _, _, runs in chunks)


class SwapHandle:
    """An in-flight swap. Returned at once; the copy runs on the backend's copy queue.

    `event` is the backend Transfer: compute that reads swapped-in blocks must wait on it
    (`PagedKVCache.wait_for(handle)`). `done()` never blocks; `wait()` blocks the host and raises
    TransferError if the copy failed, in which case the sequences are back on their original side, unchanged.
    `bytes` is what the swap moves; `seconds()` the copy queue's time on it (CUDA events on the GPU, the copy
    thread's clock on the CPU). `copy_calls` counts host<->device copy calls (gather/scatter kernels aside).
    """

    def __init__(self, direction: str, seq_ids: tuple, event: Transfer, nbytes: int, num_blocks: int,
                 copy_calls: int, settle: Callable[["SwapHandle"], None]):
        self.direction, self.seq_ids, self.event = direction, seq_ids, event
        self.bytes, self.num_blocks, self.copy_calls = nbytes, num_blocks, copy_calls
        self.error: TransferError | None = None
        self.settled = False
        self._settle = settle
        self.enqueued_at = time.perf_counter()

    def done(self) -> bool:
        """True once the copy has finished (or failed); settles the cache's bookkeeping then. Never blocks."""
        if not self.settled and self.event.done():
            self.settle()
        return self.settled

    def wait(self) -> None:
        """Block until the copy has finished; raise TransferError if it failed (after the rollback)."""
        if not self.settled:
            self.settle()
        if self.error is not None:
            raise self.error

    def settle(self) -> None:
        if self.settled:
            return
        try:
            self.event.wait()
        except TransferError as exc:
            self.error = exc
        self.settled = True
        self._settle(self)

    def seconds(self) -> float:
        """Copy-queue seconds of this swap; waits for it."""
        self.wait()
        return self.event.seconds()

    def gbps(self) -> float:
        s = self.seconds()
        return self.bytes / s / 1e9 if s > 0 else float("inf")

    def __repr__(self) -> str:
        state = "failed" if self.error else "done" if self.settled else "in flight"
        return (f"SwapHandle({self.direction}, seqs={list(self.seq_ids)}, {self.num_blocks} blocks, "
                f"{self.bytes} B, {self.copy_calls} copy calls, {state})")
