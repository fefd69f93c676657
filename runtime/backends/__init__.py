"""Device backends behind one interface: `cuda` (streams, events, pinned memory) and `cpu` (a copy thread)."""
from __future__ import annotations

import torch

from ..errors import ConfigError
from .base import Backend, Event, Stall, Transfer
from .cpu import CpuBackend
from .link import LinkEmulation
from .ordering import OrderingChecker, Span

__all__ = ["Backend", "Event", "Stall", "Transfer", "CpuBackend", "LinkEmulation", "OrderingChecker", "Span", "make_backend", "resolve_device"]


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


def make_backend(device: str | torch.device | None = None, link: LinkEmulation | None = None, *,
                 check_ordering: bool | None = None) -> Backend:
    """The backend for `device` (see `resolve_device`). `link` emulates a host<->device link on the CPU
    backend; a real device has its own, so asking for one there is a ConfigError. `check_ordering` turns the
    stream-ordering check on (backends/ordering.py); None follows TIDAL_CHECK_ORDERING."""
    device = resolve_device(device)
    if link is not None and not isinstance(link, LinkEmulation):
        raise ConfigError(f"link={link!r} must be a tidal.backends.LinkEmulation")
    if device.type == "cuda":
        if link is not None:
            raise ConfigError(f"link emulation ({link}) is for the CPU backend; {device} has a real link")
        from .cuda import CudaBackend

        return CudaBackend(device, check_ordering=check_ordering)
    return CpuBackend(device, link=link, check_ordering=check_ordering)
