"""Helpers for the KV cache tests: a scripted CPU backend (gated and faulty copies), a shadow of every
sequence's KV content kept by the test, and independent readers of the pools. Also tests of the helpers."""
from __future__ import annotations

import threading

import pytest
import torch

from tidal.backends.cpu import CpuBackend
from tidal.errors import TransferError
from tidal.kv import PagedKVCache

FATES = ("ok", "fail_before", "fail_partway", "fail_after", "raise_on_submit")


class ScriptedBackend(CpuBackend):
    """The CPU backend with copies that wait until the test opens their gate (so swaps stay in flight while
    other operations run) and fail as the test scripts it: before moving a byte, partway through the first
    link copy (staged path; the direct path has no link copy and fails after the fact instead), after every
    byte has landed, or at enqueue time."""

    def __init__(self, gated: bool = False):
        super().__init__("cpu")
        self.gated = gated
        self.gates: list[threading.Event] = []
        self.transfers: list = []  # (gate, transfer) of every copy submitted
        self.next_fate = "ok"
        self._partway = False

    def submit(self, fn, nbytes, after=(), **kw):
        fate, self.next_fate = self.next_fate, "ok"
        if fate == "raise_on_submit":
            raise TransferError("simulated: the copy could not be enqueued")
        gate = threading.Event()
        if not self.gated:
            gate.set()
        self.gates.append(gate)

        def job():
            gate.wait()
            if fate == "fail_before":
                raise RuntimeError("simulated link fault before the first byte")
            self._partway = fate == "fail_partway"
            fn()
            if fate == "fail_after" or self._partway:
                self._partway = False
                raise RuntimeError("simulated link fault after the data moved")
        transfer = super().submit(job, nbytes, after, **kw)
        self.transfers.append((gate, transfer))
        return transfer

    def _copy_now(self, dst, src):
        if self._partway:
            self._partway = False
            d, s = dst[0].reshape(-1), src[0].reshape(-1)
            half = d.numel() // 2
            d[:half].copy_(s[:half])
            raise RuntimeError("simulated link fault halfway through a copy")
        super()._copy_now(dst, src)

    def open_all(self) -> None:
        for g in self.gates:
            g.set()

    def finish_opened(self) -> None:
        """Let every copy whose gate is open run to its end (under the ordering check copies start late)."""
        for gate, transfer in self.transfers:
            if gate.is_set():
                transfer._flag.wait()

    def open_oldest(self) -> None:
        for g in self.gates:
            if not g.is_set():
                g.set()
                return


def read_seq(cache: PagedKVCache, blocks: list[int], num_tokens: int, side: str) -> torch.Tensor:
    """[L, 2, num_tokens, H, D]: a sequence's KV read straight from a pool, by its block ids."""
    c = cache.config
    if side == "device":
        x = cache.kv[:, :, blocks]  # [L, 2, nb, bs, H, D]
    else:
        x = cache.host_kv[blocks].permute(1, 2, 0, 3, 4, 5)
    return x.reshape(c.num_layers, 2, len(blocks) * c.block_size, c.num_kv_heads, c.head_dim)[:, :, :num_tokens]


def write_tokens(cache: PagedKVCache, blocks: list[int], start: int, data: torch.Tensor) -> None:
    """Write data [L, 2, n, H, D] at token positions start.. of a resident sequence, computing the
    (block, offset) pairs here rather than through the cache's slot mapping."""
    bs = cache.config.block_size
    pos = torch.arange(start, start + data.shape[2])
    blk = torch.tensor(blocks, dtype=torch.int64)[pos // bs].to(cache.kv.device)
    cache.kv[:, :, blk, (pos % bs).to(cache.kv.device)] = data.to(cache.kv.device)


def test_read_write_roundtrip_through_independent_helpers(device):
    cache = PagedKVCache(3, 2, 8, 4, 10, 4, torch.float32, device)
    blocks = cache.allocate("s", 9)
    data = torch.randn(3, 2, 9, 2, 8)
    write_tokens(cache, blocks, 0, data)
    assert torch.equal(read_seq(cache, blocks, 9, "device").cpu(), data)
    cache.close()


@pytest.mark.parametrize("fate", ["fail_before", "fail_partway", "fail_after"])
def test_scripted_backend_fails_as_told(fate):
    be = ScriptedBackend()
    dst, src = torch.zeros(8), torch.arange(1.0, 9.0)
    be.next_fate = fate
    t = be.copy([dst], [src])
    with pytest.raises(TransferError, match="simulated"):
        t.wait()
    expected = {"fail_before": torch.zeros(8), "fail_after": src,
                "fail_partway": torch.cat([src[:4], torch.zeros(4)])}[fate]
    assert torch.equal(dst, expected)
    be.close()
