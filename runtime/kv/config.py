"""`KVCacheConfig`: the validated, frozen shape of a paged KV cache, and the byte sizes that follow from it."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from ..errors import ConfigError

INT32_MAX = 2**31 - 1
DEFAULT_STAGING_BYTES = 512 << 20  # device staging for one swap chunk (CUDA); see docs/KVCACHE.md
UNSTAGED_OFF_CPU = ("staged=False on {device}: the direct path gathers device blocks straight into host memory, "
                    "which only the CPU backend can do; leave staged=None (or True) there")


def _positive(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}={value!r} must be an int >= {minimum}")


@dataclasses.dataclass(frozen=True)
class KVCacheConfig:
    """Shape of a paged KV cache. Block counts may instead come from byte budgets (`device_bytes`,
    `host_bytes`): the most whole blocks that fit, where one block holds K and V of `block_size` tokens in
    every layer (`block_bytes`).

    `staging_blocks` sizes the device staging buffer a CUDA swap gathers into (default: what fits in
    512 MiB, at most the device pool); a swap larger than that runs in staging-sized chunks. `staged`
    forces (True) or forbids (False) the staging path; None picks it when device memory is not host memory.
Forbidding it is for the CPU backend only (ConfigError elsewhere).
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    num_device_blocks: Optional[int] = None
    num_host_blocks: Optional[int] = None
    dtype: torch.dtype = torch.bfloat16
    device: Optional[str] = None
    device_bytes: Optional[int] = None
    host_bytes: Optional[int] = None
    staging_blocks: Optional[int] = None
    staged: Optional[bool] = None

    def __post_init__(self):
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            _positive(name, getattr(self, name))
        if not isinstance(self.dtype, torch.dtype) or not (self.dtype.is_floating_point or self.dtype.itemsize == 1):
            raise ConfigError(f"dtype={self.dtype!r} must be a floating-point or 1-byte (fp8/int8) torch dtype")
        for side in ("device", "host"):
            blocks, budget = f"num_{side}_blocks", f"{side}_bytes"
            if (getattr(self, blocks) is None) == (getattr(self, budget) is None):
                raise ConfigError(f"give exactly one of {blocks} and {budget}")
            if getattr(self, budget) is not None:
                _positive(budget, getattr(self, budget), 0)
                object.__setattr__(self, blocks, getattr(self, budget) // self.block_bytes)
            _positive(blocks, getattr(self, blocks), 0)
        if self.num_device_blocks * self.block_size > INT32_MAX:
            raise ConfigError(f"num_device_blocks={self.num_device_blocks} x block_size={self.block_size} "
                              f"slots exceed int32 slot ids")
        if self.staging_blocks is not None:
            _positive("staging_blocks", self.staging_blocks)
        else:
            fit = max(1, DEFAULT_STAGING_BYTES // self.block_bytes)
            object.__setattr__(self, "staging_blocks", max(1, min(fit, self.num_device_blocks)))
        if self.staged is not None and not isinstance(self.staged, bool):
            raise ConfigError(f"staged={self.staged!r} must be True, False or None")
        if isinstance(self.device, torch.device):
            object.__setattr__(self, "device", str(self.device))
        if self.staged is False and self.device is not None and not str(self.device).startswith("cpu"):
            raise ConfigError(UNSTAGED_OFF_CPU.format(device=self.device))

    @property
    def block_shape(self) -> tuple[int, int, int]:
        """One block of one layer's K (or V): [block_size, num_kv_heads, head_dim]."""
        return (self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def block_bytes(self) -> int:
        """Bytes of one block across all layers, K and V."""
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)
