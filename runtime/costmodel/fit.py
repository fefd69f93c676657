"""How the parts are fitted to samples.

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
import math
from typing import Sequence

from ..errors import ConfigError
from .lstsq import fit_linear
from .parts import LinkFit, RecomputeFit, StepFit
from .samples import TRANSFER_KINDS, DecodeSample, TransferSample

_KINK_TOL = 1e-9


def fit_step(samples: Sequence[DecodeSample]) -> tuple[StepFit, list[str]]:
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
        coef, more = fit_linear("T0", terms, [(1.0, s.batch, s.batch * s.context) for s in full],
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


def fit_links(samples: Sequence[TransferSample]) -> tuple[list[LinkFit], RecomputeFit | None, list[str]]:
    links, recompute, notes = [], None, []
    for kind in TRANSFER_KINDS:
        group = [s for s in samples if s.kind == kind]
        if not group:
            continue
        y = [s.seconds for s in group]
        if kind == "kv_recompute":
            detail = f"token counts {sorted({s.tokens for s in group})}"
            coef, more = fit_linear(kind, [("r1", "per token"), ("r0", "per recompute"),
                                            ("r2", "per token squared")],
                                     [(s.tokens, 1.0, s.tokens * s.tokens) for s in group], y, detail)
            recompute = RecomputeFit(coef["r0"], coef["r1"], coef["r2"], len(group))
        else:
            # per byte first: with a single transfer size the line goes through the origin, the conservative
            # reading when a larger transfer must be extrapolated
            sizes = {s.nbytes for s in group}
            detail = f"{len(sizes)} distinct sizes, smallest {min(sizes)} bytes"
            coef, more = fit_linear(kind, [("per_byte", "1/bandwidth"), ("latency", "per transfer")],
                                     [(s.nbytes, 1.0) for s in group], y, detail, required="per_byte")
            bandwidth = 1 / coef["per_byte"] if coef["per_byte"] else None
            links.append(LinkFit(kind, coef["latency"] or 0.0, bandwidth, len(group)))
        notes += more
    return links, recompute, notes
