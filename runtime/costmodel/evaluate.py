"""How well a cost model predicts: the relative errors of held-out samples (`Evaluation`) and the split that
holds them out without leaving the fit undetermined (`holdout_split`)."""
from __future__ import annotations

import dataclasses
import math
import random
import statistics
from typing import Any, Iterable, Sequence

from ..errors import ConfigError
from .lstsq import independent
from .samples import DecodeSample, TransferSample


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Signed relative errors (predicted - measured) / measured of decode and transfer samples, in the order
    they were given; the statistics are over their absolute values."""

    decode_errors: tuple[float, ...]
    transfer_errors: tuple[float, ...]

    def __post_init__(self):
        for name in ("decode_errors", "transfer_errors"):
            errs = tuple(getattr(self, name))
            if not all(isinstance(e, (int, float)) and math.isfinite(e) for e in errs):
                raise ConfigError(f"{name} must be finite numbers")
            object.__setattr__(self, name, errs)

    @property
    def errors(self) -> tuple[float, ...]:
        return self.decode_errors + self.transfer_errors

    @property
    def n(self) -> int:
        return len(self.errors)

    @property
    def median_relative_error(self) -> float:
        """Median of |predicted - measured| / measured over every sample."""
        return _summary(self.errors)["median_relative_error"]

    @property
    def max_relative_error(self) -> float:
        """Largest |predicted - measured| / measured over every sample."""
        return _summary(self.errors)["max_relative_error"]

    def to_dict(self) -> dict:
        """The statistics over every sample, then per group (None for an empty group), then the errors."""
        return {**_summary(self.errors),
                "decode": _summary(self.decode_errors) if self.decode_errors else None,
                "transfers": _summary(self.transfer_errors) if self.transfer_errors else None,
                "decode_errors": list(self.decode_errors), "transfer_errors": list(self.transfer_errors)}


def _summary(errors: Sequence[float]) -> dict:
    if not errors:
        raise ConfigError("no relative errors to summarise: the evaluation has no samples")
    sizes = [abs(e) for e in errors]
    return {"n": len(sizes), "median_relative_error": float(statistics.median(sizes)),
            "max_relative_error": float(max(sizes))}


# -- held-out split ------------------------------------------------------------------------------------------
def _stratum(sample) -> tuple[str, Any]:
    if isinstance(sample, DecodeSample):
        return ("decode", sample.streamed_layers == 0)
    if isinstance(sample, TransferSample):
        return ("transfer", sample.kind)
    raise ConfigError(f"holdout_split: {sample!r} is neither a DecodeSample nor a TransferSample")


def _design(sample) -> tuple[float, ...] | None:
    # The columns the fit of the sample's stratum needs identified; None: only a count matters.
    if isinstance(sample, DecodeSample):
        return (1.0, sample.batch, sample.batch * sample.context) if sample.streamed_layers == 0 else None
    if sample.kind == "kv_recompute":
        return (sample.tokens, 1.0, sample.tokens ** 2)
    return (sample.nbytes, 1.0)


def _rank(rows: Sequence[tuple[float, ...]]) -> int:
    return len(independent([[r[j] for r in rows] for j in range(len(rows[0]))])) if rows else 0


def holdout_split(samples: Iterable, fraction: float = 0.25, seed: int = 0) -> tuple[tuple, tuple]:
    """(fit, held_out): about `fraction` of each stratum (all-resident decode, streamed decode, each transfer
    kind) held out at random (`seed`), never a sample whose removal would leave its stratum's fit less
    identified than with every sample (all-resident: the T0 terms; transfers: latency and bandwidth, or the
    recompute terms; streamed decode: at least two samples kept). Deterministic; both parts keep the input
    order."""
    samples = list(samples)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise ConfigError(f"fraction={fraction!r} must be a number in [0, 1)")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed={seed!r} must be an int")
    strata: dict[tuple, list[int]] = {}
    for i, s in enumerate(samples):
        strata.setdefault(_stratum(s), []).append(i)
    rng = random.Random(seed)
    held: set[int] = set()
    for key in sorted(strata, key=repr):  # a fixed order, so the draws do not depend on the input's order
        members = strata[key]
        want = round(fraction * len(members))
        order = list(members)
        rng.shuffle(order)
        design = {i: _design(samples[i]) for i in members}
        needs_rank = all(d is not None for d in design.values())
        full_rank = _rank([design[i] for i in members]) if needs_rank else 0
        kept = set(members)
        for i in order:
            if len(kept) == len(members) - want:
                break
            rest = kept - {i}
            if needs_rank:
                if _rank([design[j] for j in sorted(rest)]) < full_rank:
                    continue
            elif len(rest) < 2:
                continue
            kept = rest
            held.add(i)
    fit = tuple(s for i, s in enumerate(samples) if i not in held)
    out = tuple(s for i, s in enumerate(samples) if i in held)
    return fit, out
