"""Online correction of the cost policy's predictions from what the loop measures (`OnlineCorrection`).
Torch-free.

A profile is measured once, on a quiet machine, one model at a time; the live loop runs several models on a
machine whose speed drifts (shared cores, a link other copies use, a batch that is not the profile's). The cost
policy therefore scales each prediction by a factor it learns from the loop: per model and kind of action, the
median of log(measured / predicted) over the last few observations, so that one outlier moves it by at most
one rank and a lasting drift is followed within half a window. (An exponentially weighted mean with weight
0.25 did worse: live decode steps are heavy-tailed, a few up to 4x their prediction where the median is
1.0, and each such step moved the factor by up to 1.4x, flipping the co-resident models' residencies back and
forth; docs/SCHEDULING.md.) Kinds: a decode step with every layer resident, one
with streamed layers (a different regime: the link, not the compute, may bound it), a preemption and a resume
per weights tier. A step that also prefilled new requests is not a sample (its prediction is a decode
step's); a resume is measured without the first step it ran for requests that were only queued.
Residency changes are not corrected: the loop's apply time of a promotion is not its copy, which lands later.
"""
from __future__ import annotations

import collections
import math
import statistics

from ..errors import ConfigError


def _number(name: str, value, lo: float, hi: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo < value <= hi:
        raise ConfigError(f"{name}={value!r} must be a number in ({lo}, {hi}]")
    return float(value)


class OnlineCorrection:
    """measured / predicted per (model, kind), learnt online. `window`: the observations whose median log ratio
    is the factor; `limit`: the factor stays within [1/limit, limit] (a prediction off by more than that is a
    wrong cost model, not drift, and the trace shows it)."""

    def __init__(self, window: int = 9, limit: float = 4.0):
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ConfigError(f"window={window!r} must be an int >= 1")
        self.window = window
        self.limit = _number("limit", limit, 1.0)
        self._recent: dict[tuple[str, str], collections.deque] = {}
        self._log: dict[tuple[str, str], float] = {}  # the median of each key's recent logs
        self._count: dict[tuple[str, str], int] = {}

    def observe(self, model: str, kind: str, predicted: float | None, measured: float) -> None:
        """One sample; ignored when either time is not positive (nothing predicted, nothing measured)."""
        if predicted is None or not predicted > 0 or not measured > 0:
            return
        key, bound = (model, kind), math.log(self.limit)
        recent = self._recent.setdefault(key, collections.deque(maxlen=self.window))
        recent.append(max(-bound, min(bound, math.log(measured / predicted))))
        self._log[key] = statistics.median(recent)
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
        return f"OnlineCorrection(window={self.window}, limit={self.limit}, {len(self._log)} factors)"
