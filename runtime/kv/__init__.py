"""Paged KV cache: block bookkeeping (`BlockAllocator`, pure Python), device/host pools with asynchronous,
batched swap (`PagedKVCache`), and the batch metadata the paged kernels take. Design: docs/KVCACHE.md.

The names are imported on first use (PEP 562 `__getattr__`), so that `tidal.kv.allocator` imports without
torch (the pools and the metadata need it; the bookkeeping does not)."""
from __future__ import annotations

from ..lazy import exports

# public name -> the submodule that defines it
_EXPORTS = {"BlockAllocator": ".allocator", "Detached": ".allocator", "PagedKVCache": ".cache",
            "KVCacheConfig": ".config", "SwapHandle": ".swap", "SwapPlan": ".swap",
            "PAD_BLOCK_ID": ".tables", "BatchMetadata": ".tables"}

__all__ = list(_EXPORTS)

__getattr__, __dir__ = exports(__name__, _EXPORTS)
