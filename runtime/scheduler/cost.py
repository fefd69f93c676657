"""The `cost` scheduling policy (`CostScheduling`): each tick, co-residency with partial offload, time-slicing
with preemption, or a mix of both (a co-resident core, the rest time-sliced beside it), chosen from each
model's fitted `tidal.costmodel.CostModel` to meet per-model SLOs on time to first token (TTFT) and time per
output token (TPOT). Torch-free, like the other policies.

Why both: the study (shared/PAPER.md) found that offloading slows decode non-linearly and model-dependently,
and that a preemption costs mostly the weights' reload. Co-residency pays on every step (streamed layers);
time-slicing pays per switch (a reload). Which is cheaper depends on the models, the machine and the load, so
the policy predicts each with the cost models and takes the cheapest.
"""
from __future__ import annotations

import dataclasses
import itertools
import math

from ..errors import ConfigError, OutOfDeviceMemory, StateError
from ..policy import Load, ModelState, Preempt, Resume
from .policies import POLICIES, Aging, ExclusiveScheduling, evict
from .pricing import Pricing, require_cost_model
from .plans import (HORIZON_S, Estimate, Plan, due, greedy, greedy_order, layer_offers, misses, over, quanta,
                    slice_estimate, worth_switching)
from .state import ModelSnapshot, SetResidency, Snapshot, Step

REBALANCE = 0.05  # residencies of models already co-resident change only for a predicted round this much shorter
# (and only when the round's gain over the queued tokens also pays for the layers moved)
MAX_SUBSETS = 4  # mixed plans: every core for up to this many models with work, tightest-SLO prefixes past it
REPLAN_OF_SLO = 0.1  # a plan is worked out again at least every this much of the tightest TTFT SLO with work,
REPLAN_S = 0.05  # or this many seconds when no model with work has one (and whenever the models with work change)
REPLAN_BACKOFF = 8  # a plan worked out again unchanged is held twice as long the next time, up to this many
# intervals, and never past the time its time-sliced slot may change hands


class CostScheduling:
    """Co-residency, time-slicing or a mixed plan, whichever the cost models predict meets the SLOs best.

    Objective, each tick: build three kinds of candidate plan over the snapshot and take the one with the lowest
    (predicted SLO violation, predicted seconds to finish the queued work) (`Estimate`: violations first,
    since an SLO is a promise and time only an efficiency; time breaks ties, so that with no SLO or none
    attainable the plan that drains fastest wins). The violation counts requests predicted to miss an SLO
    (`plans.misses`, each capped at one miss per SLO), those queued or in flight and those still to come at
    each model's arrival rate (a model left off the device: `_expecting`; a time-sliced one:
    `plans.slice_estimate`). Predictions are the cost models' scaled by what the loop measured (`Pricing`,
    `observe`).

    (a) Co-residency: every model with work active and stepped each tick, so each emits one token per round
    of sum_m step_m(R_m). Residencies R_m are chosen greedily: every model starts at 0 resident layers (a
    model brought in now at the fraction it comes back at, since a Runtime resumes a model at its own plan),
    idle active models are preempted least recently used first only while the budget needs their room, then
    layer by layer the model whose predicted step shrinks most per device byte gets one more resident layer
    while it fits (the step is convex in the streamed layers, so this greedy minimises the round). Models
    already co-resident keep their residencies unless the new ones shorten the round by REBALANCE and the
    gain over the queued tokens pays for the layers' copies (a balanced co-residency stays put). Predicted
    TPOT = the round; TTFT = the wait so far + the plan's transitions + one round.

    (b) Time-slicing: one model active, at the most resident layers that fit, the other models with work
    preempted: weights to the host whenever the host budget takes them unless disk's predicted round trip
    (preempt + resume) is cheaper by DISK_MARGIN, KV swapped or recomputed, whichever is cheaper (`Pricing.tier`). A
    switch is worth its reload only once amortised: the model on the device keeps it for a quantum Q =
    max(one step, `amortise` x the dearest switch cost among the models with work) seconds since it came in
    (or until its work is done), then the most urgent other model (least TTFT slack, then oldest request)
    takes it if it is due (`plans.due`: a model still within its TTFT slack is not switched to) (`_pick`).
    Predicted, round robin at steady state: cycle = sum_m (switch_m + Q_m); TPOT_m = cycle x step_m / Q_m;
    TTFT = wait + cycle - Q_m + step_m (`plans.slice_estimate`).

    (c) Mixed: a core (a subset of the models with work leaving at least two, `_cores`) always active and
    stepped; the others time-sliced beside it in the room it leaves, the one on the device chosen as in (b)
    (`_pick`, the quantum over the core's round plus its step), the core and it at co-residency's residencies
    (`_co_plan`), the others preempted as in (b). Predicted as (b) with rounds for steps; the core emits
    sum_t Q_t / round_t tokens a cycle (`plans.slice_estimate`). The best core is the mixed candidate.

    Hysteresis: the kind of plan chosen last (and a mixed plan's core) stays unless the other's gain covers
    the switch (`plans.worth_switching`: its transitions' seconds, and as much again to come back). A plan's
    transitions stall the requests in flight of the models it keeps on the device (`plans.misses`' stall).
    No plan preempts a model with requests in flight before it has held the device for a quantum, unless a
    model has aged (`_pinned`).

    Replanning: after a plan of Steps alone, the next plan is worked out in full at a tick when the models
    with work differ from that plan's, when a model has aged, when a model it stepped is no longer active, or
    once its interval has passed; at other ticks the last plan's Steps are repeated (`_hold`). The interval is
    `replan_interval` (by default a tenth of the tightest TTFT SLO; `replan_s=0`: every tick), doubled each
    time the plan worked out at its end is the one held (up to REPLAN_BACKOFF intervals; any other plan resets
    it), but never longer than the chosen plan's slot is stable (`Estimate.stable_s`: the time-sliced model on
    the device keeps it until its quantum is held and then until another is due, `_stable`), so that a switch
    comes no later than at the base interval. Working a plan out prices every candidate (milliseconds over four
    or five models with work, as long as a decode step), and between those events a plan of steps changes only
    as time moves the estimates: on the simulated hour of five GPU-shaped models, 95% of the plans worked out
    at the end of an interval were the plan held.

    Aging (`policies.Aging`, reused): once a model has aged, time-slicing and a mixed plan's slot serve the
    first aged model (preempting any other), co-residency steps every model with work anyway; so the exclusive and lru
    bound holds: no model with work goes more than max_skipped_ticks + N - 1 ticks without a step. When
    no plan fits (a host budget too small for a resume) the tick falls back to `ExclusiveScheduling`.

    Needs, per model with work, a CostModel in `snapshot.cost_models` (ConfigError naming it otherwise) and
    the snapshot's `num_layers`/`layer_bytes` for co-residency and mixed plans (without them only time-slicing).
    `predict(snapshot, action)` gives each action's predicted seconds for the trace."""

    needs_cost_models = True

    def __init__(self, max_wait_s: float = 2.0, max_skipped_ticks: int = 32, amortise: float = 1.0,
                 online: bool = True, replan_s: float | None = None):
        self.aging = Aging(max_wait_s, max_skipped_ticks)
        for name, value in (("amortise", amortise), ("replan_s", 0.0 if replan_s is None else replan_s)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ConfigError(f"{name}={value!r} must be a number >= 0")
        self.amortise = float(amortise)
        self.replan_s = None if replan_s is None else float(replan_s)
        self._held: tuple | None = None  # (until, models with work, Steps) of the last plan worked out in full
        self._backoff = 1  # the intervals the plan held now is held for (doubles while replans change nothing)
        self.pricing = Pricing(online)  # what actions cost: the cost models, corrected from `observe`
        self._fallback = ExclusiveScheduling(max_wait_s, max_skipped_ticks)
        self._cms: dict = {}  # name -> CostModel of the models with work, at the tick being decided
        self._steps: dict = {}  # `_step`'s, `_switch_cost`'s and `price`'s predictions at that tick
        self._rank: dict = {}  # name -> its place among the snapshot's models by name, latest first (greedy ties)
        self._ordered: list = []  # the models with work whose layers `_greedy` orders at that tick
        self._lo: dict = {}  # name -> their resident layers from which co-residency starts (0 if active)
        self._predicted: tuple[int, dict] = (-1, {})  # (tick, action -> seconds) of the last plan chosen
        self._samples: tuple[int, dict] = (-1, {})  # (tick, action -> (uncorrected seconds, kind)) of that plan
        self.last_estimates: list[Estimate] = []  # of the last decide, the chosen one first
        self._kind: str | None = None  # the kind of plan the last decide chose (hysteresis)
        self._core: tuple = ()  # the co-resident models of the last mixed plan chosen

    # -- predictions -----------------------------------------------------------------------------------------
    @property
    def correction(self):
        """The online correction of the predictions (`online.OnlineCorrection`; None with online=False)."""
        return self.pricing.correction

    def cost(self, snapshot: Snapshot, m: ModelSnapshot, resident: int, action) -> float | None:
        """Predicted seconds of `action` on `m` with `resident` layers resident before it (`Pricing.cost`)."""
        return self.pricing.cost(snapshot, m, resident, action)

    def price(self, snapshot: Snapshot, m: ModelSnapshot, resident: int, action) -> tuple:
        """`Pricing.price` of `action` on the snapshot's `m` at `resident` layers, for the candidate plans of
        the decide at hand (`Plan.add`), which price the same actions again and again: each once."""
        key = ("price", action, resident)
        if key not in self._steps:
            self._steps[key] = self.pricing.price(snapshot, m, resident, action)
        return self._steps[key]

    def observe(self, snapshot: Snapshot, action, measured_s: float) -> None:
        """The loop's measurement of `action`, applied at `snapshot`'s tick, as the last `decide` planned it:
        one sample for the correction. A step that also prefilled queued requests is none (its prediction is a
        decode step's), nor is a resume whose first step decoded requests in flight and prefilled queued ones;
        a resume with queued requests alone is measured by the loop without the step it ran for them."""
        tick, samples = self._samples
        if self.correction is None or tick != snapshot.tick or action not in samples:
            return
        m = snapshot.model(action.model)
        if m.queued and (isinstance(action, Step) or isinstance(action, Resume) and m.in_flight):
            return
        raw, kind = samples[action]
        if kind is not None:
            self.correction.observe(action.model, kind, raw, measured_s)

    def predict(self, snapshot: Snapshot, action) -> float | None:
        """Predicted seconds of `action` at this snapshot: as planned by the last `decide` on it, else from the
        snapshot's state (`cost`)."""
        tick, table = self._predicted
        if tick == snapshot.tick and action in table:
            return table[action]
        m = snapshot.model(action.model)
        return self.cost(snapshot, m, m.resident_layers(), action)

    # -- deciding --------------------------------------------------------------------------------------------
    def decide(self, snapshot: Snapshot) -> list:
        work = snapshot.with_work
        if not work:
            self._held = None
            return []
        held = self._hold(snapshot, work)
        if held is not None:
            return held
        before = self._held
        actions = self._plan(snapshot, work)
        steady = all(isinstance(a, Step) for a in actions)  # after transitions, the next tick plans anew
        names = frozenset(m.name for m in work)
        if steady and actions:
            same = before is not None and before[1] == names and before[2] == tuple(actions)
            self._backoff = min(REPLAN_BACKOFF, 2 * self._backoff) if same else 1
            base = self.replan_interval(work)
            stable = self.last_estimates[0].stable_s if self.last_estimates else math.inf
            self._held = (snapshot.time + min(base * self._backoff, max(base, stable)), names, tuple(actions))
        else:
            self._held, self._backoff = None, 1
        return actions

    def replan_interval(self, work: list[ModelSnapshot]) -> float:
        """Seconds a plan of steps is repeated before it is worked out again (the base: see the class docstring
        for its backoff): `replan_s`, or by default REPLAN_OF_SLO of the tightest TTFT SLO among the models
        with work (REPLAN_S without one)."""
        if self.replan_s is not None:
            return self.replan_s
        slos = [m.slo_ttft_s for m in work if m.slo_ttft_s is not None]
        return REPLAN_OF_SLO * min(slos) if slos else REPLAN_S

    def repeats_until(self, snapshot: Snapshot) -> float:
        """After a `decide` on `snapshot` that returned Steps alone: the time before which every later `decide`
        returns those Steps again, while the models with work stay the same and none ages (see `_hold`); a
        simulator repeats them without asking."""
        return -math.inf if self._held is None else self._held[0]

    def _hold(self, snapshot: Snapshot, work: list[ModelSnapshot]) -> list | None:
        """The last plan (Steps alone) again, with its predictions, when nothing calls for a new plan: within its
        `replan_interval`, the same models with work, none aged, its stepped models active. A plan takes
        milliseconds to work out over five models (every candidate is priced), as long as a decode step;
        between those events a plan of steps changes only as time moves its estimates."""
        if self._held is None:
            return None
        until, names, steps = self._held
        if snapshot.time >= until or names != {m.name for m in work} or \
                any(self.aging.aged(m) for m in work) or \
                not all(snapshot.model(a.model).state.active for a in steps):
            return None
        prices = [self.pricing.price(snapshot, m, m.resident_layers(), a)
                  for a, m in ((a, snapshot.model(a.model)) for a in steps)]
        self._predicted = (snapshot.tick, {a: p[0] for a, p in zip(steps, prices)})
        self._samples = (snapshot.tick, {a: p[1:] for a, p in zip(steps, prices)})
        return list(steps)

    def _plan(self, snapshot: Snapshot, work: list[ModelSnapshot]) -> list:
        """The plan worked out in full (the class docstring)."""
        self._cms = {m.name: cm for m in snapshot.models if getattr(cm := snapshot.cost_models.get(m.name), "step", None)}
        self._cms |= {m.name: require_cost_model(snapshot, m) for m in work}
        self._steps = {}  # predicted steps and switches at this snapshot, by (name, resident layers)
        self._rank = {n: i for i, n in enumerate(sorted((m.name for m in snapshot.models), reverse=True))}
        self._ordered = [m for m in work if m.num_layers and m.layer_bytes]  # `_greedy`'s one order
        self._lo = {m.name: 0 if m.state.active else m.resident_layers() for m in self._ordered}
        aged = [m for m in self.aging.order(work) if self.aging.aged(m)]
        pinned = self._pinned(snapshot, work, aged)
        mixed = sorted(self._unpinned(self._mixed(snapshot, work, aged), pinned), key=lambda p: p[0].key())
        sticky = [p for p in mixed if p[0].core == self._core]  # the co-resident set stays unless worth changing
        if sticky and mixed[0] is not sticky[0] and not worth_switching(work, sticky[0], mixed[0]):
            mixed.insert(0, sticky[0])
        alone = [self._co_residency(snapshot, work), self._time_slice(snapshot, work, aged)]
        plans = self._unpinned([p for p in alone if p is not None], pinned) + mixed[:1]
        if not plans:
            self.last_estimates = []
            return self._fallback.decide(snapshot)
        plans.sort(key=lambda p: p[0].key())
        now = [p for p in plans if p[0].kind == self._kind]
        if now and plans[0] is not now[0] and not worth_switching(work, now[0], plans[0]):
            plans.remove(now[0])
            plans.insert(0, now[0])
        plan = plans[0][1]
        self._kind, self._core = plans[0][0].kind, plans[0][0].core
        self.last_estimates = [p[0] for p in plans]
        self._predicted = (snapshot.tick, dict(zip(plan.actions, plan.costs)))
        self._samples = (snapshot.tick, dict(zip(plan.actions, plan.samples)))
        return plan.actions

    def _pinned(self, snapshot: Snapshot, work: list[ModelSnapshot], aged: list[ModelSnapshot]) -> set[str]:
        """The models no plan may preempt this tick: active ones with requests in flight that have not yet held
        the device for a quantum (`amortise` x the dearest switch among the models with work, as time-slicing
        sets it); none once a model has aged (aging may take the device from anyone)."""
        if aged:
            return set()
        dearest = max(self._switch_cost(snapshot, m, self._alone(snapshot, m)) for m in work) if len(work) > 1 else 0.0
        return {m.name for m in work if m.state.active and m.in_flight and m.active_s < self.amortise * dearest}

    @staticmethod
    def _unpinned(built: list, pinned: set[str]) -> list:
        """The candidates (Estimate, Plan) that preempt no pinned model; all of them when none is left."""
        ok = [p for p in built if not any(isinstance(a, Preempt) and a.model in pinned for a in p[1].actions)]
        return ok or built

    def explain(self) -> list[dict]:
        """The last decide's candidate plans as predicted, the chosen one first: kind, the mixed plan's core,
        violation (the summed relative overshoot of the SLOs) and seconds (to drain the queued work)."""
        return [{"kind": e.kind, **({"core": list(e.core)} if e.core else {}), "violation": round(e.violation, 4),
                 "seconds": round(e.seconds, 4)} for e in self.last_estimates]

    def _step(self, m: ModelSnapshot, resident: int) -> float:
        key = (m.name, resident)  # the greedy asks for the same steps again and again within a decide
        if key not in self._steps:  # and for every residency of a model: predicted at once
            for r, seconds in enumerate(self.pricing.steps(self._cms[m.name], m)):
                self._steps[(m.name, r)] = seconds
        return self._steps[key]

    def _evict(self, plan: Plan, m: ModelSnapshot, reserve_host: int = 0) -> None:
        """Preempt `m` to the tier `Pricing.tier` chooses, the host only when the host budget takes its copy."""
        view = plan.view
        host_fits = view.host_budget is None or \
            view.host_used + view.model(m.name).host_copy_bytes + reserve_host <= view.host_budget
        tier = self._tier(plan.snapshot, m, plan.resident[m.name], host_fits)
        plan.add(Preempt(m.name, tier[1], tier[2]) if tier else evict(view, m.name, reserve_host))

    def _switch_cost(self, snapshot: Snapshot, m: ModelSnapshot, resident: int) -> float:
        """The predicted round trip (preempt + resume) of `m` to the tier `Pricing.tier` would choose (0 when none can
        be predicted)."""
        key = ("switch", m.name, resident)
        if key not in self._steps:
            host_fits = snapshot.host_budget is None or \
                self._host_used(snapshot) + m.layer_bytes * resident <= snapshot.host_budget
            tier = self._tier(snapshot, m, resident, host_fits)
            self._steps[key] = tier[0] if tier else 0.0
        return self._steps[key]

    def _host_used(self, snapshot: Snapshot) -> int:
        if "host_used" not in self._steps:
            self._steps["host_used"] = snapshot.pool().host_used
        return self._steps["host_used"]

    def _tier(self, snapshot: Snapshot, m: ModelSnapshot, resident: int, host_fits: bool):
        """`Pricing.tier` of `m` at this tick (many candidate plans evict the same model the same way)."""
        key = ("tier", m.name, resident, host_fits)
        if key not in self._steps:
            cm = self._cms.get(m.name) or require_cost_model(snapshot, m)
            self._steps[key] = self.pricing.tier(cm, m, resident, host_fits)
        return self._steps[key]

    def _greedy(self, members: list[ModelSnapshot], lo: dict, room: float, weight: dict | None = None) -> dict:
        """`plans.greedy` over `members` with each step weighted by `weight` (name -> factor, default 1), at
        this tick. The mixed plans ask for co-residencies of many subsets of the models with work, in other
        rooms; a layer's key does not depend on the models it is ordered with, so while the members are models
        with work at weight 1 from their own starting residency, one `greedy_order` of all of those serves
        every subset and room (others: one order per set of members)."""
        weight = weight or {}
        if all(weight.get(m.name, 1.0) == 1.0 and self._lo.get(m.name) == lo[m.name] for m in members):
            if "order" not in self._steps:
                self._steps["order"] = greedy_order(None, self._ordered, self._lo,
                                                    lambda m: self._offers(m, self._lo[m.name], 1.0))
            key = ("greedy", frozenset(lo), room)  # a mixed plan's slot asks again for the set its core priced
            if key not in self._steps:
                self._steps[key] = greedy(None, members, lo, room, self._steps["order"])
            return dict(self._steps[key])
        names = tuple(sorted(m.name for m in members))
        key = ("greedy", names, tuple(lo[n] for n in names), tuple(weight.get(n, 1.0) for n in names))
        if key not in self._steps:
            self._steps[key] = greedy_order(None, members, lo, lambda m: self._offers(m, lo[m.name],
                                                                                   weight.get(m.name, 1.0)))
        return greedy(None, members, lo, room, self._steps[key])

    def _offers(self, m: ModelSnapshot, resident: int, weight: float) -> list:
        """`plans.layer_offers` of `m` from `resident` layers, its steps weighted by `weight`, at this tick (the
        same in every set of models it is ordered with; ranked by name among all the snapshot's models)."""
        key = ("offers", m.name, resident, weight)
        if key not in self._steps:
            step = (lambda x, r: weight * self._step(x, r)) if weight != 1.0 else self._step
            self._steps[key] = layer_offers(step, m, resident, self._rank[m.name])
        return self._steps[key]

    def _alone(self, snapshot: Snapshot, m: ModelSnapshot) -> int:
        """The most resident layers `m` can have alone on the device (its own plan's when unknown)."""
        if not m.num_layers or snapshot.device_budget is None:
            return m.num_layers or m.resident_layers()
        key = ("alone", m.name)
        if key not in self._steps:
            now = m.resident_layers()
            base = m.view.active_device_bytes - m.layer_device_bytes(now)
            self._steps[key] = max((r for r in range(now, m.num_layers + 1)
                                    if base + m.layer_device_bytes(r) <= snapshot.device_budget), default=now)
        return self._steps[key]

    @staticmethod
    def _setup(plan: Plan) -> float:
        return plan.seconds - sum(c or 0.0 for a, c in zip(plan.actions, plan.costs) if isinstance(a, Step))

    @staticmethod
    def _expected(m: ModelSnapshot, horizon: float) -> float:
        """The probability that `m` gets a request within `horizon` seconds at its arrival rate (Poisson)."""
        return 1.0 - math.exp(-m.arrival_rate * max(horizon, HORIZON_S))

    def _expecting(self, snapshot: Snapshot, built):
        """`built` (Estimate, Plan) with the violation expected from requests still to come: a model without work
        that the plan leaves off the device gets one within the plan's seconds with probability `_expected`, and
        that request's first token waits for the model's resume (or load) and a step."""
        est, plan = built
        extra = 0.0
        for m in snapshot.models:
            if m.has_work or not m.arrival_rate or m.slo_ttft_s is None or m.name not in self._cms or \
                    plan.view.model(m.name).state.active:
                continue
            r = m.resident_layers()
            back = self.cost(snapshot, m, r, Load(m.name) if m.state is ModelState.UNLOADED else Resume(m.name))
            extra += self._expected(m, est.seconds) * min(1.0, over(
                (back or 0.0) + self.cost(snapshot, m, r, Step(m.name)), m.slo_ttft_s))
        return dataclasses.replace(est, violation=est.violation + extra), plan

    def _co_residency(self, snapshot: Snapshot, work: list[ModelSnapshot]):
        """The better of two co-residencies: of the models with work alone (idle active models preempted while
        their room is needed), and of those with the idle active models kept too, each weighted in the round
        by the chance it gets a request (`_expected`)."""
        idle = [m for m in snapshot.models if not m.has_work and m.state.active and m.arrival_rate > 0 and
                m.name in self._cms]
        out = []
        for members in ([work, work + idle] if idle else [work]):
            weight = {m.name: 1.0 if m.has_work else self._expected(m, HORIZON_S) for m in members}
            built = self._co_plan(snapshot, members, weight=weight)
            if built is None:
                continue
            plan, target = built
            rnd, setup = sum(self._step(m, target[m.name]) for m in work), self._setup(plan)
            kept = [(m, weight[m.name] * self._step(m, target[m.name])) for m in members if not m.has_work]
            expected = rnd + sum(s for _, s in kept)  # the round once the kept idle models' requests come
            violation = sum(misses(m, None if m.first_token_wait_s is None else m.first_token_wait_s + setup + rnd,
                                   expected, setup) for m in work) + \
                sum(weight[m.name] * min(1.0, over(expected + s, m.slo_tpot_s)) for m, s in kept)
            seconds = setup + max(max(1, m.remaining_tokens) for m in work) * rnd
            out.append(self._expecting(snapshot, (Estimate("co-residency", violation, seconds), plan)))
        return min(out, key=lambda p: p[0].key(), default=None)

    def _co_plan(self, snapshot: Snapshot, members: list[ModelSnapshot], leave=(), weight=None):
        """(plan, resident layers) that preempts the active models in `leave`, then makes `members` active (and
        those with work stepped) at co-residency's residencies, each member's step weighted by `weight` (name
        -> factor, default 1) in choosing them; None when it does not fit."""
        if any(not m.num_layers or not m.layer_bytes for m in members):
            return None  # residency bytes unknown: no co-residency to budget
        weight = weight or {}
        step = lambda m, r: weight.get(m.name, 1.0) * self._step(m, r)  # noqa: E731
        plan, names = Plan(self, snapshot), {m.name for m in members}
        lo = {m.name: 0 if m.state.active else m.resident_layers() for m in members}
        at = {m.name: m.view.active_device_bytes - m.layer_device_bytes(m.resident_layers()) for m in members}
        budget = math.inf if snapshot.device_budget is None else snapshot.device_budget

        def room(resident) -> float:
            others = sum(v.device_bytes for v in plan.view.models if v.name not in names)
            return budget - others - sum(at[m.name] + m.layer_device_bytes(resident[m.name]) for m in members)

        try:
            reserve = sum(m.need().host_bytes for m in members if not m.state.active)
            for m in leave:
                if plan.view.model(m.name).state.active:
                    self._evict(plan, m, reserve)
            # idle active models leave only while the room is needed: the least expected first, then least recently used
            for v in sorted(plan.view.lru_order(), key=lambda v: snapshot.model(v.name).arrival_rate):
                if room(lo) >= 0:
                    break
                if v.state.active and v.name not in names:
                    self._evict(plan, snapshot.model(v.name))
            if room(lo) < 0:
                return None
            target = self._greedy(members, lo, room(lo), weight)
            if all(m.state.active for m in members):
                now = {m.name: m.resident_layers() for m in members}
                new_round = sum(step(m, target[m.name]) for m in members)
                old_round = sum(step(m, now[m.name]) for m in members)
                moves = sum(self.price(snapshot, m, now[m.name],
                                       SetResidency(m.name, target[m.name] / m.num_layers))[0] or 0.0
                            for m in members if target[m.name] != now[m.name])
                tokens = max(max(1, m.remaining_tokens) for m in members)
                if new_round > (1 - REBALANCE) * old_round or (old_round - new_round) * tokens <= moves:
                    target = now  # not worth moving layers: a small gain, or one the moves' copies eat
            for m in members:  # shrink first, then bring in, then grow: the bytes in use only rise to the target
                if m.state.active and target[m.name] < plan.resident[m.name]:
                    plan.add(SetResidency(m.name, target[m.name] / m.num_layers))
            for m in members:
                if not m.state.active:
                    plan.add(Load(m.name) if m.state is ModelState.UNLOADED else Resume(m.name))
            for m in members:
                if target[m.name] > plan.resident[m.name]:
                    plan.add(SetResidency(m.name, target[m.name] / m.num_layers))
        except (OutOfDeviceMemory, StateError):
            return None
        for m in sorted(members, key=lambda m: m.name):
            if m.has_work:
                plan.add(Step(m.name))
        return plan, target

    def _mixed(self, snapshot: Snapshot, work: list[ModelSnapshot], aged: list[ModelSnapshot]) -> list:
        """The mixed plans, one per core (a co-resident subset, `_cores`): the core always active and stepped, the
        other models time-sliced beside it in the room it leaves, the one chosen as time-slicing chooses (aged
        first) co-resident with it at co-residency's residencies."""
        if any(not m.num_layers or not m.layer_bytes for m in work):
            return []
        budget = math.inf if snapshot.device_budget is None else snapshot.device_budget
        idle = sum(m.view.device_bytes for m in snapshot.models if not m.has_work)
        out = []
        for core in self._cores(work):
            rest = [m for m in work if m not in core]
            target, rnd, switch = {}, {}, {}
            for t in rest:  # each sliced model's round beside the core, as co-residency would set it from scratch
                members = core + [t]
                lo = {m.name: 0 if m.state.active else m.resident_layers() for m in members}
                room = budget - idle - sum(m.view.active_device_bytes - m.layer_device_bytes(m.resident_layers())
                                           + m.layer_device_bytes(lo[m.name]) for m in members)
                if room < 0:
                    break
                target[t.name] = self._greedy(members, lo, room)
                rnd[t.name] = sum(self._step(m, target[t.name][m.name]) for m in members)
                switch[t.name] = self._switch_cost(snapshot, t, target[t.name][t.name])
            else:
                hold = quanta(rest, rnd, switch, self.amortise)[0]
                built = []
                for x in self._picks(rest, hold, switch, aged):
                    co = self._co_plan(snapshot, core + [x], [t for t in rest if t is not x])
                    if co is not None:
                        plan, got = co
                        r = dict(rnd, **{x.name: sum(self._step(m, got[m.name]) for m in core + [x])})
                        q = quanta(rest, r, switch, self.amortise)[1]
                        est = slice_estimate("mixed", core, rest, x, r, switch, q, self._setup(plan))
                        est = dataclasses.replace(est, stable_s=self._stable(rest, x, hold, switch))
                        built.append(self._expecting(snapshot, (est, plan)))
                if built:
                    out.append(self._choose(built))
        return out

    @staticmethod
    def _cores(work: list[ModelSnapshot]) -> list[list[ModelSnapshot]]:
        """The candidate cores: every subset leaving at least two models to time-slice (a single one left is
        co-residency, an empty core time-slicing); past MAX_SUBSETS models, the prefixes of the tightest-SLO
        order only."""
        if len(work) <= MAX_SUBSETS:
            return [list(c) for k in range(1, len(work) - 1) for c in itertools.combinations(work, k)]
        tight = sorted(work, key=lambda m: (m.slo_tpot_s or math.inf, m.slo_ttft_s or math.inf, m.name))
        return [tight[:k] for k in range(1, len(work) - 1)]

    @staticmethod
    def _current(work: list[ModelSnapshot]) -> ModelSnapshot | None:
        """The time-sliced model on the device now: the most recently used active one."""
        active = [m for m in work if m.state.active]
        return max(active, key=lambda m: (m.view.last_used, m.name)) if active else None

    def _pick(self, work: list[ModelSnapshot], hold: dict, switch: dict, aged: list[ModelSnapshot]) -> ModelSnapshot:
        """The time-sliced model on the device this tick: the first aged one; else the current one (the most
        recently used active one) until its quantum is held, or while no other is `due`; else the most urgent
        other (least TTFT slack, then oldest request) that is due."""
        aged = [m for m in aged if m in work]
        current = self._current(work)
        others = sorted((m for m in work if m is not current), key=lambda m: (
            math.inf if m.slo_ttft_s is None or m.first_token_wait_s is None else m.slo_ttft_s - m.first_token_wait_s,
            -(m.oldest_age_s or 0.0), m.name))
        if aged:
            return aged[0]
        if current is not None and (current.active_s < hold[current.name] or not others or
                                    not any(due(o, hold[current.name], switch[o.name]) for o in others)):
            return current
        return next(o for o in others if due(o, hold[current.name], switch[o.name])) if current is not None \
            else others[0]

    def _stable(self, work: list[ModelSnapshot], x: ModelSnapshot, hold: dict, switch: dict) -> float:
        """Seconds for which the slot's choice of `x` holds by itself (aging aside, which ends a held plan
        anyway): 0 unless `x` is the current model; else the rest of its quantum; past it, while no other model
        is `due`, until the first becomes due (its first token's wait grows into the slack of one more quantum
        and its switch); with another due already, `x` is kept because the estimates prefer it (`_choose`),
        which changes only as they drift, as the choice of kind does (no bound of its own)."""
        if x is not self._current(work):
            return 0.0
        if x.active_s < hold[x.name]:
            return hold[x.name] - x.active_s
        until = []
        for o in work:
            if o is not x:
                if due(o, hold[x.name], switch[o.name]):
                    return math.inf
                until.append(o.slo_ttft_s - o.first_token_wait_s - hold[x.name] - switch[o.name])
        return max(0.0, min(until, default=math.inf))

    def _picks(self, work: list[ModelSnapshot], hold: dict, switch: dict, aged: list[ModelSnapshot]) -> list:
        """The candidates for the slot: `_pick`'s, and, when that takes the device from a current model with
        requests in flight and a TPOT SLO (its quantum held, another due) and none has aged, the current model
        kept: the estimates decide (`_choose`) between stalling its requests mid-generation and making the
        others wait longer (lru never preempts a busy model, which on nopay kept L12's TPOT)."""
        x, current = self._pick(work, hold, switch, aged), self._current(work)
        if any(m in work for m in aged) or current is None or current is x or not current.in_flight or \
                current.slo_tpot_s is None:
            return [x]
        return [x, current]

    def _time_slice(self, snapshot: Snapshot, work: list[ModelSnapshot], aged: list[ModelSnapshot]):
        alone = {m.name: self._alone(snapshot, m) for m in work}
        step = {m.name: self._step(m, alone[m.name]) for m in work}
        switch = {m.name: self._switch_cost(snapshot, m, alone[m.name]) if len(work) > 1 else 0.0 for m in work}
        # the device is held for the whole quantum (a model that finishes sooner leaves by itself: predicting
        # its end from the remaining tokens cut quanta short, as new requests join its batch); the estimate
        # counts only the time its queued work needs
        hold, quantum = quanta(work, step, switch, self.amortise)
        built = []
        for x in self._picks(work, hold, switch, aged):
            plan = self._slice_plan(snapshot, work, x, alone[x.name])
            if plan is not None:
                est = slice_estimate("time-slicing", [], work, x, step, switch, quantum, self._setup(plan))
                est = dataclasses.replace(est, stable_s=self._stable(work, x, hold, switch))
                built.append(self._expecting(snapshot, (est, plan)))
        return self._choose(built) if built else None

    @staticmethod
    def _choose(built: list):
        """Of the slot's candidate plans (`_picks`' order), the first, unless a later one (the current model
        kept) is predicted to miss fewer SLOs: time alone does not keep a model past its quantum, so that
        round robin still bounds every wait."""
        best = built[0]
        for alt in built[1:]:
            if round(alt[0].violation, 9) < round(best[0].violation, 9):
                best = alt
        return best

    def _slice_plan(self, snapshot: Snapshot, work: list[ModelSnapshot], x: ModelSnapshot, alone: int):
        """The plan that gives `x` the device alone among the models with work, at up to `alone` resident
        layers, and steps it; None when it does not fit."""
        plan = Plan(self, snapshot)
        try:
            reserve = 0 if x.state.active else x.need().host_bytes
            for v in plan.view.lru_order():
                if v.state.active and v.name != x.name and snapshot.model(v.name).has_work:
                    self._evict(plan, snapshot.model(v.name), reserve)
            if not x.state.active:  # idle models leave only while the room is needed, the least expected first
                idle = sorted((v for v in plan.view.lru_order() if v.state.active and v.name != x.name),
                              key=lambda v: snapshot.model(v.name).arrival_rate)
                while True:
                    try:
                        plan.add(Load(x.name) if x.state is ModelState.UNLOADED else Resume(x.name))
                        break
                    except OutOfDeviceMemory:
                        if not idle:
                            return None
                        self._evict(plan, snapshot.model(idle.pop(0).name), reserve)
            for r in range(alone, plan.resident[x.name], -1):  # as many resident layers as fit
                try:
                    plan.add(SetResidency(x.name, r / x.num_layers))
                    break
                except OutOfDeviceMemory:
                    pass
        except (OutOfDeviceMemory, StateError):
            return None
        plan.add(Step(x.name))
        return plan

    def __repr__(self) -> str:
        return (f"CostScheduling(max_wait_s={self.aging.max_wait_s}, max_skipped_ticks={self.aging.max_skipped_ticks}"
                f", amortise={self.amortise}, online={self.correction is not None})")


POLICIES["cost"] = CostScheduling
