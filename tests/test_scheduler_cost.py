"""The cost policy on synthetic snapshots with synthetic cost models (pure, no engine): co-residency where a
reload is dear and offload mild, time-slicing where offload is severe and a reload cheap, the quantum, aging,
its predictions, and the budgets over a seeded random set of snapshots."""
import dataclasses
import itertools
import math
import random

import pytest

from tidal.costmodel import CostModel, LinkFit, RecomputeFit, StepFit
from tidal.errors import ConfigError
from tidal.policy import Load, ModelState, ModelView, Preempt, Resume
from tidal.scheduler import CostScheduling, ModelSnapshot, SetResidency, Snapshot, Step, check_actions, resolve
from tidal.scheduler.state import set_residency

S = ModelState
L, W, BASE, RING = 10, 10, 10, 3  # layers, bytes per layer, other device bytes (KV, embeddings), ring slots
FULL = BASE + L * W  # device bytes of a fully resident model: 110


def cost_model(t0=0.010, per_layer=0.0001, overhead=0.0005, reload=2.0, recompute=False):
    """A decode step of t0 all resident; each streamed layer copies in `per_layer` seconds (overlapped) and
    adds `overhead`; the weights come back from the host in `reload` seconds, from disk in twice that."""
    step = StepFit(L, W, t0, 0.0, 0.0, W / per_layer, overhead, 1)
    full = L * W  # a full model's weights come back in `reload` seconds
    links = (LinkFit("weights_host_out", 1e-3, 1e12, 1), LinkFit("weights_host_in", 0.0, full / reload, 1),
             LinkFit("weights_disk_in", 0.0, full / (2 * reload), 1), LinkFit("kv_swap_out", 1e-4, 1e9, 1),
             LinkFit("kv_swap_in", 1e-4, 1e9, 1))
    return CostModel(step, links, RecomputeFit(1e-3, 1e-5, 0.0, 1) if recompute else None)


def device_bytes(fraction):
    r = round(fraction * L)
    return BASE + (r + min(RING, L - r)) * W


def model(name, state=S.ACTIVE, fraction=1.0, in_flight=2, queued=0, active_s=0.0, skipped=0, waited=0.0, last=0,
          tpot=None, ttft=None, first_wait=None, remaining=100, context=64, kv=0):
    dev = device_bytes(fraction)
    r = round(fraction * L)
    view = ModelView(name, state, dev if state is S.ACTIVE else 0, r * W if state is S.PREEMPTED_HOST else 0, dev, 0,
                     host_copy_bytes=0 if state is S.PREEMPTED_HOST else r * W, last_used=last)
    work = queued + in_flight > 0
    return ModelSnapshot(view, fraction, queued, in_flight, oldest_age_s=1.0 if work else None,
                         waited_s=waited if work else 0.0, skipped_ticks=skipped if work else 0, slo_ttft_s=ttft,
                         slo_tpot_s=tpot, context=context, remaining_tokens=remaining if work else 0, kv_bytes=kv,
                         first_token_wait_s=first_wait, active_s=active_s if state is S.ACTIVE else 0.0,
                         preempted_kv="swap" if state.preempted else None, ring_slots=RING, num_layers=L,
                         layer_bytes=W)


CLOCK = itertools.count()  # each snapshot a second after the last: past any plan's replan interval


def snap(*models, device=None, host=None, cms=None, tick=0):
    cms = cms or {m.name: cost_model() for m in models}
    return Snapshot(float(next(CLOCK)), tick, device, host, tuple(models), cms)


def decide(policy, s):
    return check_actions(s, policy.decide(s))  # every plan must pass the loop's own check


# -- the choice ------------------------------------------------------------------------------------------------
def test_co_residency_pays_when_a_reload_is_dear_and_offload_mild():
    cm = cost_model(reload=2.0)  # streaming a layer costs 0.5 ms, a reload 2 s
    s = snap(model("a", tpot=0.03, last=1), model("b", S.PREEMPTED_HOST, tpot=0.03), device=160,
             cms={"a": cm, "b": cm})
    policy = CostScheduling()
    # b comes back at its own (full) residency, so a shrinks to what is left: 1 of 10 layers
    assert decide(policy, s) == [SetResidency("a", 0.1), Resume("b"), Step("a"), Step("b")]
    co, ts = policy.last_estimates
    # b's 2 s resume stalls a's two requests in flight (20 ms a token over their 100): both plans miss, the
    # co-residency less
    assert co.kind == "co-residency" and ts.kind == "time-slicing" and 0 < co.violation < ts.violation


def test_co_resident_models_grow_into_room_and_keep_residencies_that_are_good_enough():
    cms = {n: cost_model(reload=0.01) for n in "ab"}  # a layer copies in 1 ms: growing pays over 100 tokens
    s = snap(model("a", fraction=0.3, last=1), model("b", fraction=0.3), device=200, cms=cms)
    actions = decide(CostScheduling(), s)
    assert actions[-2:] == [Step("a"), Step("b")]
    grown = [a for a in actions if isinstance(a, SetResidency)]
    assert grown and all(a.fraction > 0.3 for a in grown)
    after = {a.model: a.fraction for a in grown}  # the state the plan leaves: nothing more to move
    now = snap(*(model(n, fraction=after.get(n, 0.3), last=int(n == "a")) for n in "ab"), device=200, cms=cms)
    assert decide(CostScheduling(), now) == [Step("a"), Step("b")]


def test_a_plan_of_steps_is_held_until_its_interval_passes_or_an_event():
    """After a plan of steps alone the policy repeats it, with its predictions, without working it out again,
    until a tenth of the tightest TTFT SLO has passed, the models with work change, one ages, or a stepped
    model is no longer active; `repeats_until` says until when."""
    cms = {n: cost_model(reload=2.0) for n in "ab"}
    a, b = model("a", ttft=0.5, last=1), model("b", ttft=1.0)
    s = snap(a, b, device=200, cms=cms)
    policy = CostScheduling()
    steps = decide(policy, s)
    assert steps == [Step("a"), Step("b")] and policy.replan_interval(s.with_work) == pytest.approx(0.05)
    assert policy.repeats_until(s) == pytest.approx(s.time + 0.05)
    policy._plan = lambda *_: pytest.fail("worked out again while the plan holds")
    later = dataclasses.replace(s, time=s.time + 0.04, tick=1)
    assert decide(policy, later) == steps and policy.predict(later, Step("a")) == policy.cost(later, a, L, Step("a"))
    soon = s.time + 0.01  # within the interval: only the event calls for a new plan
    events = {"the interval has passed": dataclasses.replace(s, time=s.time + 0.05),
              "another model has work": snap(a, model("b", ttft=1.0, in_flight=0), model("c", S.PREEMPTED_HOST,
                                             ttft=1.0), device=200, cms=cms | {"c": cost_model()}),
              "b has aged": snap(a, model("b", ttft=1.0, skipped=40), device=200, cms=cms),
              "b has left the device": snap(a, model("b", S.PREEMPTED_HOST, ttft=1.0), device=200, cms=cms)}
    for why, changed in events.items():
        fresh, calls = CostScheduling(), []
        assert decide(fresh, s) == steps
        plan = fresh._plan
        fresh._plan = lambda *args, plan=plan: calls.append(1) or plan(*args)
        decide(fresh, changed if why == "the interval has passed" else dataclasses.replace(changed, time=soon))
        assert calls == [1], why
    always = CostScheduling(replan_s=0)
    decide(always, s)
    assert always.repeats_until(s) == s.time  # replan_s=0: a plan at every tick
    with pytest.raises(ConfigError, match="replan_s"):
        CostScheduling(replan_s=-1)


def test_a_plan_worked_out_again_unchanged_is_held_longer_but_not_past_its_slot():
    """Each replan at the end of the interval that returns the plan held doubles the next interval, up to
    REPLAN_BACKOFF of them; a different plan resets it. A time-sliced model keeps its plan no longer than the
    rest of its quantum beyond the base interval, so the switch comes when it did before."""
    from tidal.scheduler.cost import REPLAN_BACKOFF
    cms = {n: cost_model(reload=2.0) for n in "ab"}
    s = snap(model("a", ttft=0.5, last=1), model("b", ttft=1.0), device=200, cms=cms)  # co-residency: no slot
    policy, base = CostScheduling(), 0.05
    assert decide(policy, s) == [Step("a"), Step("b")]
    t, held = s.time, []
    for tick in range(1, 6):
        until = policy.repeats_until(s)
        held.append(round(until - t, 9))
        t = until
        assert decide(policy, dataclasses.replace(s, time=t, tick=tick)) == [Step("a"), Step("b")]
    assert held == [base, 2 * base, 4 * base] + [REPLAN_BACKOFF * base] * 2
    # another plan (another model with work) starts again from the base interval
    other = snap(model("a", ttft=0.5, last=1), model("b", ttft=1.0, in_flight=0), model("c", ttft=1.0), device=None,
                 cms=cms | {"c": cost_model()})
    decide(policy, dataclasses.replace(other, time=t + 0.001))
    assert policy.repeats_until(other) == pytest.approx(t + 0.001 + base)

    # time-slicing: a holds the device (a switch costs about 1 s, its quantum) 0.3 s into it; b waits, in flight
    cm = cost_model(per_layer=0.02, reload=1.0)
    sliced = snap(model("a", active_s=0.3, last=1, ttft=0.5), model("b", S.PREEMPTED_HOST, ttft=0.5), device=FULL,
                  cms={"a": cm, "b": cm})
    policy = CostScheduling()
    assert decide(policy, sliced) == [Step("a")]
    quantum = 0.3 + policy.last_estimates[0].stable_s  # the rest of a's quantum: where b gets the device
    assert policy.last_estimates[0].kind == "time-slicing" and 0.9 < quantum < 1.2
    t = sliced.time
    for tick in range(1, 20):
        later = dataclasses.replace(sliced, time=t, tick=tick, models=(
            dataclasses.replace(sliced.models[0], active_s=0.3 + t - sliced.time), sliced.models[1]))
        actions = decide(policy, later)
        if actions != [Step("a")]:
            break
        assert policy.repeats_until(later) <= max(t + base, sliced.time + quantum - 0.3) + 1e-9
        t = policy.repeats_until(later)
    assert actions[-1] == Step("b") and t - sliced.time < quantum - 0.3 + base  # switched within a base interval


def test_greedy_hands_out_layers_as_one_at_a_time_would_for_any_room():
    """`greedy` walks `greedy_order` (made once, for every room) and must give what handing out one layer at a
    time to the best fitting offer gives, ties and blocked models included, on random convex and non-convex
    steps, ring sizes and rooms."""
    from tidal.scheduler.plans import greedy, greedy_order

    def one_at_a_time(step, work, lo, room):
        resident = dict(lo)
        while True:
            best = None
            for m in work:
                r = resident[m.name]
                extra = m.layer_device_bytes(r + 1) - m.layer_device_bytes(r) if r < m.num_layers else None
                if extra is None or extra > room:
                    continue
                gain = step(m, r) - step(m, r + 1)
                key = (gain / extra if extra > 0 else math.inf, gain, m.name)
                if best is None or key > best[0]:
                    best = (key, m, extra)
            if best is None:
                return resident
            resident[best[1].name] += 1
            room -= best[2]

    rng = random.Random(7)
    for _ in range(300):
        work = []
        for name in rng.sample("abcdef", rng.randint(1, 4)):
            layers = rng.randint(1, 9)
            m = dataclasses.replace(model(name), num_layers=layers, layer_bytes=rng.choice([W, 2 * W]),
                                    ring_slots=rng.randint(1, 3))
            work.append(m)
        # mostly shrinking, some not; small integers, so that many offers tie and the name decides
        costs = {m.name: sorted((rng.randint(0, 4) for _ in range(m.num_layers + 1)), reverse=rng.random() < 0.8)
                 for m in work}
        step = lambda m, r: costs[m.name][r]  # noqa: E731
        lo = {m.name: rng.randint(0, m.num_layers) for m in work}
        order = greedy_order(step, work, lo)
        assert len(order) == sum(m.num_layers - lo[m.name] for m in work)
        for room in (0, W, 3 * W, rng.randint(0, 20 * W), 10 ** 9, -1):
            assert greedy(step, work, lo, room, order) == greedy(step, work, lo, room) == \
                one_at_a_time(step, work, lo, room), (room, lo)


def test_residencies_stay_when_the_moves_cost_more_than_the_round_saves():
    # a layer copies in 0.2 s (reload 2 s); growing saves 0.6 ms a token, 60 ms over the 100 queued tokens
    s = snap(model("a", fraction=0.3, last=1), model("b", fraction=0.3), device=200)
    assert decide(CostScheduling(), s) == [Step("a"), Step("b")]
    # with 10,000 tokens to go the same growth pays for itself
    s = snap(model("a", fraction=0.3, last=1, remaining=10000), model("b", fraction=0.3, remaining=10000), device=200)
    assert any(isinstance(a, SetResidency) for a in decide(CostScheduling(), s))


def test_time_slicing_when_offload_is_severe_and_a_reload_cheap():
    cm = cost_model(per_layer=0.02, reload=0.005)  # a streamed layer costs 20 ms: decode collapses
    s = snap(model("a", fraction=0.5, tpot=0.05, last=1),
             model("b", fraction=0.5, tpot=0.05, active_s=1.0), device=180, cms={"a": cm, "b": cm})
    policy = CostScheduling()
    assert decide(policy, s) == [Preempt("b", "host", "swap"), SetResidency("a", 1.0), Step("a")]
    assert policy.last_estimates[0].kind == "time-slicing" and policy.last_estimates[0].violation == 0.0
    # the step is predicted at the residency the plan leaves, not the snapshot's
    assert policy.predict(s, Step("a")) == cm.predict_step(L, 2, 64)


def test_the_cheapest_tier_the_host_budget_takes():
    cm = cost_model(per_layer=0.02, reload=0.005)
    a, b = model("a", fraction=0.5, last=1), model("b", fraction=0.5, active_s=1.0)  # b has held its quantum
    host = snap(a, b, device=180, cms={"a": cm, "b": cm})
    assert decide(CostScheduling(), host)[0] == Preempt("b", "host", "swap")
    no_room = snap(a, b, device=180, host=10, cms={"a": cm, "b": cm})  # b's copy (50 bytes) does not fit
    assert decide(CostScheduling(), no_room)[0] == Preempt("b", "disk", "swap")
    # a cheap recompute beats swapping a large KV back
    cmr = cost_model(per_layer=0.02, reload=0.005, recompute=True)
    big = snap(a, dataclasses.replace(b, kv_bytes=10**9, context=4), device=180, cms={"a": cmr, "b": cmr})
    assert decide(CostScheduling(), big)[0] == Preempt("b", "host", "recompute")


# -- the quantum and aging -------------------------------------------------------------------------------------
def _alone(active_s, skipped=0, waited=0.0, remaining=100, amortise=1.0):
    cm = cost_model(per_layer=0.02, reload=1.0)  # a switch costs about 1 s
    s = snap(model("a", active_s=active_s, last=1, remaining=remaining),
             model("b", S.PREEMPTED_HOST, skipped=skipped, waited=waited), device=FULL, cms={"a": cm, "b": cm})
    return decide(CostScheduling(amortise=amortise), s)


def test_quantum_stays_until_the_reload_is_amortised():
    assert _alone(0.5) == [Step("a")]  # 0.5 s on the device < the 1 s switch: stay
    assert _alone(1.5) == [Preempt("a", "host", "swap"), Resume("b"), Step("b")]
    assert _alone(1.5, remaining=1000, amortise=2.0) == [Step("a")]  # quantum 2 x the switch
    # a model about to finish keeps its quantum too (it leaves by itself once done; new requests may join it)
    assert _alone(0.5, remaining=10) == [Step("a")]


def test_the_last_model_with_work_keeps_the_device():
    cm = cost_model(per_layer=0.02, reload=1.0)
    s = snap(model("a", active_s=100.0), model("b", S.PREEMPTED_HOST, in_flight=0), device=FULL,
             cms={"a": cm, "b": cm})
    assert decide(CostScheduling(), s) == [Step("a")]


@pytest.mark.parametrize("aged", [dict(skipped=32), dict(waited=2.0)])
def test_aging_still_wins(aged):
    assert _alone(0.5, **aged) == [Preempt("a", "host", "swap"), Resume("b"), Step("b")]


def test_aging_bound_in_a_simulated_run():
    """Tick by tick over the policy's own actions (no engine): a model kept busy never starves the other."""
    cm = cost_model(per_layer=0.02, reload=1.0)
    policy = CostScheduling(max_skipped_ticks=4, max_wait_s=1e9)
    models = {"a": model("a", last=1), "b": model("b", S.PREEMPTED_HOST)}
    worst = 0
    for tick in range(60):
        s = Snapshot(0.0, tick, FULL, None, tuple(models.values()), {"a": cm, "b": cm})
        actions = decide(policy, s)
        view, stepped = s.pool(), set()
        for act in actions:
            if isinstance(act, Step):
                stepped.add(act.model)
            elif not isinstance(act, SetResidency):
                need = None if isinstance(act, Preempt) else s.model(act.model).need()
                view = dataclasses.replace(view, request=need).apply(act)
        for name, m in models.items():
            v = dataclasses.replace(view.model(name), last_used=tick if name in stepped else m.view.last_used)
            skipped = 0 if name in stepped else m.skipped_ticks + 1
            models[name] = dataclasses.replace(m, view=v, skipped_ticks=skipped,
                                               active_s=m.active_s + 0.01 if v.state.active else 0.0,
                                               preempted_kv="swap" if v.state.preempted else None)
            worst = max(worst, skipped)
    assert worst <= 4 + 2 - 1


# -- predictions -----------------------------------------------------------------------------------------------
def test_predict_matches_the_cost_model():
    cm = cost_model()
    a = model("a", fraction=0.5, in_flight=3, context=40, kv=4096)
    b = model("b", S.PREEMPTED_HOST, fraction=1.0, in_flight=2, context=64, kv=2048)
    s = snap(a, b, cms={"a": cm, "b": cm})
    p = CostScheduling()
    assert p.predict(s, Step("a")) == cm.predict_step(5, 3, 40)
    assert p.predict(s, Preempt("a", "host", "swap")) == cm.predict_preempt(5 * W, 4096, "host", "swap")["total"]
    assert p.predict(s, Preempt("a", "disk", "recompute")) == cm.predict_preempt(5 * W, 0, "disk", "recompute")["total"]
    assert p.predict(s, Resume("b")) == cm.predict_resume(L * W, 2048, "host", "swap", resident_layers=L, batch=2,
                                                          context=64)["first_token"]
    assert p.predict(s, SetResidency("a", 1.0)) == cm.predict_transfer("weights_host_in", 5 * W)
    assert p.predict(s, SetResidency("a", 0.2)) == cm.predict_transfer("weights_host_out", 3 * W)
    assert p.predict(s, Load("a")) == cm.predict_transfer("weights_disk_in", 5 * W)
    assert p.predict(Snapshot(0.0, 0, None, None, (a,)), Step("a")) is None  # no cost model: no prediction


# -- inputs and budgets ----------------------------------------------------------------------------------------
def test_a_model_with_work_and_no_cost_model_is_refused_by_name():
    s = snap(model("a"), model("lonely"), cms={"a": cost_model()})
    with pytest.raises(ConfigError, match="'lonely'"):
        CostScheduling().decide(s)
    assert isinstance(resolve("cost", max_wait_s=1.0), CostScheduling)
    with pytest.raises(ConfigError):
        CostScheduling(amortise=-1)


def test_budgets_hold_for_every_plan_over_random_snapshots():
    rng = random.Random(14)
    states = [S.ACTIVE, S.PREEMPTED_HOST, S.PREEMPTED_DISK, S.UNLOADED]
    for _ in range(400):
        n = rng.randint(1, 4)
        device = rng.randint(FULL, n * FULL + 20)
        host = rng.choice([None, rng.randint(0, 400)])
        models, used, host_used = [], 0, 0
        for i in range(n):
            state, fraction = rng.choice(states), rng.choice([0.0, 0.3, 0.5, 1.0])
            if state is S.ACTIVE and used + device_bytes(fraction) > device:
                state = S.PREEMPTED_DISK
            if state is S.PREEMPTED_HOST and host is not None and host_used + round(fraction * L) * W > host:
                state = S.PREEMPTED_DISK
            m = model(f"m{i}", state, fraction, in_flight=rng.choice([0, 0, 1, 3]), queued=rng.choice([0, 1]),
                      active_s=rng.random() * 3, skipped=rng.choice([0, 0, 5, 40]), last=rng.randint(0, 9),
                      tpot=rng.choice([None, 0.02, 0.1]), ttft=rng.choice([None, 0.5]),
                      first_wait=rng.choice([None, 0.2]), remaining=rng.randint(1, 200), kv=rng.choice([0, 64]))
            used += m.view.device_bytes
            host_used += m.view.host_bytes
            models.append(m)
        cms = {m.name: cost_model(per_layer=rng.choice([1e-5, 1e-3, 0.02]), overhead=rng.choice([0.0, 5e-4]),
                                  reload=rng.choice([0.001, 0.1, 2.0]), recompute=rng.random() < 0.5)
               for m in models}
        s = Snapshot(0.0, 0, device, host, tuple(models), cms)
        policy = CostScheduling()
        actions = decide(policy, s)
        view, resident = s.pool(), {m.name: m.resident_layers() for m in models}
        for act in actions:  # the budgets after every action, residency changes included
            m = s.model(act.model)
            if isinstance(act, SetResidency):
                view, resident[m.name] = set_residency(view, m, resident[m.name], act.fraction)
            elif not isinstance(act, Step):
                need = None if isinstance(act, Preempt) else dataclasses.replace(m, view=view.model(m.name)).need()
                view = dataclasses.replace(view, request=need).apply(act)
            assert view.device_used <= device, (s, actions)
            assert host is None or view.host_used <= host, (s, actions)
        work = s.with_work
        if work:
            steps = {a.model for a in actions if isinstance(a, Step)}
            assert steps, (s, actions)
            aged = [m for m in policy.aging.order(work) if policy.aging.aged(m)]
            assert not aged or aged[0].name in steps, (s, actions)


def test_cost_model_inputs(tmp_path):
    from tidal.scheduler.plans import load_cost_model

    cm = cost_model()
    assert load_cost_model(cm, "a") is cm
    with pytest.raises(ConfigError, match="missing.json"):
        load_cost_model(tmp_path / "missing.json", "a")
    with pytest.raises(ConfigError, match="'a'"):
        load_cost_model(CostModel(None, (LinkFit("kv_swap_in", 0.0, 1e9, 1),), None), "a")


# -- stability: tiers, plan hysteresis, balanced residencies, the quantum (the issue 14 benchmark's findings) ----
def _tier_cm(host_in, disk_in, host_out):
    """Round trips with the weights' copies of the given bandwidths (bytes/s; KV swaps free)."""
    step = StepFit(L, W, 0.01, 0.0, 0.0, W / 0.02, 0.0, 1)
    links = (LinkFit("weights_host_out", 0.0, host_out, 1), LinkFit("weights_host_in", 0.0, host_in, 1),
             LinkFit("weights_disk_in", 0.0, disk_in, 1), LinkFit("kv_swap_out", 0.0, 1e12, 1),
             LinkFit("kv_swap_in", 0.0, 1e12, 1))
    return CostModel(step, links, None)


@pytest.mark.parametrize("disk_in, tier", [
    (100.0, "host"),  # disk's round trip (50/100 s) ties host's (50/200 + 50/200 s)
    (150.0, "host"),  # disk 25% cheaper: inside the margin (the profile's disk read is a warm-cache one)
    (1000.0, "disk"),  # disk 10x cheaper: clearly
])
def test_host_whenever_it_fits_unless_disk_is_clearly_cheaper(disk_in, tier):
    cm = _tier_cm(200.0, disk_in, 200.0)
    s = snap(model("a", fraction=0.5, last=1), model("b", fraction=1.0, active_s=1.0), device=180,
             cms={"a": cm, "b": cm})
    preempts = [a for a in decide(CostScheduling(), s) if isinstance(a, Preempt)]
    assert preempts and all(p.weights == tier for p in preempts)
    # and with the host budget too small for the copy, disk regardless
    tight = dataclasses.replace(s, host_budget=10)
    assert all(p.weights == "disk" for p in decide(CostScheduling(), tight) if isinstance(p, Preempt))


def test_a_busy_model_keeps_the_device_for_a_quantum_after_it_came_in():
    # time-slicing is predicted better (a streamed layer costs 20 ms), but b, with requests in flight, came in
    # just now: no plan preempts it before it has held the device for a quantum (its round trip, about 10 ms)
    cm = cost_model(per_layer=0.02, reload=0.005)
    fresh = snap(model("a", fraction=0.5, tpot=0.05, last=1), model("b", fraction=0.5, tpot=0.05, active_s=0.001),
                 device=180, cms={"a": cm, "b": cm})
    policy = CostScheduling()
    actions = decide(policy, fresh)
    assert not any(isinstance(a, Preempt) for a in actions) and policy.last_estimates[0].kind == "co-residency"
    held = snap(fresh.model("a"), dataclasses.replace(fresh.model("b"), active_s=1.0), device=180,
                cms={"a": cm, "b": cm})
    assert decide(CostScheduling(), held)[0] == Preempt("b", "host", "swap")
    # a model with nothing in flight (its requests still queued) stalls no generation: not pinned
    queued = snap(fresh.model("a"), model("b", fraction=0.5, tpot=0.05, active_s=0.001, in_flight=0, queued=2),
                  device=180, cms={"a": cm, "b": cm})
    assert decide(CostScheduling(), queued)[0] == Preempt("b", "host", "swap")
    # nor is anyone once a model has aged
    aged = snap(model("a", fraction=0.5, tpot=0.05, skipped=40),
                model("b", fraction=0.5, tpot=0.05, active_s=0.001, last=2), device=180, cms={"a": cm, "b": cm})
    assert decide(CostScheduling(), aged)[0] == Preempt("b", "host", "swap")


def test_no_plan_flip_when_the_gain_is_below_the_switch_cost():
    cm = cost_model(per_layer=0.004, reload=0.01)
    s = snap(model("a", fraction=0.5, last=1, remaining=10), model("b", fraction=0.5, remaining=10, active_s=1.0), device=180,
             cms={"a": cm, "b": cm})
    fresh = CostScheduling()
    decide(fresh, s)
    ts, co = fresh.last_estimates  # time-slicing predicted a little faster, both meet every SLO
    assert (ts.kind, co.kind, ts.violation, co.violation) == ("time-slicing", "co-residency", 0.0, 0.0)
    assert 0 < co.seconds - ts.seconds < 0.01  # less than the switch: a preempt and 5 layers in (5 ms)
    # a policy already co-resident stays so (replan_s=0: these snapshots share a time, and each is planned anew)
    policy = CostScheduling(replan_s=0)
    mild = {n: cost_model(per_layer=0.0001, reload=0.01) for n in "ab"}
    decide(policy, dataclasses.replace(s, cost_models=mild))  # streaming is cheap here: co-residency
    assert policy.last_estimates[0].kind == "co-residency"
    actions = decide(policy, s)
    assert actions[-2:] == [Step("a"), Step("b")] and not any(isinstance(a, Preempt) for a in actions)
    assert policy.last_estimates[0].kind == "co-residency"
    # but switches for a gain that covers it: a streamed layer at 20 ms
    severe = {n: cost_model(per_layer=0.02, reload=0.01) for n in "ab"}
    assert decide(policy, dataclasses.replace(s, cost_models=severe))[0] == Preempt("b", "host", "swap")


def test_a_balanced_co_residency_moves_no_layers_on_the_next_tick():
    cm = cost_model(reload=2.0)
    s = snap(model("a", tpot=0.03, last=1), model("b", S.PREEMPTED_HOST, tpot=0.03), device=160,
             cms={"a": cm, "b": cm})
    policy = CostScheduling()
    assert decide(policy, s) == [SetResidency("a", 0.1), Resume("b"), Step("a"), Step("b")]
    for tick in range(1, 4):  # the state that plan leaves, as the work drains: only steps
        after = snap(model("a", fraction=0.1, tpot=0.03, last=tick, remaining=100 - tick),
                     model("b", fraction=1.0, tpot=0.03, last=tick, remaining=100 - tick), device=160,
                     cms={"a": cm, "b": cm}, tick=tick)
        assert decide(policy, after) == [Step("a"), Step("b")]


def _cheap_and_dear(active_s, b_queued=0, b_in_flight=2, first_wait=None, ttft=None):
    cheap, dear = cost_model(per_layer=0.02, reload=0.05), cost_model(per_layer=0.02, reload=1.0)
    s = snap(model("a", active_s=active_s, last=1),
             model("b", S.PREEMPTED_HOST, queued=b_queued, in_flight=b_in_flight, first_wait=first_wait, ttft=ttft),
             device=FULL, cms={"a": cheap, "b": dear})
    return decide(CostScheduling(), s)


def test_the_quantum_covers_the_dearest_switch():
    # a's own round trip is about 0.05 s, b's about 1 s: a keeps the device until b's switch is amortised
    assert _cheap_and_dear(0.5) == [Step("a")]
    assert _cheap_and_dear(0.9) == [Step("a")]
    assert _cheap_and_dear(1.5) == [Preempt("a", "host", "swap"), Resume("b"), Step("b")]


def test_a_model_within_its_ttft_slack_is_not_switched_to():
    # quantum over; b only has a queued request, 0.1 s old, with a 10 s TTFT SLO: a keeps the device
    assert _cheap_and_dear(1.5, b_queued=1, b_in_flight=0, first_wait=0.1, ttft=10.0) == [Step("a")]
    # the same request close to its SLO (another quantum and b's switch would miss it): b is due
    assert _cheap_and_dear(1.5, b_queued=1, b_in_flight=0, first_wait=8.5, ttft=10.0)[-1] == Step("b")


# -- the mixed plan: a co-resident core, the others time-sliced beside it (issue 14's nopay) ----------------------
def _sized(name, layers, lb, state=S.ACTIVE, resident=None, last=0, active_s=0.0, skipped=0, tpot=0.06, ttft=1.0):
    r = layers if resident is None else resident
    dev = BASE + (r + min(RING, layers - r)) * lb
    view = ModelView(name, state, dev if state is S.ACTIVE else 0, r * lb if state is S.PREEMPTED_HOST else 0, dev, 0,
                     host_copy_bytes=0 if state is S.PREEMPTED_HOST else r * lb, last_used=last)
    return ModelSnapshot(view, r / layers, 0, 2, oldest_age_s=1.0, skipped_ticks=skipped, slo_ttft_s=ttft,
                         slo_tpot_s=tpot, context=64, remaining_tokens=20, first_token_wait_s=None,
                         active_s=active_s if state is S.ACTIVE else 0.0,
                         preempted_kv="swap" if state.preempted else None, ring_slots=RING, num_layers=layers,
                         layer_bytes=lb)


def _sized_cm(layers, lb, t0, reload):
    """A decode step of t0 all resident; a streamed layer costs 30 ms (a PCIe-like link: offload is severe)."""
    step = StepFit(layers, lb, t0, 0.0, 0.0, lb / 0.03, 0.0005, 1)
    full = layers * lb
    links = (LinkFit("weights_host_out", 1e-3, 1e12, 1), LinkFit("weights_host_in", 0.0, full / reload, 1),
             LinkFit("weights_disk_in", 0.0, full / (2 * reload), 1), LinkFit("kv_swap_out", 1e-4, 1e9, 1),
             LinkFit("kv_swap_in", 1e-4, 1e9, 1))
    return CostModel(step, links, None)


NOPAY_CMS = {"S4": _sized_cm(4, 2, 0.004, 0.02), "L12": _sized_cm(12, 10, 0.015, 0.3),
             "L8": _sized_cm(8, 10, 0.010, 0.2)}


def _nopay(l12, l8):
    """S4 small and popular (4 requests a second) with tight SLOs (full: 18 bytes), L12 (130) and L8 (90) with
    loose ones; a budget of 150: S4 fits whole beside either large model, the two large ones not together."""
    s4 = dataclasses.replace(_sized("S4", 4, 2, last=2, tpot=0.02, ttft=0.3), arrival_rate=4.0)
    return Snapshot(0.0, 0, 150, None, (s4, l12, l8), NOPAY_CMS)


def test_mixed_plan_keeps_the_small_tight_slo_model_and_one_large_one_and_preempts_the_third():
    # from an all-co-resident state (both large models mostly streamed): L8 out, L12 whole beside S4
    s = _nopay(_sized("L12", 12, 10, resident=3, last=2), _sized("L8", 8, 10, resident=2, last=1))
    policy = CostScheduling()
    assert decide(policy, s) == [Preempt("L8", "host", "swap"), SetResidency("L12", 1.0), Step("L12"), Step("S4")]
    best = policy.last_estimates[0]
    assert (best.kind, best.core) == ("mixed", ("S4",))
    assert all(e.violation > best.violation for e in policy.last_estimates[1:])  # co-residency, time-slicing
    # on the next tick (S4 and L12 whole, L8 preempted with work) it stays: only steps
    after = _nopay(_sized("L12", 12, 10, last=2, active_s=0.1), _sized("L8", 8, 10, S.PREEMPTED_HOST, last=1))
    assert decide(policy, after) == [Step("L12"), Step("S4")]
    # once L12's quantum is held, L8 would take its slot; but L12's 20 tokens to go need two more quanta,
    # two stalls of its requests for a cycle (over their 60 ms TPOT SLO), and keeping it costs L8 none: it stays
    held = _nopay(_sized("L12", 12, 10, last=2, active_s=5.0), _sized("L8", 8, 10, S.PREEMPTED_HOST, last=1))
    assert decide(policy, held) == [Step("L12"), Step("S4")]
    # even with 5 tokens to go: one stall over 5 tokens is worse still; it finishes them first, as lru would
    held = _nopay(dataclasses.replace(_sized("L12", 12, 10, last=2, active_s=5.0), remaining_tokens=5),
                  _sized("L8", 8, 10, S.PREEMPTED_HOST, last=1))
    assert decide(policy, held) == [Step("L12"), Step("S4")]
    # once its requests are done, L8 takes the slot; S4 stays, untouched
    held = _nopay(dataclasses.replace(_sized("L12", 12, 10, last=2, active_s=5.0), in_flight=0, remaining_tokens=0,
                                      oldest_age_s=None),
                  _sized("L8", 8, 10, S.PREEMPTED_HOST, last=1))
    actions = decide(policy, held)
    assert actions[0] == Preempt("L12", "host", "swap") and Resume("L8") in actions
    assert actions[-2:] == [Step("L8"), Step("S4")] and not any(a.model == "S4" for a in actions[:-1])
    # and an aged L8 gets in within L12's quantum (the aging bound)
    aged = _nopay(_sized("L12", 12, 10, last=2, active_s=0.1), _sized("L8", 8, 10, S.PREEMPTED_HOST, skipped=32))
    assert {"L8", "S4"} <= {a.model for a in decide(CostScheduling(), aged) if isinstance(a, Step)}
