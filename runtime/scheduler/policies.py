"""Scheduling policies: `decide(snapshot) -> list[action]`, plain Python over a frozen `Snapshot` (torch-free),
so that a simulator runs the same objects as the live loop.

Aging, shared by both policies (`Aging`): a model with work is *aged* once it has gone `max_skipped_ticks`
ticks in a row without a step, or has had work for `max_wait_s` seconds without one. Aged models are served
first, most skipped ticks first (then longest wait, then name), and the first of them always gets the device
at that tick: it may preempt any model not brought in at the same tick, and every model fits the device
alone (`Scheduler.add_model` checks). A model that is stepped drops back to 0 skipped ticks, so it cannot
overtake a model that was aged before it. Hence the bound: with N registered models, no model with work
goes more than `max_skipped_ticks + N - 1` ticks in a row without a step.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Protocol, runtime_checkable

from ..errors import ConfigError, OutOfDeviceMemory
from ..policy import SWAP, LruPolicy as _LruVictims, PoolView, Preempt, serve
from .state import ModelSnapshot, Snapshot, Step


@runtime_checkable
class SchedulingPolicy(Protocol):
    """`decide(snapshot)`: the actions of one tick, in order. Optional, for a simulator: `repeats_until(snapshot)`,
    after a decide on that snapshot that returned Steps alone, the time before which the policy returns the same
    Steps at every tick as long as the models with work stay the same, no request arrives for another model,
    and none ages."""

    def decide(self, snapshot: Snapshot) -> list: ...


@dataclasses.dataclass(frozen=True)
class Aging:
    """When a model waiting for the device is served before anything else (see the module docstring)."""

    max_wait_s: float = 2.0
    max_skipped_ticks: int = 32

    def __post_init__(self):
        if isinstance(self.max_wait_s, bool) or not isinstance(self.max_wait_s, (int, float)) or \
                not self.max_wait_s > 0:
            raise ConfigError(f"max_wait_s={self.max_wait_s!r} must be a number > 0")
        if isinstance(self.max_skipped_ticks, bool) or not isinstance(self.max_skipped_ticks, int) or \
                self.max_skipped_ticks < 1:
            raise ConfigError(f"max_skipped_ticks={self.max_skipped_ticks!r} must be an int >= 1")

    def aged(self, m: ModelSnapshot) -> bool:
        return m.has_work and (m.skipped_ticks >= self.max_skipped_ticks or m.waited_s >= self.max_wait_s)

    def order(self, models) -> list[ModelSnapshot]:
        """Aged models first (most skipped ticks, longest wait, name), then the rest first come first served
        (oldest request first, then name)."""
        aged = sorted((m for m in models if self.aged(m)), key=lambda m: (-m.skipped_ticks, -m.waited_s, m.name))
        rest = sorted((m for m in models if not self.aged(m)), key=lambda m: (-(m.oldest_age_s or 0.0), m.name))
        return aged + rest


def evict(view: PoolView, name: str, reserve_host: int = 0) -> Preempt:
    """The preemption of an active model that frees the device: weights to the host when the host budget
    takes its copy and `reserve_host` more bytes, to disk otherwise; KV swapped (the rule `policy.LruPolicy`
    uses for its victims)."""
    m = view.model(name)
    to_host = view.host_budget is None or view.host_used + m.host_copy_bytes + reserve_host <= view.host_budget
    return Preempt(name, weights="host" if to_host else "disk", kv=SWAP)


def bring_in(view: PoolView, m: ModelSnapshot, pinned: set[str]) -> list | None:
    """`policy.LruPolicy`'s plan to load or resume `m` (its least recently used victims, then the Load or
    Resume), the models in `pinned` spared; None when that cannot make room."""
    request = m.need(view.model(m.name))
    models = tuple(dataclasses.replace(x, pinned=x.name in pinned) for x in view.models)
    try:
        return _LruVictims().decide(dataclasses.replace(view, models=models, request=request))
    except OutOfDeviceMemory:
        return None


def _apply(view: PoolView, actions, snapshot: Snapshot) -> PoolView:
    for a in actions:
        request = None if isinstance(a, Preempt) else \
            snapshot.model(a.model).need(view.model(a.model))
        view = dataclasses.replace(view, request=request).apply(a)
    return view


class ExclusiveScheduling:
    """One model on the device at a time (the study's transformers protocol, as a baseline).

    Rules, each tick: the active model with work keeps the device and is stepped, unless another model has
    aged (`Aging`). Otherwise the next model is the first of `Aging.order` (aged first, then the model whose
    oldest unfinished request is oldest: first come first served across models). Switching preempts every
    other active model fully (weights to the host when the host budget takes the copy, else to disk; KV
    swapped), least recently used first, then loads or resumes the next and steps it. Nothing to do: no
    actions (an idle model stays where it is). Aging bound: see the module docstring."""

    def __init__(self, max_wait_s: float = 2.0, max_skipped_ticks: int = 32):
        self.aging = Aging(max_wait_s, max_skipped_ticks)

    def decide(self, snapshot: Snapshot) -> list:
        work = snapshot.with_work
        if not work:
            return []
        order = self.aging.order(work)
        current = [m for m in work if m.state.active]
        aged = [m for m in order if self.aging.aged(m)]
        if current and not aged:
            nxt = max(current, key=lambda m: (m.view.last_used, m.name))
        else:
            nxt = order[0]
        view, actions = snapshot.pool(), []
        reserve = 0 if nxt.state.active else nxt.need().host_bytes
        for m in view.lru_order():
            if m.state.active and m.name != nxt.name:
                actions.append(evict(view, m.name, reserve))
                view = view.apply(actions[-1])
        if not nxt.state.active:
            actions.append(serve(dataclasses.replace(view, request=snapshot.model(nxt.name).need())))
        return actions + [Step(nxt.name)]

    @staticmethod
    def repeats_until(snapshot: Snapshot) -> float:
        """Always (`SchedulingPolicy`): its plans read only states, work, the order of oldest requests and aging."""
        return math.inf

    def __repr__(self) -> str:
        return f"ExclusiveScheduling(max_wait_s={self.aging.max_wait_s}, max_skipped_ticks={self.aging.max_skipped_ticks})"


class LruScheduling:
    """Load or resume on demand, evict the least recently used (`policy.LruPolicy`'s victim choice), and step
    every active model that has work.

    Rules, each tick: the models with work that are not active, in `Aging.order`, are brought in one by one
    with `policy.LruPolicy`'s plan over the view the earlier ones leave. A model that has not aged may preempt
    only active models without work (those with work are pinned: two busy models would otherwise swap places
    every tick); if that cannot make room it waits. An aged model may preempt any model but those brought in
    at this tick or aged before it. Then every active model with work is stepped, by name. Aging bound: see the module
    docstring. (`Runtime.load(evict="lru")` alone preempts busy models too: it does not know who has work.)"""

    def __init__(self, max_wait_s: float = 2.0, max_skipped_ticks: int = 32):
        self.aging = Aging(max_wait_s, max_skipped_ticks)

    def decide(self, snapshot: Snapshot) -> list:
        work = snapshot.with_work
        busy = {m.name for m in work}
        view, actions, brought = snapshot.pool(), [], set()
        for m in self.aging.order(work):
            if view.model(m.name).state.active:
                if self.aging.aged(m):  # it has the device already: a later aged model may not take it
                    brought.add(m.name)
                continue
            plan = bring_in(view, m, busy | brought)
            if plan is None and self.aging.aged(m):
                plan = bring_in(view, m, brought)
            if plan is None:
                continue
            view = _apply(view, plan, snapshot)
            actions += plan
            brought.add(m.name)
        steps = [Step(m.name) for m in sorted(work, key=lambda m: m.name) if view.model(m.name).state.active]
        return actions + steps

    @staticmethod
    def repeats_until(snapshot: Snapshot) -> float:
        """Always (`SchedulingPolicy`): its plans read only states, work, the order of oldest requests and aging."""
        return math.inf

    def __repr__(self) -> str:
        return f"LruScheduling(max_wait_s={self.aging.max_wait_s}, max_skipped_ticks={self.aging.max_skipped_ticks})"


# name -> policy class; cost.py adds "cost" (`CostScheduling`) when the package loads, since it builds on
# this module (an import from here back to it would be a cycle)
POLICIES = {"exclusive": ExclusiveScheduling, "lru": LruScheduling}


def resolve(policy, **aging) -> SchedulingPolicy:
    """The policy for `policy=`: "exclusive", "lru", "cost" (built with `aging`: max_wait_s, max_skipped_ticks),
    or an object with `decide(snapshot)`."""
    if isinstance(policy, str):
        if policy not in POLICIES:
            raise ConfigError(f"policy={policy!r} must be one of {sorted(POLICIES)} or an object with "
                              "decide(snapshot)")
        return POLICIES[policy](**aging)
    if isinstance(policy, SchedulingPolicy) and not isinstance(policy, type):
        if aging:
            raise ConfigError(f"max_wait_s/max_skipped_ticks are a named policy's; {policy!r} has its own")
        return policy
    raise ConfigError(f"policy={policy!r} must be one of {sorted(POLICIES)} or an object with decide(snapshot)")
