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
Recomputation of KV (kv="recompute": a prefill):  seconds = r0 + r1*tokens + r2*tokens^2.

Preempt = weights ("host": weights_host_out; "disk", "keep": nothing copied) + KV ("swap": kv_swap_out).
Resume total = weights ("host": weights_host_in; "disk": weights_disk_in) + KV (kv_swap_in) + recompute. The
first token (an approximation: bookkeeping and contention are not modelled) comes at total + step without
pipelining, and with it at kv + first + max(step + recompute, weights - first), where first is the copy of the
region the first layer needs and step the decode step of the swapped-in batch.

Modules: `samples` (what is measured), `parts` and `fit` (the fitted parts and how they are fitted, `lstsq`
the least squares beneath), `model` (`CostModel` and its predictions), `evaluate` (held-out errors). Every
public name is re-exported here. The weight and KV modes are `tidal.modes`'.
"""
from ..modes import KV_MODES, WEIGHT_MODES
from .evaluate import Evaluation, holdout_split
from .model import VERSION, CostModel
from .parts import LinkFit, RecomputeFit, StepFit
from .samples import LINK_KINDS, TRANSFER_KINDS, DecodeSample, TransferSample

__all__ = ["VERSION", "TRANSFER_KINDS", "LINK_KINDS", "WEIGHT_MODES", "KV_MODES", "DecodeSample",
           "TransferSample", "StepFit", "LinkFit", "RecomputeFit", "CostModel", "Evaluation", "holdout_split"]
