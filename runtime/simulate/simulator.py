"""The simulator (`Simulator`): the scheduler's loop over simulated engines, on simulated time. Torch-free.

Each tick, as `tidal.Scheduler`'s loop does it: requests that have arrived are queued on their model; a frozen
`Snapshot` is built (the same type, the same fields, from the simulated engines' books); the *policy object*
decides (the very `exclusive`, `lru` or `cost` policy the live loop runs, or any object with `decide`); the
loop's own `check_actions` refuses a plan the state does not allow; each action is applied in order and the
clock advances by its duration: Step by the simulated engine's step (`engine.SimEngine`), every other
action by what `scheduler.pricing.Pricing` predicts from the model's `CostModel` (the cost policy's own
prices, uncorrected); a Resume of a model with work also runs its first step, overlapped with the copies, as
the loop's does (the Step after it then returns that step's tokens and takes no time). Each model's bytes
are the `policy.PoolView` counts of its state and residency, and `check_actions` checks every plan against
them, so the budgets hold as they do live. The trace and the aging counters are the loop's.

Fast-forward: a policy that says until when it repeats a plan of Steps alone (`repeats_until`: `exclusive` and
`lru` always, their plans reading only the models' states, which have work, the order of their oldest
requests and the aging counters; `cost` until it works its plan out again, `replan_s` later) gets it
repeated without being asked, through the arrivals and finished requests of the models with work, until that
time, a request for a model without work, a stepped model out of work, or a waiting model about to age (a
test checks such runs equal to asking at every tick).
"""
from __future__ import annotations

import bisect
import dataclasses
import types

from ..errors import ConfigError
from ..policy import Load, ModelState, ModelView, PoolView, Preempt, Resume
from ..scheduler.policies import resolve
from ..scheduler.pricing import Pricing
from ..scheduler.state import (ARRIVAL_WINDOW_S, ModelSnapshot, SetResidency, Snapshot, Step, Unload,
                               check_actions)
from .engine import Backlog, SimEngine, SimRequest


@dataclasses.dataclass
class SimResult:
    """What one simulation did: every request with its timestamps, the trace (loads, preemptions, resumes,
    residency changes; steps only counted), the simulated seconds, and the policy's decisions."""

    policy: str
    requests: list[SimRequest]
    trace: list[dict]
    steps: dict[str, int]
    end_s: float
    decisions: int  # times the policy was asked
    ticks: int
    busy_s: float  # simulated seconds spent stepping a model


class Simulator:
    """Run `policy` ("exclusive", "lru", "cost" or a policy object) over simulated `models` (SimModelConfig)
    under the budgets (bytes; None: no limit). `max_wait_s`/`max_skipped_ticks`: a named policy's aging."""

    def __init__(self, models, policy="lru", device_budget: int | None = None, host_budget: int | None = None,
                 **aging):
        names = [m.name for m in models]
        if len(set(names)) != len(names) or not names:
            raise ConfigError(f"models must have distinct names, at least one: {names}")
        self.configs = {m.name: m for m in models}
        self.policy = resolve(policy, **aging)
        self.policy_name = policy if isinstance(policy, str) else type(policy).__name__
        self.device_budget, self.host_budget = device_budget, host_budget
        for m in models:
            r = round(m.resident_fraction * m.num_layers)
            for tier, need, budget in (("device", m.device_bytes(r), device_budget),
                                       ("host", m.host_bytes(r), host_budget)):
                if budget is not None and need > budget:
                    raise ConfigError(f"model {m.name!r} needs {need} {tier} bytes while active; the {tier} budget "
                                      f"is {budget}, so it can never be loaded")
        self.cost_models = types.MappingProxyType({m.name: m.cost_model for m in models})
        self.pricing = Pricing(online=False)

    # -- one run -------------------------------------------------------------------------------------------------
    def run(self, trace) -> SimResult:
        """Simulate `trace` (workload.TraceRequest, any order) until every request has finished."""
        reqs = sorted((SimRequest(i, t.model, t.prompt_tokens, t.output_tokens, t.time_s) for i, t in
                       enumerate(trace)), key=lambda r: (r.arrival_s, r.id))
        unknown = sorted({r.model for r in reqs} - set(self.configs))
        if unknown:
            raise ConfigError(f"the trace names model {unknown[0]!r}; simulated: {sorted(self.configs)}")
        for r in reqs:
            cfg = self.configs[r.model]
            if cfg.blocks_for(r.prompt_tokens + 1) > cfg.blocks:
                raise ConfigError(f"a request of {r.prompt_tokens} prompt tokens can never fit model {r.model!r}'s "
                                  f"KV cache ({cfg.blocks * cfg.block_size} tokens)")
        run = _Run(self, reqs)
        return run.go()


class _Run:
    """The state of one simulation (the loop's books, the engines, the pool view)."""

    def __init__(self, sim: Simulator, reqs: list[SimRequest]):
        self.sim, self.reqs = sim, reqs
        self.engines = {n: SimEngine(c) for n, c in sim.configs.items()}
        self.state = {n: ModelState.UNLOADED for n in sim.configs}
        self.queues = {n: Backlog() for n in sim.configs}
        self.arrivals: dict[str, list[float]] = {n: [] for n in sim.configs}  # every arrival, in order
        self.preempted_kv: dict[str, str | None] = {n: None for n in sim.configs}
        self.last_used = {n: -1 for n in sim.configs}
        self.last_step_at: dict[str, float] = {}
        self.active_since: dict[str, float] = {}
        self.skipped = {n: 0 for n in sim.configs}
        self.trace: list[dict] = []
        self.steps = {n: 0 for n in sim.configs}
        self.now, self.tick, self.next, self.decisions, self.busy = 0.0, 0, 0, 0, 0.0
        self.carried: set[str] = set()  # models whose resume ran their next step ahead (the engine's carry)

    def view(self, name: str) -> ModelView:
        """The model's bytes as `policy.PoolView` counts them (its module docstring): active, the device at its
        residency and the host its streamed layers; preempted to the host, a host copy of what was on the
        device more; to disk, nothing."""
        cfg, r, state = self.sim.configs[name], self.engines[name].resident, self.state[name]
        device, host = cfg.device_bytes(r), cfg.host_bytes(r)
        copy = cfg.top_bytes + r * cfg.layer_bytes
        now = {ModelState.ACTIVE: (device, host), ModelState.PREEMPTED_HOST: (0, host + copy),
               ModelState.PREEMPTED_DISK: (0, 0), ModelState.UNLOADED: (0, 0)}[state]
        return ModelView(name, state, now[0], now[1], device, host, host_copy_bytes=copy, host_release_bytes=host,
                         last_used=self.last_used[name])

    # -- the snapshot --------------------------------------------------------------------------------------------
    def pool(self) -> PoolView:
        return PoolView(self.sim.device_budget, self.sim.host_budget, tuple(self.view(n) for n in self.sim.configs))

    def snapshot(self) -> Snapshot:
        """The live loop's snapshot (`scheduler.snapshots.build`) of the simulated books. Its aggregates over a
        model's requests come from the backlogs' running sums and the (batch-sized) running set, so a tick costs
        the same however long the queues grow."""
        now, models = self.now, []
        window = min(ARRIVAL_WINDOW_S, max(1.0, now))
        for name, cfg in self.sim.configs.items():
            e, q = self.engines[name], self.queues[name]
            parts, running = (q, e.waiting), e.running
            count = len(q) + len(e.waiting) + len(running)
            oldest = min([t for t in (p.oldest_arrival() for p in parts) if t is not None] +
                         [r.arrival_s for r in running], default=None)
            no_token = [t for t in (p.oldest_without_token() for p in parts) if t is not None] + \
                [r.arrival_s for r in running if r.first_token_s is None]
            view = self.view(name)
            active = view.state.active
            arrivals = self.arrivals[name]
            models.append(ModelSnapshot(
                view, e.resident / cfg.num_layers, len(q), e.unfinished,
                oldest_age_s=None if oldest is None else now - oldest,
                waited_s=0.0 if oldest is None else now - max(oldest, self.last_step_at.get(name, oldest)),
                skipped_ticks=self.skipped[name] if oldest is not None else 0,
                slo_ttft_s=cfg.slo_ttft_s, slo_tpot_s=cfg.slo_tpot_s,
                context=(q.context + e.waiting.context + sum(r.context for r in running)) // count if count else 0,
                remaining_tokens=max([p.max_remaining() for p in parts] +
                                     [r.output_tokens - r.generated for r in running]),
                kv_bytes=e.kv_bytes(),
                first_token_wait_s=now - min(no_token) if no_token else None,
                first_token_waiting=len(q) - q.with_token + len(e.waiting) - e.waiting.with_token +
                sum(r.first_token_s is None for r in running),
                active_s=now - self.active_since.get(name, 0.0) if active else 0.0,
                preempted_kv=self.preempted_kv[name], ring_slots=cfg.ring_slots, num_layers=cfg.num_layers,
                layer_bytes=cfg.layer_bytes,
                arrival_rate=(len(arrivals) - bisect.bisect_left(arrivals, now - window)) / window))
        return Snapshot(now, self.tick, self.sim.device_budget, self.sim.host_budget, tuple(models),
                        self.sim.cost_models)

    # -- the loop ------------------------------------------------------------------------------------------------
    def arrive(self, busy: set | None = None) -> bool:
        """Queue the requests that have arrived by now; with `busy`, only while they are for those models (False:
        one for another model is next)."""
        while self.next < len(self.reqs) and self.reqs[self.next].arrival_s <= self.now:
            r = self.reqs[self.next]
            if busy is not None and r.model not in busy:
                return False
            self.queues[r.model].append(r)
            self.arrivals[r.model].append(r.arrival_s)
            self.next += 1
        return True

    def with_work(self) -> set[str]:
        """The models with work: queued, or unfinished in their engine."""
        return {n for n, e in self.engines.items() if self.queues[n] or e.unfinished}

    def pending(self) -> int:
        return sum(len(q) for q in self.queues.values()) + sum(e.unfinished for e in self.engines.values())

    def go(self) -> SimResult:
        policy = self.sim.policy
        while self.next < len(self.reqs) or self.pending():
            self.arrive()
            if not self.pending():
                self.now = self.reqs[self.next].arrival_s  # idle until the next arrival
                continue
            snap = self.snapshot()
            actions = check_actions(snap, policy.decide(snap))
            self.decisions += 1
            self.apply_all(snap, actions)
            repeats = getattr(policy, "repeats_until", None)
            if callable(repeats) and actions and all(isinstance(a, Step) for a in actions) and \
                    self.with_work() == {m.name for m in snap.with_work}:
                self.fast_forward(snap, actions, repeats(snap))
        return SimResult(self.sim.policy_name, self.reqs, self.trace, self.steps, self.now, self.decisions,
                         self.tick, self.busy)

    def apply_all(self, snap: Snapshot, actions) -> None:
        """Apply the plan in order, the clock advancing by each action."""
        stepped = set()
        for action in actions:
            t = self.now
            seconds, moved = self.apply(snap, action)
            self.now += seconds
            if isinstance(action, Step):
                self.steps[action.model] += 1
                self.busy += seconds
                stepped.add(action.model)
            else:
                self.trace.append({"time": t, "tick": self.tick, "action": type(action).__name__,
                                   "model": action.model, "seconds": seconds, "bytes": moved,
                                   "args": {k: v for k, v in dataclasses.asdict(action).items() if k != "model"}})
            if isinstance(action, (Step, Load, Resume)):
                self.last_used[action.model] = self.tick
            if isinstance(action, (Load, Resume)):
                self.active_since[action.model] = t
        self.count_ticks([m.name for m in snap.with_work], stepped)

    def count_ticks(self, work: list[str], stepped: set) -> None:
        """The loop's books after a tick that stepped `stepped` while `work` (names) had work."""
        self.skipped = {n: (0 if n in stepped or n not in work else self.skipped[n] + 1) for n in self.skipped}
        for n in stepped:
            self.last_step_at[n] = self.now
        self.tick += 1

    def fast_forward(self, snap: Snapshot, actions, until: float) -> None:
        """Repeat a plan of Steps alone while nothing the policy reads changes (see the module docstring): before
        `until`, the same models with work (a request for one of them may arrive, one of theirs may finish),
        none of them about to age."""
        aging = getattr(self.sim.policy, "aging", None)  # a policy without aging has nothing to age
        names = [a.model for a in actions]
        work = [m.name for m in snap.with_work]
        busy, stepped = set(work), set(names)
        waiting = [(m.name, snap.time - m.oldest_age_s) for m in snap.with_work if m.name not in names] \
            if aging is not None else []
        while self.now < until and self.arrive(busy):
            for name, oldest in waiting:
                waited = self.now - max(oldest, self.last_step_at.get(name, oldest))
                if self.skipped[name] + 1 >= aging.max_skipped_ticks or waited >= aging.max_wait_s:
                    return
            for n in names:
                seconds = self.step(n)
                self.now += seconds
                self.busy += seconds
                self.steps[n] += 1
                self.last_used[n] = self.tick
            self.count_ticks(work, stepped)
            if not all(self.queues[n] or self.engines[n].unfinished for n in names):
                return

    def hand(self, name: str) -> SimEngine:
        e, queue = self.engines[name], self.queues[name]
        if queue:
            for r in queue:
                e.hand(r, self.now)
            self.queues[name] = Backlog()
        return e

    def step(self, name: str) -> float:
        """One step of `name`'s engine, its queued requests handed to it first: its seconds (none for the step
        a resume ran ahead, whose outputs this one returns, as `Engine.step` returns its carry)."""
        e = self.hand(name)
        if name in self.carried:
            self.carried.discard(name)
            return 0.0
        return e.step(self.now)[0]

    def resume(self, name: str, price: dict, weights: str) -> float:
        """The loop's Resume: the queued requests handed over, then, with any work, the first step run ahead
        while the copies land (pipelined: it starts once the KV and, from the host, the first layer are in,
        and its tokens are out no earlier than the last copy); its seconds."""
        e = self.hand(name)
        copies = price["weights"] + price["kv"]
        if not e.unfinished:
            return price["total"]
        lead = price["kv"] + price["weights"] / max(1, e.resident + 1) if weights == "host" else copies
        seconds = e.step(self.now + lead, not_before=self.now + copies)[0]
        self.busy += seconds
        self.carried.add(name)
        return max(copies, lead + seconds)

    def apply(self, snap: Snapshot, action) -> tuple[float, int]:
        """Apply `action`: (its simulated seconds, the bytes it moved). The plan passed `check_actions` on the
        snapshot, whose views `view` makes: the byte books need no check here."""
        name = action.model
        cfg, e, m = self.sim.configs[name], self.engines[name], snap.model(name)
        if isinstance(action, Step):
            return self.step(name), 0
        m = dataclasses.replace(m, view=self.view(name), kv_bytes=e.kv_bytes())
        if isinstance(action, Resume):
            w, kv = self.state[name].weights or "host", self.preempted_kv[name] or "swap"
            price = self.sim.pricing.resume(cfg.cost_model, m, e.resident, w, kv)
        else:
            seconds = self.sim.pricing.cost(snap, m, e.resident, action) or 0.0
        weights = cfg.top_bytes + e.resident * cfg.layer_bytes
        moved = 0
        if isinstance(action, SetResidency):
            new = m.resident_layers(action.fraction)
            moved, e.resident = abs(new - e.resident) * cfg.layer_bytes, new
        elif isinstance(action, Unload):
            self.state[name] = ModelState.UNLOADED
        elif isinstance(action, Preempt):
            moved = (weights if action.weights == "host" else 0) + (e.kv_bytes() if action.kv == "swap" else 0)
            self.state[name], self.preempted_kv[name] = ModelState.preempted_to(action.weights), action.kv
            if action.kv == "recompute":
                e.drop_kv()
        else:  # Load, Resume
            moved = weights + (e.kv_bytes() if self.preempted_kv[name] == "swap" else 0)
            self.state[name], self.preempted_kv[name] = ModelState.ACTIVE, None
            if isinstance(action, Resume):
                seconds = self.resume(name, price, w)
        return seconds, moved
