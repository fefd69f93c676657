"""The frozen `Snapshot` a policy decides on, built from a `Scheduler`'s queues and books and its Runtime's
engines (`build`; `Scheduler.snapshot()` calls it). The loop's own part: it reads the Scheduler's private books."""
from __future__ import annotations

import dataclasses
import time

from ..engine.preemption import staging_bytes
from ..policy import ModelState, ModelView
from .state import ARRIVAL_WINDOW_S, ModelSnapshot, Snapshot


def build(sched) -> Snapshot:
    """`Scheduler.snapshot()`: the scheduler's queues and books and its Runtime's engines, at this instant."""
    now = time.monotonic()
    rt = sched.runtime
    loaded = {v.name: v for v in rt.view().models}  # the Runtime's own snapshot of its engines
    with sched._lock:
        queued = {n: (len(q), q[0].submitted_at if q else None) for n, q in sched._queues.items()}
        waiting = {n: list(q) for n, q in sched._queues.items()}
        window = min(ARRIVAL_WINDOW_S, max(1.0, now - sched._t0))
        rates = {n: sum(t >= now - window for t in a) / window for n, a in sched._arrivals.items()}
    models = []
    for name in list(sched._models) + [n for n in loaded if n not in sched._models]:
        reg = sched._models.get(name)
        view = loaded.get(name) or ModelView(name, ModelState.UNLOADED, 0, 0, reg.device_bytes, reg.host_bytes)
        view = dataclasses.replace(view, last_used=sched._last_used.get(name, -1))
        n_queued, first = queued.get(name, (0, None))
        in_flight = sched._in_flight.get(name, {})
        starts = [t for t in [first] + [r.submitted_at for r in in_flight.values()] if t is not None]
        oldest = min(starts) if starts else None
        engine = rt.models.get(name)
        fraction = engine.plan.resident_fraction if engine is not None else reg.resident_fraction
        models.append(ModelSnapshot(
            view, fraction, n_queued, len(in_flight),
            oldest_age_s=None if oldest is None else now - oldest,
            waited_s=0.0 if oldest is None else now - max(oldest, sched._last_step_at.get(name, oldest)),
            skipped_ticks=sched._skipped.get(name, 0) if oldest is not None else 0,
            resume_staging_bytes=staging_bytes(engine) if engine is not None else 0,
            arrival_rate=rates.get(name, 0.0),
            **_cost_view(sched, name, reg, view, engine, waiting.get(name, []) + list(in_flight.values()), now)))
    return Snapshot(now - sched._t0, sched._tick, rt.device_budget, rt.host_budget, tuple(models),
                    dict(sched.cost_models))


def _cost_view(sched, name, reg, view, engine, requests, now) -> dict:
    """The snapshot's fields for the cost policy: SLOs, the shape of the work, what a swap would move."""
    out = {"active_s": now - sched._active_since.get(name, sched._t0) if view.state.active else 0.0,
           "preempted_kv": engine.preempted.kv if engine is not None and engine.preempted is not None else None}
    if reg is None:
        return out
    block, block_bytes = reg.kv_block
    sizes = [len(r.prompt) + len(r.output_ids) for r in requests]
    out.update(slo_ttft_s=reg.slo_ttft_s, slo_tpot_s=reg.slo_tpot_s, num_layers=reg.num_layers,
               layer_bytes=reg.layer_bytes, ring_slots=reg.ring_slots,
               context=sum(sizes) // len(sizes) if sizes else 0,
               remaining_tokens=max((r.params.max_new_tokens - len(r.output_ids) for r in requests), default=0),
               kv_bytes=sum(-(-(len(r.prompt) + len(r.output_ids)) // block) * block_bytes for r in requests
                            if r.engine_id is not None),
               first_token_wait_s=max((now - r.submitted_at for r in requests if r.first_token_at is None),
                                      default=None),
               first_token_waiting=sum(r.first_token_at is None for r in requests))
    return out
