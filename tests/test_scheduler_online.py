"""The cost policy's online correction (`tidal.scheduler.online`): the factor it learns from the loop's
measurements, per model and kind of action, and the loop handing it those measurements."""
import dataclasses
import math
import types

import pytest

from tidal.errors import ConfigError
from tidal.policy import ModelState, Preempt, Resume
from tidal.scheduler import CostScheduling, SetResidency, Step
from tidal.scheduler.loop import _own_seconds
from tidal.scheduler.online import OnlineCorrection
from test_scheduler_cost import cost_model, decide, model, snap

S = ModelState


def test_the_factor_is_the_median_of_the_recent_log_ratios():
    c = OnlineCorrection(window=3, limit=4.0)
    assert c.factor("a", "step") == 1.0  # nothing learnt yet
    c.observe("a", "step", 0.010, 0.030)
    assert c.factor("a", "step") == pytest.approx(3.0)  # one sample: its own ratio
    c.observe("a", "step", 0.010, 0.010)
    assert c.factor("a", "step") == pytest.approx(math.sqrt(3.0))  # two: the geometric mean
    c.observe("a", "step", 0.010, 0.020)
    assert c.factor("a", "step") == pytest.approx(2.0)  # 1, 2, 3: the median
    c.observe("a", "step", 0.010, 0.012)  # the window drops the 3
    assert c.factor("a", "step") == pytest.approx(1.2)  # 1, 2, 1.2
    assert c.factor("a", "step_streamed") == 1.0 and c.factor("b", "step") == 1.0  # per model and kind
    c.observe("b", "preempt_host", 0.1, 100.0)  # a thousand times off: a wrong model, clamped to the limit
    assert c.factor("b", "preempt_host") == pytest.approx(4.0)
    for predicted, measured in ((None, 1.0), (0.0, 1.0), (1.0, 0.0), (-1.0, 1.0)):
        c.observe("c", "step", predicted, measured)  # nothing to learn from
    assert c.factor("c", "step") == 1.0
    assert c.as_dict() == {"a": {"step": {"factor": round(c.factor("a", "step"), 4), "samples": 4}},
                           "b": {"preempt_host": {"factor": 4.0, "samples": 1}}}


def test_outliers_do_not_move_the_factor_and_a_lasting_drift_is_followed_within_half_a_window():
    c = OnlineCorrection(window=9)
    for _ in range(40):
        c.observe("a", "step", 0.02, 0.03)
    assert c.factor("a", "step") == pytest.approx(1.5, rel=1e-9)
    for _ in range(4):  # heavy-tailed steps, as live: four of nine at 4x (clamped) leave the median
        c.observe("a", "step", 0.02, 2.0)
        assert c.factor("a", "step") == pytest.approx(1.5, rel=1e-9)
    c = OnlineCorrection(window=9)
    for _ in range(9):
        c.observe("a", "step", 0.02, 0.02)
    for i in range(5):  # the machine slows down to 2x for good: the fifth sample moves the median there
        assert c.factor("a", "step") == pytest.approx(1.0)
        c.observe("a", "step", 0.02, 0.04)
    assert c.factor("a", "step") == pytest.approx(2.0)


@pytest.mark.parametrize("kwargs", [{"window": 0}, {"window": 2.5}, {"window": True}, {"limit": 1.0},
                                    {"limit": "2"}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ConfigError):
        OnlineCorrection(**kwargs)
    with pytest.raises(ConfigError, match="online"):
        CostScheduling(online="yes")


def test_the_policy_scales_its_step_predictions_by_what_it_observed():
    s = snap(model("a", tpot=1.0, last=1), model("b", tpot=1.0), device=None)
    policy = CostScheduling()
    assert decide(policy, s) == [Step("a"), Step("b")]
    raw = policy.predict(s, Step("a"))
    assert raw == pytest.approx(cost_model().predict_step(10, 2, 64))
    policy.observe(s, Step("a"), 3 * raw)  # the machine runs a's steps 3x slower than its profile
    nxt = snap(model("a", tpot=1.0, last=1), model("b", tpot=1.0), device=None, tick=1)
    decide(policy, nxt)
    assert policy.predict(nxt, Step("a")) == pytest.approx(3 * raw)
    assert policy.predict(nxt, Step("b")) == pytest.approx(raw)  # b is not a
    # a step that prefilled queued requests is not a decode step's sample
    queued = snap(model("a", tpot=1.0, last=1, queued=2), model("b", tpot=1.0), device=None, tick=2)
    decide(policy, queued)
    policy.observe(queued, Step("a"), 100 * raw)
    assert policy.correction.factor("a", "step") == pytest.approx(3.0)
    # an action the last decide did not plan at that tick is not a sample either
    policy.observe(nxt, Step("a"), 100 * raw)
    assert policy.correction.factor("a", "step") == pytest.approx(3.0)


def test_preemptions_are_corrected_per_tier_and_steps_per_regime():
    cm = cost_model(per_layer=0.02, reload=0.005)  # time-slicing: b is preempted to the host
    s = snap(model("a", fraction=0.5, tpot=0.05, last=1), model("b", fraction=0.5, tpot=0.05, active_s=1.0),
             device=180, cms={"a": cm, "b": cm})
    policy = CostScheduling()
    actions = decide(policy, s)
    assert actions[0] == Preempt("b", "host", "swap")
    raw = policy.predict(s, actions[0])
    policy.observe(s, actions[0], 2 * raw)
    assert policy.correction.as_dict() == {"b": {"preempt_host": {"factor": 2.0, "samples": 1}}}
    assert policy.cost(s, s.model("b"), 5, Preempt("b", "host", "swap")) == pytest.approx(2 * raw)
    assert policy.cost(s, s.model("b"), 5, Preempt("b", "disk", "swap")) == \
        CostScheduling(online=False).cost(s, s.model("b"), 5, Preempt("b", "disk", "swap"))
    # a step with streamed layers and one with none are two regimes, learnt apart
    policy.correction.observe("a", "step_streamed", 1.0, 2.0)
    assert policy.cost(s, s.model("a"), 5, Step("a")) == pytest.approx(2 * cm.predict_step(5, 2, 64))
    assert policy.cost(s, s.model("a"), 10, Step("a")) == pytest.approx(cm.predict_step(10, 2, 64))


def test_without_online_correction_predictions_are_the_cost_models():
    s = snap(model("a", tpot=1.0, last=1), model("b", tpot=1.0), device=None)
    policy = CostScheduling(online=False)
    decide(policy, s)
    raw = policy.predict(s, Step("a"))
    policy.observe(s, Step("a"), 5 * raw)
    assert policy.correction is None and policy.predict(s, Step("a")) == raw


# -- requests still to come: the models' arrival rates ------------------------------------------------------------
def _rate(m, rate):
    return dataclasses.replace(m, arrival_rate=rate)


@pytest.mark.parametrize("rate, kept", [(0.0, False), (5.0, True)])
def test_co_residency_keeps_an_idle_model_that_expects_requests(rate, kept):
    # a busy, b idle (both active, all resident), c preempted with a request waiting: all three whole need 330
    # bytes of 250. Without requests expected for b, the room comes from preempting it; with 5 a second
    # expected, its next request would wait for a 0.1 s reload (TTFT SLO 0.05 s), so all three stay, b's and
    # a's layers streaming.
    cms = {n: cost_model(reload=0.1) for n in "abc"}
    b = _rate(model("b", in_flight=0, ttft=0.05, tpot=0.5), rate)
    s = snap(model("a", ttft=0.5, tpot=0.5, last=2), b, model("c", S.PREEMPTED_HOST, ttft=0.5, tpot=0.5, first_wait=0.2),
             device=250, cms=cms)
    policy = CostScheduling()
    actions = decide(policy, s)
    assert actions[-3:] == [Resume("c"), Step("a"), Step("c")]  # an idle model is not stepped, kept or not
    assert (Preempt("b", "host", "swap") not in actions) is kept
    assert any(isinstance(a, SetResidency) and a.model == "b" for a in actions) is kept
    assert policy.last_estimates[0].kind == "co-residency" and policy.last_estimates[0].violation == 0.0


def test_a_plan_that_leaves_an_expected_model_off_the_device_pays_for_its_next_request():
    cm = cost_model(reload=2.0)
    b = model("b", S.PREEMPTED_HOST, in_flight=0, ttft=0.5)
    estimates = {}
    for rate in (0.0, 2.0):
        s = snap(model("a", tpot=1.0, last=1), _rate(b, rate), device=None, cms={"a": cm, "b": cm})
        policy = CostScheduling()
        assert decide(policy, s) == [Step("a")]  # a alone: b, preempted and idle, stays where it is
        estimates[rate] = policy.last_estimates[0]
    back = policy.cost(s, s.model("b"), 10, Resume("b")) + policy.cost(s, s.model("b"), 10, Step("b"))
    p = 1 - math.exp(-2.0 * max(estimates[2.0].seconds, 1.0))
    assert estimates[2.0].seconds == estimates[0.0].seconds
    # its next request waits for the 2 s reload, over twice its 0.5 s TTFT SLO: a whole miss, as likely as a
    # request
    assert back > 2.0 and p > 0.8
    assert estimates[2.0].violation == pytest.approx(estimates[0.0].violation + p)


def test_the_loop_measures_each_models_arrival_rate(tmp_path):
    from scheduler_util import build_models, tiny
    import torch
    import tidal

    kw = dict(dtype=torch.float32, kv_cache_bytes=1 << 15, block_size=4, kernels="reference")
    paths = build_models(tiny("arrivals", layers=2), {"a": [], "b": []}, tmp_path)
    rt = tidal.Runtime(device="cpu")
    sched = tidal.Scheduler(rt, policy="lru")
    with rt, sched:
        for name in ("a", "b"):
            sched.add_model(name, paths[name], **kw)
        for _ in range(5):
            sched.submit("a", [1, 2, 3], max_new_tokens=2)
        snap = sched.snapshot()
        window = min(tidal.scheduler.state.ARRIVAL_WINDOW_S, max(1.0, snap.time))
        assert snap.model("a").arrival_rate == pytest.approx(5 / window, rel=0.05)
        assert snap.model("b").arrival_rate == 0.0
        sched.run_until_idle()


# -- the objective: requests predicted to miss an SLO ------------------------------------------------------------
def test_misses_count_requests_and_cap_each_at_one():
    from tidal.scheduler.plans import misses

    m = dataclasses.replace(model("a", in_flight=3, queued=1, ttft=0.1, tpot=0.05, first_wait=0.0),
                            first_token_waiting=2)
    assert misses(m, 0.1, 0.05) == 0.0  # both met, exactly
    assert misses(m, 0.15, None) == pytest.approx(2 * 0.5)  # two requests waiting for a token, 50% over
    assert misses(m, 10.0, None) == 2.0  # hopeless: each a whole miss, no more
    assert misses(m, None, 0.06) == pytest.approx(4 * 0.2)  # TPOT: every unfinished request
    assert misses(m, 1.0, 1.0) == 6.0
    no_slo = model("b", in_flight=3)
    assert misses(no_slo, 9.0, 9.0) == 0.0
    # a plan's transitions stall the three in flight (0.5 s over the 50 remaining tokens: 10 ms each); the
    # queued one pays them in its TTFT, not its TPOT
    m = dataclasses.replace(m, remaining_tokens=50)
    assert misses(m, None, 0.05, stall=0.5) == pytest.approx(3 * 0.2)
    assert misses(m, None, 0.06, stall=0.5) == pytest.approx(3 * 0.4 + 1 * 0.2)


def test_a_time_sliced_model_pays_for_the_requests_that_arrive_while_it_is_off_the_device():
    from tidal.scheduler.plans import HORIZON_S, slice_estimate

    a = model("a", in_flight=0, queued=0, ttft=0.2, remaining=0)
    b = model("b", in_flight=1, ttft=0.2, remaining=1)
    rnd, switch, quantum = {"a": 0.01, "b": 0.01}, {"a": 0.3, "b": 0.3}, {"a": 0.5, "b": 0.5}
    quiet = slice_estimate("time-slicing", [], [a, b], b, rnd, switch, quantum, 0.0)
    busy = slice_estimate("time-slicing", [], [_rate(a, 3.0), b], b, rnd, switch, quantum, 0.0)
    cycle, off = 1.6, 1.1  # a is off the device 1.1 s of every 1.6 s and waits up to 1.1 s for its slot
    late = (off - (0.2 - 0.01)) / off
    assert busy.violation - quiet.violation == pytest.approx(3.0 * HORIZON_S * off / cycle * late)
    assert busy.seconds == quiet.seconds


def test_a_sliced_models_tpot_counts_each_whole_wait_for_its_slot():
    from tidal.scheduler.plans import slice_estimate

    # b, off the device now, has 30 tokens left at 10 ms a round and a 0.2 s quantum: 2 quanta, so 2 waits of
    # the rest of the cycle (1.7 - 0.2 s) over its 30 tokens: 0.11 s a token, over its 0.1 s TPOT SLO by 10%
    # (the steady state's cycle x round / Q, 0.085 s, would call it met)
    a = model("a", in_flight=1, remaining=100)
    b = model("b", S.PREEMPTED_HOST, in_flight=1, tpot=0.1, remaining=30)
    est = slice_estimate("time-slicing", [], [a, b], a, {"a": 0.01, "b": 0.01}, {"a": 0.5, "b": 0.5},
                         {"a": 0.5, "b": 0.2}, 0.0)
    tpot = 0.01 + 2 * (1.7 - 0.2) / 30
    assert 1.7 * 0.01 / 0.2 < 0.1 < tpot
    assert est.violation == pytest.approx(tpot / 0.1 - 1)


@pytest.mark.parametrize("in_flight", [0, 1])
def test_a_resume_is_a_sample_unless_its_first_step_also_prefilled_beside_a_decode(in_flight):
    """The loop hands queued requests to the engine before a Resume, whose first step then prefills them. With
    nothing in flight the loop reports the resume's copies alone (`_own_seconds`), a sample like any resume's;
    with requests in flight too, the step decoded them and prefilled the others: no prediction covers that."""
    s = snap(model("b", S.PREEMPTED_HOST, tpot=0.05, queued=2, in_flight=in_flight), device=None)
    policy = CostScheduling()
    actions = decide(policy, s)
    assert actions[0] == Resume("b")
    raw = policy.predict(s, actions[0])
    report = types.SimpleNamespace(first_step_seconds=0.3, overlap_seconds=0.2)
    measured = _own_seconds(s, actions[0], report, 2 * raw + 0.1)
    assert measured == pytest.approx(2 * raw if not in_flight else 2 * raw + 0.1)
    policy.observe(s, actions[0], measured)
    learnt = {} if in_flight else {"b": {"resume_host": {"factor": 2.0, "samples": 1}}}
    assert policy.correction.as_dict() == learnt
