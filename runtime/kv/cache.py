"""`PagedKVCache`: device K/V pools in the kernels' layout, a pinned host pool, and asynchronous swap between them.

Device memory: one buffer `kv` of `[num_layers, 2, num_device_blocks, block_size, num_kv_heads, head_dim]`;
`layer(l)` returns the contiguous `[num_device_blocks, block_size, num_kv_heads, head_dim]` K and V views the
kernels take. Host memory: one pinned `HostArena` region of `[num_host_blocks, num_layers, 2, block_size,
num_kv_heads, head_dim]`, so that a run of consecutive host blocks is one contiguous span (swap.py).

Each sequence lives in exactly one pool, tracked by that pool's `BlockAllocator`. A swap detaches the
sequences from their source pool (references held, see allocator.py), installs them in the destination pool,
and enqueues the copy. Until the copy is settled (`poll()`, `handle.done()` or `handle.wait()`), the
sequences are locked: any operation on them raises KVCacheError naming the handle. Settling releases the
source blocks on success; on failure it frees the destination blocks and puts the sequences back, so the
source pool (whose blocks nobody could reuse meanwhile) holds them unchanged.
"""
from __future__ import annotations

import torch

from ..arena import HostArena
from ..backends import Backend, Stall, make_backend
from ..backends.ordering import unit_spans
from ..errors import ConfigError, KVCacheError, OrderingError, TransferError
from .allocator import BlockAllocator
from .config import UNSTAGED_OFF_CPU, KVCacheConfig
from .swap import DirectMover, StagedMover, SwapHandle, SwapPlan
from .tables import BatchMetadata, build, slots

DEVICE, HOST = "device", "host"


class PagedKVCache:
    """Paged KV cache with a device pool, a pinned host pool and batched asynchronous swap.

    Sizes: give `num_device_blocks`/`num_host_blocks`, or byte budgets `device_bytes`/`host_bytes` (one block
    = K and V of `block_size` tokens in all layers). `dtype` is the KV dtype (bf16/fp16 on GPU, fp32 on CPU
    typically). `device` is "cpu", "cuda[:n]" or None (CUDA when available). `backend` shares an existing
    backend (e.g. the one weight streaming uses) instead of making one. Raises ConfigError on bad sizes.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                 num_device_blocks: int | None = None, num_host_blocks: int | None = None,
                 dtype: torch.dtype = torch.bfloat16, device=None, *, device_bytes: int | None = None,
                 host_bytes: int | None = None, staging_blocks: int | None = None, staged: bool | None = None,
                 backend: Backend | None = None):
        cfg = KVCacheConfig(num_layers, num_kv_heads, head_dim, block_size, num_device_blocks, num_host_blocks,
                            dtype, device, device_bytes, host_bytes, staging_blocks, staged)
        self.config = cfg
        self.backend = backend if backend is not None else make_backend(cfg.device)
        if cfg.device is not None and torch.device(cfg.device).type != self.backend.device.type:
            raise ConfigError(f"device={cfg.device!r} differs from the backend's {self.backend.device}")
        self.device = self.backend.device
        if cfg.staged is False and self.device.type != "cpu":
            raise ConfigError(UNSTAGED_OFF_CPU.format(device=self.device))
        # the ordering check sees KV memory block by block, in two logical pools of this cache
        self._spaces = {DEVICE: ("KV device block", id(self)), HOST: ("KV host block", id(self))}
        self.device_pool = BlockAllocator(cfg.num_device_blocks, block_size, DEVICE)
        self.host_pool = BlockAllocator(cfg.num_host_blocks, block_size, HOST)
        self.arena = HostArena(self.backend, max(1, cfg.num_host_blocks * cfg.block_bytes), label="KV host pool")
        host = self.arena.alloc(cfg.num_host_blocks * cfg.block_bytes)
        self.host_kv = host.view(dtype).view(cfg.num_host_blocks, num_layers, 2, *cfg.block_shape)
        self.kv = self.mover = None
        self.restore_device()
        self._inflight: dict = {}  # seq_id -> SwapHandle
        self._handles: list[SwapHandle] = []

    # -- the device pool's memory ----------------------------------------------------------------------------
    @property
    def device_bytes(self) -> int:
        """Device memory the cache holds now: the pool and the swap staging buffer (0 once released)."""
        if self.kv is None:
            return 0
        staging = getattr(self.mover, "staging", None)
        return self.kv.numel() * self.kv.element_size() + (0 if staging is None else staging.numel() *
                                                            staging.element_size())

    def release_device(self) -> int:
        """Free the device pool's memory (a preempted model's); every sequence must be off the device and no
        swap in flight. Returns the bytes released. `restore_device` allocates it again."""
        self.synchronize()
        if self.device_pool.num_used:
            raise KVCacheError(f"release_device: {self.device_pool.num_used} device blocks still in use "
                               f"(sequences {self.device_pool.seq_ids()[:4]}...); swap them out or free them first")
        released = self.device_bytes
        self.kv = self.mover = None
        return released

    def restore_device(self) -> None:
        """Allocate the device pool (and staging buffer) again after `release_device`; a no-op if held."""
        if self.kv is not None:
            return
        cfg = self.config
        n_dev = cfg.num_device_blocks * cfg.block_bytes
        self.kv = self.backend.empty(n_dev, label="KV device pool").view(cfg.dtype).view(
            cfg.num_layers, 2, cfg.num_device_blocks, *cfg.block_shape)
        if self.backend.checker is not None:
            self.backend.fresh(self._blocks(DEVICE, range(cfg.num_device_blocks)), "allocate the KV device pool")
        staged = cfg.staged if cfg.staged is not None else self.device.type != "cpu"
        self.mover = (StagedMover(self.backend, self.kv, self.host_kv, cfg.staging_blocks) if staged
                      else DirectMover(self.backend, self.kv, self.host_kv))

    # -- views for the kernels -------------------------------------------------------------------------------
    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_cache, v_cache) of one layer, each `[num_device_blocks, block_size, num_kv_heads, head_dim]`."""
        return self.kv[index, 0], self.kv[index, 1]

    def block_ids(self, seq_id) -> list[int]:
        """The sequence's block ids in the pool it lives in (see `where`)."""
        return self._pool(seq_id).block_table(seq_id)

    def block_table(self, seq_id) -> torch.Tensor:
        """`[num_blocks]` int32 on the device: a resident sequence's block table (one upload; not the step
        path, which is `batch`)."""
        return self.batch([seq_id], [0]).block_tables[0]

    def num_tokens(self, seq_id) -> int:
        return self._pool(seq_id).num_tokens(seq_id)

    def where(self, seq_id) -> str:
        """"device" or "host": the pool the sequence is in (for a swap in flight, its destination)."""
        return self._pool(seq_id).where

    def batch(self, seq_ids, num_new=None) -> BatchMetadata:
        """Block tables, lengths and the slot mapping of each sequence's last `num_new[i]` tokens (default 1),
        as device tensors uploaded with one copy (tables.py). Sequences must be on the device, not in flight."""
        seq_ids = list(seq_ids)
        num_new = [1] * len(seq_ids) if num_new is None else list(num_new)
        if len(num_new) != len(seq_ids):
            raise ConfigError(f"num_new has {len(num_new)} entries for {len(seq_ids)} sequences")
        tables, lens = [], []
        for s, n in zip(seq_ids, num_new):
            self._resident(s)
            tables.append(self.device_pool.block_table(s))
            lens.append(self.device_pool.num_tokens(s))
            if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= lens[-1]:
                raise ConfigError(f"num_new={n!r} for sequence {s!r} of {lens[-1]} tokens")
        if self.backend.checker is not None:  # the step's kernels write the new tokens and read every block
            self.backend.compute_writes(self._blocks(DEVICE, {b for t in tables for b in t}),
                                        f"attention over sequences {seq_ids[:4]}")
        return build(tables, lens, num_new, self.config.block_size, self.device)

    def slot_mapping(self, seq_id, start: int, stop: int) -> torch.Tensor:
        """`[stop - start]` int64 on the device: slots of token positions [start, stop) of a resident sequence."""
        self._resident(seq_id)
        n = self.device_pool.num_tokens(seq_id)
        if not 0 <= start <= stop <= n:
            raise ConfigError(f"positions [{start}, {stop}) outside sequence {seq_id!r} of {n} tokens")
        table = self.device_pool.block_table(seq_id)
        if self.backend.checker is not None:
            self.backend.compute_writes(self._blocks(DEVICE, table), f"writing sequence {seq_id!r}'s KV")
        ids = slots(table, self.config.block_size, start, stop)
        return torch.from_numpy(ids).to(self.device)

    # -- sequence operations ---------------------------------------------------------------------------------
    def allocate(self, seq_id, num_tokens: int) -> list[int]:
        """Device blocks for a new sequence of `num_tokens` tokens; returns its block ids."""
        self.poll()
        self._device_held("allocate")
        if seq_id in self.host_pool:
            raise KVCacheError(f"sequence {seq_id!r} already exists in the host pool")
        return self.device_pool.allocate(seq_id, num_tokens)

    def append(self, seq_id, num_tokens: int = 1) -> None:
        """Room for `num_tokens` more tokens of a resident sequence. A shared partial last block is copied on
        write here, on the compute queue, before the caller writes the new tokens."""
        self.poll()
        self._resident(seq_id)
        cow = self.device_pool.append(seq_id, num_tokens)
        if cow is not None:
            src, dst = cow
            if self.backend.checker is not None:
                self.backend.compute_reads(self._blocks(DEVICE, [src]), "copy-on-write source")
                self.backend.compute_writes(self._blocks(DEVICE, [dst]), "copy-on-write destination")
            self.kv[:, :, dst].copy_(self.kv[:, :, src])

    def truncate(self, seq_id, num_tokens: int) -> None:
        """Shrink a resident sequence to its first `num_tokens` tokens (undoes an `append`)."""
        self.poll()
        self._resident(seq_id)
        self.device_pool.truncate(seq_id, num_tokens)

    def fork(self, parent, child) -> None:
        """`child` shares `parent`'s blocks, in whichever pool `parent` is."""
        self.poll()
        pool = self._pool(parent)
        self._unlocked(parent)
        other = self.host_pool if pool is self.device_pool else self.device_pool
        if child in other:
            raise KVCacheError(f"sequence {child!r} already exists in the {other.where} pool")
        pool.fork(parent, child)

    def free(self, seq_id) -> None:
        """Drop a sequence from whichever pool it is in (KVCacheError if unknown or freed before)."""
        self.poll()
        pool = self._pool(seq_id)
        self._unlocked(seq_id)
        pool.free(seq_id)

    # -- swap ------------------------------------------------------------------------------------------------
    def swap_out(self, seq_ids) -> SwapHandle:
        """Move these device sequences to the host pool; returns at once. The copy waits for the compute
        issued so far (which wrote the blocks). OutOfBlocks if the host pool is short: nothing changes."""
        return self._swap("out", seq_ids, self.device_pool, self.host_pool)

    def swap_in(self, seq_ids) -> SwapHandle:
        """Move these host sequences to the device pool; returns at once. Compute reading them must first
        `wait_for(handle)`. OutOfBlocks if the device pool is short: nothing changes."""
        self._device_held("swap_in")
        return self._swap("in", seq_ids, self.host_pool, self.device_pool)

    def wait_for(self, handle: SwapHandle) -> Stall:
        """Make compute issued from now on wait for the swap (no host block on CUDA)."""
        return self.backend.wait_for(handle.event)

    def poll(self) -> None:
        """Settle every finished swap without blocking: frees source blocks, or rolls a failed swap back."""
        for h in [h for h in self._handles if h.event.done()]:
            h.done()

    def pending(self) -> list[SwapHandle]:
        return list(self._handles)

    def _swap(self, direction, seq_ids, src: BlockAllocator, dst: BlockAllocator) -> SwapHandle:
        self.poll()
        seq_ids = tuple(seq_ids)
        if len(set(seq_ids)) != len(seq_ids):
            raise KVCacheError(f"swap_{direction}: repeated sequence ids in {list(seq_ids)}")
        for s in seq_ids:
            self._pool(s)
            self._unlocked(s)
            if s not in src:
                raise KVCacheError(f"swap_{direction}: sequence {s!r} is in the {dst.where} pool already")
        position: dict[int, int] = {}  # source block -> index among distinct blocks; keeps sharing
        tables = {}
        for s in seq_ids:
            table = src.block_table(s)
            tables[s] = ([position.setdefault(b, len(position)) for b in table], src.num_tokens(s))
        new = dst.allocate_mapped(tables, len(position))  # OutOfBlocks here changes nothing
        detached = {s: src.detach(s) for s in seq_ids}
        dev, host = (list(position), new) if direction == "out" else (new, list(position))
        plan = SwapPlan.build(dev, host)
        nbytes = len(position) * self.config.block_bytes
        try:
            fn, calls = getattr(self.mover, f"swap_{direction}")(plan)
            dev, host = self._blocks(DEVICE, plan.device_blocks), self._blocks(HOST, plan.host_blocks)
            event = self.backend.submit(fn, nbytes, after=self._after_compute(),
                                        reads=dev if direction == "out" else host,
                                        writes=host if direction == "out" else dev,
                                        op=f"swap_{direction} of sequences {list(seq_ids)[:4]}")
        except Exception as exc:
            # Part of the work may be enqueued already (CUDA): let it drain before the blocks are reused.
            self.backend.synchronize()
            self._rollback(seq_ids, detached, src, dst)
            if isinstance(exc, (TransferError, OrderingError)):
                raise
            raise TransferError(f"swap_{direction} of {list(seq_ids)} failed: {exc!r}") from exc
        handle = SwapHandle(direction, seq_ids, event, nbytes, len(position), calls, self._settle)
        handle.detached = detached
        handle.pools = (src, dst)
        self._handles.append(handle)
        for s in seq_ids:
            self._inflight[s] = handle
        return handle

    def _settle(self, handle: SwapHandle) -> None:
        src, dst = handle.pools
        for s in handle.seq_ids:
            del self._inflight[s]
        self._handles.remove(handle)
        if handle.error is None:
            for d in handle.detached.values():
                src.release(d)
        else:
            self._rollback(handle.seq_ids, handle.detached, src, dst)

    @staticmethod
    def _rollback(seq_ids, detached, src: BlockAllocator, dst: BlockAllocator) -> None:
        for s in seq_ids:
            dst.free(s)
            src.reattach(s, detached[s])

    def _after_compute(self) -> list:
        """What a swap waits for: all compute issued so far (it wrote the blocks swap-out reads, and read the
        blocks swap-in overwrites)."""
        return [self.backend.record()]

    def _blocks(self, where: str, blocks) -> list:
        if self.backend.checker is None:
            return []
        return unit_spans(self._spaces[where], blocks, self._spaces[where][0])

    # -- checks ----------------------------------------------------------------------------------------------
    def _pool(self, seq_id) -> BlockAllocator:
        if seq_id in self.device_pool:
            return self.device_pool
        if seq_id in self.host_pool:
            return self.host_pool
        raise KVCacheError(f"sequence {seq_id!r} is unknown (never allocated, or freed)")

    def _unlocked(self, seq_id) -> None:
        handle = self._inflight.get(seq_id)
        if handle is not None:
            raise KVCacheError(f"sequence {seq_id!r} has a swap in flight ({handle!r}); wait() it or poll()")

    def _device_held(self, op: str) -> None:
        if self.kv is None:
            raise KVCacheError(f"{op}: the device pool is released (release_device); restore_device() first")

    def _resident(self, seq_id) -> None:
        if self._pool(seq_id) is not self.device_pool:
            raise KVCacheError(f"sequence {seq_id!r} is swapped out to the host; swap_in() it first")
        self._unlocked(seq_id)

    def check(self) -> None:
        """Verify both allocators' invariants and that no sequence is in both pools."""
        self.device_pool.check()
        self.host_pool.check()
        both = set(self.device_pool.seq_ids()) & set(self.host_pool.seq_ids())
        if both:
            raise KVCacheError(f"sequences in both pools: {sorted(map(repr, both))}")

    def synchronize(self) -> None:
        """Wait for every swap and settle it (a failed one is rolled back; its error stays on its handle)."""
        for h in list(self._handles):
            h.settle()

    def close(self) -> None:
        """Finish outstanding swaps and release the host pool's pinned memory."""
        self.synchronize()
        if self.backend.checker is not None:
            self.backend.host_writes(self._blocks(HOST, range(self.config.num_host_blocks)),
                                     "release the KV host pool")
        self.arena.release()
