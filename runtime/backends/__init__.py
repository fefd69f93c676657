"""Device backends behind one interface: `cuda` (streams, events, pinned memory) and `cpu` (a copy thread)."""
from __future__ import annotations

import torch

from ..errors import ConfigError
from .base import Backend, Event, Stall, Transfer
from .cpu import CpuBackend

__all__ = ["Backend", "Event", "Stall", "Transfer", "CpuBackend", "make_backend", "resolve_device"]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`None` picks CUDA when available, else the CPU. Raises ConfigError for anything else unusable."""
    if device is None:
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device={device!r} is not a device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={str(device)!r} but CUDA is not available here")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device={str(device)!r} but only {torch.cuda.device_count()} CUDA devices exist")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device={str(device)!r}: tidal supports 'cpu' and 'cuda'")
    return device


def make_backend(device: str | torch.device | None = None) -> Backend:
    device = resolve_device(device)
    if device.type == "cuda":
        from .cuda import CudaBackend

        return CudaBackend(device)
    return CpuBackend(device)
