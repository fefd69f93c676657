"""Online correction of the cost policy's predictions from what the loop measures (`OnlineCorrection`).
Torch-free.

A profile is measured once, on a quiet machine, one model at a time; the live loop runs several models on a
machine whose speed drifts (shared cores, a link other copies use, a batch that is not the profile's). The cost
policy therefore scales each prediction by a factor it learns from the loop: per model and kind of action, an
exponentially weighted mean of log(measured / predicted), so that one outlier moves it by a bounded step and a
lasting drift is followed within a few observations. Kinds: a decode step with every layer resident, one
with streamed layers (a different regime: the link, not the compute, may bound it), a preemption and a resume
per weights tier. A step that also prefilled new requests is not a sample (its prediction is a decode
step's); a resume is measured without the first step it ran for requests that were only queued.
Residency changes are not corrected: the loop's apply time of a promotion is not its copy, which lands later.
"""
from __future__ import annotations

import math

from ..errors import ConfigError


def _number(name: str, value, lo: float, hi: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo < value <= hi:
        raise ConfigError(f"{name}={value!r} must be a number in ({lo}, {hi}]")
    return float(value)


class OnlineCorrection:
    """measured / predicted per (model, kind), learnt online. `alpha`: the weight of a new sample in the mean
    of the logs; `limit`: the factor stays within [1/limit, limit] (a prediction off by more than that is a
    wrong cost model, not drift, and the trace shows it)."""

    def __init__(self, alpha: float = 0.25, limit: float = 4.0):
        self.alpha = _number("alpha", alpha, 0.0, 1.0)
        self.limit = _number("limit", limit, 1.0)
        self._log: dict[tuple[str, str], float] = {}
        self._count: dict[tuple[str, str], int] = {}

    def observe(self, model: str, kind: str, predicted: float | None, measured: float) -> None:
        """One sample; ignored when either time is not positive (nothing predicted, nothing measured)."""
        if predicted is None or not predicted > 0 or not measured > 0:
            return
        key, x = (model, kind), math.log(measured / predicted)
        bound = math.log(self.limit)
        x = max(-bound, min(bound, x))
        old = self._log.get(key)
        self._log[key] = x if old is None else old + self.alpha * (x - old)
        self._count[key] = self._count.get(key, 0) + 1

    def factor(self, model: str, kind: str) -> float:
        """The factor to multiply `kind`'s predictions for `model` by (1 before any sample)."""
        return math.exp(self._log.get((model, kind), 0.0))

    def as_dict(self) -> dict:
        """{model: {kind: {"factor", "samples"}}}, for a report."""
        out: dict = {}
        for (model, kind), x in sorted(self._log.items()):
            out.setdefault(model, {})[kind] = {"factor": round(math.exp(x), 4), "samples": self._count[(model, kind)]}
        return out

    def __repr__(self) -> str:
        return f"OnlineCorrection(alpha={self.alpha}, limit={self.limit}, {len(self._log)} factors)"
