"""What the cost policy builds on: cost models from `add_model`, a candidate plan's predicted outcome
(`Estimate`), and a plan built one checked action at a time (`Plan`). Torch-free."""
from __future__ import annotations

import dataclasses
import itertools
import math
import os
from ..errors import ConfigError, StateError
from ..policy import Preempt
from .state import SetResidency, Snapshot, Step, set_residency


SECONDS_MARGIN = 0.25  # at equal predicted violation, a plan of another kind must drain this much faster
HORIZON_S = 1.0  # the least time a plan is taken to hold: requests expected within it count against the plan


def load_cost_model(value, name: str):
    """`add_model(cost_model=...)`: a CostModel as given, or one fitted to every decode and preemption row of
    the profile.json at a path (`tidal.study.costfit`'s samples). ConfigError naming `name` otherwise."""
    from ..costmodel import CostModel

    if isinstance(value, (str, os.PathLike)):
        from ..study import costfit, schema

        doc = schema.load(value)
        try:
            value = CostModel.fit(costfit.decode_samples(doc), costfit.transfer_samples(doc))
        except ConfigError as exc:
            raise ConfigError(f"model {name!r}: no cost model could be fitted from {value}: {exc}") from None
    if not isinstance(value, CostModel) or value.step is None or value.step.a0 is None:
        raise ConfigError(f"model {name!r}: cost_model={value!r} must be a CostModel with a fitted decode step, "
                          "or the path of a profile.json")
    return value


def over(seconds, slo) -> float:
    return 0.0 if seconds is None or slo is None else max(0.0, seconds / slo - 1.0)


def misses(m, ttft, tpot, stall: float = 0.0) -> float:
    """The SLO misses a model's requests are predicted (`ttft`, `tpot`: seconds, None: no prediction): per
    SLO, its requests (for TTFT those still without a first token, for TPOT all unfinished ones) times the
    relative overshoot capped at one, so that a request over twice its SLO counts as one miss, as SLO
    attainment counts it, and one model's hopeless SLO cannot outweigh the others' that can still be met.
    `stall`: seconds the plan's transitions hold the model's requests in flight before its next step (the loop
    applies them first), spread over their remaining tokens; queued requests pay them in TTFT instead."""
    waiting = max(m.first_token_waiting, 1 if m.first_token_wait_s is not None else 0)
    ttft_misses = waiting * min(1.0, over(ttft, m.slo_ttft_s))
    if tpot is None:
        return ttft_misses
    stalled = tpot + stall / max(1, m.remaining_tokens)
    return ttft_misses + m.in_flight * min(1.0, over(stalled, m.slo_tpot_s)) + \
        (m.queued if m.has_work else 1) * min(1.0, over(tpot, m.slo_tpot_s))


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A candidate plan's predicted outcome: `violation`, the requests predicted to miss an SLO (`misses`,
    summed over the models with work, and over requests still to come; 0: every SLO met); `seconds`, the
    predicted time to finish the work queued now."""

    kind: str  # "co-residency", "time-slicing" or "mixed"
    violation: float
    seconds: float
    core: tuple = ()  # a mixed plan's co-resident models (names)
    stable_s: float = math.inf  # seconds before its time-sliced slot may change hands by itself (no aging)

    def key(self) -> tuple[float, float]:
        return round(self.violation, 9), self.seconds


class Plan:
    """Actions built one at a time over the snapshot, each checked as `check_actions` checks it (a refused one
    raises and is not added), with each one's predicted seconds."""

    def __init__(self, policy, snapshot: Snapshot):  # policy: the CostScheduling whose `price` prices actions
        self.policy, self.snapshot, self.view = policy, snapshot, snapshot.pool()
        self.resident = {m.name: m.resident_layers() for m in snapshot.models}
        self.actions, self.costs = [], []
        self.samples = []  # per action: (the cost model's own seconds, the online correction's kind)

    @property
    def seconds(self) -> float:
        return sum(c or 0.0 for c in self.costs)

    def add(self, action) -> None:
        m = self.snapshot.model(action.model)
        if isinstance(action, (Step, SetResidency)) and not self.view.model(m.name).state.active:
            raise StateError(f"{action}: {m.name!r} is not active")
        if isinstance(action, SetResidency):
            view, new = set_residency(self.view, m, self.resident[m.name], action.fraction)
        elif isinstance(action, Step):
            view, new = self.view, self.resident[m.name]
        else:
            request = None if isinstance(action, Preempt) else \
                m.need(self.view.model(m.name))
            view, new = dataclasses.replace(self.view, request=request).apply(action), self.resident[m.name]
        cost, raw, kind = self.policy.price(self.snapshot, m, self.resident[m.name], action)
        self.costs.append(cost)
        self.samples.append((raw, kind))
        self.view, self.resident[m.name] = view, new
        self.actions.append(action)


def greedy(step, work, lo: dict, room: float, order: list | None = None) -> dict:
    """Resident layers per model, from `lo`: one layer at a time to the model whose predicted step (`step(m, r)`)
    shrinks most per device byte, while it fits `room` (the step is convex in the streamed layers). A model
    whose next layer does not fit takes no more. `order`: `greedy_order(step, work, lo)`, when already made; it
    may cover more models than `lo` (those take nothing), so one order of every model serves each subset."""
    resident, blocked = dict(lo), set()
    for name, extra in order if order is not None else greedy_order(step, work, lo):
        if name in blocked or name not in resident:
            continue
        if extra > room:
            blocked.add(name)  # the room only shrinks: its next layer never fits
            continue
        resident[name] += 1
        room -= extra
    return resident


def greedy_order(step, work, lo: dict, offers=None) -> list[tuple[str, int]]:
    """The layers `greedy` hands out from `lo` with room to spare, in its order: (model, device bytes) each,
    the next layer of whichever model gains most per byte (then most, then the latest name) first. The order
    does not depend on the room, so one order serves every room (`greedy`'s blocked models only drop out).
    `offers(m)`: `layer_offers(step, m, lo[m.name], rank)` with ranks comparable across `work`, when made
    already (each model's are the same in every set of models it is ordered with)."""
    if offers is None:
        rank = {m.name: i for i, m in enumerate(sorted(work, key=lambda m: m.name, reverse=True))}
        offers = lambda m: layer_offers(step, m, lo[m.name], rank[m.name])  # noqa: E731
    # each model's runs come in rising keys, and no two models' keys are equal: taking the best next layer
    # each time is sorting the runs
    return [(name, extra) for _, name, extras in sorted(itertools.chain.from_iterable(offers(m) for m in work))
            for extra in extras]


def layer_offers(step, m, resident: int, rank: int) -> list[tuple]:
    """`m`'s layers from `resident` + 1 on, in runs (key, name, the layers' device bytes), keys rising: a layer
    is keyed by how `greedy_order` chooses (smallest first: the most gain per byte, then the most gain, then
    the lowest `rank`), and a layer keyed no worse than the one that starts its run is taken right after it (it
    beats every other model's next layer as that one did), so it joins the run (for a step convex in the
    streamed layers every run is one layer but for the ring's last, free, layers)."""
    out, size, seconds = [], m.layer_device_bytes(resident), step(m, resident)
    for r in range(resident, m.num_layers):
        size_next, seconds_next = m.layer_device_bytes(r + 1), step(m, r + 1)
        extra, gain = size_next - size, seconds - seconds_next
        size, seconds = size_next, seconds_next
        key = (-(gain / extra) if extra > 0 else -math.inf, -gain, rank)
        if out and key <= out[-1][0]:
            out[-1][2].append(extra)
        else:
            out.append((key, m.name, [extra]))
    return out


def worth_switching(work, now, alt) -> bool:
    """Whether to leave the current plan (`now`: (Estimate, Plan)) for `alt`: only when alt's gain covers the
    switch, whose cost S is alt's transitions (preempts, resumes, residency changes), counted once more (alt's
    estimate pays them once: this is the way back). In violation: alt's must be lower by S / SLO_TTFT summed
    over the models with a request waiting for its first token and a TTFT SLO (the overshoot the transitions
    put on those first tokens); at equal violation, alt's seconds (which count S once) lower by 2 S (the way back,
    and as much again) and by SECONDS_MARGIN of the current plan's: drain times are steady-state estimates
    that ignore the requests still to come (at violation 0 on copay, S alone let a drain time 13% shorter on
    paper move the policy off co-residency, preempting two busy models)."""
    (cur, _), (new, plan) = now, alt
    switch = sum(c or 0.0 for a, c in zip(plan.actions, plan.costs) if not isinstance(a, Step))
    margin = sum(min(1.0, switch / m.slo_ttft_s) for m in work
                 if m.first_token_wait_s is not None and m.slo_ttft_s is not None)
    if round(new.violation, 9) < round(cur.violation, 9):
        return new.violation + margin < cur.violation
    return round(new.violation, 9) == round(cur.violation, 9) and \
        new.seconds + 2 * switch < (1 - SECONDS_MARGIN) * cur.seconds


def due(m, quantum: float, switch: float) -> bool:
    """Whether `m`, waiting off the device, is due the device at the end of another model's quantum: its
    requests in flight (stalled mid-generation by its preemption), or no request waiting for a first token, or
    no TTFT SLO, or its oldest request without a token would miss that SLO if it waited one more `quantum` plus
    its own `switch`. A model still within its TTFT slack is not switched to (aging serves it anyway)."""
    if m.first_token_wait_s is None or m.slo_ttft_s is None or m.in_flight > 0:
        return True
    return m.first_token_wait_s + quantum + switch >= m.slo_ttft_s


def quanta(rest, rnd: dict, switch: dict, amortise: float) -> tuple[dict, dict]:
    """(hold, quantum) per time-sliced model: it holds the device max(one round, `amortise` x the dearest
    switch) seconds (a quantum ends in a switch to another model and back); its queued work needs only
    min(hold, its tokens x its round)."""
    dearest = max(switch.values(), default=0.0)
    hold = {n: max(rnd[n], amortise * max(switch[n], dearest)) for n in rnd}
    return hold, {m.name: min(hold[m.name], max(1, m.remaining_tokens) * rnd[m.name]) for m in rest}


def slice_estimate(kind: str, core, rest, x, rnd: dict, switch: dict, quantum: dict, setup: float) -> Estimate:
    """Time-slicing of `rest` (x on the device now) beside the always-stepped `core` (empty: plain time-slicing),
    round robin: cycle = sum_t (switch_t + Q_t); a sliced model's round rnd_t steps it and the core; its queued
    work (its most remaining tokens N_t) needs k_t = ceil(N_t x rnd_t / Q_t) quanta, and waits the rest of a
    cycle between two (k_t - 1 waits for x, k_t for the others): TPOT_t = rnd_t + waits x (cycle - Q_t) / N_t;
    TTFT_t = wait + (setup for x, else cycle - Q_t) + rnd_t. Requests still to come: t's arrival rate x
    HORIZON_S of them, each off the device with probability (cycle - Q_t) / cycle and then waiting uniformly
    up to cycle - Q_t for its slot, a miss when that and a round exceed its TTFT SLO. The core
    emits sum_t Q_t / rnd_t tokens a cycle; its TTFT = wait + setup + rnd_x."""
    cycle = sum(switch[t.name] + quantum[t.name] for t in rest)
    violation = 0.0
    for t in rest:
        n, tokens = t.name, max(1, t.remaining_tokens)
        ttft = None if t.first_token_wait_s is None else t.first_token_wait_s + (
            setup if t is x else cycle - quantum[n]) + rnd[n]
        # its queued work needs k whole quanta; before each (but x's first, running now) it waits the rest of
        # a cycle, and those waits spread over its tokens (the steady state's cycle x round / Q counts
        # fractions of quanta, and understates a request that needs one more)
        gaps = math.ceil(tokens * rnd[n] / quantum[n]) - (t is x)
        violation += misses(t, ttft, rnd[n] + max(0, gaps) * (cycle - quantum[n]) / tokens,
                            setup if t is x else 0.0)
        off = cycle - quantum[n]
        if t.arrival_rate and t.slo_ttft_s is not None and off > 0:
            # requests still to come, HORIZON_S of them at its arrival rate: one arriving while t is off the
            # device (a fraction off / cycle of the time) waits uniformly up to `off` for its slot, and misses
            # when that wait and a round exceed its TTFT SLO
            late = min(1.0, max(0.0, off - (t.slo_ttft_s - rnd[n])) / off)
            violation += t.arrival_rate * HORIZON_S * off / cycle * late
    core_tpot = cycle / sum(quantum[t.name] / rnd[t.name] for t in rest) if core else 0.0
    for m in core:
        ttft = None if m.first_token_wait_s is None else m.first_token_wait_s + setup + rnd[x.name]
        violation += misses(m, ttft, core_tpot, setup)
    sliced = sum(max(1, t.remaining_tokens) * rnd[t.name] + switch[t.name] * (
        math.ceil(max(1, t.remaining_tokens) * rnd[t.name] / quantum[t.name]) - (t is x)) for t in rest)
    drained = max((max(1, m.remaining_tokens) * core_tpot for m in core), default=0.0)
    return Estimate(kind, violation, setup + max(sliced, drained), tuple(m.name for m in core))
