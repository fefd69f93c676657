"""tidal.Scheduler live: three tiny random models under a device budget that fits one, then one and a half.
Every request's greedy tokens match the same prompt run alone in a plain Engine; the budgets hold at every
tick (checked by a policy wrapper, in the loop's own thread); abort frees everything; submission from several
threads while the loop runs; the aging bound; errors leave the rest undisturbed; a failed loop fails its
requests."""
import json
import threading

import pytest
import torch

import tidal
from tidal.errors import ConfigError, OutOfDeviceMemory, PromptError, StateError
from scheduler_util import alone, build_models, tiny

TINY = tiny("sched-tiny", layers=2)
KW = dict(dtype=torch.float32, kv_cache_bytes=1 << 15, host_kv_bytes=1 << 15, block_size=4, kernels="reference")
NAMES = ("m0", "m1", "m2")
PROMPTS = {  # per model: (prompt, max_new_tokens)
    "m0": [([1, 2, 3, 4], 5), ([9, 8, 7], 7), ([5] * 10, 4)],
    "m1": [([3, 1, 4, 1, 5], 6), ([2, 7], 3)],
    "m2": [([11, 12, 13], 8), ([40, 41, 42, 43, 44, 45], 2), ([100], 5)],
}


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return build_models(TINY, NAMES, tmp_path_factory.mktemp("sched"))


@pytest.fixture(scope="module")
def reference(paths):
    return alone(paths, PROMPTS, KW)


@pytest.fixture(scope="module")
def size(paths):
    return tidal.Engine.placement(paths["m0"], device="cpu", **KW).footprint


class Checked:
    """Wraps a policy: asserts the budgets at every tick (before its actions, i.e. after the last tick's) and
    records the most skipped ticks any model with work showed."""

    def __init__(self, rt, inner):
        self.rt, self.inner, self.worst, self.ticks = rt, tidal.scheduler.resolve(inner), 0, 0

    def decide(self, snap):
        rt = self.rt
        assert rt.device_budget is None or rt._device_used() <= rt.device_budget
        assert rt.host_budget is None or rt._host_used() <= rt.host_budget
        assert snap.device_budget == rt.device_budget
        self.worst = max([self.worst] + [m.skipped_ticks for m in snap.models])
        self.ticks += 1
        return self.inner.decide(snap)


def make(paths, size, policy, fraction, trace_path=None, **aging):
    rt = tidal.Runtime(device="cpu", device_budget_bytes=int(size.device * fraction))
    checked = Checked(rt, tidal.scheduler.resolve(policy, **aging))
    sched = tidal.Scheduler(rt, policy=checked, trace_path=trace_path)
    for name in NAMES:
        sched.add_model(name, paths[name], **KW)
    return rt, sched, checked


def submit_all(sched):
    reqs = []
    for i in range(3):  # interleaved across models
        for name in NAMES:
            if i < len(PROMPTS[name]):
                p, n = PROMPTS[name][i]
                reqs.append(sched.submit(name, p, max_new_tokens=n))
    return reqs


@pytest.mark.parametrize("fraction", [1.0, 1.5])
@pytest.mark.parametrize("policy", ["exclusive", "lru"])
def test_every_request_matches_a_plain_engine_within_budget(paths, reference, size, policy, fraction, tmp_path):
    trace = tmp_path / "trace.jsonl" if policy == "lru" else None
    rt, sched, checked = make(paths, size, policy, fraction, trace_path=trace)
    with rt, sched:
        reqs = submit_all(sched)
        sched.run_until_idle()
        for r in reqs:
            assert r.done and r.finish_reason == "length" and r.error is None
            assert r.output_ids == reference[r.model][tuple(r.prompt)], r
            assert r.submitted_at <= r.first_token_at <= r.finished_at
            assert len(r.token_times) == len(r.output_ids) and r.token_times == sorted(r.token_times)
        assert checked.ticks > 0
        assert all(e.num_unfinished == 0 for e in rt.models.values())
        if policy == "exclusive":
            assert sum(s.active for s in rt.status().values()) == 1
    entries = [json.loads(line) for line in trace.read_text().splitlines()] if trace else sched.trace
    assert entries and set(entries[0]) == {"time", "tick", "action", "model", "args", "predicted_s", "measured_s"}
    kinds = {e["action"] for e in entries}
    assert {"Load", "Step"} <= kinds and (fraction > 1.0 or "Preempt" in kinds)
    assert all(e["predicted_s"] is None and e["measured_s"] >= 0 for e in entries)
    assert [e["time"] for e in entries] == sorted(e["time"] for e in entries)
    if trace:
        assert sched.trace == []


def test_a_resume_prefills_its_models_queue_while_the_weights_arrive(paths, reference, size):
    """The loop hands a model's queued requests to its engine before resuming it: the resume's first step, its
    copies still landing, prefills them (its report says so), and the tokens are those of the model alone."""
    rt, sched, _ = make(paths, size, "exclusive", 1.0)
    with rt, sched:
        done = []
        for name, i in (("m0", 0), ("m1", 0), ("m0", 1)):  # the budget holds one model: m0 comes back
            p, n = PROMPTS[name][i]
            done.append(sched.submit(name, p, max_new_tokens=n))
            sched.run_until_idle()
        for r in done:
            assert r.output_ids == reference[r.model][tuple(r.prompt)], r
        entries = sched.trace
        at = max(i for i, e in enumerate(entries) if e["action"] == "Resume")
        resume = entries[at]
        assert resume["model"] == "m0" and resume["report"]["pipelined"]
        report = resume["report"]
        assert report["first_step_seconds"] > 0 and report["time_to_first_token"] is not None
        assert report["recompute_tokens"] == 0 and report["weight_bytes"] > 0
        step = entries[at + 1]  # the Step after it returns the step run ahead
        assert step["action"] == "Step" and step["model"] == "m0"
        assert done[2].first_token_at >= done[2].submitted_at


def test_abort_frees_everything(paths, reference, size):
    rt, sched, _ = make(paths, size, "lru", 1.0, max_skipped_ticks=1)  # the models take turns every tick
    with rt, sched:
        long = [sched.submit(n, [1, 2, 3], max_new_tokens=30) for n in NAMES]
        for _ in range(4):
            sched.tick()
        queued = sched.submit("m0", [4, 5], max_new_tokens=30)
        status = rt.status()
        assert len(status) == 3 and sum(s.preempted and s.running_requests == 1 for s in status.values()) == 2
        assert sched.abort(queued) and queued.finish_reason == "aborted"
        assert not sched.abort(queued)
        assert sum(r.output_ids != [] for r in long) >= 1
        for r in long:
            assert sched.abort(r) and r.done and r.finish_reason == "aborted"
        for name, engine in rt.models.items():
            assert engine.num_unfinished == 0 and not engine.has_unfinished()
            if engine.preempted is None:
                assert engine.cache.device_pool.num_free == engine.cache.config.num_device_blocks
            assert engine.cache.host_pool.num_free == engine.cache.config.num_host_blocks
        assert not sched.tick()  # nothing left
        p, n = PROMPTS["m1"][0]
        r = sched.submit("m1", p, max_new_tokens=n)
        sched.run_until_idle()
        assert r.output_ids == reference["m1"][tuple(p)]


def test_submission_from_several_threads_while_the_loop_runs(paths, reference, size):
    rt, sched, checked = make(paths, size, "lru", 1.5)
    out, lock = [], threading.Lock()

    def client(k):
        for i in range(4):
            name = NAMES[(k + i) % 3]
            p, n = PROMPTS[name][(k + i) % len(PROMPTS[name])]
            r = sched.submit(name, p, max_new_tokens=n)
            with lock:
                out.append(r)

    with rt:
        sched.start()
        with pytest.raises(StateError):
            sched.run_until_idle()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for r in out:
            assert r.wait(timeout=60) == reference[r.model][tuple(r.prompt)]
        late = sched.submit("m2", [1, 2, 3], max_new_tokens=40)
        assert sched.abort(late)
        assert late.wait(timeout=60) is late.output_ids and late.finish_reason == "aborted"
        sched.stop()
        sched.close()
        assert len(out) == 16 and checked.ticks > 0


@pytest.mark.parametrize("policy", ["exclusive", "lru"])
def test_aging_bound_live(paths, size, policy):
    k = 3
    rt, sched, checked = make(paths, size, policy, 1.0, max_skipped_ticks=k, max_wait_s=60.0)
    with rt, sched:
        busy = [sched.submit("m0", [1, 2], max_new_tokens=40)]
        sched.tick()
        others = [sched.submit(n, [3, 4], max_new_tokens=3) for n in ("m1", "m2")]
        sched.run_until_idle()
        assert checked.worst <= k + len(NAMES) - 1
        assert all(r.finished_at < busy[0].finished_at for r in others)  # served while m0 still had work


def test_aging_by_time_live(paths, size):
    rt, sched, _ = make(paths, size, "exclusive", 1.0, max_skipped_ticks=10 ** 6, max_wait_s=0.02)
    with rt, sched:
        busy = sched.submit("m0", [1, 2], max_new_tokens=44)
        sched.tick()
        other = sched.submit("m1", [3, 4], max_new_tokens=2)
        sched.run_until_idle()
        assert other.finished_at < busy.finished_at


def test_errors_leave_everything_else_undisturbed(paths, reference, size, tmp_path):
    rt, sched, _ = make(paths, size, "lru", 1.0)
    with rt, sched:
        p, n = PROMPTS["m0"][0]
        r = sched.submit("m0", p, max_new_tokens=n)
        before = sched.snapshot().models
        with pytest.raises(ConfigError, match="no model named 'nope'"):
            sched.submit("nope", [1, 2])
        with pytest.raises(PromptError, match="positions"):
            sched.submit("m0", [1] * 49)
        with pytest.raises(PromptError, match="vocabulary"):
            sched.submit("m0", [1, 128])
        with pytest.raises(PromptError, match="empty"):
            sched.submit("m0", [])
        with pytest.raises(ConfigError):
            sched.submit("m0", [1], max_new_tokens=0)
        with pytest.raises(OutOfDeviceMemory, match="can never be loaded"):
            sched.add_model("big", paths["m0"], **dict(KW, kv_cache_bytes=1 << 20))
        with pytest.raises(ConfigError, match="registered or loaded already"):
            sched.add_model("m1", paths["m1"], **KW)
        with pytest.raises(ConfigError, match="kv_cache_bytes"):
            sched.add_model("x", paths["m1"], **{k: v for k, v in KW.items() if k != "kv_cache_bytes"})
        sched.add_model("small", paths["m2"], **dict(KW, kv_cache_bytes=1 << 13))  # 4 blocks of 4 tokens
        with pytest.raises(PromptError, match="KV cache holds 16"):
            sched.submit("small", [1] * 17)
        after = sched.snapshot().models
        assert [(m.name, m.queued, m.state) for m in after if m.name != "small"] == \
            [(m.name, m.queued, m.state) for m in before]
        assert rt.models == {} or set(rt.models) <= set(NAMES)
        sched.run_until_idle()
        assert r.output_ids == reference["m0"][tuple(p)]


def test_a_failed_loop_fails_its_requests_and_stop_raises(paths, size):
    rt = tidal.Runtime(device="cpu", device_budget_bytes=size.device)
    lru = tidal.scheduler.resolve("lru")

    class Breaks:
        calls = 0

        def decide(self, snap):
            Breaks.calls += 1
            if Breaks.calls == 3:
                raise RuntimeError("policy broke")
            return lru.decide(snap)

    sched = tidal.Scheduler(rt, policy=Breaks())
    with rt:
        for name in NAMES:
            sched.add_model(name, paths[name], **KW)
        reqs = [sched.submit(n, [1, 2], max_new_tokens=20) for n in NAMES]
        sched.start()
        for r in reqs:
            with pytest.raises(RuntimeError, match="policy broke"):
                r.wait(timeout=60)
            assert r.finish_reason == "error"
        with pytest.raises(RuntimeError, match="policy broke"):
            sched.stop()
        with pytest.raises(StateError, match="loop failed"):
            sched.submit("m0", [1])


def test_a_policy_action_the_state_refuses_changes_nothing(paths, size):
    rt = tidal.Runtime(device="cpu", device_budget_bytes=size.device)

    class Bad:
        def decide(self, snap):
            return [tidal.Step("m0")]  # m0 is not loaded

    sched = tidal.Scheduler(rt, policy=Bad())
    with rt:
        sched.add_model("m0", paths["m0"], **KW)
        r = sched.submit("m0", [1, 2])
        with pytest.raises(StateError, match="cannot apply Step"):
            sched.tick()
        assert r.finish_reason == "error" and rt.models == {}


def test_set_residency_through_the_runtime_keeps_tokens_and_budgets(paths, reference, size):
    """A policy that halves, then restores, m0's resident fraction while its requests are in flight."""
    rt = tidal.Runtime(device="cpu", device_budget_bytes=2 * size.device)
    lru = tidal.scheduler.resolve("lru")
    seen = []

    class Halves:
        def decide(self, snap):
            assert rt._device_used() <= rt.device_budget
            m0 = snap.model("m0")
            seen.append(m0.resident_fraction)
            actions = lru.decide(snap)
            if m0.state.active and m0.has_work and snap.tick in (2, 5):
                return [tidal.SetResidency("m0", 0.5 if snap.tick == 2 else 1.0)] + actions
            return actions

    sched = tidal.Scheduler(rt, policy=Halves())
    with rt, sched:
        for name in ("m0", "m1"):
            sched.add_model(name, paths[name], **KW)
        reqs = [sched.submit(n, p, max_new_tokens=k) for n in ("m0", "m1") for p, k in PROMPTS[n]]
        sched.run_until_idle()
        for r in reqs:
            assert r.output_ids == reference[r.model][tuple(r.prompt)], r
    assert seen[2] == 1.0 and seen[3] == 0.5 and seen[6] == 1.0
    changes = [e for e in sched.trace if e["action"] == "SetResidency"]
    assert [e["args"] for e in changes] == [{"fraction": 0.5}, {"fraction": 1.0}]


def test_remove_model_frees_its_bytes_and_it_can_come_back(paths, reference, size):
    rt, sched, _ = make(paths, size, "lru", 1.0)  # one model at a time: m0 is preempted to the host below
    with rt, sched:
        for name in ("m0", "m1"):
            p, n = PROMPTS[name][0]
            sched.submit(name, p, max_new_tokens=n)
            sched.run_until_idle()
        assert rt.status()["m0"].preempted and rt.status()["m0"].host_bytes > 0
        busy = sched.submit("m1", [1, 2], max_new_tokens=3)
        with pytest.raises(StateError, match="1 requests queued or in flight"):
            sched.remove_model("m1")
        assert sched.unfinished("m1") == 1 and "m1" in rt.models  # nothing changed
        sched.run_until_idle()
        assert busy.done and sched.unfinished("m1") == 0
        host_before = rt._host_used()
        sched.remove_model("m0")  # preempted: its host copy goes
        assert "m0" not in rt.models and rt._host_used() < host_before
        assert "m0" not in {m.name for m in sched.snapshot().models}
        with pytest.raises(ConfigError, match="no model named 'm0'"):
            sched.submit("m0", [1], max_new_tokens=1)
        with pytest.raises(ConfigError, match="no model named 'm0'"):
            sched.remove_model("m0")
        sched.add_model("m0", paths["m0"], **KW)  # registered anew: loads anew, same tokens
        p, n = PROMPTS["m0"][1]
        r = sched.submit("m0", p, max_new_tokens=n)
        sched.run_until_idle()
        assert r.output_ids == reference["m0"][tuple(p)]
        assert [e["action"] for e in sched.trace if e["model"] == "m0"].count("Load") == 2
