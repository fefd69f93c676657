"""Engine.preempt / Engine.resume: identical greedy tokens in every mode, exact byte counts, reports whose
parts add up, and the fault cases (a failed copy or read leaves the model preempted and resumable)."""
import math
import shutil

import pytest

import tidal
import engine_util
from engine_util import collect, finish
from tidal.errors import CheckpointError, ConfigError, StateError, TransferError

pytestmark = pytest.mark.usefixtures("ordering")  # each test also runs under the ordering check

PROMPTS = [[5, 17, 99, 3, 42, 8, 71, 2, 9], [11], [64, 2, 90, 33]]
NEW = 10
BLOCK = 4
STEPS_BEFORE = 4  # steps run before preempting: prefill + 3 decodes


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return engine_util.saved_qwen2(tmp_path_factory, PROMPTS, NEW)


def engine(path, device, **kw):
    kw = {"block_size": BLOCK, "kv_cache_bytes": 1 << 20, "resident_fraction": 0.5, **kw}
    return tidal.Engine.from_pretrained(path, device=device, **kw)


def start(eng, steps=STEPS_BEFORE):
    return engine_util.start(eng, PROMPTS, NEW, steps)


def param_bytes(ref, resident):
    """Bytes of the parameters that live on the device: embeddings, final norm, LM head (tied here) and the
    resident layers, from the transformers model itself."""
    n = sum(p.numel() * p.element_size() for p in ref.model.embed_tokens.parameters())
    n += sum(p.numel() * p.element_size() for p in ref.model.norm.parameters())
    for i in resident:
        n += sum(p.numel() * p.element_size() for p in ref.model.layers[i].parameters())
    return n


def assert_adds_up(report):
    """Every part is recorded and lies within the call: each is a sum of disjoint intervals inside it (host
    sections, or copies the call enqueued and waited for), so none exceeds the total however loaded the
    machine is. `parts_seconds` is the sum of exactly those parts. (How much host time no part measures
    depends on the load, so it is not bounded here.)"""
    from tidal.engine import ResumeReport

    names = ["bookkeeping_seconds", "weight_seconds", "kv_seconds"]
    if isinstance(report, ResumeReport):
        names += ["disk_seconds", "first_step_seconds"]
    parts = [getattr(report, n) for n in names]
    assert report.parts_seconds > 0 and report.total_seconds > 0
    assert all(0 <= p <= report.total_seconds for p in parts), report
    assert report.parts_seconds == pytest.approx(sum(parts), rel=1e-12, abs=0)


@pytest.mark.parametrize("kv", ["swap", "recompute"])
def test_requests_added_while_preempted_are_prefilled_by_the_resumes_first_step(model, device, kv):
    """A scheduler hands its queue to a preempted engine before resuming it, so that the resume's first step
    (pipelined: while the weights arrive) prefills the new prompt: its first token is out when resume returns,
    the recompute counts only the dropped requests, and every request's greedy tokens are unchanged."""
    ref, path, want = model
    with engine(path, device) as eng:
        ids, out = engine_util.start(eng, PROMPTS[:2], NEW, STEPS_BEFORE)
        eng.preempt(weights="host", kv=kv)
        late = eng.add_request(PROMPTS[2], max_new_tokens=NEW)
        out[late] = []
        prefills = eng.counters.prefill_tokens
        res = eng.resume(pipelined=True)
        assert eng.counters.prefill_tokens - prefills == len(PROMPTS[2]) + \
            (sum(len(p) + STEPS_BEFORE for p in PROMPTS[:2]) if kv == "recompute" else 0)
        first = eng.step()  # the step resume ran ahead: the new request's first token among its outputs
        assert [list(o.token_ids) for o in first if o.request_id == late] == [want[2][:1]]
        collect(first, out)
        assert finish(eng, [*ids, late], out) == want
        assert res.time_to_first_token is not None and res.first_step_seconds > 0
        if kv == "recompute":
            assert res.recompute_tokens == sum(len(p) + STEPS_BEFORE for p in PROMPTS[:2])
            assert 0 < res.recompute_seconds < res.first_step_seconds
        else:
            assert res.recompute_tokens == 0 and res.recompute_seconds == 0.0
        assert_adds_up(res)


@pytest.mark.parametrize("pipelined", [True, False])
@pytest.mark.parametrize("kv", ["swap", "recompute"])
@pytest.mark.parametrize("weights", ["host", "disk", "keep"])
def test_round_trip_keeps_greedy_tokens(model, device, weights, kv, pipelined):
    ref, path, want = model
    with engine(path, device) as eng:
        ids, out = start(eng)
        held = sum(math.ceil(eng.cache.num_tokens(i) / BLOCK) for i in ids)
        before = eng.memory()
        pre = eng.preempt(weights=weights, kv=kv)
        assert eng.memory().device == (before.device - eng.cache.config.num_device_blocks *
                                       eng.cache.config.block_bytes - (pre.weight_bytes + eng.weights.layer_bytes * 3
                                                                       if weights != "keep" else 0))
        with pytest.raises(StateError, match="preempted"):
            eng.step()
        res = eng.resume(pipelined=pipelined)
        assert finish(eng, ids, out) == want
        assert eng.memory() == before
        s = eng.stats()  # resume's swap-in is in its report, not in the engine's own swap counters
        assert s.suspend_swap_outs == s.suspend_swap_ins == 0 and s.suspend_swap_seconds == 0.0

        # the exact bytes: KV blocks held x block bytes, and the parameters released from the device
        block_bytes = 2 * 6 * BLOCK * 2 * 16 * 4  # K and V, 6 layers, 2 kv heads, head_dim 16, fp32
        resident = eng.plan.resident_layers
        if kv == "swap":
            assert pre.kv_bytes == res.kv_bytes == held * block_bytes and pre.kv_swapped_requests == 3
            assert res.recompute_tokens == 0
        else:
            assert pre.kv_bytes == res.kv_bytes == 0 and pre.kv_recompute_requests == 3
            assert res.recompute_tokens == sum(len(p) + STEPS_BEFORE for p in PROMPTS)  # prompt + output so far
            assert res.recompute_seconds > 0
        expected_weights = param_bytes(ref, resident) if weights != "keep" else 0
        assert pre.weight_bytes == res.weight_bytes == expected_weights
        assert (pre.weight_seconds > 0) == (weights == "host")
        assert res.disk_bytes == (param_bytes(ref, range(6)) if weights == "disk" else 0)
        read_path = "native (" if tidal.native.available() else "python ("
        assert res.loader.startswith(read_path) if weights == "disk" else res.loader == "none"
        assert res.time_to_first_token is not None and res.time_to_first_token <= res.total_seconds
        if weights != "keep":
            assert 0 < res.time_to_first_layer <= res.time_to_first_token
        assert_adds_up(pre)
        assert_adds_up(res)  # pipelined too: its parts overlap one another, yet each lies within the call
        if not pipelined:
            assert res.overlap_seconds == 0.0
        d = res.to_dict()
        assert d["weight_bytes"] == res.weight_bytes and "kv_gbps" in d and str(res).startswith("resume ")
        eng.cache.check()
        assert eng.cache.device_pool.num_free == eng.cache.config.num_device_blocks


def test_preempt_an_idle_model_and_state_errors(model, device):
    _, path, want = model
    with engine(path, device, resident_fraction=1.0) as eng:
        with pytest.raises(StateError, match="not preempted"):
            eng.resume()
        pre = eng.preempt()
        assert pre.kv_bytes == 0 and pre.weight_bytes > 0
        with pytest.raises(StateError, match="already preempted"):
            eng.preempt()
        with pytest.raises(StateError, match="preempted"):
            eng.generate(PROMPTS)
        with pytest.raises(ConfigError, match="weights="):
            tidal.Engine.preempt(eng, weights="gpu")
        res = eng.resume()
        assert res.time_to_first_token is None
        assert eng.generate(PROMPTS, max_new_tokens=NEW) == want


def test_host_pool_too_small_drops_what_does_not_fit(model, device):
    _, path, want = model
    block_bytes = 2 * 6 * BLOCK * 2 * 16 * 4
    with engine(path, device, host_kv_bytes=3 * block_bytes) as eng:  # request 0 alone holds 3 blocks
        ids, out = start(eng)
        pre = eng.preempt(weights="host", kv="swap")
        assert pre.kv_swapped_requests == 1 and pre.kv_recompute_requests == 2
        eng.resume()
        assert finish(eng, ids, out) == want


@pytest.mark.parametrize("pipelined", [True, False])
def test_a_copy_that_fails_during_resume_leaves_the_model_preempted(model, device, monkeypatch, pipelined):
    """The third weight region's copy fails on the copy queue (asynchronously): the resume raises, the model
    is preempted again with every block and byte accounted for, and a second resume completes the run."""
    _, path, want = model
    with engine(path, device) as eng:
        ids, out = start(eng)
        eng.preempt(weights="host", kv="swap")
        real = eng.backend._copy_now
        seen = []

        def failing(dst, src):
            seen.append(1)
            if len(seen) == 4:  # the KV swap-in, then the embeddings, the first layer and this one
                raise RuntimeError("injected copy failure")
            return real(dst, src)
        monkeypatch.setattr(eng.backend, "_copy_now", failing)
        with pytest.raises(TransferError):
            eng.resume(pipelined=pipelined)
        assert len(seen) >= 4
        monkeypatch.setattr(eng.backend, "_copy_now", real)
        assert eng.preempted is not None and eng.memory().device == 0
        eng.cache.check()
        assert eng.cache.device_pool.num_used == 0
        with pytest.raises(StateError):
            eng.step()
        eng.resume(pipelined=pipelined)
        assert finish(eng, ids, out) == want


def test_a_copy_that_cannot_be_enqueued_leaves_the_model_preempted(model, device, monkeypatch):
    _, path, want = model
    with engine(path, device) as eng:
        ids, out = start(eng)
        eng.preempt(weights="host", kv="recompute")
        real = eng.backend.copy
        calls = []

        def refuse(*a, **k):
            calls.append(1)
            if len(calls) == 2:
                raise TransferError("injected: copy queue refused")
            return real(*a, **k)
        monkeypatch.setattr(eng.backend, "copy", refuse)
        with pytest.raises(TransferError, match="injected"):
            eng.resume()
        monkeypatch.setattr(eng.backend, "copy", real)
        assert eng.preempted is not None and eng.memory().device == 0
        eng.resume()
        assert finish(eng, ids, out) == want


def test_a_truncated_checkpoint_at_resume_keeps_others_running(model, device, tmp_path):
    _, path, want = model
    copy = shutil.copytree(path, tmp_path / "ckpt")
    other = engine(path, device)
    with engine(copy, device) as eng:
        ids, out = start(eng)
        eng.preempt(weights="disk", kv="swap")
        f = copy / "model.safetensors"
        good = f.read_bytes()
        f.write_bytes(good[:-4096])
        with pytest.raises(CheckpointError, match="model.safetensors"):
            eng.resume()
        assert eng.preempted is not None and eng.memory().device == 0
        assert other.generate(PROMPTS, max_new_tokens=NEW) == want  # the other model is unaffected
        f.write_bytes(good)
        eng.resume()
        assert finish(eng, ids, out) == want
    other.close()


def test_back_to_back_preemptions_return_each_token_once(model, device):
    """Resume runs a first step whose outputs wait for the next step(); preempting and resuming again before
    that step must neither lose nor repeat them, and each resume must still run its own step."""
    _, path, want = model
    with engine(path, device) as eng:
        ids, out = start(eng)
        for _ in range(3):
            eng.preempt(weights="host", kv="swap")
            report = eng.resume(pipelined=False)
            assert report.first_step_seconds > 0 and eng.has_pending_outputs
        assert finish(eng, ids, out) == want
        assert not eng.has_pending_outputs


def test_keep_host_copy_makes_host_preemption_copy_nothing(model, device):
    """keep_host_copy: the pinned host copy is made at load and kept, so preempt(weights="host") only releases
    device memory, every time; weights="disk" drops the copy and the resume from disk makes it again. Tokens
    stay identical and the host bytes are what the placement said."""
    ref, path, want = model
    resident = None
    with engine(path, device, keep_host_copy=True) as eng:
        placement = tidal.Engine.placement(path, device=device, block_size=BLOCK, kv_cache_bytes=1 << 20,
                                           resident_fraction=0.5, keep_host_copy=True)
        active = eng.memory()
        assert active.host == placement.footprint.host
        copy_bytes = tidal.weights.host_copy_bytes(eng.weights)
        plain = tidal.Engine.placement(path, device=device, block_size=BLOCK, kv_cache_bytes=1 << 20,
                                       resident_fraction=0.5)
        assert active.host == plain.footprint.host + copy_bytes
        resident = eng.plan.resident_layers
        ids, out = start(eng)
        for weights in ("host", "host", "disk", "host"):
            pre = eng.preempt(weights=weights, kv="swap")
            assert pre.weight_bytes == param_bytes(ref, resident)
            if weights == "host":
                assert pre.host_copy_reused and pre.weight_seconds == 0.0 and "host copy kept" in str(pre)
                assert eng.memory().host == active.host  # nothing new on the host but the KV
            else:
                assert not pre.host_copy_reused and pre.host_bytes_released >= copy_bytes
            res = eng.resume(pipelined=True)
            assert res.weight_bytes == param_bytes(ref, resident)
            assert eng.memory() == active  # the copy is back after a resume from disk too
            collect(eng.step(), out)
        assert finish(eng, ids, out) == want


@pytest.mark.parametrize("keep_host_copy", [False, True])
def test_a_preemption_frees_the_device_regions_when_it_returns(model, device, keep_host_copy):
    """Nothing holds a preempted model's device regions: not the copy that moved them to the host, nor the one
    that made the kept host copy at load (the CPU backend's copy thread once held its last job until the
    next came, and with it the memory a preemption had released)."""
    import weakref

    _, path, want = model
    with engine(path, device, keep_host_copy=keep_host_copy) as eng:
        ids, out = start(eng)
        regions = [weakref.ref(t) for t in eng.weights.device.values()]
        assert regions and all(r() is not None for r in regions)
        eng.preempt(weights="host", kv="swap")
        assert [r for r in regions if r() is not None] == []
        eng.resume()
        assert finish(eng, ids, out) == want


def test_keep_host_copy_in_the_runtime_needs_no_host_growth(model, device):
    _, path, want = model
    kw = dict(block_size=BLOCK, kv_cache_bytes=1 << 20, host_kv_bytes=1 << 20, keep_host_copy=True)
    footprint = tidal.Engine.placement(path, device=device, **kw).footprint
    with tidal.Runtime(device=device, host_budget_bytes=footprint.host) as rt:
        rt.load("m", path, **kw)
        rt.preempt("m", weights="host")  # no room for a second copy; none is needed
        rt.resume("m")
        assert rt.generate("m", PROMPTS, max_new_tokens=NEW) == want


def test_a_request_aborted_while_preempted_is_not_swapped_back_in(model, device):
    """Its KV is freed at the abort; the resume brings back the others alone, and they finish as if alone."""
    _, path, want = model
    with engine(path, device) as eng:
        ids, out = start(eng)
        pre = eng.preempt(weights="host", kv="swap")
        assert pre.kv_swapped_requests == len(PROMPTS)
        assert eng.abort(ids[0])
        eng.resume()
        eng.cache.check()
        assert finish(eng, ids[1:], out) == want[1:]
        assert eng.cache.device_pool.num_used == 0 and eng.cache.host_pool.num_used == 0
