"""BlockAllocator: exact block ids, reference counts, copy-on-write, errors with no state change."""
import copy
import sys

import pytest

import tidal
from tidal.errors import ConfigError, KVCacheError, OutOfBlocks
from tidal.kv import BlockAllocator


def state(a: BlockAllocator):
    return copy.deepcopy((a._free, a._ref, a._tables, a._tokens, a._held))


def test_public_export():
    a = tidal.BlockAllocator(4, 2)
    assert a.allocate("s", 3) == [0, 1] and a.num_free == 2


def test_allocate_append_free_exact_ids():
    a = BlockAllocator(6, 4)
    assert a.allocate("a", 5) == [0, 1]
    assert a.allocate("b", 4) == [2]
    assert a.append("a", 3) is None and a.block_table("a") == [0, 1]  # fills block 1 (tokens 5..7)
    assert a.append("a", 1) is None and a.block_table("a") == [0, 1, 3]
    assert a.num_tokens("a") == 9 and a.num_free == 2
    assert a.free("a") == [3, 1, 0]
    assert a.allocate("c", 12) == [0, 1, 3]  # freed in reverse, so handed back in ascending order
    assert a.allocate("e", 0) == [] and a.num_free == 2
    a.check()


def test_fork_shares_blocks_and_copies_the_partial_block_on_write():
    a = BlockAllocator(8, 4)
    a.allocate("p", 6)  # blocks 0 (full), 1 (2 of 4 tokens)
    a.fork("p", "c")
    assert a.block_table("c") == [0, 1] and a.refcount(0) == 2 and a.refcount(1) == 2
    assert a.append("c", 1) == (1, 2)  # the child copies shared block 1 into 2 before writing
    assert a.block_table("c") == [0, 2] and a.block_table("p") == [0, 1]
    assert (a.refcount(1), a.refcount(2)) == (1, 1)
    assert a.append("p", 1) is None  # parent now owns block 1 alone: no copy
    a.fork("p", "d")
    assert a.append("p", 5) == (1, 3) and a.block_table("p") == [0, 3, 4]
    assert a.free("d") == [1]  # 0 is still shared with p and c
    assert a.refcount(0) == 2
    a.check()


def test_fork_of_full_blocks_needs_no_copy():
    a = BlockAllocator(4, 4)
    a.allocate("p", 8)
    a.fork("p", "c")
    assert a.append("c", 1) is None and a.block_table("c") == [0, 1, 2]
    a.check()


def test_out_of_blocks_changes_nothing():
    a = BlockAllocator(4, 4)
    a.allocate("a", 6)
    a.fork("a", "b")
    before = state(a)
    with pytest.raises(OutOfBlocks) as e:
        a.allocate("c", 13)
    assert (e.value.needed, e.value.free, e.value.where) == (4, 2, "device")
    a.allocate("x", 8)  # now 0 free
    before = state(a)
    with pytest.raises(OutOfBlocks) as e:
        a.append("b", 1)  # needs the copy-on-write block
    assert (e.value.needed, e.value.free) == (1, 0)
    assert state(a) == before
    a.check()


@pytest.mark.parametrize("call, exc, match", [
    (lambda a: a.free("nope"), KVCacheError, "not in the device pool"),
    (lambda a: a.append("nope", 1), KVCacheError, "not in the device pool"),
    (lambda a: a.fork("nope", "z"), KVCacheError, "not in the device pool"),
    (lambda a: a.fork("a", "a"), KVCacheError, "already exists"),
    (lambda a: a.allocate("a", 1), KVCacheError, "already exists"),
    (lambda a: a.allocate("z", -1), ConfigError, "num_tokens"),
    (lambda a: a.allocate("z", 1.5), ConfigError, "num_tokens"),
    (lambda a: a.append("a", -2), ConfigError, "num_tokens"),
    (lambda a: a.block_table("nope"), KVCacheError, "not in the device pool"),
])
def test_bad_input_raises_and_changes_nothing(call, exc, match):
    a = BlockAllocator(4, 4)
    a.allocate("a", 5)
    before = state(a)
    with pytest.raises(exc, match=match):
        call(a)
    assert state(a) == before


def test_double_free():
    a = BlockAllocator(4, 4)
    a.allocate("a", 5)
    a.free("a")
    before = state(a)
    with pytest.raises(KVCacheError, match="already freed"):
        a.free("a")
    assert state(a) == before


def test_bad_config():
    for args in [(-1, 4), (4, 0), (4, True)]:
        with pytest.raises(ConfigError):
            BlockAllocator(*args)


def test_detach_holds_blocks_until_release_and_reattach_restores():
    a = BlockAllocator(4, 4)
    a.allocate("a", 6)
    a.fork("a", "b")
    d = a.detach("a")
    a.free("b")  # b's references go; a's held ones keep both blocks allocated
    assert a.num_free == 2 and a.refcount(0) == 1
    a.check()
    a.reattach("a", d)
    assert a.block_table("a") == [0, 1] and a.num_tokens("a") == 6
    d = a.detach("a")
    assert sorted(a.release(d)) == [0, 1] and a.num_free == 4
    a.check()


def test_allocate_mapped_keeps_sharing_and_is_atomic():
    a = BlockAllocator(4, 4)
    new = a.allocate_mapped({"x": ([0, 1], 5), "y": ([0, 2], 8)}, 3)
    assert new == [0, 1, 2] and a.refcount(0) == 2
    before = state(a)
    with pytest.raises(OutOfBlocks):
        a.allocate_mapped({"z": ([0, 1], 8)}, 2)
    with pytest.raises(KVCacheError, match="already exists"):
        a.allocate_mapped({"x": ([0], 1)}, 1)
    assert state(a) == before
    a.check()


def test_check_detects_corruption():
    a = BlockAllocator(4, 4)
    a.allocate("a", 5)
    a._ref[0] = 2
    with pytest.raises(KVCacheError, match="refcounts"):
        a.check()
    a._ref[0] = 1
    a._free.append(0)
    with pytest.raises(KVCacheError):
        a.check()


def work(fn) -> list[tuple]:
    """Every Python line (function, line number) and every builtin call that `fn()` runs, in order: a count of
    work that no load on the machine can change, unlike a time."""
    events = []

    def lines(frame, event, arg):
        if event == "line":
            events.append((frame.f_code.co_name, frame.f_lineno))
        return lines

    def builtins(frame, event, arg):
        if event == "c_call":
            events.append(("c_call", arg.__qualname__))

    sys.settrace(lines)
    sys.setprofile(builtins)
    try:
        fn()
    finally:
        sys.setprofile(None)
        sys.settrace(None)
    return events


def test_allocate_and_free_do_the_same_work_in_any_pool_size():
    """Allocating and freeing one block runs the same lines and builtin calls in a half-full pool of 1k
    blocks as in one of 200k, so their cost does not grow with the pool. (Work inside one builtin, such as
    a list scan, is not seen; the allocator's module doc says why there is none.)"""
    def alloc_free(n_blocks):
        a = BlockAllocator(n_blocks, 16)
        for i in range(n_blocks // 2):  # a half-full pool with many sequences
            a.allocate(("bg", i), 16)

        def ops():
            for i in range(3):
                a.allocate(i, 16)
                a.free(i)
        return work(ops)

    small = alloc_free(1000)
    assert any(e[0] == "_pop" for e in small) and ("c_call", "list.pop") in small  # the allocator is seen
    assert small == alloc_free(200_000)
    # the control: a scan of the pool (check()) runs more lines in a larger pool
    assert len(work(BlockAllocator(10, 16).check)) < len(work(BlockAllocator(20, 16).check))
