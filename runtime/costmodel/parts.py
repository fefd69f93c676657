"""The fitted parts of a cost model: the decode step (`StepFit`), one transfer kind's line (`LinkFit`) and the
recompute polynomial (`RecomputeFit`); each predicts its own seconds."""
from __future__ import annotations

import dataclasses

from ..errors import ConfigError
from .checks import check_int, check_optional, check_seconds, from_dict
from .samples import LINK_KINDS


@dataclasses.dataclass(frozen=True)
class StepFit:
    """The decode-step model of one model (`num_layers` layers of `layer_bytes`): T0 = a0 + a1*B + a2*B*C
    (None: not identified; counts as 0), step = max(T0, S*layer_bytes/stream_bandwidth) + S*stream_overhead
    with S streamed layers. `stream_*` are None without streamed samples; a0 is None without all-resident
    ones (then nothing is predicted)."""

    num_layers: int
    layer_bytes: int
    a0: float | None
    a1: float | None
    a2: float | None
    stream_bandwidth: float | None
    stream_overhead: float | None
    samples: int

    def __post_init__(self):
        check_int("num_layers", self.num_layers, 1)
        check_int("layer_bytes", self.layer_bytes, 1)
        for name in ("a0", "a1", "a2", "stream_overhead"):
            object.__setattr__(self, name, check_optional(name, getattr(self, name)))
        object.__setattr__(self, "stream_bandwidth",
                           check_optional("stream_bandwidth", self.stream_bandwidth, positive=True))
        check_int("samples", self.samples, 0)

    def t0(self, batch: int, context: int) -> float:
        if self.a0 is None:
            raise ConfigError("decode step: no all-resident decode sample was measured, so T0 (the step with "
                              "every layer resident) and everything built on it is unknown")
        return self.a0 + (self.a1 or 0.0) * batch + (self.a2 or 0.0) * batch * context

    def seconds(self, resident_layers: int, batch: int, context: int) -> float:
        check_int("resident_layers", resident_layers, 0)
        if resident_layers > self.num_layers:
            raise ConfigError(f"resident_layers={resident_layers} exceeds the model's {self.num_layers} "
                              "layers")
        check_int("batch", batch, 1)
        check_int("context", context, 0)
        t0 = self.t0(batch, context)
        s = self.num_layers - resident_layers
        if s and (self.stream_bandwidth is None or self.stream_overhead is None):
            raise ConfigError(f"decode step with {s} streamed layers: no decode sample with streamed layers "
                              "was measured, so the streaming bandwidth and overhead are unknown")
        return self._streamed(t0, s)

    def seconds_all(self, batch: int, context: int) -> list[float | None]:
        """`seconds` at every residency, 0 to num_layers resident layers, from one validation (None where it
        would raise: streamed layers without a streaming fit)."""
        check_int("batch", batch, 1)
        check_int("context", context, 0)
        t0, streams = self.t0(batch, context), self.stream_bandwidth is not None and self.stream_overhead is not None
        return [self._streamed(t0, s) if streams or not s else None for s in range(self.num_layers, -1, -1)]

    def streamed(self, t0: float, s: int) -> float:
        """A pass over the model whose all-resident seconds are `t0`, with `s` streamed layers (the class
        docstring's formula; s = 0: t0)."""
        check_int("streamed layers", s, 0)
        if s > self.num_layers:
            raise ConfigError(f"{s} streamed layers exceed the model's {self.num_layers} layers")
        if s and (self.stream_bandwidth is None or self.stream_overhead is None):
            raise ConfigError(f"a pass with {s} streamed layers: no decode sample with streamed layers was "
                              "measured, so the streaming bandwidth and overhead are unknown")
        return self._streamed(t0, s)

    def _streamed(self, t0: float, s: int) -> float:
        """The step with `s` streamed layers (the class docstring's formula; s = 0: T0)."""
        return t0 if s == 0 else max(t0, s * self.layer_bytes / self.stream_bandwidth) + s * self.stream_overhead

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "StepFit":
        return from_dict(cls, d)


@dataclasses.dataclass(frozen=True)
class LinkFit:
    """seconds = latency + nbytes / bandwidth for one transfer kind. `bandwidth` is None when only empty
    transfers were measured."""

    kind: str
    latency: float
    bandwidth: float | None
    samples: int

    def __post_init__(self):
        if self.kind not in LINK_KINDS:
            raise ConfigError(f"kind={self.kind!r} must be one of {LINK_KINDS}")
        object.__setattr__(self, "latency", check_seconds("latency", self.latency, positive=False))
        object.__setattr__(self, "bandwidth", check_optional("bandwidth", self.bandwidth, positive=True))
        check_int("samples", self.samples, 1)

    def seconds(self, nbytes: int) -> float:
        check_int("nbytes", nbytes, 0)
        if nbytes and self.bandwidth is None:
            raise ConfigError(f"{self.kind}: only empty transfers were measured; the bandwidth is unknown")
        return self.latency + (nbytes / self.bandwidth if nbytes else 0.0)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LinkFit":
        return from_dict(cls, d)


@dataclasses.dataclass(frozen=True)
class RecomputeFit:
    """seconds = r0 + r1*tokens + r2*tokens^2 for the prefill of dropped KV (None: not identified; counts
    as 0)."""

    r0: float | None
    r1: float | None
    r2: float | None
    samples: int

    def __post_init__(self):
        for name in ("r0", "r1", "r2"):
            object.__setattr__(self, name, check_optional(name, getattr(self, name)))
        check_int("samples", self.samples, 1)

    def seconds(self, tokens: int) -> float:
        check_int("tokens", tokens, 0)
        return (self.r0 or 0.0) + (self.r1 or 0.0) * tokens + (self.r2 or 0.0) * tokens * tokens

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RecomputeFit":
        return from_dict(cls, d)
