import threading

import pytest
import torch

from tidal import LayerStreamer, ResidencyPlan, StreamedLayer
from tidal.arena import ALIGN, HostArena, layout
from tidal.backends import CpuBackend, make_backend
from tidal.errors import ShapeError, TidalError, TransferError

pytestmark = pytest.mark.usefixtures("ordering")  # each test also runs under the ordering check


def test_copies_are_byte_exact_and_report_bytes(device):
    be = make_backend(device)
    src = [torch.randn(1001), torch.randint(0, 9, (3, 7), dtype=torch.int32), torch.randn(5, dtype=torch.float64)]
    dst = [torch.empty_like(s, device=be.device) for s in src]
    t = be.copy(dst, src)
    t.wait()
    assert t.done() and t.nbytes == sum(s.numel() * s.element_size() for s in src)
    assert t.seconds() >= 0
    for d, s in zip(dst, src):
        assert torch.equal(d.cpu(), s)
    with pytest.raises(ShapeError, match="pair 0"):
        be.copy([torch.empty(3)], [torch.empty(4)])
    be.close()


def test_copy_queue_runs_in_order_and_waits_for_events():
    be = CpuBackend()
    gate = threading.Event()
    order = []
    first = be.submit(lambda: (gate.wait(), order.append(1)), 0)
    second = be.submit(lambda: order.append(2), 0)
    assert not second.done()
    gate.set()
    second.wait()
    assert order == [1, 2] and first.done()
    be.close()


def test_a_failed_transfer_fails_its_dependants():
    be = CpuBackend()
    boom = be.submit(lambda: 1 / 0, 0)
    dst, src = torch.zeros(4), torch.ones(4)
    after = be.copy([dst], [src], after=[boom])
    with pytest.raises(TransferError, match="ZeroDivisionError"):
        boom.wait()
    with pytest.raises(TransferError, match="waits for failed"):
        after.wait()
    assert torch.equal(dst, torch.zeros(4))  # the dependant never ran
    ok = be.copy([dst], [src])  # the queue itself still works
    ok.wait()
    assert torch.equal(dst, src)
    be.close()
    with pytest.raises(TransferError, match="closed"):
        be.copy([dst], [src])


def test_arena_layout_is_aligned_and_views_round_trip(device):
    be = make_backend(device)  # on CUDA the arena is registered (pinned) host memory
    shapes = [((3, 5), torch.float32), ((7,), torch.float16), ((2, 2, 2), torch.bfloat16), ((1,), torch.int64)]
    slots, size = layout(shapes)
    assert all(s.offset % ALIGN == 0 for s in slots)
    assert size == slots[-1].offset + 8
    arena = HostArena(be, size + 1000)
    region = arena.alloc(size)
    tensors = [torch.randn(s).to(d) for s, d in shapes]
    for slot, t in zip(slots, tensors):
        slot.view(region).copy_(t)
    for slot, t in zip(slots, tensors):
        assert torch.equal(slot.view(region), t)
    with pytest.raises(TidalError, match="cannot fit"):
        arena.alloc(arena.nbytes)
    arena.release()
    be.close()


class RecordingBackend(CpuBackend):
    """Logs every copy with the events it waits on, and every compute event recorded."""

    def __init__(self):
        super().__init__()
        self.log = []

    def record(self):
        ev = super().record()
        self.log.append(("record", ev))
        return ev

    def copy(self, dst, src, after=(), **kw):
        t = super().copy(dst, src, after, **kw)
        self.log.append(("copy", dst[0].data_ptr(), tuple(after), t))
        return t


def _layers(plan, nbytes=1000):
    return {i: StreamedLayer(i, torch.full((nbytes,), i, dtype=torch.uint8), tuple(layout([((nbytes,), torch.uint8)])[0]))
            for i in plan.streamed_layers}


@pytest.mark.parametrize("depth", [0, 1, 2, 3])
def test_streamer_reuses_a_slot_only_after_the_compute_that_read_it(depth):
    be = RecordingBackend()
    plan = ResidencyPlan.from_layers(8, [0, 3])
    streamer = LayerStreamer(be, plan, _layers(plan), prefetch_depth=depth)
    slot_of_ptr = {s.buffer.data_ptr(): k for k, s in enumerate(streamer.slots)}
    last_release = {}  # slot -> event recorded by the compute that last read it
    for _ in range(3):
        streamer.begin_step()
        for layer in plan.streamed_layers:
            before = len(be.log)
            (view,) = streamer.acquire(layer)
            assert torch.equal(view, torch.full((1000,), layer, dtype=torch.uint8))  # the right bytes arrived
            for entry in be.log[before:]:
                if entry[0] == "copy":
                    k = slot_of_ptr[entry[1]]
                    if k in last_release:
                        assert last_release[k] in entry[2], "a copy overwrote a slot without waiting for its reader"
            slot = next(k for k, s in enumerate(streamer.slots) if s.layer == layer)
            streamer.release(layer)
            last_release[slot] = be.log[-1][1]
        streamer.end_step()
    last, total = streamer.summary()
    assert last.copies == last.layers_streamed == 6
    assert len(streamer.slots) == min(depth + 1, 6)
    be.close()


def test_streamer_recovers_from_out_of_order_use():
    be = CpuBackend()
    plan = ResidencyPlan.from_fraction(6, 0.0)
    streamer = LayerStreamer(be, plan, _layers(plan), prefetch_depth=2)
    streamer.acquire(0)
    streamer.release(0)  # lookahead now holds layers 1 and 2
    for layer in (4, 0, 5, 5):  # a forward that restarts, skips, repeats
        (view,) = streamer.acquire(layer)
        assert int(view[0]) == layer and int(view[-1]) == layer
        streamer.release(layer)
    with pytest.raises(TidalError, match="without a matching acquire"):
        streamer.release(3)
    be.close()


@pytest.mark.parametrize("nbytes", [1, 4095, (4 << 20) - 1, 4 << 20, (6 << 20) + 123])
def test_cpu_host_memory_holds_bytes_and_asks_for_huge_pages(nbytes):
    """CPU-backend buffers from 4 MiB up are anonymous mappings advised to use transparent huge pages (fresh
    memory is what preemption and resume copy into); small ones are plain tensors. Both hold what is copied."""
    import mmap
    from pathlib import Path

    from tidal.backends.cpu import HUGE_PAGE_MIN_BYTES, empty_host

    buf = empty_host(nbytes)
    assert buf.dtype == torch.uint8 and buf.shape == (nbytes,) and buf.is_contiguous()
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(nbytes))
    buf.copy_(src)
    assert torch.equal(buf, src)
    smaps = Path("/proc/self/smaps")
    if nbytes >= HUGE_PAGE_MIN_BYTES and hasattr(mmap, "MADV_HUGEPAGE") and smaps.exists():
        addr, flags = buf.data_ptr(), None
        for line in smaps.read_text().splitlines():
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and line.startswith("VmFlags:"):
                flags = line.split()[1:]
                break
        assert flags is not None and "hg" in flags  # VM_HUGEPAGE: the madvise took
