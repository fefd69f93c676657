"""Where an engine's bytes go: `EngineConfig` (the engine's own settings), `Footprint` (bytes per tier) and
`Placement`, computed from the checkpoint's headers alone, before anything is allocated."""
from __future__ import annotations

import dataclasses

import torch

from ..arena import align_up
from ..backends import resolve_device
from ..checkpoint import Checkpoint
from ..config import OffloadConfig
from ..errors import ConfigError
from ..model import KERNEL_CHOICES, ModelConfig
from ..modes import KV_MODES

CPU_KV_BYTES = 512 << 20  # default KV pool on the CPU backend
HOST_KV_CAP = 8 << 30  # default host (swap) pool: as large as the device pool, at most this
CUDA_KV_FRACTION = 0.85  # of the device memory free after the weights, by default
CUDA_HEADROOM = 1 << 30  # left for activations and the allocator when sizing the default KV pool


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """The engine's own settings (the model's come from its config.json, placement from OffloadConfig).
    `suspend`: what happens to a request's KV when the device pool is short: "swap" to the host pool, or
    "recompute" (freed; the request is prefilled again)."""

    block_size: int = 16
    kv_cache_bytes: int | None = None
    host_kv_bytes: int | None = None
    max_batch_size: int | None = None
    max_prefill_tokens: int = 4096
    suspend: str = "swap"
    kernels: str = "auto"
    keep_host_copy: bool = False

    def __post_init__(self):
        for name in ("block_size", "max_prefill_tokens"):
            check_int(name, getattr(self, name), 1)
        for name in ("kv_cache_bytes", "host_kv_bytes", "max_batch_size"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 1 if name == "max_batch_size" else 0)
        if self.suspend not in KV_MODES:
            raise ConfigError(f"suspend={self.suspend!r} must be one of {KV_MODES}")
        if self.kernels not in KERNEL_CHOICES:
            raise ConfigError(f"kernels={self.kernels!r} must be one of {KERNEL_CHOICES}")
        if not isinstance(self.keep_host_copy, bool):
            raise ConfigError(f"keep_host_copy={self.keep_host_copy!r} must be a bool")


def check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}={value!r} must be an int >= {minimum}")


@dataclasses.dataclass(frozen=True)
class Footprint:
    """Bytes a model holds on each tier: `device` (weights, streaming ring, KV pool), `host` (streamed and
    parked weights, KV host pool) and `disk` (weights that are only in the checkpoint files right now)."""

    device: int
    host: int
    disk: int


@dataclasses.dataclass(frozen=True)
class Placement:
    """`Engine.placement`: the validated settings, the residency plan, the KV cache's shape, and the bytes
    the engine will hold on each tier once loaded and active."""

    engine: EngineConfig
    offload: OffloadConfig
    device: torch.device
    checkpoint: Checkpoint
    model: ModelConfig
    dtype: torch.dtype
    plan: object
    kv: object  # KVCacheConfig
    footprint: Footprint


def place(path, cfg: EngineConfig, offload: OffloadConfig, dtype: torch.dtype | None) -> Placement:
    """The Placement of the checkpoint at `path` under these settings (reads headers only)."""
    from .. import weights as W
    from ..kv import KVCacheConfig

    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ConfigError(f"dtype={dtype!r} must be a floating-point torch dtype")
    target = resolve_device(offload.device)
    ckpt = Checkpoint(path)
    config = ModelConfig.from_hf(ckpt.config, str(ckpt.path / "config.json"))
    W.check(ckpt, config)
    dtype = dtype or ckpt.info("model.embed_tokens.weight").dtype
    plan = offload.plan([W.layer_bytes(config, dtype)] * config.num_layers, W.top_bytes(config, dtype))
    layout = W.empty(config, plan, dtype)
    streamed = len(plan.streamed_layers)
    weight_device = sum(layout.region_bytes(k) for k in layout.device_keys)
    ring = min(offload.prefetch_depth + 1, streamed) * layout.layer_bytes if streamed else 0
    device_kv = cfg.kv_cache_bytes if cfg.kv_cache_bytes is not None else \
        default_kv_bytes(target, weight_device + ring)
    host_kv = cfg.host_kv_bytes if cfg.host_kv_bytes is not None else min(device_kv, HOST_KV_CAP)
    kv = KVCacheConfig(config.num_layers, config.num_kv_heads, config.head_dim, cfg.block_size, dtype=dtype,
                       device=str(target), device_bytes=device_kv, host_bytes=host_kv)
    if kv.num_device_blocks < 1:
        raise ConfigError(f"kv_cache_bytes={device_kv} holds no KV block of {kv.block_bytes} bytes")
    staging = kv.staging_blocks * kv.block_bytes if target.type != "cpu" else 0
    footprint = Footprint(
        device=weight_device + ring + kv.num_device_blocks * kv.block_bytes + staging,
        host=(align_up(streamed * align_up(layout.layer_bytes)) if streamed else 0) +
        align_up(max(1, kv.num_host_blocks * kv.block_bytes)) +
        (W.host_copy_bytes(layout) if cfg.keep_host_copy else 0),
        disk=0)
    return Placement(cfg, offload, target, ckpt, config, dtype, plan, kv, footprint)


def default_kv_bytes(device: torch.device, weight_bytes: int) -> int:
    """Most of the device memory left once `weight_bytes` of weights are placed; 512 MiB on the CPU."""
    if device.type != "cuda":
        return CPU_KV_BYTES
    free, _ = torch.cuda.mem_get_info(device)
    return max(0, int((free - weight_bytes) * CUDA_KV_FRACTION) - CUDA_HEADROOM)
