"""What the cost model is fitted to: measured decode steps (`DecodeSample`) and transfers
(`TransferSample`)."""
from __future__ import annotations

import dataclasses

from ..errors import ConfigError
from .checks import check_int, check_seconds, from_dict

TRANSFER_KINDS = ("weights_host_out", "weights_host_in", "weights_disk_in", "kv_swap_out", "kv_swap_in",
                  "kv_recompute")
LINK_KINDS = TRANSFER_KINDS[:-1]  # the kinds that are copies: latency + bytes / bandwidth


@dataclasses.dataclass(frozen=True)
class DecodeSample:
    """One measured decode step (the median of several) of a model with `num_layers` decoder layers of
    `layer_bytes` bytes each, `resident_layers` of them resident, at batch `batch` and `context` tokens per
    sequence."""

    num_layers: int
    resident_layers: int
    layer_bytes: int
    batch: int
    context: int
    step_seconds: float

    def __post_init__(self):
        check_int("num_layers", self.num_layers, 1)
        check_int("resident_layers", self.resident_layers, 0)
        if self.resident_layers > self.num_layers:
            raise ConfigError(f"resident_layers={self.resident_layers} exceeds num_layers={self.num_layers}")
        check_int("layer_bytes", self.layer_bytes, 1)
        check_int("batch", self.batch, 1)
        check_int("context", self.context, 0)
        object.__setattr__(self, "step_seconds", check_seconds("step_seconds", self.step_seconds))

    @property
    def streamed_layers(self) -> int:
        return self.num_layers - self.resident_layers

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DecodeSample":
        return from_dict(cls, d)


@dataclasses.dataclass(frozen=True)
class TransferSample:
    """One measured transfer: `kind` (TRANSFER_KINDS) moved `nbytes` bytes in `seconds`. For "kv_recompute",
    `tokens` is the number of tokens prefilled again and `nbytes` may be 0; for the other kinds `tokens`
    must be 0."""

    kind: str
    nbytes: int
    seconds: float
    tokens: int = 0

    def __post_init__(self):
        if self.kind not in TRANSFER_KINDS:
            raise ConfigError(f"kind={self.kind!r} must be one of {TRANSFER_KINDS}")
        check_int("nbytes", self.nbytes, 0)
        object.__setattr__(self, "seconds", check_seconds("seconds", self.seconds))
        check_int("tokens", self.tokens, 0)
        if self.tokens and self.kind != "kv_recompute":
            raise ConfigError(f"tokens={self.tokens} given for kind={self.kind!r}; only kv_recompute counts "
                              "tokens")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TransferSample":
        return from_dict(cls, d)
