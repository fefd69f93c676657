"""Paged KV cache: block bookkeeping (`BlockAllocator`, pure Python), device/host pools with asynchronous,
batched swap (`PagedKVCache`), and the batch metadata the paged kernels take. Design: docs/KVCACHE.md."""
from .allocator import BlockAllocator, Detached
from .cache import PagedKVCache
from .config import KVCacheConfig
from .swap import SwapHandle, SwapPlan
from .tables import PAD_BLOCK_ID, BatchMetadata

__all__ = ["BlockAllocator", "Detached", "PagedKVCache", "KVCacheConfig", "SwapHandle", "SwapPlan",
           "PAD_BLOCK_ID", "BatchMetadata"]
