"""Paged KV cache: block bookkeeping (`BlockAllocator`, pure Python), device/host pools with asynchronous,
batched swap (`PagedKVCache`), and the batch metadata the paged kernels take. Design: docs/KVCACHE.md.

The names are imported on first use (PEP 562 `__getattr__`), so that `tidal.kv.allocator` imports without
torch (the pools and the metadata need it; the bookkeeping does not)."""
from __future__ import annotations

import importlib

# public name -> the submodule that defines it
_EXPORTS = {"BlockAllocator": ".allocator", "Detached": ".allocator", "PagedKVCache": ".cache",
            "KVCacheConfig": ".config", "SwapHandle": ".swap", "SwapPlan": ".swap",
            "PAD_BLOCK_ID": ".tables", "BatchMetadata": ".tables"}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tidal.kv' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
