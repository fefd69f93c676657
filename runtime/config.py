"""Validated, frozen configuration objects."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .backends.link import LinkEmulation, coerce as _coerce_link
from .errors import ConfigError
from .plan import ResidencyPlan


@dataclasses.dataclass(frozen=True)
class OffloadConfig:
    """How `tidal.offload` places a model: which layers stay resident, how far ahead to stream, where.

    Give at most one of `resident_layers` and `device_budget_bytes`; either overrides `resident_fraction`,
    which must then stay at its default of 1.0. `link`: an emulated host<->device link for the CPU backend
    (a `tidal.backends.LinkEmulation`, or a bandwidth in GB/s).
    """

    resident_fraction: float = 1.0
    resident_layers: Optional[tuple[int, ...]] = None
    prefetch_depth: int = 2
    device: Optional[str] = None
    device_budget_bytes: Optional[int] = None
    record_timeline: bool = False
    link: Optional[LinkEmulation] = None

    def __post_init__(self):
        f = self.resident_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f <= 1.0:
            raise ConfigError(f"resident_fraction={f!r} must be a number in [0, 1]")
        d = self.prefetch_depth
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise ConfigError(f"prefetch_depth={d!r} must be an int >= 0")
        if self.resident_layers is not None:
            try:
                object.__setattr__(self, "resident_layers", tuple(self.resident_layers))
            except TypeError:
                raise ConfigError(f"resident_layers={self.resident_layers!r} must be a list of layer indices")
        given = [n for n in ("resident_layers", "device_budget_bytes") if getattr(self, n) is not None]
        if len(given) > 1 or (given and f != 1.0):
            raise ConfigError(f"give one of resident_fraction, resident_layers, device_budget_bytes; got "
                              f"{', '.join(given + (['resident_fraction'] if f != 1.0 else []))}")
        b = self.device_budget_bytes
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 0):
            raise ConfigError(f"device_budget_bytes={b!r} must be an int >= 0")
        if isinstance(self.device, torch.device):
            object.__setattr__(self, "device", str(self.device))
        object.__setattr__(self, "link", _coerce_link(self.link))
        if self.link is not None and str(self.device or "").startswith("cuda"):
            raise ConfigError(f"link ({self.link}) emulates a link on the CPU backend; device={self.device!r} "
                              f"has a real one")

    def plan(self, layer_bytes: list[int], fixed_bytes: int = 0) -> ResidencyPlan:
        """The residency plan this configuration asks for, over layers of `layer_bytes` device bytes each;
        `fixed_bytes` (embeddings, norms, head) counts against `device_budget_bytes`."""
        n = len(layer_bytes)
        if self.resident_layers is not None:
            return ResidencyPlan.from_layers(n, self.resident_layers)
        if self.device_budget_bytes is not None:
            return ResidencyPlan.from_budget(layer_bytes, self.device_budget_bytes, fixed_bytes,
                                             ring_slots=self.prefetch_depth + 1)
        return ResidencyPlan.from_fraction(n, self.resident_fraction)
