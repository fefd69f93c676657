"""`GET /v1/tidal/status`: each model's tier, residency, queue and footprint, the budgets, and the
scheduler's most recent decisions (its trace): the last few of every kind, and the last few switches (every
action but Step, which the loop records at each tick)."""
from __future__ import annotations

RECENT_DECISIONS = 20
SCAN_LIMIT = 10_000  # trace entries read back at most to find the recent switches


def status_doc(service, recent: int = RECENT_DECISIONS) -> dict:
    """The status document (plain JSON types): the scheduler's snapshot and the runtime's books, read between
    two ticks (one instant), and the trace's latest entries. Call it off the event loop: it waits for the tick
    in progress to end."""
    sched = service.scheduler
    rt = sched.runtime
    with sched.between_ticks():
        snap = sched.snapshot()
        loaded = rt.status()
    models = {}
    for m in snap.models:
        v, st = m.view, loaded.get(m.name)
        served = service.models.get(m.name)
        models[m.name] = {
            "tier": _tier(m.state),
            "state": m.state.name.lower(),
            "kv_mode": st.kv if st is not None else None,
            "resident_fraction": m.resident_fraction,
            "queued": m.queued,
            "in_flight": m.in_flight,
            "oldest_age_s": m.oldest_age_s,
            "footprint": {"device_bytes": v.device_bytes, "host_bytes": v.host_bytes,
                          "disk_bytes": st.disk_bytes if st is not None else 0,
                          "active_device_bytes": v.active_device_bytes,
                          "active_host_bytes": v.active_host_bytes},
            "max_model_len": served.max_len if served is not None else None,
            "kv_capacity_tokens": served.capacity if served is not None else None,
            "slo_ttft_s": m.slo_ttft_s, "slo_tpot_s": m.slo_tpot_s,
        }
    trace = sched.trace
    return {
        "policy": repr(sched.policy),
        "device": str(rt.device),
        "budgets": {"device_bytes": rt.device_budget, "host_bytes": rt.host_budget,
                    "device_used_bytes": sum(m.view.device_bytes for m in snap.models),
                    "host_used_bytes": sum(m.view.host_bytes for m in snap.models)},
        "tick": snap.tick,
        "shutting_down": service.closing,
        "models": models,
        "recent_decisions": trace[-recent:] if recent else [],
        "recent_switches": _switches(trace, recent),
    }


def _switches(trace: list, n: int) -> list[dict]:
    """The last `n` decisions but Steps (loads, preemptions, resumes, residency changes), oldest first."""
    out = []
    for entry in reversed(trace[-SCAN_LIMIT:]):  # a slice: the loop's thread appends meanwhile
        if len(out) == n:
            break
        if entry["action"] != "Step":
            out.append(entry)
    return out[::-1]


def _tier(state) -> str:
    """Where the model's weights are: "device" (active), "host", "disk", "keep" (preempted), "unloaded"."""
    if state.active:
        return "device"
    return state.weights or "unloaded"
