"""Engine.set_residency / Runtime.set_residency: layers promoted and demoted between steps while requests
decode give the greedy tokens of an uninterrupted run (and of transformers); the device footprint, the ring
and the report follow the plan; bad arguments and failed copies leave the old plan in force."""
import pytest

import tidal
from engine_util import collect, finish, saved_qwen2, start
from tidal.engine import ResidencyReport
from tidal.engine.residency import footprint
from tidal.errors import ConfigError, OutOfDeviceMemory, StateError, TransferError
from tidal.plan import ResidencyPlan

pytestmark = pytest.mark.usefixtures("ordering")  # each test also runs under the ordering check

PROMPTS = [[5, 17, 99, 3, 42, 8, 71, 2, 9], [11], [64, 2, 90, 33]]
NEW = 12
LAYERS = 6
KV = 1 << 20


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    _, path, want = saved_qwen2(tmp_path_factory, PROMPTS, NEW)
    return path, want


def engine(path, device, **kw):
    kw = {"block_size": 4, "kv_cache_bytes": KV, "resident_fraction": 0.5, **kw}
    return tidal.Engine.from_pretrained(path, device=device, **kw)


def run(eng, changes=None, wait=False):
    """Generate PROMPTS; before step k, apply changes[k] (kwargs of set_residency). Returns tokens, reports."""
    ids, out = start(eng, PROMPTS, NEW)
    reports, k = [], 0
    while eng.has_unfinished():
        if changes and k in changes:
            reports.append(eng.set_residency(**changes[k], wait=wait))
            eng.cache.check()
        collect(eng.step(), out)
        k += 1
    return [out[i] for i in ids], reports


def fresh_device_bytes(path, device, plan, **kw):
    with engine(path, device, resident_fraction=1.0, resident_layers=list(plan.resident_layers), **kw) as e:
        return e.memory().device


UP_DOWN_BACK = {1: dict(resident_fraction=1.0), 3: dict(resident_fraction=0.0), 4: dict(resident_layers=[0, 5]),
                6: dict(resident_fraction=0.5), 8: dict(resident_layers=[1, 2, 3, 4]), 9: dict(resident_fraction=0.0)}


@pytest.mark.parametrize("keep_host_copy", [False, True])
@pytest.mark.parametrize("wait", [False, True])
def test_changes_while_decoding_match_an_uninterrupted_run(model, device, keep_host_copy, wait):
    path, want = model
    with engine(path, device, keep_host_copy=keep_host_copy) as eng:
        plain, _ = run(eng)
    assert plain == want
    with engine(path, device, keep_host_copy=keep_host_copy) as eng:
        got, reports = run(eng, UP_DOWN_BACK, wait=wait)
        assert got == want
        assert [r.new_plan for r in reports] == [
            ResidencyPlan.from_fraction(LAYERS, 1.0), ResidencyPlan.from_fraction(LAYERS, 0.0),
            ResidencyPlan.from_layers(LAYERS, [0, 5]), ResidencyPlan.from_fraction(LAYERS, 0.5),
            ResidencyPlan.from_layers(LAYERS, [1, 2, 3, 4]), ResidencyPlan.from_fraction(LAYERS, 0.0)]
        assert all(a.new_plan == b.old_plan for a, b in zip(reports, reports[1:]))
        assert eng.stats().residency_changes == len(reports)
        assert eng.stats().streamed_layers == tuple(range(LAYERS))
        # every layer is in exactly one place: bound on the device, or streamed from the host
        w = eng.weights
        assert set(w.device) == {"embed", "head"} and set(w.streamed) == set(range(LAYERS))


def test_report_ring_and_memory_follow_the_plan(model, device):
    path, want = model
    with engine(path, device) as eng:
        lb = eng.weights.layer_bytes
        depth = eng.offload_config.prefetch_depth
        ids = [eng.add_request(p, max_new_tokens=NEW) for p in PROMPTS]
        eng.step()
        for kw, resident in ((dict(resident_fraction=1.0), 6), (dict(resident_layers=[2]), 1),
                             (dict(resident_fraction=0.0), 0), (dict(resident_layers=[0, 1, 2, 3, 4]), 5)):
            old = eng.plan
            r = eng.set_residency(**kw, wait=True)
            assert isinstance(r, ResidencyReport) and r.old_plan == old and r.new_plan == eng.plan
            assert len(eng.plan.resident_layers) == resident
            assert r.promoted == tuple(i for i in r.new_plan.resident_layers if i not in old.resident_layers)
            assert r.demoted == tuple(i for i in old.resident_layers if i not in r.new_plan.resident_layers)
            assert r.to_device_bytes == lb * len(r.promoted)
            streamed = LAYERS - resident
            assert r.ring_bytes_after == min(depth + 1, streamed) * lb == eng.stats().ring_bytes
            assert r.device_bytes_after == eng.memory().device == fresh_device_bytes(path, device, eng.plan)
            if r.promoted:
                assert r.to_device_seconds > 0 and r.to_device_gbps > 0
            if r.to_host_bytes:
                assert r.to_host_seconds > 0 and r.to_host_gbps > 0
            assert r.total_seconds > 0 and str(r) and r.to_dict()["new_plan"] == str(eng.plan)
            eng.step()
        while eng.has_unfinished():
            eng.step()
        assert eng.stats().streaming.bytes_streamed > 0 and len(ids) == len(PROMPTS)


def test_the_footprint_is_known_before_the_change(model, device):
    path, _ = model
    with engine(path, device) as eng:
        for plan in (ResidencyPlan.from_fraction(LAYERS, 1.0), ResidencyPlan.from_layers(LAYERS, [3]),
                     ResidencyPlan.from_fraction(LAYERS, 0.0)):
            predicted = footprint(eng, plan)
            eng.set_residency(resident_layers=list(plan.resident_layers))
            assert eng.memory() == predicted


def test_host_copies_are_made_once(model, device):
    """A demotion copies a layer to the host only if no host copy exists: with keep_host_copy never; without
    it, the first time (a layer that streamed once keeps its host region)."""
    path, want = model
    with engine(path, device) as eng:
        host0 = eng.memory().host
        first = eng.set_residency(resident_fraction=0.0)
        assert first.to_host_bytes == 3 * eng.weights.layer_bytes and first.to_host_seconds > 0
        grown = eng.memory().host
        assert grown > host0
        eng.set_residency(resident_fraction=1.0, wait=True)
        again = eng.set_residency(resident_fraction=0.0)
        assert again.to_host_bytes == 0 and eng.memory().host == grown
        assert eng.stats().residency_to_host_bytes == first.to_host_bytes
    with engine(path, device, keep_host_copy=True) as eng:
        host0 = eng.memory().host
        assert eng.set_residency(resident_fraction=0.0).to_host_bytes == 0
        assert eng.memory().host == host0


@pytest.mark.parametrize("weights", ["host", "disk"])
@pytest.mark.parametrize("keep_host_copy", [False, True])
def test_preempt_and_resume_after_a_change(model, device, weights, keep_host_copy):
    path, want = model
    with engine(path, device, keep_host_copy=keep_host_copy) as eng:
        ids, out = start(eng, PROMPTS, NEW)
        for change in (dict(resident_layers=[0, 1, 4]), dict(resident_fraction=1.0)):
            eng.set_residency(**change)
            collect(eng.step(), out)
            eng.preempt(weights=weights)
            assert eng.memory().device == 0
            eng.resume()
        assert finish(eng, ids, out) == want
        assert eng.plan == ResidencyPlan.from_fraction(LAYERS, 1.0)


def test_bad_arguments_change_nothing(model, device):
    path, want = model
    with engine(path, device) as eng:
        plan, mem = eng.plan, eng.memory()
        fixed = sum(eng.weights.region_bytes(k) for k in ("embed", "head"))
        for kw, match in ((dict(resident_fraction=0.5, resident_layers=[1]), "exactly one"), ({}, "exactly one"),
                          (dict(resident_layers=[6]), r"\[0, 6\)"), (dict(resident_layers=[1, 1]), "repeats"),
                          (dict(resident_layers=[-1]), "layer index"), (dict(resident_fraction=1.5), r"\[0, 1\]"),
                          (dict(device_bytes=fixed - 1), "below"), (dict(device_bytes=-1), ">= 0"),
                          (dict(resident_layers=3), "list of layer indices")):
            with pytest.raises(ConfigError, match=match):
                eng.set_residency(**kw)
            assert eng.plan == plan and eng.memory() == mem
        r = eng.set_residency(device_bytes=mem.device)  # weights + ring only: more room than the 0.5 plan needs
        assert len(eng.plan.resident_layers) >= len(plan.resident_layers)
        assert r.new_plan == eng.plan
        got, _ = run(eng)
        assert got == want
        eng.preempt()
        with pytest.raises(StateError, match="preempted"):
            eng.set_residency(resident_fraction=1.0)


@pytest.mark.parametrize("wait", [False, True])
def test_a_promotion_copy_that_fails_on_the_copy_queue(model, device, monkeypatch, wait):
    """The copy fails asynchronously: the step that first reads the layer (or the waiting call) raises
    TransferError, the promotions are undone, and the run finishes with the reference tokens."""
    path, want = model
    with engine(path, device) as eng:
        plan, mem = eng.plan, eng.memory()
        ids, out = start(eng, PROMPTS, NEW, steps=1)
        real = eng.backend.submit

        def submit(fn, nbytes, after=(), **kw):
            if kw.get("op", "").startswith("promote layer"):
                def fn():
                    raise RuntimeError("injected copy failure")
            return real(fn, nbytes, after, **kw)
        monkeypatch.setattr(eng.backend, "submit", submit)
        with pytest.raises(TransferError):
            eng.set_residency(resident_fraction=1.0, wait=wait)
            eng.step()
        monkeypatch.setattr(eng.backend, "submit", real)
        assert eng.plan == plan and eng.memory() == mem and eng.promotion is None
        eng.cache.check()
        assert finish(eng, ids, out) == want


@pytest.mark.parametrize("which", ["promote", "demote"])
def test_a_copy_that_cannot_be_enqueued_leaves_the_old_plan(model, device, monkeypatch, which):
    path, want = model
    with engine(path, device) as eng:
        plan, mem = eng.plan, eng.memory()
        ids, out = start(eng, PROMPTS, NEW, steps=1)
        real = eng.backend.copy

        def refuse(*a, op="copy", **k):
            if op.startswith(which):
                raise TransferError("injected: copy queue refused")
            return real(*a, op=op, **k)
        monkeypatch.setattr(eng.backend, "copy", refuse)
        with pytest.raises(TransferError, match="injected"):
            eng.set_residency(resident_layers=[0, 1, 2])  # promotes some layers and demotes others
        monkeypatch.setattr(eng.backend, "copy", real)
        assert eng.plan == plan and eng.memory() == mem
        assert finish(eng, ids, out) == want


def test_runtime_checks_the_budget_first(model, device):
    path, want = model
    kw = {"kv_cache_bytes": KV, "block_size": 4, "resident_fraction": 0.5, "prefetch_depth": 1}  # ring of 2
    need = tidal.Engine.placement(path, device=device, **kw).footprint.device
    with tidal.Runtime(device=device, device_budget_bytes=need + 1) as rt:
        rt.load("m", path, **kw)
        eng = rt.models["m"]
        plan, mem = eng.plan, eng.memory()
        with pytest.raises(OutOfDeviceMemory, match=rf"over the device budget of {need + 1}"):
            rt.set_residency("m", resident_fraction=1.0)
        with pytest.raises(ConfigError):
            rt.set_residency("m", resident_layers=[9])
        assert eng.plan == plan and eng.memory() == mem
        r = rt.set_residency("m", resident_fraction=0.0)
        assert r.new_plan == eng.plan and rt._active_bytes["m"] == (eng.memory().device, eng.memory().host)
        assert rt.status()["m"].device_bytes < need
        r = rt.set_residency("m", resident_fraction=0.5, wait=True)
        assert rt.status()["m"].device_bytes == need
        assert rt.generate("m", PROMPTS, max_new_tokens=NEW) == want


class _Deaf(dict):
    def update(self, *a, **k):  # the promotion's copies never reach the forward: no wait on them
        pass


def test_the_check_catches_a_promoted_layer_read_before_its_copy(model, device, monkeypatch):
    from tidal.errors import OrderingError

    path, _ = model
    monkeypatch.setenv("TIDAL_CHECK_ORDERING", "1")
    with engine(path, device) as eng:
        eng.add_request(PROMPTS[0], max_new_tokens=NEW)
        eng.step()
        eng.model.arriving = _Deaf()
        eng.set_residency(resident_fraction=1.0)
        with pytest.raises(OrderingError, match="promote layer"):
            eng.step()
