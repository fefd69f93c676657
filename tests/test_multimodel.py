"""tidal.Runtime: several engines under device and host budgets. Seeded random sequences of load, generate,
preempt, resume and unload, checking after every operation that the budgets hold, that every model's bytes
are on exactly the tiers `status()` says (derived independently from `Engine.placement`), and that greedy
tokens match transformers."""
import random

import pytest
import torch

import tidal
from hf_models import greedy, make_model
from tidal.arena import align_up
from tidal.errors import ConfigError, OutOfDeviceMemory, StateError
from tidal.policy import Load, ModelState, Preempt, Request, Resume

pytestmark = pytest.mark.usefixtures("ordering")  # each test also runs under the ordering check

PROMPTS = [[5, 17, 99, 3, 42], [11, 4]]
NEW = 6
KV = 1 << 16  # 64 KiB of KV per model
SHAPES = {  # three different models
    "llama": dict(arch="llama", num_layers=4),
    "qwen2": dict(arch="qwen2", num_layers=3, hidden=96, heads=6, kv_heads=2, intermediate=160),
    "mistral": dict(arch="mistral", num_layers=5, hidden=64, heads=4, kv_heads=4),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for name, shape in SHAPES.items():
        shape = dict(shape)
        ref = make_model(shape.pop("arch"), std=0.5, **shape)
        path = tmp_path_factory.mktemp(name)
        ref.save_pretrained(path)
        want = [greedy(ref, torch.tensor([p]), NEW)[0, len(p):].tolist() for p in PROMPTS]
        out[name] = (path, want)
    return out


def kwargs(name):
    return {"kv_cache_bytes": KV, "host_kv_bytes": KV, "block_size": 4,
            "resident_fraction": 0.5 if name == "mistral" else 1.0}


def footprints(models, name, device):
    p = tidal.Engine.placement(models[name][0], device=device, **kwargs(name))
    return p.footprint, p


def check_invariants(rt, models, device):
    status = rt.status()
    assert set(status) == set(rt.models)
    assert sum(s.device_bytes for s in status.values()) <= rt.device_budget
    for name, s in status.items():
        active, placement = footprints(models, name, device)
        eng = rt.models[name]
        layout = eng.weights
        weights_device = sum(layout.region_bytes(k) for k in layout.device_keys)
        streamed = layout.layer_bytes * len(placement.plan.streamed_layers)
        kv_host = align_up(max(1, placement.kv.num_host_blocks * placement.kv.block_bytes))  # the KV host pool
        if s.state is ModelState.ACTIVE:
            assert (s.device_bytes, s.host_bytes, s.disk_bytes) == (active.device, active.host, 0)
        elif s.state is ModelState.PREEMPTED_HOST:
            assert (s.device_bytes, s.disk_bytes) == (0, 0)
            assert s.host_bytes >= active.host + weights_device  # the parked copy, aligned per region
        else:
            assert s.state is ModelState.PREEMPTED_DISK
            assert (s.device_bytes, s.host_bytes, s.disk_bytes) == (0, kv_host, weights_device + streamed)


def test_random_sequences_keep_budgets_tiers_and_tokens(models, device):
    sizes = {n: footprints(models, n, device)[0].device for n in SHAPES}
    budget = sum(sizes.values()) - min(sizes.values()) // 2  # all three never fit at once
    for seed in range(3):
        rng = random.Random(seed)
        with tidal.Runtime(device=device, device_budget_bytes=budget) as rt:
            done = []
            for _ in range(16):
                name = rng.choice(list(SHAPES))
                if name not in rt.models:
                    op = "load"
                elif rt.models[name].preempted is None:
                    op = rng.choice(["generate", "generate", "preempt", "preempt", "unload"])
                else:
                    op = rng.choice(["resume", "resume", "unload"])
                if op == "load":
                    rt.load(name, models[name][0], evict="lru", **kwargs(name))
                elif op == "generate":
                    assert rt.generate(name, PROMPTS, max_new_tokens=NEW) == models[name][1]
                elif op == "preempt":
                    report = rt.preempt(name, weights=rng.choice(["host", "disk"]), kv=rng.choice(["swap", "recompute"]))
                    assert report.weight_bytes > 0
                elif op == "resume":
                    report, evicted = rt.resume(name, pipelined=rng.random() < 0.5, evict="lru")
                    assert all(r.model != name for r in evicted)
                    assert rt.generate(name, PROMPTS, max_new_tokens=NEW) == models[name][1]
                else:
                    rt.unload(name)
                done.append(op)
                check_invariants(rt, models, device)
            assert {"load", "generate", "preempt", "resume"} <= set(done), done


def test_budget_errors_and_lru_eviction(models, device):
    sizes = {n: footprints(models, n, device)[0].device for n in SHAPES}
    budget = sizes["llama"] + sizes["qwen2"]
    with tidal.Runtime(device=device, device_budget_bytes=budget) as rt:
        rt.load("llama", models["llama"][0], **kwargs("llama"))
        rt.load("qwen2", models["qwen2"][0], **kwargs("qwen2"))
        with pytest.raises(OutOfDeviceMemory, match=f"needs {sizes['mistral']} device .* of {budget} device"):
            rt.load("mistral", models["mistral"][0], **kwargs("mistral"))
        assert set(rt.models) == {"llama", "qwen2"}  # the failed load left nothing behind
        rt.generate("llama", PROMPTS, max_new_tokens=NEW)  # qwen2 is now the least recently used
        evicted = rt.load("mistral", models["mistral"][0], evict="lru", **kwargs("mistral"))
        assert [r.model for r in evicted] == ["qwen2"]
        assert rt.status()["qwen2"].preempted and rt.status()["qwen2"].device_bytes == 0
        with pytest.raises(OutOfDeviceMemory):
            rt.resume("qwen2")
        report, evicted = rt.resume("qwen2", evict="lru")
        # least recently used first: llama, then mistral if qwen2 and mistral together exceed the budget
        assert [r.model for r in evicted] == ["llama"] + (["mistral"] if sizes["mistral"] + sizes["qwen2"] > budget
                                                          else [])
        assert rt.generate("qwen2", PROMPTS, max_new_tokens=NEW) == models["qwen2"][1]
        with pytest.raises(StateError, match="preempted"):
            rt.generate("llama", PROMPTS)
        with pytest.raises(StateError, match="not preempted"):
            rt.resume("qwen2")
        with pytest.raises(ConfigError, match="loaded already"):
            rt.load("qwen2", models["qwen2"][0], **kwargs("qwen2"))
        with pytest.raises(ConfigError, match="kv_cache_bytes"):
            rt.load("other", models["qwen2"][0])
        with pytest.raises(ConfigError, match="no model named"):
            rt.preempt("nope")


def test_host_budget_sends_evictions_to_disk(models, device):
    sizes = {n: footprints(models, n, device)[0] for n in SHAPES}
    host = sizes["llama"].host + sizes["qwen2"].host + 4096  # no room for a parked copy of the weights
    budget = sizes["llama"].device + sizes["qwen2"].device // 2
    with tidal.Runtime(device=device, device_budget_bytes=budget, host_budget_bytes=host) as rt:
        rt.load("llama", models["llama"][0], **kwargs("llama"))
        (report,) = rt.load("qwen2", models["qwen2"][0], evict="lru", **kwargs("qwen2"))
        assert report.weights == "disk" and rt.status()["llama"].disk_bytes > 0
        check_invariants(rt, models, device)
        rt.preempt("qwen2", weights="disk")
        rt.host_budget += tidal.engine.preemption.staging_bytes(rt.models["llama"])  # room for the disk resume's staging
        rt.resume("llama")
        assert rt.generate("llama", PROMPTS, max_new_tokens=NEW) == models["llama"][1]


def test_a_disk_resume_must_fit_its_staging_in_the_host_budget(models, device):
    """Resuming from disk reads the device regions into host staging first; a host budget without room for
    that refuses the resume, and the model stays preempted and resumable."""
    size, _ = footprints(models, "llama", device)
    with tidal.Runtime(device=device, host_budget_bytes=size.host + 4096) as rt:
        rt.load("llama", models["llama"][0], **kwargs("llama"))
        rt.preempt("llama", weights="disk")
        staging = tidal.engine.preemption.staging_bytes(rt.models["llama"])
        assert staging >= sum(rt.models["llama"].weights.region_bytes(k) for k in rt.models["llama"].weights.device_keys)
        with pytest.raises(OutOfDeviceMemory, match=f"{staging} host bytes"):
            rt.resume("llama")
        assert rt.status()["llama"].state is ModelState.PREEMPTED_DISK
        rt.host_budget = size.host + staging
        rt.resume("llama")
        assert rt.generate("llama", PROMPTS, max_new_tokens=NEW) == models["llama"][1]


def test_lru_preempts_nothing_when_preempting_everything_would_not_make_room(models, device):
    sizes = {n: footprints(models, n, device)[0].device for n in SHAPES}
    with tidal.Runtime(device=device, device_budget_bytes=sizes["llama"] + sizes["qwen2"]) as rt:
        rt.load("llama", models["llama"][0], **kwargs("llama"))
        rt.load("qwen2", models["qwen2"][0], **kwargs("qwen2"))
        before = rt.status()
        rt.device_budget = sizes["mistral"] - 1
        with pytest.raises(OutOfDeviceMemory, match=r"preempting every active model \(2\) would not make room"):
            rt.load("mistral", models["mistral"][0], evict="lru", **kwargs("mistral"))
        assert rt.status() == before


class Scripted:
    """A policy that returns the plans it was given, one per decision, and keeps the views it was shown."""

    def __init__(self, *plans):
        self.plans, self.views = list(plans), []

    def decide(self, view):
        self.views.append(view)
        return self.plans.pop(0)

    def __repr__(self):
        return "Scripted()"


def test_the_runtime_applies_exactly_the_policys_actions(models, device):
    room = sum(footprints(models, n, device)[0].device for n in SHAPES)
    with tidal.Runtime(device=device, device_budget_bytes=room) as rt:  # all fit: LRU would preempt nothing
        rt.load("llama", models["llama"][0], **kwargs("llama"))
        rt.load("qwen2", models["qwen2"][0], **kwargs("qwen2"))
        policy = Scripted([Preempt("llama", "disk"), Preempt("qwen2", "host", "recompute"), Load("mistral")])
        reports = rt.load("mistral", models["mistral"][0], evict=policy, **kwargs("mistral"))
        assert [(r.model, r.weights, r.kv) for r in reports] == [("llama", "disk", "swap"),
                                                                 ("qwen2", "host", "recompute")]
        need, _ = footprints(models, "mistral", device)
        (view,) = policy.views
        assert view.request == Request("mistral", need.device, need.host)
        assert [(m.name, m.state, m.last_used) for m in view.models] == [
            ("llama", ModelState.ACTIVE, 0), ("qwen2", ModelState.ACTIVE, 1), ("mistral", ModelState.UNLOADED, 2)]
        status = rt.status()
        assert [status[n].state for n in ("llama", "qwen2", "mistral")] == [
            ModelState.PREEMPTED_DISK, ModelState.PREEMPTED_HOST, ModelState.ACTIVE]
        assert str(status["llama"]).startswith("preempted (weights=disk, kv=swap): 0 device")
        check_invariants(rt, models, device)
        staging = tidal.engine.preemption.staging_bytes(rt.models["llama"])
        policy = Scripted([Resume("llama")])
        report, evicted = rt.resume("llama", evict=policy)
        assert evicted == [] and policy.views[0].model("llama").state is ModelState.PREEMPTED_DISK
        assert policy.views[0].request.host_bytes >= staging > 0
        assert rt.generate("llama", PROMPTS, max_new_tokens=NEW) == models["llama"][1]


@pytest.mark.parametrize("plan, error, match", [
    ([Preempt("qwen2"), Preempt("nope"), Load("mistral")], StateError, "no model named 'nope'"),
    ([Preempt("qwen2"), Preempt("qwen2"), Load("mistral")], StateError, "'qwen2' is not active"),
    ([Load("mistral")], OutOfDeviceMemory, r"Load\('mistral'\) needs"),
    ([Preempt("qwen2")], StateError, r"must end with Load\('mistral'\)"),
    ([Resume("qwen2"), Load("mistral")], StateError, "applies only Preempts"),
    ([Preempt("llama"), "qwen2", Load("mistral")], ConfigError, "not a Preempt, Load or Resume"),
    (None, ConfigError, "not a list of actions"),
])
def test_an_action_the_runtime_cannot_apply_raises_and_changes_nothing(models, device, plan, error, match):
    sizes = {n: footprints(models, n, device)[0].device for n in SHAPES}
    with tidal.Runtime(device=device, device_budget_bytes=sizes["llama"] + sizes["qwen2"]) as rt:
        rt.load("llama", models["llama"][0], **kwargs("llama"))
        rt.load("qwen2", models["qwen2"][0], **kwargs("qwen2"))
        before = rt.status()
        with pytest.raises(error, match=match) as exc:
            rt.load("mistral", models["mistral"][0], evict=Scripted(plan), **kwargs("mistral"))
        assert "nothing was changed" in str(exc.value) and "Scripted()" in str(exc.value)
        assert rt.status() == before and list(rt.models) == ["llama", "qwen2"]
        with pytest.raises(ConfigError, match="must be None, 'lru' or a Policy"):
            rt.load("mistral", models["mistral"][0], evict="mru", **kwargs("mistral"))
