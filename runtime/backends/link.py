"""Link emulation for the CPU backend: make the copy queue behave like a host<->device link of a set bandwidth.

On the CPU backend "device" and "host" share one DRAM, so a streamed layer costs about as much to copy as to
compute and offloading looks nearly free. With a `LinkEmulation`, every piece of work on the copy queue (the
link: weight streaming, KV swap, preemption and resume copies) takes at least `nbytes / bandwidth`; the
waiting happens on the copy thread, so compute overlaps it as it overlaps a GPU's copy engine.
"""
from __future__ import annotations

import dataclasses

from ..errors import ConfigError


@dataclasses.dataclass(frozen=True)
class LinkEmulation:
    """An emulated host<->device link of `gbps` (1e9 bytes per second) in each direction. `label` says what
    it stands for (e.g. "as an H100 on PCIe Gen4"); every figure and JSON document made with it carries it."""

    gbps: float
    label: str = ""

    def __post_init__(self):
        g = self.gbps
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not g > 0 or g != g or g == float("inf"):
            raise ConfigError(f"link gbps={g!r} must be a finite number > 0")
        object.__setattr__(self, "gbps", float(g))
        if not isinstance(self.label, str):
            raise ConfigError(f"link label={self.label!r} must be a string")

    def seconds(self, nbytes: int) -> float:
        """The least time `nbytes` take over this link."""
        return nbytes / (self.gbps * 1e9)

    def describe(self) -> dict:
        return {"emulated": True, "gbps": self.gbps, "label": self.label or f"{self.gbps:g} GB/s link"}

    def __str__(self) -> str:
        return self.label or f"emulated {self.gbps:g} GB/s link"
