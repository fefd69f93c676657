"""Residency plans: which decoder layers stay on the device and which are streamed. Pure Python, no torch.

Streamed layers are spread evenly among resident ones by default. A streamed layer's copy overlaps with the
compute of the layers before it; if the streamed layers were bunched together (say the last half of the
model), each copy could only hide behind another streamed layer's compute, which is short next to the copy,
so the ring would drain and compute would stall on every layer of the bunch. Interleaved, every streamed
layer has about (resident / streamed) resident layers of compute in front of it to hide behind.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

from .errors import ConfigError


def spread_streamed(num_layers: int, num_streamed: int) -> list[int]:
    """Indices of `num_streamed` layers spread evenly over `num_layers` (each at the middle of its share)."""
    return [int((j + 0.5) * num_layers / num_streamed) for j in range(num_streamed)]


@dataclasses.dataclass(frozen=True)
class ResidencyPlan:
    """`resident[i]` says whether decoder layer i lives on the device; the rest are streamed."""

    resident: tuple[bool, ...]

    def __post_init__(self):
        if not self.resident:
            raise ConfigError("a residency plan needs at least one layer")

    @property
    def num_layers(self) -> int:
        return len(self.resident)

    @property
    def resident_layers(self) -> tuple[int, ...]:
        return tuple(i for i, r in enumerate(self.resident) if r)

    @property
    def streamed_layers(self) -> tuple[int, ...]:
        return tuple(i for i, r in enumerate(self.resident) if not r)

    @property
    def resident_fraction(self) -> float:
        return len(self.resident_layers) / self.num_layers

    def next_streamed(self, layer: int, count: int) -> list[int]:
        """The `count` streamed layers that run after `layer`, wrapping into the next forward pass."""
        streamed = self.streamed_layers
        if not streamed or count <= 0:
            return []
        after = [i for i in streamed if i > layer] + [i for i in streamed if i <= layer]
        return [i for i in after if i != layer][:count]

    @classmethod
    def from_fraction(cls, num_layers: int, fraction: float) -> "ResidencyPlan":
        _check_num_layers(num_layers)
        if not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
            raise ConfigError(f"resident_fraction={fraction!r} must be a number in [0, 1]")
        num_streamed = num_layers - round(fraction * num_layers)
        streamed = set(spread_streamed(num_layers, num_streamed)) if num_streamed else set()
        return cls(tuple(i not in streamed for i in range(num_layers)))

    @classmethod
    def from_layers(cls, num_layers: int, resident_layers: Iterable[int]) -> "ResidencyPlan":
        _check_num_layers(num_layers)
        layers = list(resident_layers)
        for i in layers:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < num_layers:
                raise ConfigError(f"resident_layers: {i!r} is not a layer index in [0, {num_layers})")
        if len(set(layers)) != len(layers):
            raise ConfigError(f"resident_layers: {sorted(layers)} repeats an index")
        chosen = set(layers)
        return cls(tuple(i in chosen for i in range(num_layers)))

    @classmethod
    def from_budget(cls, layer_bytes: Sequence[int], budget_bytes: int, fixed_bytes: int = 0,
                    ring_slots: int = 1) -> "ResidencyPlan":
        """The plan with the most resident layers whose device bytes fit `budget_bytes`.

        Device bytes = `fixed_bytes` (embeddings, norms, head) + resident layers + the streaming ring
        (`ring_slots` slots of the largest streamed layer, when any layer is streamed).
        """
        n = len(layer_bytes)
        _check_num_layers(n)
        if not isinstance(budget_bytes, int) or budget_bytes < 0:
            raise ConfigError(f"device_budget_bytes={budget_bytes!r} must be a non-negative int")
        for num_streamed in range(n + 1):
            plan = cls.from_fraction(n, (n - num_streamed) / n)
            if plan.device_bytes(layer_bytes, fixed_bytes, ring_slots) <= budget_bytes:
                return plan
        need = cls.from_fraction(n, 0.0).device_bytes(layer_bytes, fixed_bytes, ring_slots)
        raise ConfigError(f"device_budget_bytes={budget_bytes} is below the {need} bytes needed with every "
                          f"layer streamed ({fixed_bytes} fixed + {ring_slots} ring slots)")

    def device_bytes(self, layer_bytes: Sequence[int], fixed_bytes: int = 0, ring_slots: int = 1) -> int:
        if len(layer_bytes) != self.num_layers:
            raise ConfigError(f"layer_bytes has {len(layer_bytes)} entries for {self.num_layers} layers")
        resident = sum(layer_bytes[i] for i in self.resident_layers)
        streamed = [layer_bytes[i] for i in self.streamed_layers]
        ring = min(ring_slots, len(streamed)) * max(streamed, default=0)
        return fixed_bytes + resident + ring

    def __str__(self) -> str:
        marks = "".join("R" if r else "s" for r in self.resident)
        return f"ResidencyPlan({len(self.resident_layers)}/{self.num_layers} resident: {marks})"


def _check_num_layers(n: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"num_layers={n!r}: the model has no decoder layers")
