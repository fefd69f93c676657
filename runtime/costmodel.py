"""A cost model of one model on one machine, fitted from measurements, for a scheduler to predict what a
decode step, a preemption and a resume will cost. Pure Python (stdlib only). Design note: docs/COSTMODEL.md.

Decode step. L decoder layers of W bytes each, R of them resident, S = L - R streamed, batch B, context C
tokens per sequence:

    T0(B, C) = a0 + a1*B + a2*B*C                       (every layer resident)
    step(R, B, C) = max(T0(B, C), S*W/bw) + S*o         (S > 0)

The streamed layers' copies (S*W bytes per forward at the streaming bandwidth bw) overlap the compute, so the
step takes whichever is longer; each streamed layer adds an overhead o (event waits, slot bookkeeping,
launches) that does not overlap. Where S*W/bw > T0 a step is link-bound, otherwise compute-bound.

Transfers, for each kind in TRANSFER_KINDS but "kv_recompute":  seconds = latency + nbytes / bandwidth.
Recomputation of dropped KV (a prefill):  seconds = r0 + r1*tokens + r2*tokens^2.

Preempt = weights ("host": weights_host_out; "disk", "keep": nothing copied) + KV ("swap": kv_swap_out).
Resume total = weights ("host": weights_host_in; "disk": weights_disk_in) + KV (kv_swap_in) + recompute. The
first token (an approximation: bookkeeping and contention are not modelled) comes at total + step without
pipelining, and with it at kv + first + max(step + recompute, weights - first), where first is the copy of the
region the first layer needs and step the decode step of the swapped-in batch.

Fitting. Every fit minimises the sum of squared *relative* residuals ((predicted - measured) / measured)^2:
measurements span orders of magnitude and their noise is roughly proportional to them. T0, the transfer lines
and the recompute polynomial are linear least squares with non-negative coefficients. A coefficient that the
samples cannot identify (its column is a linear combination of the others: one batch size, one context, one
transfer size, ...) is dropped and named in `fit_notes`. bw and o are fitted on the samples with S > 0, with
T0 taken from the all-resident fit: with v = W/bw (seconds to copy one layer) the objective is quadratic in
(v, o) between consecutive kinks v = T0_i/S_i, so its global minimum over v >= 0, o >= 0 is found exactly by
solving each piece. Since W is the same in every sample, a link-bound step S*(v + o) only identifies v + o,
and a compute-bound step T0 + S*o only o: o needs a compute-bound streamed sample and bw a link-bound one.
Without the former o is fixed at 0 (bw is then the effective per-layer rate); without the latter bw is set to
the lowest value that keeps every measured sample compute-bound (a pessimistic bound). Both are noted.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import random
import statistics
from typing import Any, Iterable, Sequence

from .errors import ConfigError

VERSION = 1
TRANSFER_KINDS = ("weights_host_out", "weights_host_in", "weights_disk_in", "kv_swap_out", "kv_swap_in",
                  "kv_recompute")
LINK_KINDS = TRANSFER_KINDS[:-1]
WEIGHT_MODES = ("host", "disk", "keep")  # as preemption.WEIGHT_MODES; not imported: that module needs torch
KV_MODES = ("swap", "drop")
_RANK_TOL = 1e-9  # a column whose part independent of the others is below this (relative) adds nothing
_KINK_TOL = 1e-9


# -- validation ----------------------------------------------------------------------------------------------
def _int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}={value!r} must be an int >= {minimum}")
    return value


def _seconds(name: str, value: Any, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
            value < 0 or (positive and value == 0):
        raise ConfigError(f"{name}={value!r} must be a finite number {'> 0' if positive else '>= 0'}")
    return float(value)


def _optional(name: str, value: Any, positive: bool = False) -> float | None:
    return None if value is None else _seconds(name, value, positive)


def _from_dict(cls, d: Any, convert=None):
    if not isinstance(d, dict):
        raise ConfigError(f"{cls.__name__}.from_dict: expected a dict, got {type(d).__name__}")
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields]
    missing = [f.name for f in fields if f.name not in d and f.default is dataclasses.MISSING]
    unknown = sorted(set(d) - set(names))
    if missing or unknown:
        raise ConfigError(f"{cls.__name__}.from_dict: missing keys {missing}, unknown keys {unknown}")
    kwargs = {k: d[k] for k in names if k in d}
    return cls(**(convert(kwargs) if convert else kwargs))


# -- samples -------------------------------------------------------------------------------------------------
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
        _int("num_layers", self.num_layers, 1)
        _int("resident_layers", self.resident_layers, 0)
        if self.resident_layers > self.num_layers:
            raise ConfigError(f"resident_layers={self.resident_layers} exceeds num_layers={self.num_layers}")
        _int("layer_bytes", self.layer_bytes, 1)
        _int("batch", self.batch, 1)
        _int("context", self.context, 0)
        object.__setattr__(self, "step_seconds", _seconds("step_seconds", self.step_seconds))

    @property
    def streamed_layers(self) -> int:
        return self.num_layers - self.resident_layers

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DecodeSample":
        return _from_dict(cls, d)


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
        _int("nbytes", self.nbytes, 0)
        object.__setattr__(self, "seconds", _seconds("seconds", self.seconds))
        _int("tokens", self.tokens, 0)
        if self.tokens and self.kind != "kv_recompute":
            raise ConfigError(f"tokens={self.tokens} given for kind={self.kind!r}; only kv_recompute counts "
                              "tokens")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TransferSample":
        return _from_dict(cls, d)


# -- least squares -------------------------------------------------------------------------------------------
def _dot(a: Sequence[float], b: Sequence[float]) -> float:
    return math.fsum(x * y for x, y in zip(a, b))


def _independent(cols: Sequence[Sequence[float]]) -> list[int]:
    # Indices of the columns kept when each, in order, is kept only if it is not (numerically) a linear
    # combination of those kept before it.
    basis: list[list[float]] = []
    kept = []
    for j, col in enumerate(cols):
        norm = math.sqrt(_dot(col, col))
        if norm == 0:
            continue
        q = [x / norm for x in col]
        for _ in range(2):  # twice: one pass of Gram-Schmidt loses orthogonality on near-dependent columns
            for b in basis:
                c = _dot(q, b)
                q = [x - c * y for x, y in zip(q, b)]
        rest = math.sqrt(_dot(q, q))
        if rest > _RANK_TOL:
            basis.append([x / rest for x in q])
            kept.append(j)
    return kept


def _solve(cols: Sequence[Sequence[float]], y: Sequence[float]) -> list[float]:
    # Least-squares coefficients of independent columns, by modified Gram-Schmidt QR.
    k = len(cols)
    q = [list(c) for c in cols]
    r = [[0.0] * k for _ in range(k)]
    z, rest = [0.0] * k, list(y)
    for j in range(k):
        for i in range(j):
            r[i][j] = _dot(q[i], q[j])
            q[j] = [a - r[i][j] * b for a, b in zip(q[j], q[i])]
        r[j][j] = math.sqrt(_dot(q[j], q[j]))
        q[j] = [a / r[j][j] for a in q[j]]
        z[j] = _dot(q[j], rest)
        rest = [a - z[j] * b for a, b in zip(rest, q[j])]
    coef = [0.0] * k
    for j in reversed(range(k)):
        coef[j] = (z[j] - math.fsum(r[j][i] * coef[i] for i in range(j + 1, k))) / r[j][j]
    return coef


def _fit_linear(label: str, terms: Sequence[tuple[str, str]], rows: Sequence[Sequence[float]],
                y: Sequence[float], detail: str, required: str | None = None
                ) -> tuple[dict[str, float | None], list[str]]:
    # Non-negative least squares of y ~ sum(c_j * x_j) on relative residuals. `terms` are (name, meaning) of
    # the columns, in the order they are kept when they are collinear. A term the rows cannot identify is None
    # in the result; one the non-negativity holds at 0 is 0.0. `required` is a term that must stay in the fit
    # (and so come out > 0) when it is identifiable.
    names = [n for n, _ in terms]
    cols = [[row[j] / yi for row, yi in zip(rows, y)] for j in range(len(terms))]
    ones = [1.0] * len(y)
    kept = _independent(cols)
    count = f"{len(y)} sample{'s' if len(y) != 1 else ''}"
    notes = [f"{label}: {name} ({meaning}) not identifiable from {count} ({detail}); dropped"
             for j, (name, meaning) in enumerate(terms) if j not in kept]
    must = {names.index(required)} & set(kept) if required else set()
    best, best_sse = None, math.inf
    for size in range(len(kept), -1, -1):  # larger subsets first, so that a tie keeps more terms
        for subset in itertools.combinations(kept, size):
            if not must <= set(subset):
                continue
            coef = _solve([cols[j] for j in subset], ones) if subset else []
            if any(c < 0 or (j in must and c == 0) for c, j in zip(coef, subset)):
                continue
            fit = [math.fsum(c * cols[j][i] for c, j in zip(coef, subset)) for i in range(len(y))]
            sse = math.fsum((1 - f) ** 2 for f in fit)
            if sse < best_sse * (1 - 1e-12):
                best, best_sse = dict(zip(subset, coef)), sse
    result: dict[str, float | None] = {n: None for n in names}
    for j in kept:
        result[names[j]] = best.get(j, 0.0) if best is not None else 0.0
        if best is not None and j not in best:
            notes.append(f"{label}: {names[j]} ({terms[j][1]}) fitted negative; held at 0")
    return result, notes


# -- fitted parts --------------------------------------------------------------------------------------------
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
        _int("num_layers", self.num_layers, 1)
        _int("layer_bytes", self.layer_bytes, 1)
        for name in ("a0", "a1", "a2", "stream_overhead"):
            object.__setattr__(self, name, _optional(name, getattr(self, name)))
        object.__setattr__(self, "stream_bandwidth",
                           _optional("stream_bandwidth", self.stream_bandwidth, positive=True))
        _int("samples", self.samples, 0)

    def t0(self, batch: int, context: int) -> float:
        if self.a0 is None:
            raise ConfigError("decode step: no all-resident decode sample was measured, so T0 (the step with "
                              "every layer resident) and everything built on it is unknown")
        return self.a0 + (self.a1 or 0.0) * batch + (self.a2 or 0.0) * batch * context

    def seconds(self, resident_layers: int, batch: int, context: int) -> float:
        _int("resident_layers", resident_layers, 0)
        if resident_layers > self.num_layers:
            raise ConfigError(f"resident_layers={resident_layers} exceeds the model's {self.num_layers} "
                              "layers")
        _int("batch", batch, 1)
        _int("context", context, 0)
        t0 = self.t0(batch, context)
        s = self.num_layers - resident_layers
        if s == 0:
            return t0
        if self.stream_bandwidth is None or self.stream_overhead is None:
            raise ConfigError(f"decode step with {s} streamed layers: no decode sample with streamed layers "
                              "was measured, so the streaming bandwidth and overhead are unknown")
        return max(t0, s * self.layer_bytes / self.stream_bandwidth) + s * self.stream_overhead

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "StepFit":
        return _from_dict(cls, d)


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
        object.__setattr__(self, "latency", _seconds("latency", self.latency, positive=False))
        object.__setattr__(self, "bandwidth", _optional("bandwidth", self.bandwidth, positive=True))
        _int("samples", self.samples, 1)

    def seconds(self, nbytes: int) -> float:
        _int("nbytes", nbytes, 0)
        if nbytes and self.bandwidth is None:
            raise ConfigError(f"{self.kind}: only empty transfers were measured; the bandwidth is unknown")
        return self.latency + (nbytes / self.bandwidth if nbytes else 0.0)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LinkFit":
        return _from_dict(cls, d)


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
            object.__setattr__(self, name, _optional(name, getattr(self, name)))
        _int("samples", self.samples, 1)

    def seconds(self, tokens: int) -> float:
        _int("tokens", tokens, 0)
        return (self.r0 or 0.0) + (self.r1 or 0.0) * tokens + (self.r2 or 0.0) * tokens * tokens

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RecomputeFit":
        return _from_dict(cls, d)


# -- fitting -------------------------------------------------------------------------------------------------
def _fit_step(samples: Sequence[DecodeSample]) -> tuple[StepFit, list[str]]:
    shapes = sorted({(s.num_layers, s.layer_bytes) for s in samples})
    if len(shapes) > 1:
        raise ConfigError(f"decode samples come from more than one model ((num_layers, layer_bytes) = "
                          f"{shapes}); a cost model is fitted per model and machine")
    (num_layers, layer_bytes), = shapes
    notes: list[str] = []
    full = [s for s in samples if s.streamed_layers == 0]
    streamed = [s for s in samples if s.streamed_layers > 0]
    coef: dict[str, float | None] = {"a0": None, "a1": None, "a2": None}
    if full:
        detail = f"batches {sorted({s.batch for s in full})}, contexts {sorted({s.context for s in full})}"
        terms = [("a0", "per step"), ("a1", "per sequence"), ("a2", "per context token")]
        coef, more = _fit_linear("T0", terms, [(1.0, s.batch, s.batch * s.context) for s in full],
                                 [s.step_seconds for s in full], detail)
        notes += more
    else:
        notes.append("T0: no all-resident decode samples; the decode step (and streaming, which is fitted "
                     "against it) is not modelled")
    fit = StepFit(num_layers, layer_bytes, coef["a0"], coef["a1"], coef["a2"], None, None, len(samples))
    if full and streamed:
        per_layer, overhead, more = _fit_stream(streamed, [fit.t0(s.batch, s.context) for s in streamed])
        bw = layer_bytes / per_layer if per_layer else None
        fit = dataclasses.replace(fit, stream_bandwidth=bw, stream_overhead=overhead)
        notes += more
    elif streamed:
        notes.append(f"stream: {len(streamed)} streamed samples ignored without T0")
    return fit, notes


def _fit_stream(samples: Sequence[DecodeSample], t0: Sequence[float]
                ) -> tuple[float | None, float, list[str]]:
    # (v = seconds to copy one layer, o, notes) minimising sum(((max(T0, S*v) + S*o - y) / y)^2).
    s = [float(x.streamed_layers) for x in samples]
    y = [x.step_seconds for x in samples]
    notes = []
    v, o = _stream_search(t0, s, y, free_overhead=True)
    link, compute = _regimes(t0, s, v)
    if not compute:
        v, o = _stream_search(t0, s, y, free_overhead=False)
        link, compute = _regimes(t0, s, v)
        notes.append("stream: every streamed sample is link-bound, so the per-layer overhead o cannot be "
                     "told from the copy time; o fixed at 0 and bw is the effective per-layer rate")
    elif o == 0.0:
        notes.append("stream: o (per streamed layer) fitted negative; held at 0")
    if not link:
        v = min(t / si for t, si in zip(t0, s))
        notes.append("stream: every streamed sample is compute-bound, so the streaming bandwidth is only "
                     "bounded below; bw set to that bound (pessimistic: the copy may be faster)")
    if len(set(zip(s, t0))) == 1:
        # both readings fit one configuration: S*(v + o) = y and T0 + S*o = y
        notes.append("stream: every streamed sample has the same streamed layers, batch and context, which "
                     "cannot tell a link-bound step from a compute-bound one; the fit took the "
                     f"{'link' if link else 'compute'}-bound reading")
    at_kink = len(s) - link - compute
    notes.append(f"stream: {link} link-bound and {compute} compute-bound samples"
                 + (f", {at_kink} at the kink" if at_kink else ""))
    return (v if v > 0 else None), o, notes


def _regimes(t0: Sequence[float], s: Sequence[float], v: float) -> tuple[int, int]:
    # (link-bound, compute-bound) sample counts at copy time v per layer. A sample at the kink identifies
    # neither v nor o (the optimum can slide along it), so it counts for neither.
    link = sum(si * v > t * (1 + _KINK_TOL) for t, si in zip(t0, s))
    compute = sum(t > si * v * (1 + _KINK_TOL) for t, si in zip(t0, s))
    return link, compute


def _stream_search(t0: Sequence[float], s: Sequence[float], y: Sequence[float],
                   free_overhead: bool) -> tuple[float, float]:
    # The global minimum over v >= 0 (and o >= 0, or o = 0) of the relative squared error.
    w = [1 / yi ** 2 for yi in y]

    def wsum(p, q):
        return math.fsum(wi * pi * qi for wi, pi, qi in zip(w, p, q))

    def sse(v, o):
        residual = [max(t, si * v) + si * o - yi for t, si, yi in zip(t0, s, y)]
        return wsum(residual, residual)

    bounds = [0.0] + sorted({t / si for t, si in zip(t0, s)}) + [math.inf]
    best, best_sse = (0.0, 0.0), math.inf
    for lo, hi in zip(bounds, bounds[1:]):
        # for v in [lo, hi] the link-bound samples are those whose kink is <= lo, and y ~ a*v + S*o + rest
        # is a linear model: a = S where link-bound (else 0), rest = T0 where compute-bound (else 0)
        link = [t / si <= lo for t, si in zip(t0, s)]
        a = [si if li else 0.0 for si, li in zip(s, link)]
        r = [yi - (0.0 if li else t) for yi, li, t in zip(y, link, t0)]
        saa, sab, sbb, sar, sbr = wsum(a, a), wsum(a, s), wsum(s, s), wsum(a, r), wsum(s, r)
        # the minimum of a convex quadratic over the box is its free minimum or lies on an edge
        candidates = [(min(max(sar / saa, lo), hi) if saa > 0 else lo, 0.0)]  # edge o = 0
        if free_overhead:
            candidates += [(v, max(0.0, (sbr - sab * v) / sbb)) for v in (lo, hi) if math.isfinite(v)]
            det = saa * sbb - sab * sab
            if det > 1e-12 * saa * sbb:  # else every sample here is link-bound: v and o only count as v + o
                v, o = (sbb * sar - sab * sbr) / det, (saa * sbr - sab * sar) / det
                if lo <= v <= hi and o >= 0:
                    candidates.append((v, o))
        for v, o in candidates:
            e = sse(v, o)
            if e < best_sse:
                best, best_sse = (v, o), e
    return best


def _fit_links(samples: Sequence[TransferSample]) -> tuple[list[LinkFit], RecomputeFit | None, list[str]]:
    links, recompute, notes = [], None, []
    for kind in TRANSFER_KINDS:
        group = [s for s in samples if s.kind == kind]
        if not group:
            continue
        y = [s.seconds for s in group]
        if kind == "kv_recompute":
            detail = f"token counts {sorted({s.tokens for s in group})}"
            coef, more = _fit_linear(kind, [("r1", "per token"), ("r0", "per recompute"),
                                            ("r2", "per token squared")],
                                     [(s.tokens, 1.0, s.tokens * s.tokens) for s in group], y, detail)
            recompute = RecomputeFit(coef["r0"], coef["r1"], coef["r2"], len(group))
        else:
            # per byte first: with a single transfer size the line goes through the origin, the conservative
            # reading when a larger transfer must be extrapolated
            sizes = {s.nbytes for s in group}
            detail = f"{len(sizes)} distinct sizes, smallest {min(sizes)} bytes"
            coef, more = _fit_linear(kind, [("per_byte", "1/bandwidth"), ("latency", "per transfer")],
                                     [(s.nbytes, 1.0) for s in group], y, detail, required="per_byte")
            bandwidth = 1 / coef["per_byte"] if coef["per_byte"] else None
            links.append(LinkFit(kind, coef["latency"] or 0.0, bandwidth, len(group)))
        notes += more
    return links, recompute, notes


# -- the model -----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CostModel:
    """Fitted costs of one model on one machine (see the module docstring for the equations). Build it with
    `CostModel.fit`; `fit_notes` says what the samples could not identify and what was done instead."""

    step: StepFit | None
    links: tuple[LinkFit, ...]
    recompute: RecomputeFit | None
    fit_notes: tuple[str, ...] = ()

    def __post_init__(self):
        links = tuple(self.links)
        kinds = [l.kind for l in links]
        if len(set(kinds)) != len(kinds):
            raise ConfigError(f"links: a transfer kind appears twice in {kinds}")
        object.__setattr__(self, "links", tuple(sorted(links, key=lambda l: LINK_KINDS.index(l.kind))))
        notes = tuple(self.fit_notes)
        if not all(isinstance(n, str) for n in notes):
            raise ConfigError("fit_notes must be strings")
        object.__setattr__(self, "fit_notes", notes)

    @classmethod
    def fit(cls, decode: Sequence[DecodeSample] = (),
            transfers: Sequence[TransferSample] = ()) -> "CostModel":
        """Fit every part the samples measure. Decode samples must all come from one model (same num_layers
        and layer_bytes), else ConfigError."""
        decode, transfers = list(decode), list(transfers)
        for name, group, typ in (("decode", decode, DecodeSample), ("transfers", transfers, TransferSample)):
            bad = [s for s in group if not isinstance(s, typ)]
            if bad:
                raise ConfigError(f"{name}: {bad[0]!r} is not a {typ.__name__}")
        if not decode and not transfers:
            raise ConfigError("CostModel.fit: no samples")
        notes: list[str] = []
        step = None
        if decode:
            step, more = _fit_step(decode)
            notes += more
        links, recompute, more = _fit_links(transfers)
        return cls(step, tuple(links), recompute, tuple(notes + more))

    @property
    def kinds(self) -> tuple[str, ...]:
        """The transfer kinds this model can predict."""
        return tuple(l.kind for l in self.links) + (("kv_recompute",) if self.recompute else ())

    def predict_step(self, resident_layers: int, batch: int, context: int) -> float:
        """Seconds of one decode step: `resident_layers` resident, `batch` sequences of `context` tokens."""
        if self.step is None:
            raise ConfigError("decode step: no decode samples were measured")
        return self.step.seconds(resident_layers, batch, context)

    def predict_transfer(self, kind: str, nbytes: int = 0, tokens: int = 0) -> float:
        """Seconds of one transfer of `kind`; `tokens` for "kv_recompute", `nbytes` for the others."""
        if kind not in TRANSFER_KINDS:
            raise ConfigError(f"kind={kind!r} must be one of {TRANSFER_KINDS}")
        if kind == "kv_recompute":
            if self.recompute is None:
                raise ConfigError("kv_recompute was never measured; no prediction for it")
            return self.recompute.seconds(tokens)
        for link in self.links:
            if link.kind == kind:
                return link.seconds(nbytes)
        raise ConfigError(f"{kind} was never measured; no prediction for it")

    def _moved(self, kind: str, nbytes: int) -> float:
        # nothing moved costs nothing: preempt and resume skip a copy they have no bytes for
        return self.predict_transfer(kind, nbytes) if nbytes else 0.0

    def predict_preempt(self, weight_bytes: int, kv_bytes: int, weights: str = "host",
                        kv: str = "swap") -> dict:
        """Seconds of `Engine.preempt(weights, kv)`: {"weights", "kv", "total"}. Only "host" copies weights
        ("disk" and "keep" release or keep them), only "swap" copies KV; bookkeeping is not modelled. An
        engine with keep_host_copy copies no weights either: pass weight_bytes=0 for it."""
        _check_modes(weights, kv)
        _int("weight_bytes", weight_bytes, 0)
        _int("kv_bytes", kv_bytes, 0)
        w = self._moved("weights_host_out", weight_bytes) if weights == "host" else 0.0
        k = self._moved("kv_swap_out", kv_bytes) if kv == "swap" else 0.0
        return {"weights": w, "kv": k, "total": w + k}

    def predict_resume(self, weight_bytes: int, kv_bytes: int, weights: str = "host", kv: str = "swap",
                       recompute_tokens: int = 0, pipelined: bool = False, *,
                       resident_layers: int | None = None, batch: int = 1, context: int = 0,
                       first_region_bytes: int | None = None) -> dict:
        """Seconds of `Engine.resume(pipelined)` after `preempt(weights, kv)`: {"weights", "kv", "recompute",
        "total", "first_token"}.

        total = weights + kv + recompute: the weights back ("host": weights_host_in; "disk": weights_disk_in,
        which covers the read and the copy; "keep": 0), the KV swapped in, the dropped KV prefilled again.
        first_token approximates when the first step's tokens are out. That step decodes the `batch` swapped
        requests (at `context` tokens, `resident_layers` resident, default all; no decode when kv="drop" or
        batch=0) and prefills the recomputed ones. Unpipelined: total + the decode step. Pipelined (weights=
        "host"): the KV and the first region (`first_region_bytes`, the embeddings + first layer; default one
        decoder layer) arrive first, then the step runs while the rest arrives, so it ends no earlier than
        the last copy: kv + first + max(decode step + recompute, rest of the weights). A pipelined "disk"
        resume is predicted as unpipelined (its read comes before any copy; this overstates first_token by at
        most the host-to-device part). first_token is None when no request is in flight."""
        _check_modes(weights, kv)
        if not isinstance(pipelined, bool):
            raise ConfigError(f"pipelined={pipelined!r} must be a bool")
        _int("weight_bytes", weight_bytes, 0)
        _int("kv_bytes", kv_bytes, 0)
        _int("recompute_tokens", recompute_tokens, 0)
        _int("batch", batch, 0)
        kind = {"host": "weights_host_in", "disk": "weights_disk_in"}.get(weights)
        w = self._moved(kind, weight_bytes) if kind else 0.0
        k = self._moved("kv_swap_in", kv_bytes) if kv == "swap" else 0.0
        r = self.predict_transfer("kv_recompute", tokens=recompute_tokens) if recompute_tokens else 0.0
        total = w + k + r
        decoding = kv == "swap" and batch > 0
        if not decoding and not recompute_tokens:
            first_token = None
        else:
            if decoding:
                if resident_layers is None:
                    resident_layers = self.step.num_layers if self.step is not None else 0
                step = self.predict_step(resident_layers, batch, context)
            else:
                step = 0.0
            first_token = total + step
            if pipelined and weights == "host" and weight_bytes:
                if first_region_bytes is None:
                    first_region_bytes = self.step.layer_bytes if self.step is not None else 0
                _int("first_region_bytes", first_region_bytes, 0)
                first = self.predict_transfer("weights_host_in", min(first_region_bytes, weight_bytes))
                first_token = k + first + max(step + r, w - first)
        return {"weights": w, "kv": k, "recompute": r, "total": total, "first_token": first_token}

    def evaluate(self, decode_samples: Sequence[DecodeSample] = (),
                 transfer_samples: Sequence[TransferSample] = ()) -> "Evaluation":
        """Relative errors (predicted - measured) / measured of each sample, in the order given."""
        if not decode_samples and not transfer_samples:
            raise ConfigError("evaluate: no samples")
        d = tuple((self.predict_step(s.resident_layers, s.batch, s.context) - s.step_seconds) / s.step_seconds
                  for s in decode_samples)
        t = tuple((self.predict_transfer(s.kind, s.nbytes, s.tokens) - s.seconds) / s.seconds
                  for s in transfer_samples)
        return Evaluation(d, t)

    def to_dict(self) -> dict:
        """A JSON-safe dict; `from_dict` reads it back."""
        return {"version": VERSION, "step": self.step.to_dict() if self.step else None,
                "links": [l.to_dict() for l in self.links],
                "recompute": self.recompute.to_dict() if self.recompute else None,
                "fit_notes": list(self.fit_notes)}

    @classmethod
    def from_dict(cls, d: dict) -> "CostModel":
        if not isinstance(d, dict) or d.get("version") != VERSION:
            got = d.get("version") if isinstance(d, dict) else type(d).__name__
            raise ConfigError(f"CostModel.from_dict: version {got!r}, this tidal reads version {VERSION}")

        def convert(kw):
            if not isinstance(kw["links"], list):
                raise ConfigError("CostModel.from_dict: links must be a list")
            step, recompute = kw["step"], kw["recompute"]
            return dict(step=StepFit.from_dict(step) if step is not None else None,
                        links=tuple(LinkFit.from_dict(l) for l in kw["links"]),
                        recompute=RecomputeFit.from_dict(recompute) if recompute is not None else None,
                        fit_notes=tuple(kw["fit_notes"]))

        return _from_dict(cls, {k: v for k, v in d.items() if k != "version"}, convert)


def _check_modes(weights: str, kv: str) -> None:
    if weights not in WEIGHT_MODES:
        raise ConfigError(f"weights={weights!r} must be one of {WEIGHT_MODES}")
    if kv not in KV_MODES:
        raise ConfigError(f"kv={kv!r} must be one of {KV_MODES}")


# -- evaluation ----------------------------------------------------------------------------------------------
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
    return len(_independent([[r[j] for r in rows] for j in range(len(rows[0]))])) if rows else 0


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
