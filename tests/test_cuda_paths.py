"""The CUDA backend's host-side logic, shown on the CPU: page-locking whole pages tied to the memory's
lifetime, the stall probe that must never block, and the KV swap path CUDA cannot take."""
import gc
import logging

import pytest
import torch

from tidal.backends.cuda import CudaStall
from tidal.backends.pinning import PAGE, PinnedHostAllocator
from tidal.errors import ConfigError
from tidal.kv import KVCacheConfig, PagedKVCache


class FakeRegistrar:
    """Stands in for cuMemHostRegister: refuses a page registered twice, as the driver does."""

    def __init__(self, fail_with: str | None = None):
        self.fail_with = fail_with
        self.ranges: dict[int, int] = {}
        self.unregistered: list[int] = []
        self.drained = 0

    def register(self, ptr, nbytes):
        if self.fail_with:
            return self.fail_with
        if any(ptr < p + n and p < ptr + nbytes for p, n in self.ranges.items()):
            return "CUresult 712 (part of the range is already registered)"
        self.ranges[ptr] = nbytes
        return None

    def unregister(self, ptr):
        self.unregistered.append(ptr)
        return None if self.ranges.pop(ptr, None) is not None else "CUresult 713 (not registered)"


@pytest.mark.parametrize("sizes", [[1, 7, 100, 4095], [PAGE, PAGE + 1, 3 * PAGE - 1], [1 << 20, 13]])
def test_small_buffers_get_pages_of_their_own_and_all_register(sizes):
    reg = FakeRegistrar()
    alloc = PinnedHostAllocator(reg)
    bufs = [alloc.allocate(n) for n in sizes]
    assert [b.numel() for b in bufs] == sizes  # exactly the bytes asked for
    assert all(b.data_ptr() % PAGE == 0 for b in bufs)
    assert len(reg.ranges) == len(sizes) and alloc.report() == "pinned"
    assert sorted(reg.ranges.values()) == sorted(max(PAGE, -(-n // PAGE) * PAGE) for n in sizes)
    assert all(alloc.is_pinned(b) for b in bufs)
    for i, b in enumerate(bufs):  # usable memory, each its own
        b.fill_(i + 1)
    assert [int(b[0]) for b in bufs] == list(range(1, len(sizes) + 1))


def test_a_failed_registration_leaves_a_usable_pageable_buffer_and_says_so(caplog):
    alloc = PinnedHostAllocator(FakeRegistrar(fail_with="CUresult 2 (out of memory)"))
    with caplog.at_level(logging.WARNING, logger="tidal"):
        buf = alloc.allocate(10_000)
    assert buf.numel() == 10_000 and not alloc.is_pinned(buf)
    buf.copy_(torch.arange(10_000) % 251)
    assert torch.equal(buf, (torch.arange(10_000) % 251).to(torch.uint8))
    assert alloc.report().startswith("pageable (12288 bytes in 1 buffers: CUresult 2 (out of memory))")
    assert "pageable" in caplog.text and "out of memory" in caplog.text
    assert PinnedHostAllocator(None).allocate(5).numel() == 5  # no driver library at all: pageable too


def test_registration_ends_when_the_last_view_dies_not_before():
    reg = FakeRegistrar()
    alloc = PinnedHostAllocator(reg, drain=lambda: setattr(reg, "drained", reg.drained + 1))
    buf = alloc.allocate(3 * PAGE)
    base = buf.data_ptr()
    view = buf[PAGE:2 * PAGE]
    del buf
    gc.collect()
    assert base in reg.ranges and alloc.live == 1  # a view keeps the memory, so the registration stays
    del view
    gc.collect()
    assert reg.unregistered == [base] and alloc.live == 0 and alloc.pinned_bytes == 0
    assert reg.drained == 1  # the copy queue drained first: no queued copy reads unregistered pages


def test_explicit_release_unregisters_once():
    reg = FakeRegistrar()
    alloc = PinnedHostAllocator(reg)
    buf = alloc.allocate(100)
    alloc.release(buf)
    alloc.release(buf)
    assert reg.unregistered == [buf.data_ptr()] and alloc.live == 0
    del buf
    gc.collect()
    assert len(reg.unregistered) == 1


def test_buffers_of_an_abandoned_object_are_unregistered():
    """An offloaded model never restored, an error path, a benchmark variant: nobody calls release."""
    reg = FakeRegistrar()
    alloc = PinnedHostAllocator(reg)

    class Holder:
        def __init__(self):
            self.parts = [alloc.allocate(n)[: n // 2] for n in (5000, 70_000, 1 << 18)]
    h = Holder()
    assert alloc.live == 3
    del h
    gc.collect()
    assert alloc.live == 0 and not reg.ranges and len(reg.unregistered) == 3


class FakeCudaEvent:
    def __init__(self, done):
        self.is_done = done
        self.synchronized = False

    def query(self):
        return self.is_done

    def synchronize(self):
        self.synchronized = True


def test_a_stall_is_ready_only_when_both_its_ends_are():
    need, arrived = FakeCudaEvent(True), FakeCudaEvent(False)
    stall = CudaStall(need, arrived)
    assert not stall.ready()  # the copy has not finished: seconds() would block the host
    arrived.is_done = True
    assert stall.ready()
    assert CudaStall(FakeCudaEvent(True), None).ready()
    assert not CudaStall(FakeCudaEvent(False), FakeCudaEvent(True)).ready()


@pytest.mark.parametrize("device", ["cuda", "cuda:1", torch.device("cuda", 0)])
def test_unstaged_swap_is_refused_off_the_cpu(device):
    with pytest.raises(ConfigError, match="staged=False on cuda.*only the CPU backend"):
        KVCacheConfig(2, 2, 8, 16, num_device_blocks=4, num_host_blocks=4, device=device, staged=False)
    KVCacheConfig(2, 2, 8, 16, num_device_blocks=4, num_host_blocks=4, device=device, staged=True)
    KVCacheConfig(2, 2, 8, 16, num_device_blocks=4, num_host_blocks=4, device="cpu", staged=False)


def test_unstaged_swap_is_refused_on_a_non_cpu_backend_given_without_a_device():
    class NotCpu:
        device = torch.device("cuda", 0)
        checker = None

    with pytest.raises(ConfigError, match="staged=False on cuda:0"):
        PagedKVCache(2, 2, 8, 16, num_device_blocks=4, num_host_blocks=4, staged=False, backend=NotCpu())
