"""Least squares on relative residuals, in plain Python: which columns the samples identify
(`independent`) and the non-negative fit of a linear model (`fit_linear`)."""
from __future__ import annotations

import itertools
import math
from typing import Sequence

_RANK_TOL = 1e-9  # a column whose part independent of the others is below this (relative) adds nothing


def _dot(a: Sequence[float], b: Sequence[float]) -> float:
    return math.fsum(x * y for x, y in zip(a, b))


def independent(cols: Sequence[Sequence[float]]) -> list[int]:
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


def fit_linear(label: str, terms: Sequence[tuple[str, str]], rows: Sequence[Sequence[float]],
                y: Sequence[float], detail: str, required: str | None = None
                ) -> tuple[dict[str, float | None], list[str]]:
    # Non-negative least squares of y ~ sum(c_j * x_j) on relative residuals. `terms` are (name, meaning) of
    # the columns, in the order they are kept when they are collinear. A term the rows cannot identify is None
    # in the result; one the non-negativity holds at 0 is 0.0. `required` is a term that must stay in the fit
    # (and so come out > 0) when it is identifiable.
    names = [n for n, _ in terms]
    cols = [[row[j] / yi for row, yi in zip(rows, y)] for j in range(len(terms))]
    ones = [1.0] * len(y)
    kept = independent(cols)
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
