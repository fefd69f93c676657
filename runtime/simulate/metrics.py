"""Latency and SLO metrics of a run, live or simulated (`summarize`), named as the scheduler benchmark names
them (`ttft_p50_s`, `slo_attainment`, `goodput_rps`, ...), so that a simulation and the live run it replays
compare key by key. Plain Python and numpy."""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Served:
    """One request's outcome: its model, its arrival, its first and last token (None: none came), its tokens,
    and whether it finished without error."""

    model: str
    arrival_s: float
    first_token_s: float | None
    last_token_s: float | None
    tokens: int
    done: bool

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first: (last - first) / (tokens - 1); 0 for a single token."""
        if self.first_token_s is None:
            return None
        return (self.last_token_s - self.first_token_s) / (self.tokens - 1) if self.tokens > 1 else 0.0

    def meets(self, slo_ttft_s: float | None, slo_tpot_s: float | None) -> bool:
        """Finished, with both SLOs met (an SLO of None always is)."""
        ttft, tpot = self.ttft_s, self.tpot_s
        return self.done and ttft is not None and (slo_ttft_s is None or ttft <= slo_ttft_s) and \
            (slo_tpot_s is None or tpot <= slo_tpot_s)


def _pct(xs, q):
    return None if not xs else float(np.percentile(xs, q))


def summarize(served, slos: dict, start_s: float, end_s: float) -> dict:
    """The metrics of `served` (Served) over [start_s, end_s] (the span: first arrival to last finish);
    `slos`: model -> (slo_ttft_s, slo_tpot_s). SLO attainment: requests meeting both SLOs / requests; goodput:
    those per second of the span."""
    served = list(served)
    ttft = [s.ttft_s for s in served if s.ttft_s is not None]
    tpot = [s.tpot_s for s in served if s.tpot_s is not None]
    met = sum(s.meets(*slos.get(s.model, (None, None))) for s in served)
    span = max(end_s - start_s, 1e-9)
    n = len(served)
    out = {"requests": n, "finished": sum(s.done for s in served), "span_s": round(span, 3)}
    for name, xs in (("ttft", ttft), ("tpot", tpot)):
        for q in (50, 90, 99):
            out[f"{name}_p{q}_s"] = _pct(xs, q)
    out.update({"slo_attainment": met / n if n else None, "goodput_rps": met / span,
                "throughput_rps": out["finished"] / span,
                "throughput_tok_s": sum(s.tokens for s in served) / span})
    return out
