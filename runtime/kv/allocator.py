"""`BlockAllocator`: KV block bookkeeping in plain Python (ints and lists, no tensors).

A pool of `num_blocks` fixed-size blocks, each holding `block_size` tokens. Every sequence owns an ordered
block list (its block table) and a token count; block i of the list holds tokens
[i * block_size, (i + 1) * block_size). Blocks are reference counted so that `fork` can share them.

Invariants (`check()` verifies all of them):
  * refcount[b] == (occurrences of b in all block tables) + held[b], for every block b;
  * a block is on the free list exactly when its refcount is 0, and at most once;
  * len(free) + (blocks with refcount > 0) == num_blocks;
  * every table has exactly ceil(num_tokens / block_size) blocks.

"Held" references belong to a sequence detached for an in-flight swap (`detach`): its blocks stay allocated,
neither free nor in any table, until the swap either completes (`release`) or fails (`reattach`). That is
what keeps a failed swap's source intact, including blocks it shares with sequences that were freed while
the copy was in flight.

The free list is a stack: allocate and free are O(1) per block. `free` pushes a table's blocks in reverse,
so that freeing a sequence and allocating the same number of blocks again hands back the same ascending run
(the swap plan copies one contiguous run of host blocks with one call; see swap.py).
"""
from __future__ import annotations

import dataclasses
from typing import Hashable, Iterable

from ..errors import ConfigError, KVCacheError, OutOfBlocks


@dataclasses.dataclass(frozen=True)
class Detached:
    """A sequence's table taken out of the allocator, its references still held (see module doc)."""

    blocks: tuple[int, ...]
    num_tokens: int


def _count(name: str, value, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}={value!r} must be an int >= {minimum}")
    return value


class BlockAllocator:
    """Fixed pool of KV blocks with per-sequence block tables, reference counts and copy-on-write.

    `where` only names the pool in errors ("device" or "host"). Failing calls raise before changing anything:
    `OutOfBlocks` (with blocks needed and free) when the pool is short, `KVCacheError` for an unknown or
    duplicate sequence (a double free is a free of an unknown sequence), `ConfigError` for a bad count.
    """

    def __init__(self, num_blocks: int, block_size: int, where: str = "device"):
        self.num_blocks = _count("num_blocks", num_blocks)
        self.block_size = _count("block_size", block_size, 1)
        self.where = where
        self._ref = [0] * num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # stack: pops 0, 1, 2, ...
        self._tables: dict[Hashable, list[int]] = {}
        self._tokens: dict[Hashable, int] = {}
        self._held: dict[int, int] = {}

    # -- queries ---------------------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        """Blocks with a reference (in a table or held by an in-flight swap)."""
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def __contains__(self, seq_id) -> bool:
        return seq_id in self._tables

    def seq_ids(self) -> list:
        return list(self._tables)

    def block_table(self, seq_id) -> list[int]:
        return list(self._table(seq_id))

    def num_tokens(self, seq_id) -> int:
        self._table(seq_id)
        return self._tokens[seq_id]

    def refcount(self, block: int) -> int:
        return self._ref[block]

    def _table(self, seq_id) -> list[int]:
        table = self._tables.get(seq_id)
        if table is None:
            raise KVCacheError(f"sequence {seq_id!r} is not in the {self.where} pool (unknown, or already freed)")
        return table

    def _new(self, seq_id) -> None:
        if seq_id in self._tables:
            raise KVCacheError(f"sequence {seq_id!r} already exists in the {self.where} pool")

    def _ensure_free(self, needed: int) -> None:
        if needed > len(self._free):
            raise OutOfBlocks(needed, len(self._free), self.where)

    def _pop(self, n: int) -> list[int]:
        out = [self._free.pop() for _ in range(n)]
        for b in out:
            self._ref[b] = 1
        return out

    def _decref(self, blocks: Iterable[int]) -> list[int]:
        freed = []
        for b in reversed(list(blocks)):
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._free.append(b)
                freed.append(b)
        return freed

    # -- sequence operations ---------------------------------------------------------------------------------
    def allocate(self, seq_id, num_tokens: int) -> list[int]:
        """A new sequence holding `num_tokens` tokens; returns its block table."""
        _count("num_tokens", num_tokens)
        self._new(seq_id)
        n = self.blocks_for(num_tokens)
        self._ensure_free(n)
        self._tables[seq_id] = self._pop(n)
        self._tokens[seq_id] = num_tokens
        return list(self._tables[seq_id])

    def append(self, seq_id, num_tokens: int = 1) -> tuple[int, int] | None:
        """Grow a sequence by `num_tokens`. Returns (src, dst) when its last, partial block was shared and
        had to be copied on write: the caller copies block src's contents to dst before writing; else None."""
        _count("num_tokens", num_tokens)
        table = self._table(seq_id)
        old = self._tokens[seq_id]
        partial = old % self.block_size != 0
        cow = partial and self._ref[table[-1]] > 1
        extra = self.blocks_for(old + num_tokens) - len(table)
        if num_tokens == 0:
            return None
        self._ensure_free(extra + cow)
        result = None
        if cow:
            src = table[-1]
            (dst,) = self._pop(1)
            self._ref[src] -= 1  # still > 0: shared, so never freed here
            table[-1] = dst
            result = (src, dst)
        table.extend(self._pop(extra))
        self._tokens[seq_id] = old + num_tokens
        return result

    def truncate(self, seq_id, num_tokens: int) -> None:
        """Shrink a sequence to its first `num_tokens` tokens (>= 1), releasing the blocks past them: undoes
        an `append` whose tokens were never written (a failed step)."""
        table = self._table(seq_id)
        _count("num_tokens", num_tokens, 1)
        if num_tokens > self._tokens[seq_id]:
            raise KVCacheError(f"truncate({seq_id!r}, {num_tokens}): the sequence holds {self._tokens[seq_id]}")
        keep = self.blocks_for(num_tokens)
        self._decref(table[keep:])
        del table[keep:]
        self._tokens[seq_id] = num_tokens

    def fork(self, parent, child) -> None:
        """`child` shares all of `parent`'s blocks (reference counts +1); whichever of them next writes into
        the shared partial last block copies it first (see `append`)."""
        table = self._table(parent)
        self._new(child)
        for b in table:
            self._ref[b] += 1
        self._tables[child] = list(table)
        self._tokens[child] = self._tokens[parent]

    def free(self, seq_id) -> list[int]:
        """Drop a sequence; returns the blocks that became free (those no other sequence shares)."""
        table = self._table(seq_id)
        del self._tables[seq_id], self._tokens[seq_id]
        return self._decref(table)

    # -- swap support: move tables between pools without losing a block ------------------------------------
    def detach(self, seq_id) -> Detached:
        """Take a sequence out of its table, keeping its block references held until `release`/`reattach`."""
        table = self._table(seq_id)
        detached = Detached(tuple(table), self._tokens[seq_id])
        del self._tables[seq_id], self._tokens[seq_id]
        for b in table:
            self._held[b] = self._held.get(b, 0) + 1
        return detached

    def _unhold(self, blocks: Iterable[int]) -> None:
        for b in blocks:
            left = self._held[b] - 1
            if left:
                self._held[b] = left
            else:
                del self._held[b]

    def release(self, detached: Detached) -> list[int]:
        """Drop the held references of a detached sequence; returns the blocks that became free."""
        self._unhold(detached.blocks)
        return self._decref(detached.blocks)

    def reattach(self, seq_id, detached: Detached) -> None:
        """Put a detached sequence back, its held references becoming table references again."""
        self._new(seq_id)
        self._unhold(detached.blocks)
        self._tables[seq_id] = list(detached.blocks)
        self._tokens[seq_id] = detached.num_tokens

    def allocate_mapped(self, tables: dict, num_blocks: int) -> list[int]:
        """Allocate `num_blocks` fresh blocks and install `tables`: seq_id -> (indices into the new blocks,
        num_tokens). A block referenced by k tables gets refcount k, so sharing carries over. Returns the
        new block ids. Every index must be used at least once."""
        for seq_id, (local, tokens) in tables.items():
            self._new(seq_id)
            if len(local) != self.blocks_for(tokens) or any(not 0 <= i < num_blocks for i in local):
                raise KVCacheError(f"sequence {seq_id!r}: table {local} does not fit {tokens} tokens")
        self._ensure_free(num_blocks)
        blocks = [self._free.pop() for _ in range(num_blocks)]
        for seq_id, (local, tokens) in tables.items():
            table = [blocks[i] for i in local]
            for b in table:
                self._ref[b] += 1
            self._tables[seq_id], self._tokens[seq_id] = table, tokens
        if any(self._ref[b] == 0 for b in blocks):  # a caller bug: would leak a block
            raise KVCacheError("allocate_mapped: a new block is in no table")
        return blocks

    # -- invariants ------------------------------------------------------------------------------------------
    def check(self) -> None:
        """Raise KVCacheError when any invariant in the module doc is broken."""
        refs = [0] * self.num_blocks
        for seq_id, table in self._tables.items():
            if len(table) != self.blocks_for(self._tokens[seq_id]):
                raise KVCacheError(f"{self.where}: sequence {seq_id!r} has {len(table)} blocks for "
                                   f"{self._tokens[seq_id]} tokens")
            for b in table:
                refs[b] += 1
        for b, n in self._held.items():
            refs[b] += n
        if refs != self._ref:
            bad = [b for b in range(self.num_blocks) if refs[b] != self._ref[b]]
            raise KVCacheError(f"{self.where}: refcounts wrong for blocks {bad[:8]}")
        free = set(self._free)
        if len(free) != len(self._free):
            raise KVCacheError(f"{self.where}: a block is on the free list twice")
        if free != {b for b in range(self.num_blocks) if self._ref[b] == 0}:
            raise KVCacheError(f"{self.where}: free list differs from the blocks with refcount 0")
        if len(self._free) + sum(1 for r in self._ref if r > 0) != self.num_blocks:
            raise KVCacheError(f"{self.where}: free + used != total")
