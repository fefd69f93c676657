"""The cost policy live (tidal.Scheduler over a Runtime, CPU): two tiny random models under a device budget of
one and a half, with synthetic cost models that make co-residency pay, then time-slicing. Every request's
greedy tokens match the same prompt run alone; the budgets hold at every tick; the trace carries the
policy's predictions."""
import pytest
import torch

import tidal
from tidal import weights
from tidal.costmodel import CostModel, LinkFit, StepFit
from tidal.errors import ConfigError
from scheduler_util import alone, build_models, tiny

TINY = tiny("cost-tiny", layers=4)
# prefetch_depth=0: a one-slot ring, so that streaming layers frees device bytes on a 4-layer model
KW = dict(dtype=torch.float32, kv_cache_bytes=1 << 15, host_kv_bytes=1 << 15, block_size=4, kernels="reference",
          prefetch_depth=0)
PROMPTS = {"m0": [([1, 2, 3, 4], 6), ([9, 8, 7], 5)], "m1": [([3, 1, 4, 1, 5], 6), ([2, 7], 4)]}


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return build_models(TINY, PROMPTS, tmp_path_factory.mktemp("cost"))


@pytest.fixture(scope="module")
def reference(paths):
    return alone(paths, PROMPTS, KW)


@pytest.fixture(scope="module")
def placement(paths):
    return tidal.Engine.placement(paths["m0"], device="cpu", **KW)


def cost_model(placement, per_layer, reload):
    w = weights.empty(placement.model, placement.plan, placement.dtype).layer_bytes
    full = placement.model.num_layers * w
    step = StepFit(placement.model.num_layers, w, 0.01, 0.0, 0.0, w / per_layer, 5e-4, 1)
    links = (LinkFit("weights_host_out", 1e-3, 1e12, 1), LinkFit("weights_host_in", 0.0, full / reload, 1),
             LinkFit("weights_disk_in", 0.0, full / (2 * reload), 1), LinkFit("kv_swap_out", 1e-4, 1e9, 1),
             LinkFit("kv_swap_in", 1e-4, 1e9, 1))
    return CostModel(step, links, None)


class Checked:
    """The cost policy, with the budgets asserted at every tick."""

    def __init__(self, rt):
        # replan_s=0: a plan at every tick (by default a plan of steps is held up to 50 ms without TTFT SLOs,
        # the length of this whole run, and the choice checked here would be made only once)
        self.rt, self.inner, self.kinds, self.observed = rt, tidal.CostScheduling(replan_s=0), [], []
        self.needs_cost_models = True

    def decide(self, snap):
        rt = self.rt
        assert rt._device_used() <= rt.device_budget
        actions = self.inner.decide(snap)
        self.kinds.append(self.inner.last_estimates[0].kind if self.inner.last_estimates else None)
        return actions

    def predict(self, snap, action):
        return self.inner.predict(snap, action)

    def explain(self):
        return self.inner.explain()

    def observe(self, snap, action, measured_s):
        self.observed.append((action, measured_s))
        self.inner.observe(snap, action, measured_s)


@pytest.mark.parametrize("per_layer, reload, expect", [(1e-4, 2.0, "co-residency"), (0.05, 1e-3, "time-slicing")])
def test_cost_policy_live_matches_a_plain_engine_within_budget(paths, reference, placement, per_layer, reload,
                                                               expect):
    rt = tidal.Runtime(device="cpu", device_budget_bytes=int(1.5 * placement.footprint.device))
    policy = Checked(rt)
    sched = tidal.Scheduler(rt, policy=policy)
    with rt, sched:
        for name in PROMPTS:
            sched.add_model(name, paths[name], slo_tpot_s=0.05, cost_model=cost_model(placement, per_layer, reload),
                            **KW)
        reqs = [sched.submit(n, p, max_new_tokens=k) for n in PROMPTS for p, k in PROMPTS[n]]
        sched.run_until_idle()
        for r in reqs:
            assert r.done and r.error is None and r.output_ids == reference[r.model][tuple(r.prompt)], r
        assert rt._device_used() <= rt.device_budget
    assert expect in policy.kinds
    kinds = {e["action"] for e in sched.trace}
    assert ("SetResidency" in kinds) if expect == "co-residency" else ("Preempt" in kinds)
    assert all(e["predicted_s"] is not None for e in sched.trace if e["action"] == "Step")
    # the loop hands the policy every action's measured seconds, as the trace records them; decode steps
    # (not the prefilling ones) have taught the correction a factor per model, preemptions and resumes theirs
    assert [(a.model, type(a).__name__, round(t, 6)) for a, t in policy.observed] == \
        [(e["model"], e["action"], e["measured_s"]) for e in sched.trace]
    # why: every action but a step carries the plans the policy weighed, the chosen one first
    whys = [e["why"] for e in sched.trace if e["action"] != "Step"]
    assert whys and all(w[0]["kind"] in ("co-residency", "time-slicing", "mixed") for w in whys)
    assert all("why" not in e for e in sched.trace if e["action"] == "Step")
    learnt = policy.inner.correction.as_dict()
    assert set(learnt) == set(PROMPTS) and all({"step", "step_streamed"} & set(m) for m in learnt.values())
    tiers = {f"{what}_{tier}" for what in ("preempt", "resume") for tier in ("host", "disk")}
    assert {k for m in learnt.values() for k in m} <= {"step", "step_streamed"} | tiers


def test_cost_policy_needs_a_cost_model_per_model(paths):
    rt = tidal.Runtime(device="cpu")
    sched = tidal.Scheduler(rt, policy="cost")
    with rt, sched:
        with pytest.raises(ConfigError, match="'m0'"):
            sched.add_model("m0", paths["m0"], **KW)
        with pytest.raises(ConfigError, match="slo_tpot_s"):
            sched.add_model("m0", paths["m0"], slo_tpot_s=0, **KW)
        assert sched.submit  # nothing was registered
        with pytest.raises(ConfigError):
            sched.submit("m0", [1])
