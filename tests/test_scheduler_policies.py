"""The scheduler's policies on synthetic snapshots: pure, exact actions on small cases, exhaustive over small
state spaces, and a tick-level simulation (the same policy objects, no engine) that checks the aging bound."""
import dataclasses
import itertools
import random

import pytest

from tidal.errors import ConfigError, OutOfDeviceMemory, StateError
from tidal.policy import Load, ModelState, ModelView, Preempt, Resume
from tidal.scheduler import (Aging, ExclusiveScheduling, LruScheduling, ModelSnapshot, SetResidency, Snapshot, Step,
                             Unload, check_actions, resolve)

S = ModelState
SIZE = 100  # device bytes of every synthetic model while active


def model(name, state=S.ACTIVE, queued=0, in_flight=0, age=None, waited=0.0, skipped=0, last=0, size=SIZE,
          copy=SIZE):
    device = size if state is S.ACTIVE else 0
    host = copy if state is S.PREEMPTED_HOST else 0
    view = ModelView(name, state, device, host, size, 0, host_copy_bytes=0 if state is S.PREEMPTED_HOST else copy,
                     last_used=last)
    has_work = queued + in_flight > 0
    return ModelSnapshot(view, 1.0, queued, in_flight, oldest_age_s=(age if age is not None else 1.0) if has_work
                         else None, waited_s=waited if has_work else 0.0, skipped_ticks=skipped if has_work else 0)


def snap(*models, device=SIZE, host=None):
    return Snapshot(0.0, 0, device, host, tuple(models))


def decide(policy, s):
    return check_actions(s, policy.decide(s))  # every plan must also pass the loop's check


# -- exclusive -------------------------------------------------------------------------------------------------
def test_exclusive_nothing_to_do():
    assert decide(ExclusiveScheduling(), snap(model("a"), model("b", S.UNLOADED))) == []


def test_exclusive_keeps_the_busy_model_until_its_work_is_done():
    s = snap(model("a", queued=1, age=0.1), model("b", S.UNLOADED, queued=3, age=5.0), device=2 * SIZE)
    assert decide(ExclusiveScheduling(), s) == [Step("a")]


def test_exclusive_switches_first_come_first_served():
    s = snap(model("a", last=3), model("b", S.PREEMPTED_HOST, in_flight=1, age=1.0),
             model("c", S.UNLOADED, queued=1, age=2.0), device=2 * SIZE)
    assert decide(ExclusiveScheduling(), s) == [Preempt("a", "host", "swap"), Load("c"), Step("c")]
    s = snap(model("a"), model("b", S.PREEMPTED_HOST, in_flight=1, age=2.0), model("c", S.UNLOADED, queued=1, age=2.0))
    assert decide(ExclusiveScheduling(), s) == [Preempt("a"), Resume("b"), Step("b")]  # tie: by name


def test_exclusive_preempts_every_other_model_least_recently_used_first():
    s = snap(model("a", last=5), model("b", last=2), model("c", S.UNLOADED, queued=1), device=3 * SIZE)
    assert decide(ExclusiveScheduling(), s) == [Preempt("b"), Preempt("a"), Load("c"), Step("c")]


def test_exclusive_goes_to_disk_when_the_host_budget_cannot_take_the_copy():
    s = snap(model("a"), model("b", S.UNLOADED, queued=1), host=SIZE - 1)
    assert decide(ExclusiveScheduling(), s) == [Preempt("a", "disk", "swap"), Load("b"), Step("b")]
    s = snap(model("a"), model("b", S.UNLOADED, queued=1), host=SIZE)
    assert decide(ExclusiveScheduling(), s) == [Preempt("a", "host", "swap"), Load("b"), Step("b")]


@pytest.mark.parametrize("aged", [dict(skipped=4), dict(waited=0.5)])
def test_exclusive_aged_model_takes_the_device(aged):
    policy = ExclusiveScheduling(max_wait_s=0.5, max_skipped_ticks=4)
    s = snap(model("a", queued=1), model("b", S.PREEMPTED_HOST, in_flight=1, **aged))
    assert decide(policy, s) == [Preempt("a"), Resume("b"), Step("b")]
    young = {k: v - (1 if k == "skipped" else 0.01) for k, v in aged.items()}
    s = snap(model("a", queued=1), model("b", S.PREEMPTED_HOST, in_flight=1, **young))
    assert decide(policy, s) == [Step("a")]


def test_exclusive_exhaustive_small_states():
    """Every combination of 3 models' states, work and age: one Step, at most one model active afterwards,
    the step goes to the first aged model if any, else the busy active one, else the oldest request."""
    policy = ExclusiveScheduling(max_skipped_ticks=2)
    states = [S.ACTIVE, S.PREEMPTED_HOST, S.UNLOADED]
    for combo in itertools.product(states, [0, 1], [0, 2], repeat=3):
        specs = [combo[i:i + 3] for i in range(0, 9, 3)]
        if sum(st is S.ACTIVE for st, _, _ in specs) > 1:
            continue  # exclusive never leaves two models active
        ms = [model(n, st, queued=w, skipped=sk, age=float(i)) for i, (n, (st, w, sk)) in enumerate(zip("abc", specs))]
        s = snap(*ms)
        actions = decide(policy, s)
        work = [m for m in ms if m.has_work]
        if not work:
            assert actions == []
            continue
        steps = [a for a in actions if isinstance(a, Step)]
        assert len(steps) == 1 and actions[-1] == steps[0]
        aged = [m for m in work if m.skipped_ticks >= 2]
        busy_active = [m for m in work if m.state.active]
        want = aged[0] if aged else busy_active[0] if busy_active else max(work, key=lambda m: m.oldest_age_s)
        assert steps[0].model == want.name, (specs, actions)
        view = s.pool()
        for a in actions[:-1]:
            view = dataclasses.replace(view, request=None if isinstance(a, Preempt) else s.model(a.model).need()
                                       ).apply(a)
        assert [m.name for m in view.models if m.state.active] == [want.name]


# -- lru -------------------------------------------------------------------------------------------------------
def test_lru_loads_on_demand_and_steps_every_busy_model():
    s = snap(model("a", queued=1), model("b", S.UNLOADED, queued=1), device=2 * SIZE)
    assert decide(LruScheduling(), s) == [Load("b"), Step("a"), Step("b")]


def test_lru_never_preempts_a_busy_model_for_one_that_has_not_aged():
    s = snap(model("a", in_flight=1), model("b", S.UNLOADED, queued=1, skipped=3))
    assert decide(LruScheduling(max_skipped_ticks=4), s) == [Step("a")]


def test_lru_preempts_the_least_recently_used_idle_model():
    s = snap(model("a", last=7), model("c", last=2), model("d", in_flight=1, last=1),
             model("b", S.PREEMPTED_HOST, queued=1), device=3 * SIZE, host=10 * SIZE)
    assert decide(LruScheduling(), s) == [Preempt("c", "host", "swap"), Resume("b"), Step("b"), Step("d")]


def test_lru_aged_model_preempts_a_busy_one_and_later_ones_wait():
    s = snap(model("a", in_flight=1), model("b", S.UNLOADED, queued=1, skipped=5),
             model("c", S.UNLOADED, queued=1, skipped=7))
    # c has skipped the most: it gets the device; b (also aged) cannot take it from c in the same tick
    assert decide(LruScheduling(max_skipped_ticks=4), s) == [Preempt("a"), Load("c"), Step("c")]


def test_lru_aged_by_time():
    s = snap(model("a", in_flight=1), model("b", S.UNLOADED, queued=1, waited=0.3))
    assert decide(LruScheduling(max_wait_s=0.3), s) == [Preempt("a"), Load("b"), Step("b")]
    assert decide(LruScheduling(max_wait_s=0.31), s) == [Step("a")]


def test_lru_exhaustive_small_states_keep_the_budget():
    """Every combination of 3 models' states and work under a budget of two: the plan applies, the budget
    holds after it, every busy active model is stepped, and an aged model is always brought in."""
    policy = LruScheduling(max_skipped_ticks=2)
    states = [S.ACTIVE, S.PREEMPTED_HOST, S.UNLOADED]
    for combo in itertools.product(states, [0, 1], [0, 2], repeat=3):
        specs = [combo[i:i + 3] for i in range(0, 9, 3)]
        if sum(st is S.ACTIVE for st, _, _ in specs) > 2:
            continue
        ms = [model(n, st, queued=w, skipped=sk, last=i) for i, (n, (st, w, sk)) in enumerate(zip("abc", specs))]
        s = snap(*ms, device=2 * SIZE)
        actions = decide(policy, s)
        view = s.pool()
        for a in actions:
            if not isinstance(a, Step):
                view = dataclasses.replace(view, request=None if isinstance(a, Preempt) else
                                           s.model(a.model).need()).apply(a)
        assert view.device_used <= 2 * SIZE
        active = {m.name for m in view.models if m.state.active}
        assert {a.model for a in actions if isinstance(a, Step)} == {m.name for m in ms if m.has_work} & active
        aged = [m for m in ms if m.has_work and m.skipped_ticks >= 2]
        if aged:
            first = max(aged, key=lambda m: (m.skipped_ticks, -ord(m.name[0])))
            assert first.name in active, (specs, actions)


# -- the aging bound, simulated --------------------------------------------------------------------------------
def simulate(policy, n_models, budget_models, ticks, seed, k):
    """Tick-level simulation: each request needs a few steps; arrivals are random. Returns the most ticks in a
    row any model with work went without a step."""
    rng = random.Random(seed)
    names = [f"m{i}" for i in range(n_models)]
    views = {n: ModelView(n, S.UNLOADED, 0, 0, SIZE, 0, host_copy_bytes=SIZE) for n in names}
    work = dict.fromkeys(names, 0)
    skipped, last, worst = dict.fromkeys(names, 0), dict.fromkeys(names, -1), 0
    for t in range(ticks):
        for n in names:
            if rng.random() < 0.3:
                work[n] += rng.randint(1, 4)
        ms = tuple(ModelSnapshot(dataclasses.replace(views[n], last_used=last[n]), 1.0, queued=work[n],
                                 oldest_age_s=float(skipped[n]) if work[n] else None,
                                 skipped_ticks=skipped[n] if work[n] else 0) for n in names)
        s = Snapshot(float(t), t, budget_models * SIZE, None, ms)
        view = s.pool()
        for a in check_actions(s, policy.decide(s)):
            if isinstance(a, Step):
                work[a.model] -= 1
                skipped[a.model] = -1
                last[a.model] = t
            else:
                view = dataclasses.replace(view, request=None if isinstance(a, Preempt) else
                                           s.model(a.model).need()).apply(a)
        assert view.device_used <= budget_models * SIZE
        views = {m.name: m for m in view.models}
        for n in names:
            skipped[n] = skipped[n] + 1 if work[n] else 0
            worst = max(worst, skipped[n])
    return worst


@pytest.mark.parametrize("cls", [ExclusiveScheduling, LruScheduling])
@pytest.mark.parametrize("n_models,budget_models", [(2, 1), (3, 1), (3, 2), (4, 2)])
def test_aging_bound_holds_in_simulation(cls, n_models, budget_models):
    k = 3
    for seed in range(5):
        worst = simulate(cls(max_skipped_ticks=k, max_wait_s=1e9), n_models, budget_models, 300, seed, k)
        assert worst <= k + n_models - 1, (seed, worst)


# -- the actions and their check -------------------------------------------------------------------------------
def test_check_actions_refuses_what_the_state_does_not_allow():
    s = snap(model("a", in_flight=1), model("b", S.UNLOADED, queued=1))
    with pytest.raises(StateError, match="not active"):
        check_actions(s, [Step("b")])
    with pytest.raises(OutOfDeviceMemory):
        check_actions(s, [Load("b")])  # a is still on the device
    with pytest.raises(StateError, match="in flight"):
        check_actions(s, [Unload("a")])
    with pytest.raises(StateError, match="no model"):
        check_actions(s, [Step("zz")])
    with pytest.raises(ConfigError):
        check_actions(s, ["Step a"])
    assert check_actions(s, [Preempt("a"), Load("b"), Step("b"), SetResidency("b", 0.5)])
    assert check_actions(snap(model("a")), [Unload("a")]) == [Unload("a")]
    with pytest.raises(ConfigError):
        SetResidency("a", 1.5)


def test_resolve_and_aging_arguments():
    assert isinstance(resolve("exclusive"), ExclusiveScheduling)
    assert resolve("lru", max_wait_s=0.1).aging == Aging(0.1, 32)
    p = LruScheduling()
    assert resolve(p) is p
    for bad in ("fifo", None, LruScheduling):  # "cost" is a policy since issue 14
        with pytest.raises(ConfigError):
            resolve(bad)
    with pytest.raises(ConfigError):
        Aging(max_skipped_ticks=0)
    with pytest.raises(ConfigError):
        resolve(p, max_wait_s=1.0)
