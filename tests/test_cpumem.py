"""The CPU backend's device memory (`tidal.backends.cpumem.MappingCache`): freed large buffers' memory is
reused, split to size and merged back, never while a tensor still views it, never for two live buffers at once;
the process holds no more than its peak of live bytes unless fragmented; a closed backend's memory goes back
to the OS."""
import random
import threading
import weakref

import pytest
import torch

from tidal.backends.cpumem import MappingCache, align_up

MiB = 1 << 20


class Maker:
    """Mappings as bytearrays, with a record of every one made."""

    def __init__(self, fail_at: int | None = None):
        self.made: list[int] = []
        self.fail_at = fail_at

    def __call__(self, nbytes: int) -> bytearray:
        if self.fail_at is not None and len(self.made) == self.fail_at:
            raise MemoryError(f"no {nbytes} bytes")
        self.made.append(nbytes)
        return bytearray(nbytes)


def fill(buf: torch.Tensor, seed: int) -> torch.Tensor:
    src = torch.randint(0, 256, (buf.numel(),), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    buf.copy_(src)
    return src


def test_a_freed_buffer_is_served_again_from_its_mapping_and_only_once_no_view_is_left():
    make = Maker()
    cache = MappingCache(make)
    a = cache.take(5 * MiB + 3)
    assert a.numel() == 5 * MiB + 3 and a.dtype == torch.uint8
    ptr = a.data_ptr()
    view = a[100:200].view(torch.int16)  # a view keeps the mapping in use
    del a
    b = cache.take(5 * MiB + 3)
    assert b.data_ptr() != ptr and make.made == [6 * MiB, 6 * MiB]
    del view
    c = cache.take(5 * MiB)
    assert c.data_ptr() == ptr and len(make.made) == 2
    s = cache.stats()
    assert (s.live_bytes, s.free_bytes, s.peak_bytes, s.reused, s.mapped) == (12 * MiB, 0, 12 * MiB, 1, 2)
    del b, c


def test_the_smallest_free_segment_serves_a_buffer_split_to_size():
    make = Maker()
    cache = MappingCache(make)
    held = [cache.take(n * MiB) for n in (16, 4, 8)]
    ptrs = {t.numel() // MiB: t.data_ptr() for t in held}
    del held
    five = cache.take(5 * MiB)  # 6 MiB needed: the 8 MiB mapping is the smallest that holds it
    assert five.data_ptr() == ptrs[8]
    three = cache.take(3 * MiB)  # 4 needed: the 4 MiB mapping
    assert three.data_ptr() == ptrs[4]
    seven = cache.take(7 * MiB)  # 8 needed: the 2 MiB left of the 8 are too few; the 16's first half
    assert seven.data_ptr() == ptrs[16]
    four = cache.take(4 * MiB)  # the 16's second half
    assert four.data_ptr() == ptrs[16] + 8 * MiB
    two = cache.take(MiB + 1)  # the 8's last 2 MiB
    assert two.data_ptr() == ptrs[8] + 6 * MiB
    assert len(make.made) == 3
    s = cache.stats()
    assert (s.live_bytes, s.free_bytes, s.peak_bytes, s.reused) == (24 * MiB, 4 * MiB, 28 * MiB, 5)
    del five, three, seven, four, two


def test_segments_merge_back_into_their_mapping():
    make = Maker()
    cache = MappingCache(make)
    big = cache.take(64 * MiB)
    ptr = big.data_ptr()
    del big
    a, b, c = (cache.take(6 * MiB) for _ in range(3))
    assert [t.data_ptr() - ptr for t in (a, b, c)] == [0, 6 * MiB, 12 * MiB]
    del b, a  # the first two merge with each other, then c's return joins them to the rest
    first = cache.take(12 * MiB)
    assert first.data_ptr() == ptr
    del c
    assert cache.stats().free_bytes == 52 * MiB
    whole = cache.take(52 * MiB)  # the rest, after the 12 MiB in use
    assert whole.data_ptr() == ptr + 12 * MiB and make.made == [64 * MiB]
    del first, whole


class Buf(bytearray):  # a mapping the test can watch (bytearray itself takes no weak references)
    pass


def ends(buf: torch.Tensor) -> torch.Tensor:
    return torch.cat([buf[:4096], buf[-4096:]])


def stamp(buf: torch.Tensor, seed: int) -> torch.Tensor:
    """Random bytes at the buffer's two ends (where another buffer on the same memory would write)."""
    want = torch.randint(0, 256, (8192,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    buf[:4096], buf[-4096:] = want[:4096], want[4096:]
    return want


@pytest.mark.parametrize("seed", range(4))
def test_random_takes_and_frees_never_alias_and_hold_no_more_than_the_peak(seed):
    """Live buffers never overlap and keep their bytes whatever the others do; the live bytes are what is held;
    the mapped bytes (counted from the mappings still alive) are live + free, and exceed the peak (the most live
    bytes seen since the last trim) only while no mapping is wholly free."""
    rng = random.Random(seed)
    mappings: list[tuple[weakref.ref, int, int]] = []  # (mapping, address, size)

    def make(nbytes):
        buf = Buf(nbytes)
        mappings.append((weakref.ref(buf), torch.frombuffer(buf, dtype=torch.uint8).data_ptr(), nbytes))
        return buf

    cache = MappingCache(make)
    held: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    peak_seen = 0
    for step in range(150):
        r = rng.random()
        if r < 0.5 or not held:
            n = rng.choice([MiB, 2 * MiB, 3 * MiB + 17, 6 * MiB, 7 * MiB, 13 * MiB + 5, 32 * MiB])
            held[step] = (cache.take(n), None)
            held[step] = (held[step][0], stamp(held[step][0], seed * 1000 + step))
        elif r < 0.95:
            del held[rng.choice(list(held))]
        else:
            cache.trim()
            peak_seen = 0
        s = cache.stats()
        peak_seen = max(peak_seen, s.live_bytes)
        assert s.live_bytes == sum(align_up(b.numel()) for b, _ in held.values())
        assert s.peak_bytes == peak_seen
        alive = [(addr, size) for ref, addr, size in mappings if ref() is not None]
        assert s.live_bytes + s.free_bytes == sum(size for _, size in alive)
        if s.live_bytes + s.free_bytes > s.peak_bytes:
            for addr, size in alive:
                assert any(addr <= b.data_ptr() < addr + size for b, _ in held.values())
        assert all(torch.equal(ends(b), want) for b, want in held.values())
        spans = sorted((b.data_ptr(), b.data_ptr() + b.numel()) for b, _ in held.values())
        assert all(hi <= lo for (_, hi), (lo, _) in zip(spans, spans[1:]))  # no two live buffers overlap
    assert cache.stats().reused > 0


def test_trim_gives_free_memory_back_and_drops_the_owners_buffers_as_they_return():
    make = Maker()
    cache = MappingCache(make)
    mine = [cache.take(8 * MiB, owner="a") for _ in range(2)]
    theirs = cache.take(8 * MiB, owner="b")
    spare = cache.take(4 * MiB, owner="b")
    del spare
    assert cache.stats().free_bytes == 4 * MiB
    cache.trim(owner="a")
    s = cache.stats()
    assert (s.live_bytes, s.free_bytes, s.peak_bytes) == (24 * MiB, 0, 24 * MiB)
    del mine
    s = cache.stats()  # a's buffers are not kept: the OS gets them, and the peak follows
    assert (s.live_bytes, s.free_bytes, s.peak_bytes) == (8 * MiB, 0, 8 * MiB)
    del theirs
    s = cache.stats()  # b's are kept for reuse
    assert (s.live_bytes, s.free_bytes, s.peak_bytes) == (0, 8 * MiB, 8 * MiB)


def test_a_failed_mapping_leaves_the_books_as_they_were():
    make = Maker(fail_at=1)
    cache = MappingCache(make)
    a = cache.take(4 * MiB, owner="x")
    before = cache.stats()
    with pytest.raises(MemoryError, match="no"):
        cache.take(10 * MiB, owner="x")
    assert cache.stats() == before
    del a
    assert cache.stats().live_bytes == 0


def test_a_buffer_freed_in_another_thread_is_reused():
    make = Maker()
    cache = MappingCache(make)
    box = [cache.take(6 * MiB)]
    ptr = box[0].data_ptr()

    def drop():
        box.clear()

    t = threading.Thread(target=drop)
    t.start()
    t.join()
    assert cache.take(6 * MiB).data_ptr() == ptr


def test_the_cpu_backend_serves_large_device_buffers_from_the_process_cache_and_frees_them_at_close():
    from tidal.backends.cpu import DEVICE_MEMORY, HUGE_PAGE_MIN_BYTES, CpuBackend

    be = CpuBackend()
    try:
        small = be.empty(HUGE_PAGE_MIN_BYTES - 1)
        before = DEVICE_MEMORY.stats()
        big = be.empty(HUGE_PAGE_MIN_BYTES + 5)
        src = fill(big, 7)
        ptr = big.data_ptr()
        after = DEVICE_MEMORY.stats()
        assert after.live_bytes - before.live_bytes == align_up(HUGE_PAGE_MIN_BYTES + 5)
        del big
        again = be.empty(HUGE_PAGE_MIN_BYTES + 5)
        assert again.data_ptr() == ptr and torch.equal(again, src)  # the same pages, as an earlier owner left them
        assert DEVICE_MEMORY.stats().reused == after.reused + 1
        del small
    finally:
        be.close()
    del again
    s = DEVICE_MEMORY.stats()
    assert s.live_bytes == before.live_bytes and s.free_bytes == 0


def test_the_cache_can_be_turned_off_for_comparison(monkeypatch, caplog):
    import logging

    from tidal.backends.cpu import DEVICE_CACHE_ENV, DEVICE_MEMORY, HUGE_PAGE_MIN_BYTES, CpuBackend

    monkeypatch.setenv(DEVICE_CACHE_ENV, "0")
    with caplog.at_level(logging.INFO, logger="tidal"):
        be = CpuBackend()
    assert f"{DEVICE_CACHE_ENV}=0" in caplog.text  # the slow path says so
    try:
        before = DEVICE_MEMORY.stats()
        buf = be.empty(HUGE_PAGE_MIN_BYTES * 2)
        src = fill(buf, 3)
        assert torch.equal(buf, src) and DEVICE_MEMORY.stats() == before
    finally:
        be.close()
