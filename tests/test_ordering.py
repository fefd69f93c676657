"""The stream-ordering check (backends/ordering.py): its rules on their own, and the faults it catches in the
real streamer, KV cache and resume when one wait is taken out of each."""

import pytest
import torch

from tidal import Engine, LayerStreamer, ResidencyPlan, StreamedLayer
from tidal.arena import HostArena, layout
from tidal.backends import CpuBackend, OrderingChecker, Span
from tidal.backends.ordering import enabled_by_env
from tidal.errors import OrderingError
from tidal.kv import PagedKVCache

R = Span("memory", 1000, 2000, "region R")


def _copy(checker, after=(), reads=(), writes=(R,), op="fill R"):
    return checker.copy_submitted(after, reads, writes, op)


def test_compute_must_wait_for_the_copy_that_fills_a_region():
    c = OrderingChecker()
    mark = _copy(c)
    with pytest.raises(OrderingError, match="compute 'use R' reads region R whose filling copy 'fill R'"):
        c.compute_uses([R], "use R")
    c.compute_waits(mark)
    c.compute_uses([R], "use R")
    # a part of the region counts too, and a later copy is covered by waiting on it (the queue is in order)
    _copy(c, after=[c.compute_event()], op="refill R")
    later = _copy(c, writes=(Span("memory", 5000, 6000, "other"),), op="other")
    c.compute_waits(later)
    c.compute_uses([Span("memory", 1500, 1600, "part of R")], "use part of R")


def test_a_copy_must_wait_for_the_last_compute_use_of_what_it_overwrites():
    c = OrderingChecker()
    c.compute_waits(_copy(c))
    c.compute_uses([R], "layer 3")
    with pytest.raises(OrderingError, match="copy 'fill R' writes region R whose last compute use 'layer 3'"):
        _copy(c)
    c.compute_uses([R], "layer 3 again")
    _copy(c, after=[c.compute_event()])  # recorded after the use: fine


def test_fresh_device_memory_counts_as_used_by_compute_until_an_event_after_it():
    c = OrderingChecker()
    c.allocated([R], "allocate R")
    with pytest.raises(OrderingError, match="last compute use 'allocate R'"):
        _copy(c)
    early = c.compute_event()
    c.allocated([R], "allocate R")
    with pytest.raises(OrderingError):
        _copy(c, after=[early])  # recorded before the allocation: not enough
    _copy(c, after=[c.compute_event()])


def test_host_memory_is_not_fresh_for_compute_and_forgets_freed_neighbours():
    c = OrderingChecker()
    c.allocated([R], "allocate host R", compute=False)
    _copy(c)  # nothing on compute ever used host memory
    c.allocated([Span("memory", 1500, 2500, "new")], "allocate new", compute=False)
    c.compute_uses([Span("memory", 1500, 2500, "new")], "use new")  # the old copy's record was split away
    with pytest.raises(OrderingError):
        c.compute_uses([Span("memory", 1000, 1400, "rest of R")], "use the rest of R")


def test_a_copy_must_not_read_what_compute_wrote_before_it_waited():
    c = OrderingChecker()
    c.compute_uses([R], "write R", write=True)
    with pytest.raises(OrderingError, match="copy 'save R' reads region R before compute 'write R'"):
        c.copy_submitted([], [R], [], "save R")
    c.compute_uses([R], "write R", write=True)
    c.copy_submitted([c.compute_event()], [R], [], "save R")


def test_compute_must_not_overwrite_what_a_copy_may_still_read():
    c = OrderingChecker()
    mark = c.copy_submitted([c.compute_event()], [R], [], "save R")
    with pytest.raises(OrderingError, match="compute 'write R' writes region R that copy 'save R'"):
        c.compute_uses([R], "write R", write=True)
    c.compute_waits(mark)
    c.compute_uses([R], "write R", write=True)


def test_host_memory_may_change_only_after_the_host_saw_its_copies_complete():
    c = OrderingChecker()
    mark = c.copy_submitted([], [R], [], "upload R")
    with pytest.raises(OrderingError, match="'free R' changes region R while copy 'upload R' that reads it"):
        c.host_changes([R], "free R")
    c.compute_waits(mark)  # compute waiting is not the host knowing
    with pytest.raises(OrderingError):
        c.host_changes([R], "free R")
    c.host_saw(mark)
    c.host_changes([R], "free R")


def test_a_host_wait_on_compute_orders_every_later_copy_after_it():
    c = OrderingChecker()
    c.compute_uses([R], "layer 0")
    ev = c.compute_event()
    c.host_saw(ev)
    _copy(c)


def test_synchronize_orders_everything():
    c = OrderingChecker()
    c.copy_submitted([], [R], [], "upload R")
    c.compute_uses([Span("memory", 0, 10, "S")], "use S", write=True)
    c.synchronized()
    c.host_changes([R], "free R")
    c.copy_submitted([], [Span("memory", 0, 10, "S")], [], "save S")


def test_logical_pools_are_checked_unit_by_unit():
    c = OrderingChecker()
    blocks = [Span("kv", b, b + 1, f"block {b}") for b in (3, 4)]
    c.compute_waits(c.copy_submitted([], [], blocks[:1], "swap in block 3"))
    c.compute_uses(blocks[:1], "attend")
    c.copy_submitted([], [], blocks[1:], "swap in block 4")
    with pytest.raises(OrderingError, match="block 4"):
        c.compute_uses(blocks, "attend")


def test_the_mode_follows_the_environment(monkeypatch):
    monkeypatch.setenv("TIDAL_CHECK_ORDERING", "0")
    assert not enabled_by_env() and CpuBackend().checker is None
    monkeypatch.setenv("TIDAL_CHECK_ORDERING", "1")
    assert enabled_by_env() and CpuBackend().checker is not None
    assert CpuBackend(check_ordering=False).checker is None


def test_delayed_copies_make_a_missing_wait_show_as_wrong_bytes():
    be = CpuBackend(check_ordering=True, seed=3)
    be.checker.max_delay_s = 0.3  # long enough that the read below surely comes first
    src, dst = torch.arange(1000, dtype=torch.float32), torch.zeros(1000)
    t = be.copy([dst], [src])
    assert not torch.equal(dst, src)  # read without waiting: the old bytes
    be.wait_for(t)
    assert torch.equal(dst, src)
    be.close()


# -- one wait taken out of the real components ---------------------------------------------------------------

def _streamer(be, depth=1):
    plan = ResidencyPlan.from_layers(6, [0])
    layers = {i: StreamedLayer(i, torch.full((4096,), i, dtype=torch.uint8), tuple(layout([((4096,), torch.uint8)])[0]))
              for i in plan.streamed_layers}
    return LayerStreamer(be, plan, layers, prefetch_depth=depth)


def _forward(streamer):
    streamer.begin_step()
    for layer in streamer.plan.streamed_layers:
        (view,) = streamer.acquire(layer)
        assert int(view[0]) == layer and int(view[-1]) == layer
        streamer.release(layer)
    streamer.end_step()


def test_the_streamer_passes_the_check():
    be = CpuBackend(check_ordering=True)
    streamer = _streamer(be)
    for _ in range(3):
        _forward(streamer)
    assert be.checker.checks > 0
    streamer.close()
    be.close()


def test_check_catches_compute_reading_a_slot_without_waiting_for_its_copy(monkeypatch):
    be = CpuBackend(check_ordering=True)
    streamer = _streamer(be)
    monkeypatch.setattr(LayerStreamer, "_wait_copy", lambda self, slot: None)
    with pytest.raises(OrderingError, match=r"compute 'layer 1's compute' reads ring slot \d whose filling copy "
                                            r"'stream layer 1 into ring slot \d'"):
        _forward(streamer)
    be.close()


def test_check_catches_a_slot_reused_before_its_reader_finished(monkeypatch):
    be = CpuBackend(check_ordering=True)
    streamer = _streamer(be)
    # release() no longer records the reader's event: a reused slot's copy waits only on its allocation
    monkeypatch.setattr(be, "record", lambda: streamer.slots[0].released)
    with pytest.raises(OrderingError, match=r"copy 'stream layer \d into ring slot \d' writes ring slot \d whose "
                                            r"last compute use 'layer \d's compute'"):
        for _ in range(2):
            _forward(streamer)
    be.close()


def test_check_catches_the_first_fill_of_a_fresh_slot_waiting_on_nothing():
    be = CpuBackend(check_ordering=True)
    streamer = _streamer(be)
    for slot in streamer.slots:
        slot.released = None  # as before the fix: the first copy into a slot waited on nothing
    with pytest.raises(OrderingError, match=r"writes ring slot 0 whose last compute use 'allocate ring slot 0'"):
        _forward(streamer)
    be.close()


def _cache(be):
    return PagedKVCache(2, 2, 8, 4, num_device_blocks=16, num_host_blocks=16, dtype=torch.float32, backend=be)


def test_check_catches_a_swap_out_that_does_not_wait_for_the_kv_writes(monkeypatch):
    be = CpuBackend(check_ordering=True)
    cache = _cache(be)
    cache.allocate("a", 9)
    cache.slot_mapping("a", 0, 9)  # the prefill's writes
    cache.swap_out(["a"]).wait()  # waits for compute: fine
    cache.swap_in(["a"]).wait()
    cache.batch(["a"], [1])
    monkeypatch.setattr(cache, "_after_compute", lambda: [])
    with pytest.raises(OrderingError, match=r"copy 'swap_out of sequences \['a'\]' reads KV device block \d+ before "
                                            r"compute 'attention over sequences \['a'\]'"):
        cache.swap_out(["a"])
    be.close()


def test_check_catches_a_swap_in_over_blocks_compute_may_still_read(monkeypatch):
    be = CpuBackend(check_ordering=True)
    cache = _cache(be)
    cache.allocate("a", 5)
    cache.allocate("b", 5)
    cache.swap_out(["b"]).wait()
    cache.batch(["a"], [1])
    cache.free("a")  # its blocks go back to the pool while the attention that read them may be queued
    monkeypatch.setattr(cache, "_after_compute", lambda: [])
    with pytest.raises(OrderingError, match=r"copy 'swap_in of sequences \['b'\]' writes KV device block \d+ whose "
                                            r"last compute use 'attention over sequences \['a'\]'"):
        cache.swap_in(["b"])
    be.close()


def test_check_catches_a_host_buffer_released_while_a_copy_reads_it():
    be = CpuBackend(check_ordering=True)
    arena = HostArena(be, 1 << 16, label="test arena")
    dst = be.empty(1 << 16, label="device copy")
    t = be.copy([dst], [arena.buffer], after=[be.record()], op="upload the arena")
    with pytest.raises(OrderingError, match="release a host buffer' changes test arena while copy 'upload the arena'"):
        arena.release()
    t.wait()
    arena.release()
    be.close()


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    from tidal.presets import build

    return build("micro", torch.float32, cache_dir=tmp_path_factory.mktemp("ordering"), log=lambda s: None)


def _engine(path):
    return Engine.from_pretrained(path, device="cpu", dtype=torch.float32, resident_fraction=0.5,
                                  kv_cache_bytes=4 << 20, kernels="reference")


def test_resume_passes_the_check_and_the_check_catches_its_missing_waits(small_model, monkeypatch):
    monkeypatch.setenv("TIDAL_CHECK_ORDERING", "1")
    engine = _engine(small_model)
    assert engine.backend.checker is not None
    engine.add_request([1, 2, 3, 4, 5], max_new_tokens=8)
    engine.step()
    engine.preempt(weights="host", kv="swap")
    engine.resume(pipelined=True)
    engine.step()
    engine.preempt(weights="host", kv="recompute")  # no KV swap-in, whose wait on compute would cover the copies

    be = engine.backend
    copy = be.copy
    monkeypatch.setattr(be, "copy", lambda dst, src, after=(), **kw: copy(dst, src, (), **kw))
    with pytest.raises(OrderingError, match=r"copy 'resume weights region '\w+'' writes weights region '\w+' whose "
                                            r"last compute use 'allocate weights region"):
        engine.resume(pipelined=True)
    assert engine.preempted is not None  # the failed resume left it preempted, resumable
    monkeypatch.setattr(be, "copy", copy)

    wait_for = be.wait_for
    skip = lambda ev: None if ev.mark is not None and ev.mark.op.startswith("resume weights") else wait_for(ev)
    monkeypatch.setattr(be, "wait_for", skip)
    with pytest.raises(OrderingError, match=r"compute 'forward over weights region '\w+'' reads weights region"):
        engine.resume(pipelined=True)
    engine.close()
