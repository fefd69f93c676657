"""PagedKVCache: layout, batch metadata, swap semantics, bad input and fault injection."""
import copy

import pytest
import torch

import tidal
from tidal.errors import ConfigError, KVCacheError, OutOfBlocks, TransferError
from tidal.kv import PAD_BLOCK_ID, PagedKVCache
from test_kv_support import ScriptedBackend, read_seq, write_tokens

pytestmark = pytest.mark.usefixtures("ordering")  # each test also runs under the ordering check

L, H, D, BS = 3, 2, 8, 4


def make(device="cpu", dev_blocks=8, host_blocks=8, **kw):
    return PagedKVCache(L, H, D, BS, dev_blocks, host_blocks, torch.float32, device, **kw)


def fill(cache, seq, n):
    blocks = cache.allocate(seq, n)
    data = torch.randn(L, 2, n, H, D)
    write_tokens(cache, blocks, 0, data)
    return data


def state(cache):
    pools = [copy.deepcopy((p._free, p._ref, p._tables, p._tokens, p._held))
             for p in (cache.device_pool, cache.host_pool)]
    return pools, cache.kv.clone(), cache.host_kv.clone()


def same(a, b):
    # bytes, not values: unwritten pool memory may hold NaN patterns, and NaN != NaN
    return a[0] == b[0] and all(torch.equal(x.view(torch.uint8), y.view(torch.uint8)) for x, y in zip(a[1:], b[1:]))


def test_public_export_and_layout(device):
    cache = tidal.PagedKVCache(L, H, D, BS, 8, 4, torch.float32, device)
    k, v = cache.layer(2)
    assert k.shape == v.shape == (8, BS, H, D) and k.is_contiguous() and v.is_contiguous()
    assert cache.host_kv.shape == (4, L, 2, BS, H, D)
    cache.close()


def test_byte_budgets(device):
    block = 2 * L * BS * H * D * 4
    cache = PagedKVCache(L, H, D, BS, dtype=torch.float32, device=device, device_bytes=5 * block + 7,
                         host_bytes=3 * block)
    assert (cache.config.num_device_blocks, cache.config.num_host_blocks) == (5, 3)
    with pytest.raises(ConfigError, match="exactly one of num_device_blocks and device_bytes"):
        PagedKVCache(L, H, D, BS, 4, 4, torch.float32, "cpu", device_bytes=block)
    for bad in [dict(num_layers=0), dict(block_size=-1), dict(dtype=torch.int32), dict(staging_blocks=0)]:
        args = dict(num_layers=L, num_kv_heads=H, head_dim=D, block_size=BS, num_device_blocks=4,
                    num_host_blocks=4, dtype=torch.float32, device="cpu") | bad
        with pytest.raises(ConfigError):
            PagedKVCache(**args)


def test_batch_metadata_matches_block_tables(device):
    cache = make(device, dev_blocks=16)
    cache.allocate("a", 9)  # blocks 0, 1, 2
    cache.allocate("b", 2)  # block 3
    cache.fork("a", "c")
    cache.append("c", 2)  # copy-on-write of block 2 into 4, then 11 tokens
    m = cache.batch(["a", "b", "c"], [1, 2, 3])
    assert m.block_tables.dtype == m.seq_lens.dtype == m.slot_mapping.dtype == torch.int32
    assert m.block_tables.device.type == torch.device(device).type
    pad = PAD_BLOCK_ID
    assert m.block_tables.tolist() == [[0, 1, 2], [3, pad, pad], [0, 1, 4]]
    assert m.seq_lens.tolist() == [9, 2, 11]
    # a: token 8 -> block 2 offset 0; b: tokens 0, 1 -> block 3; c: tokens 8, 9, 10 -> block 4
    assert m.slot_mapping.tolist() == [8, 12, 13, 16, 17, 18]
    assert cache.block_table("c").tolist() == [0, 1, 4]
    assert cache.slot_mapping("a", 3, 6).tolist() == [3, 4, 5]
    with pytest.raises(ConfigError, match="num_new"):
        cache.batch(["a"], [10])
    with pytest.raises(ConfigError, match="positions"):
        cache.slot_mapping("a", 5, 10)
    cache.close()


def test_copy_on_write_keeps_both_contents(device):
    cache = make(device)
    data = fill(cache, "p", 6)
    cache.fork("p", "c")
    cache.append("c", 1)
    extra = torch.randn(L, 2, 1, H, D)
    write_tokens(cache, cache.block_ids("c"), 6, extra)
    assert torch.equal(read_seq(cache, cache.block_ids("p"), 6, "device").cpu(), data)
    assert torch.equal(read_seq(cache, cache.block_ids("c"), 7, "device").cpu(), torch.cat([data, extra], 2))
    cache.close()


@pytest.mark.parametrize("staged", [False, True], ids=["direct", "staged"])
def test_swap_round_trip_preserves_bytes_and_sharing(device, staged):
    # the unstaged path gathers straight into host memory, which only the CPU backend can do
    cache = make(device if staged else "cpu", dev_blocks=12, host_blocks=12, staged=staged, staging_blocks=2)
    a, b = fill(cache, "a", 10), fill(cache, "b", 5)
    cache.fork("a", "a2")  # shares a's 3 blocks
    h = cache.swap_out(["a", "a2", "b"])
    h.wait()
    assert h.num_blocks == 5 and h.bytes == 5 * cache.config.block_bytes  # shared blocks moved once
    assert h.copy_calls == (3 if staged else 1)  # one host run, in chunks of 2 blocks when staged
    assert h.seconds() > 0 and cache.device_pool.num_free == 12
    assert cache.block_ids("a") == cache.block_ids("a2")  # still shared, on the host
    assert [cache.where(s) for s in ("a", "a2", "b")] == ["host"] * 3
    h = cache.swap_in(["a2", "b"])
    cache.wait_for(h)
    h.wait()
    assert cache.where("a2") == "device" and cache.where("a") == "host"
    for seq, data in (("a", a), ("a2", a), ("b", b)):
        got = read_seq(cache, cache.block_ids(seq), cache.num_tokens(seq), cache.where(seq))
        assert torch.equal(got.cpu(), data), seq
    cache.check()
    cache.close()


def test_device_blocks_return_only_after_the_copy_is_done():
    be = ScriptedBackend(gated=True)
    cache = make(dev_blocks=4, backend=be)
    data = fill(cache, "a", 16)
    h = cache.swap_out(["a"])
    assert not h.done() and cache.where("a") == "host"
    assert cache.device_pool.num_free == 0  # the copy still reads them
    with pytest.raises(OutOfBlocks):
        cache.allocate("b", 1)
    with pytest.raises(KVCacheError, match="in flight"):
        cache.swap_in(["a"])
    be.open_all()
    h.wait()
    assert h.done() and cache.device_pool.num_free == 4
    assert torch.equal(read_seq(cache, cache.block_ids("a"), 16, "host"), data)
    cache.close()


def test_swap_without_room_raises_and_changes_nothing(device):
    cache = make(device, dev_blocks=4, host_blocks=3)
    fill(cache, "a", 16)
    before = state(cache)
    with pytest.raises(OutOfBlocks) as e:
        cache.swap_out(["a"])
    assert (e.value.needed, e.value.free, e.value.where) == (4, 3, "host")
    assert same(state(cache), before)
    cache.free("a")
    fill(cache, "b", 12)
    cache.swap_out(["b"]).wait()
    fill(cache, "c", 8)  # device now has 2 free, b needs 3
    before = state(cache)
    with pytest.raises(OutOfBlocks) as e:
        cache.swap_in(["b"])
    assert (e.value.needed, e.value.free, e.value.where) == (3, 2, "device")
    assert same(state(cache), before)
    cache.close()


@pytest.mark.parametrize("call, exc, match", [
    (lambda c: c.free("nope"), KVCacheError, "unknown"),
    (lambda c: c.append("h", 1), KVCacheError, "swapped out"),
    (lambda c: c.batch(["h"]), KVCacheError, "swapped out"),
    (lambda c: c.swap_in(["d"]), KVCacheError, "in the device pool already"),
    (lambda c: c.swap_out(["h"]), KVCacheError, "in the host pool already"),
    (lambda c: c.swap_out(["d", "d"]), KVCacheError, "repeated"),
    (lambda c: c.swap_out(["d", "nope"]), KVCacheError, "unknown"),
    (lambda c: c.allocate("h", 1), KVCacheError, "already exists"),
    (lambda c: c.fork("d", "h"), KVCacheError, "already exists"),
    (lambda c: c.where("nope"), KVCacheError, "unknown"),
    (lambda c: c.append("d", -1), ConfigError, "num_tokens"),
])
def test_bad_input_raises_and_changes_nothing(call, exc, match):
    cache = make()
    fill(cache, "d", 5)
    fill(cache, "h", 6)
    cache.swap_out(["h"]).wait()
    cache.free("d")
    with pytest.raises(KVCacheError, match="unknown"):  # double free
        cache.free("d")
    fill(cache, "d", 5)
    before = state(cache)
    with pytest.raises(exc, match=match):
        call(cache)
    assert same(state(cache), before)
    cache.close()


@pytest.mark.parametrize("staged", [False, True], ids=["direct", "staged"])
@pytest.mark.parametrize("fate", ["fail_before", "fail_partway", "fail_after", "raise_on_submit"])
@pytest.mark.parametrize("direction", ["out", "in"])
def test_a_failed_swap_leaves_the_sequence_where_it_was(staged, fate, direction):
    """A backend fault during the copy: the sequence stays wholly on its source side, readable and
    unchanged, with every block of both pools accounted for."""
    be = ScriptedBackend()
    cache = make(dev_blocks=10, host_blocks=10, staged=staged, staging_blocks=2, backend=be)
    other = fill(cache, "other", 7)
    data = fill(cache, "s", 13)
    cache.fork("s", "s2")
    if direction == "in":
        cache.swap_out(["s", "s2"]).wait()
    source = cache.where("s")
    before = state(cache)
    be.next_fate = fate
    with pytest.raises(TransferError, match="simulated"):
        getattr(cache, f"swap_{direction}")(["s"]).wait()
    assert cache.where("s") == source and not cache.pending()
    assert state(cache)[0] == before[0]  # bookkeeping exactly as before, nothing leaked
    cache.check()
    assert torch.equal(read_seq(cache, cache.block_ids("s"), 13, source), data)
    assert torch.equal(read_seq(cache, cache.block_ids("other"), 7, "device"), other)
    # and the cache still works: the same swap now succeeds
    getattr(cache, f"swap_{direction}")(["s"]).wait()
    dest = "host" if direction == "out" else "device"
    assert cache.where("s") == dest
    assert torch.equal(read_seq(cache, cache.block_ids("s"), 13, dest), data)
    cache.close()


def test_failed_swap_out_survives_free_of_a_sharing_sequence():
    """While a swap-out of `s` is in flight, the fork sharing its blocks is freed; the swap then fails: `s`
    comes back on the device with its blocks intact (they were held, not freed)."""
    be = ScriptedBackend(gated=True)
    cache = make(dev_blocks=6, host_blocks=6, backend=be)
    data = fill(cache, "s", 10)
    cache.fork("s", "t")
    be.next_fate = "fail_after"
    h = cache.swap_out(["s"])
    cache.free("t")
    fill(cache, "u", 12)  # takes the 3 free blocks; must not get any of s's
    with pytest.raises(OutOfBlocks):
        cache.allocate("v", 1)
    be.open_all()
    with pytest.raises(TransferError):
        h.wait()
    assert cache.where("s") == "device"
    assert torch.equal(read_seq(cache, cache.block_ids("s"), 10, "device"), data)
    cache.check()
    cache.close()
