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
        if s.state == "active":
            assert (s.device_bytes, s.host_bytes, s.disk_bytes) == (active.device, active.host, 0)
        elif "weights=host" in s.state:
            assert (s.device_bytes, s.disk_bytes) == (0, 0)
            assert s.host_bytes >= active.host + weights_device  # the parked copy, aligned per region
        else:
            assert "weights=disk" in s.state
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
                    report = rt.preempt(name, weights=rng.choice(["host", "disk"]), kv=rng.choice(["swap", "drop"]))
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
        assert rt.status()["qwen2"].state.startswith("preempted") and rt.status()["qwen2"].device_bytes == 0
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
        rt.host_budget += tidal.preemption.staging_bytes(rt.models["llama"])  # room for the disk resume's staging
        rt.resume("llama")
        assert rt.generate("llama", PROMPTS, max_new_tokens=NEW) == models["llama"][1]


def test_a_disk_resume_must_fit_its_staging_in_the_host_budget(models, device):
    """Resuming from disk reads the device regions into host staging first; a host budget without room for
    that refuses the resume, and the model stays preempted and resumable."""
    size, _ = footprints(models, "llama", device)
    with tidal.Runtime(device=device, host_budget_bytes=size.host + 4096) as rt:
        rt.load("llama", models["llama"][0], **kwargs("llama"))
        rt.preempt("llama", weights="disk")
        staging = tidal.preemption.staging_bytes(rt.models["llama"])
        assert staging >= sum(rt.models["llama"].weights.region_bytes(k) for k in rt.models["llama"].weights.device_keys)
        with pytest.raises(OutOfDeviceMemory, match=f"{staging} host bytes"):
            rt.resume("llama")
        assert "weights=disk" in rt.status()["llama"].state
        rt.host_budget = size.host + staging
        rt.resume("llama")
        assert rt.generate("llama", PROMPTS, max_new_tokens=NEW) == models["llama"][1]
