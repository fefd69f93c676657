"""`tidal simulate` (runtime/simulate/): the simulated engine's batching and KV blocks, the simulator running
the scheduler's own policy objects (the same instances the live loop runs) with budgets held at every tick,
deterministic runs, and the command end to end on a real `tidal profile` of a small preset."""
import dataclasses
import json
import subprocess
import sys

import pytest
import torch

import tidal
from tidal.costmodel import CostModel, LinkFit, RecomputeFit, StepFit
from tidal.errors import ConfigError
from tidal.scheduler import LruScheduling, Snapshot, resolve
from tidal.simulate.engine import SimEngine, SimModelConfig, SimRequest
from tidal.simulate.metrics import Served, summarize
from tidal.simulate.simulator import Simulator
from tidal.simulate.workload import TraceRequest, WorkloadSpec, generate

L, W, TOP, KVT = 8, 1000, 500, 10  # layers, bytes per layer, other weights, KV bytes per token


def cost_model(step=0.01, per_layer=0.002, reload=0.05):
    links = (LinkFit("weights_host_out", 0.0, L * W / reload, 1), LinkFit("weights_host_in", 0.0, L * W / reload, 1),
             LinkFit("weights_disk_in", 0.0, L * W / (2 * reload), 1), LinkFit("kv_swap_out", 0.0, 1e6, 1),
             LinkFit("kv_swap_in", 0.0, 1e6, 1))
    return CostModel(StepFit(L, W, step, 0.0, 0.0, W / per_layer, 0.0, 1), links, RecomputeFit(0.001, 1e-4, 0.0, 1))


def config(name, kv_tokens=256, **kw):
    return SimModelConfig(name, cost_model(), L, W, TOP, KVT, kv_cache_bytes=kv_tokens * KVT, block_size=4, **kw)


# -- the simulated engine ------------------------------------------------------------------------------------------
def test_engine_batches_prefills_and_decodes_every_request_to_its_length():
    e = SimEngine(config("a", max_batch_size=2))
    reqs = [SimRequest(i, "a", p, n, 0.0) for i, (p, n) in enumerate([(5, 3), (1, 1), (9, 6)])]
    for r in reqs:
        e.hand(r, 0.0)
    now, steps, peak = 0.0, 0, 0
    while e.unfinished:
        seconds, _ = e.step(now)
        now += seconds
        steps += 1
        peak = max(peak, len(e.running))
        assert e.used_blocks == sum(-(-r.context // 4) for r in e.running) <= e.config.blocks
    assert peak <= 2
    for r in reqs:
        assert r.generated == r.output_tokens and r.first_token_s <= r.finished_s
    # the third waited for a slot: the batch held two
    assert reqs[2].first_token_s > reqs[0].first_token_s


@pytest.mark.parametrize("resident", [L, 5, 0])
def test_a_prefill_on_a_partly_resident_model_streams_its_layers_again(resident):
    """A step that decodes and prefills is two passes, as the engine runs them, and each streams the layers
    that are not resident: by hand, decode max(T0, S x per_layer) and prefill max(P, S x per_layer)."""
    e = SimEngine(config("a", resident_fraction=resident / L))
    first, second = SimRequest(0, "a", 30, 5, 0.0), SimRequest(1, "a", 20, 5, 0.0)
    e.hand(first, 0.0)
    e.step(0.0)
    e.hand(second, 0.0)
    seconds, _ = e.step(1.0)
    s = L - resident
    decode = max(0.01, s * 0.002) if s else 0.01
    prefill = 0.001 + 1e-4 * 20
    assert seconds == pytest.approx(decode + (max(prefill, s * 0.002) if s else prefill))
    assert second.first_token_s == pytest.approx(1.0 + seconds)


class PlainEngine:
    """The simulated engine written the plain way, every running request touched at every decode step: the
    reference `SimEngine`'s books (O(1) a step) must equal, step by step."""

    def __init__(self, config):
        self.config, self.resident, self.waiting, self.running, self.used_blocks = config, L, [], [], 0

    def step(self, now, not_before=0.0):
        cfg, block, seconds, finished = self.config, self.config.block_size, 0.0, []
        if self.running:
            new = sum(1 for r in self.running if r.context % block == 0)
            while self.used_blocks + new > cfg.blocks and len(self.running) > 1:
                victim = self.running.pop()
                new -= victim.context % block == 0
                self.used_blocks -= cfg.blocks_for(victim.context)
                victim.engine_preemptions += 1
                self.waiting.insert(0, victim)
            context = sum(r.context for r in self.running) // len(self.running)
            seconds += cfg.cost_model.predict_step(self.resident, len(self.running), context)
            self.used_blocks += new
            self.running = self._token(self.running, max(now + seconds, not_before), finished)
        admitted = []
        while self.waiting and len(self.running) + len(admitted) < cfg.max_batch_size:
            blocks = cfg.blocks_for(self.waiting[0].context + 1)
            if self.used_blocks + blocks > cfg.blocks:
                break
            self.used_blocks += blocks
            admitted.append(self.waiting.pop(0))
        if admitted:
            seconds += cfg.cost_model.predict_prefill(self.resident, sum(r.context for r in admitted))
            t = max(now + seconds, not_before)
            for r in admitted:
                r.first_token_s = t if r.first_token_s is None else r.first_token_s
            self.running += self._token(admitted, t, finished)
        return seconds, finished

    def _token(self, requests, t, finished):
        """Each of `requests` gets its next token at `t`: those done go to `finished`, the rest are returned."""
        still = []
        for r in requests:
            r.generated += 1
            if r.generated >= r.output_tokens:
                r.finished_s = t
                self.used_blocks -= self.config.blocks_for(r.context)
                finished.append(r)
            else:
                still.append(r)
        return still


def _against_plain(seed) -> int:
    import copy
    import random
    rng = random.Random(seed)
    cfg = config("a", kv_tokens=rng.choice([48, 64, 96, 400]), max_batch_size=rng.randint(1, 6))  # one fits alone
    cfg = dataclasses.replace(cfg, block_size=rng.choice([1, 2, 4, 5]))
    fast, plain = SimEngine(cfg), PlainEngine(cfg)
    reqs = [SimRequest(i, "a", rng.randint(1, 12), rng.randint(1, 30), 0.0) for i in range(40)]
    twins = copy.deepcopy(reqs)
    now, handed = 0.0, 0
    for tick in range(3000):
        for _ in range(rng.choice([0, 0, 0, 1, 2])):
            if handed < len(reqs):
                fast.hand(reqs[handed], now)
                twins[handed].started_s = now
                plain.waiting.append(twins[handed])
                handed += 1
        if rng.random() < 0.01:  # a preemption with KV recompute
            fast.drop_kv()
            plain.waiting[:0], plain.running, plain.used_blocks = plain.running, [], 0
        not_before = now + rng.choice([0.0, rng.random() * 0.05])  # a resume's step waits for its last layer
        got, want = fast.step(now, not_before), plain.step(now, not_before)
        assert got[0] == want[0] and [r.id for r in got[1]] == [r.id for r in want[1]], tick
        assert fast.used_blocks == plain.used_blocks, tick
        assert [r.id for r in fast.running] == [r.id for r in plain.running], tick  # reading brings them up to date
        assert [dataclasses.astuple(r) for r in reqs] == [dataclasses.astuple(r) for r in twins], tick
        now += got[0]
        if handed == len(reqs) and not fast.unfinished:
            break
    assert handed == len(reqs) and all(r.done for r in reqs)
    return sum(r.engine_preemptions for r in reqs)


def test_the_engine_books_equal_the_plain_engine_step_by_step():
    """Random arrivals, lengths, block sizes and KV pools small enough to preempt inside the engine, and KV
    dropped now and then (a preemption with recompute): every step's seconds, finished requests, blocks, and
    every request's fields equal the plain engine's; the seeds between them preempt inside the engine."""
    assert sum(_against_plain(seed) for seed in range(8)) > 0


def test_engine_preempts_the_newest_request_when_its_kv_runs_out_and_it_still_finishes():
    e = SimEngine(config("a", kv_tokens=24))  # 6 blocks of 4 tokens
    reqs = [SimRequest(i, "a", 6, 12, 0.0) for i in range(2)]  # each grows to 18 tokens: 5 blocks
    for r in reqs:
        e.hand(r, 0.0)
    now = 0.0
    while e.unfinished:
        seconds, _ = e.step(now)
        now += seconds
        assert e.used_blocks == sum(-(-r.context // 4) for r in e.running) <= 6
    assert all(r.done and r.generated == 12 for r in reqs)
    assert sum(r.engine_preemptions for r in reqs) >= 1


# -- the simulator -------------------------------------------------------------------------------------------------
class Checked:
    """Wraps a policy: asserts the budgets in every snapshot it is given, and counts the snapshots."""

    def __init__(self, inner):
        self.inner, self.seen, self.aging = inner, 0, getattr(inner, "aging", None)

    def decide(self, snap):
        assert isinstance(snap, Snapshot)
        pool = snap.pool()
        assert snap.device_budget is None or pool.device_used <= snap.device_budget
        assert snap.host_budget is None or pool.host_used <= snap.host_budget
        self.seen += 1
        return self.inner.decide(snap)


def _trace(seed=0, duration=20.0):
    spec = WorkloadSpec(rate=4.0, cv=1.5, zipf=1.0, duration=duration, seed=seed, prompt_mean=12, prompt_sigma=0.5,
                        output_mean=16, output_sigma=0.5, prompt_max=40, output_max=40)
    return generate(spec, ["a", "b", "c"])


@pytest.mark.parametrize("policy", ["exclusive", "lru", "cost"])
def test_every_request_finishes_within_the_budgets(policy):
    models = [config(n, slo_ttft_s=1.0, slo_tpot_s=0.05) for n in "abc"]
    one = models[0].device_bytes(L)
    checked = Checked(resolve(policy))
    sim = Simulator(models, checked, device_budget=int(1.5 * one))  # one model and a half
    trace = _trace()
    result = sim.run(trace)
    assert checked.seen == result.decisions > 0
    assert len(result.requests) == len(trace) and all(r.done for r in result.requests)
    for r in result.requests:
        assert r.arrival_s <= r.first_token_s <= r.finished_s <= result.end_s
        assert r.generated == r.output_tokens
    kinds = {e["action"] for e in result.trace}
    assert "Load" in kinds and "Preempt" in kinds and "Resume" in kinds
    again = Simulator(models, resolve(policy), device_budget=int(1.5 * one)).run(trace)  # deterministic
    assert [(r.first_token_s, r.finished_s) for r in again.requests] == \
        [(r.first_token_s, r.finished_s) for r in result.requests]


@pytest.mark.parametrize("prompt,reload", [(7, 0.05), (100, 0.005)])  # the copy longer / the prefill longer
def test_a_resume_prefills_its_queue_while_the_weights_arrive(prompt, reload):
    """As the live loop's: a Resume of a model with queued requests runs its first step while the layers land,
    so the first token is out max(copy, first layer + prefill) after the resume starts, not their sum."""
    models = [SimModelConfig(n, cost_model(reload=reload), L, W, TOP, KVT, kv_cache_bytes=256 * KVT,
                             block_size=4) for n in "ab"]
    trace = [TraceRequest(0.0, "a", 5, 3), TraceRequest(1.0, "b", 5, 3), TraceRequest(2.0, "a", prompt, 2)]
    result = Simulator(models, "exclusive", device_budget=models[0].device_bytes(L)).run(trace)
    resume = [e for e in result.trace if e["action"] == "Resume"][-1]
    assert resume["model"] == "a"
    copy = reload  # the whole model from the host: L * W bytes at L * W / reload bytes/s, no KV
    prefill = 0.001 + 1e-4 * prompt  # RecomputeFit
    expected = max(copy, copy / (L + 1) + prefill)
    assert resume["seconds"] == pytest.approx(expected)
    last = result.requests[2]
    assert last.first_token_s == pytest.approx(resume["time"] + expected)
    assert last.finished_s - last.first_token_s == pytest.approx(0.01)  # then one decode step, all resident


@pytest.mark.parametrize("policy", ["exclusive", "lru", "cost"])
@pytest.mark.parametrize("rate", [4.0, 12.0])
def test_fast_forward_changes_nothing(policy, rate):
    """A plan of steps alone is repeated without asking the policy again until its `repeats_until` (exclusive,
    lru: ever; cost: its replan_s), through arrivals and finished requests of the models with work: the same
    run as asking at every tick (at 12 requests/s the queues grow long)."""
    models = [config(n, kv_tokens=64, slo_ttft_s=1.0, slo_tpot_s=0.05) for n in "abc"]
    budget = int(1.5 * models[0].device_bytes(L))
    spec = WorkloadSpec(rate=rate, cv=1.5, zipf=1.0, duration=20.0, seed=3, prompt_mean=12, prompt_sigma=0.5,
                        output_mean=16, output_sigma=0.5, prompt_max=40, output_max=40)
    trace = generate(spec, list("abc"))
    fast = Simulator(models, policy, device_budget=budget).run(trace)
    slow = Simulator(models, Checked(resolve(policy)), device_budget=budget).run(trace)  # no repeats_until
    assert 2 * fast.decisions < slow.decisions == slow.ticks == fast.ticks
    assert [(r.first_token_s, r.finished_s) for r in fast.requests] == \
        [(r.first_token_s, r.finished_s) for r in slow.requests]
    assert fast.trace == slow.trace and fast.steps == slow.steps


def test_a_policy_of_its_own_that_repeats_its_steps_and_has_no_aging():
    class Steady:  # steps every active model with work, brings nothing in but by lru's rules; no aging
        inner = LruScheduling(max_wait_s=1e9, max_skipped_ticks=10 ** 9)

        def decide(self, snap):
            return self.inner.decide(snap)

        def repeats_until(self, snap):
            return float("inf")

    models = [config(n) for n in "ab"]
    trace = [t for t in _trace(seed=4) if t.model != "c"][:30]
    result = Simulator(models, Steady(), device_budget=int(1.5 * models[0].device_bytes(L))).run(trace)
    assert all(r.done for r in result.requests) and result.decisions < result.ticks


@pytest.mark.parametrize("policy", ["exclusive", "cost"])
def test_snapshot_aggregates_match_a_count_over_every_request(policy, monkeypatch):
    """The snapshot's per-model aggregates come from running sums (so a tick costs the same beside long queues):
    at every tick of an over-capacity run with engine preemptions, they equal a count over every request."""
    from tidal.scheduler.state import ARRIVAL_WINDOW_S
    from tidal.simulate import simulator

    fast, ticks = simulator._Run.snapshot, []

    def counted(run):
        snap = fast(run)
        window = min(ARRIVAL_WINDOW_S, max(1.0, run.now))
        for m in snap.models:
            arrived = [r for r in run.reqs[:run.next] if r.model == m.name]
            live = [r for r in arrived if not r.done]
            queued = list(run.queues[m.name])
            no_token = [r for r in live if r.first_token_s is None]
            assert (m.queued, m.in_flight) == (len(queued), len(live) - len(queued))
            assert m.oldest_age_s == (run.now - min(r.arrival_s for r in live) if live else None)
            assert m.context == (sum(r.context for r in live) // len(live) if live else 0)
            assert m.remaining_tokens == max((r.output_tokens - r.generated for r in live), default=0)
            assert m.first_token_waiting == len(no_token)
            assert m.first_token_wait_s == (run.now - min(r.arrival_s for r in no_token) if no_token else None)
            assert m.arrival_rate == sum(r.arrival_s >= run.now - window for r in arrived) / window
        ticks.append(sum(m.in_flight > 8 for m in snap.models))
        return snap

    monkeypatch.setattr(simulator._Run, "snapshot", counted)
    models = [config(n, kv_tokens=48, slo_ttft_s=1.0, slo_tpot_s=0.05) for n in "abc"]
    spec = WorkloadSpec(rate=12.0, cv=2.0, zipf=1.0, duration=8.0, seed=5, prompt_mean=10, prompt_sigma=0.6,
                        output_mean=20, output_sigma=0.6, prompt_max=30, output_max=40)
    result = Simulator(models, policy, device_budget=int(1.5 * models[0].device_bytes(L))).run(
        generate(spec, list("abc")))
    assert any(ticks)  # engines held more than a batch: their waiting lines were counted too
    assert sum(r.engine_preemptions for r in result.requests) > 0  # and held requests that had a token


def test_refusals_name_the_problem():
    m = config("a")
    with pytest.raises(ConfigError, match="never be loaded"):
        Simulator([m], "lru", device_budget=10)
    with pytest.raises(ConfigError, match="names model 'zz'"):
        Simulator([m], "lru").run([TraceRequest(0.0, "zz", 4, 4)])
    with pytest.raises(ConfigError, match="can never fit model 'a'"):
        Simulator([m], "lru").run([TraceRequest(0.0, "a", 5000, 4)])


def test_the_same_policy_object_runs_live_and_simulated(tmp_path):
    """One LruScheduling instance decides for the live Scheduler on real engines and for the simulator, on
    snapshots of the same type carrying the same fields."""
    from scheduler_util import build_models, tiny

    policy = LruScheduling()
    seen = {"live": [], "sim": []}

    class Recorder:
        def __init__(self, where):
            self.where, self.aging = where, policy.aging

        def decide(self, snap):
            seen[self.where].append(snap)
            return policy.decide(snap)

    paths = build_models(tiny("sim-tiny", layers=2), ("a", "b"), tmp_path)
    kw = dict(dtype=torch.float32, kv_cache_bytes=1 << 15, kernels="reference")
    rt = tidal.Runtime(device="cpu")
    with rt, tidal.Scheduler(rt, policy=Recorder("live")) as sched:
        for n in "ab":
            sched.add_model(n, paths[n], **kw)
        reqs = [sched.submit(n, [1, 2, 3], max_new_tokens=4) for n in "ab"]
        sched.run_until_idle()
        assert all(r.done for r in reqs)
    sim = Simulator([config(n) for n in "ab"], Recorder("sim"))
    sim.run([TraceRequest(0.0, n, 3, 4) for n in "ab"])
    live, simulated = seen["live"][0].models[0], seen["sim"][0].models[0]
    assert type(seen["live"][0]) is type(seen["sim"][0]) is Snapshot
    fields = live.__dataclass_fields__
    assert {f for f in fields if getattr(live, f) is None} == {f for f in fields if getattr(simulated, f) is None}
    for f in ("slo_ttft_s", "num_layers", "layer_bytes", "ring_slots", "context", "remaining_tokens"):
        assert (getattr(live, f) == 0) == (getattr(simulated, f) == 0), f


def test_metrics_against_a_hand_count():
    served = [Served("a", 0.0, 0.5, 1.5, 11, True), Served("a", 1.0, 1.1, 1.2, 1, True),
              Served("b", 2.0, None, None, 0, False)]
    m = summarize(served, {"a": (0.4, 0.2), "b": (1.0, 1.0)}, 0.0, 4.0)
    assert (m["requests"], m["finished"], m["span_s"]) == (3, 2, 4.0)
    assert m["slo_attainment"] == pytest.approx(1 / 3)  # the first misses its TTFT, the third never ran
    assert m["goodput_rps"] == pytest.approx(0.25) and m["throughput_tok_s"] == pytest.approx(3.0)
    assert m["ttft_p50_s"] == pytest.approx(0.3) and m["tpot_p50_s"] == pytest.approx(0.05)


# -- the command -------------------------------------------------------------------------------------------------
def test_the_command_on_a_real_profile(tmp_path):
    prof = tmp_path / "micro"
    subprocess.run([sys.executable, "-m", "tidal", "profile", "micro", "--quick", "--out", str(prof)], check=True,
                   capture_output=True)
    path = prof / "profile.json"
    one = SimModelConfig.from_profile("x", path, kv_cache_bytes=1 << 20).device_bytes(
        json.loads(path.read_text())["model"]["num_layers"])
    out = tmp_path / "sim"
    r = subprocess.run([sys.executable, "-m", "tidal", "simulate", "--workload",
                        "rate=4,cv=1,zipf=1.1,duration=20,seed=0,prompt_mean=16,output_mean=16,prompt_max=64,"
                        "output_max=64", "--profile", f"a={path}", "--profile", f"b={path}", "--device-budget",
                        str(int(1.5 * one)), "--kv-cache", "1MiB", "--slo", "ttft=1,tpot=0.2", "--rates", "2,4",
                        "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads((out / "simulate.json").read_text())
    assert set(doc["policies"]) == {"exclusive", "lru", "cost"}
    for row in doc["policies"].values():
        assert row["requests"] == doc["workload"]["count"] == row["finished"]
        assert {"ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "slo_attainment", "goodput_rps", "switches"} <= set(row)
    assert len(doc["rates"]["slo_attainment"]["lru"]) == 2 and (out / "rates.png").exists()
    png = (out / "timeline.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    bad = subprocess.run([sys.executable, "-m", "tidal", "simulate", "--workload", "rate=4", "--profile",
                          f"a={path}", "--device-budget", "1GiB", "--out", str(out)], capture_output=True, text=True)
    assert bad.returncode != 0 and "duration" in bad.stderr


def test_timeline_segments_from_a_trace():
    """Which model is where, from a scheduler trace: loads at the registered fraction, residency changes, a
    preemption keeping the fraction it left with, a resume back to it, an unload ending the segment."""
    from tidal.simulate.figures import segments

    ev = lambda t, a, m, **args: {"time": t, "action": a, "model": m, "args": args}  # noqa: E731
    trace = [ev(1.0, "Load", "a"), ev(1.5, "Step", "a"), ev(2.0, "SetResidency", "a", fraction=0.5),
             ev(3.0, "Preempt", "a", weights="disk", kv="swap"), ev(3.0, "Load", "b"), ev(4.0, "Resume", "a"),
             ev(5.0, "Unload", "b"), ev(5.5, "Preempt", "a", weights="host", kv="recompute")]
    got = segments(trace, ["a", "b", "c"], end=7.0, loaded={"b": 0.25}, offset=1.0)
    assert got == {"a": [(0.0, 1.0, "active", 1.0), (1.0, 2.0, "active", 0.5), (2.0, 3.0, "disk", 0.5),
                         (3.0, 4.5, "active", 0.5), (4.5, 7.0, "host", 0.5)],
                   "b": [(2.0, 4.0, "active", 0.25)], "c": []}


def test_live_without_validate_is_refused(tmp_path):
    r = subprocess.run([sys.executable, "-m", "tidal", "simulate", "--workload", "rate=1,duration=1", "--live",
                        "--out", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode != 0 and "--live makes the live run for --validate" in r.stderr


def test_gpu_shapes_match_the_published_parameter_counts():
    from tidal.presets import PRESETS
    from tidal.simulate.shapes import cost_model, gpu_model, shape

    for name in ("qwen2.5-0.5b", "llama-3.2-1b", "qwen2.5-3b", "llama-3-8b", "qwen2.5-14b"):
        s = shape(name)
        assert s.params == PRESETS[name].param_count(), name  # the preset's own count, from its tensor shapes
        assert s.top_bytes + s.num_layers * s.layer_bytes == 2 * s.params
        cm, fast = cost_model(s, "pcie4"), cost_model(s, "c2c")
        steps = [cm.predict_step(r, 1, 512) for r in range(s.num_layers, -1, -1)]
        assert steps == sorted(steps) and steps[-1] > 10 * steps[0]  # streaming over PCIe: decode collapses
        assert fast.predict_step(s.num_layers // 2, 1, 512) < cm.predict_step(s.num_layers // 2, 1, 512)
    m = gpu_model("x", "llama-3-8b", 2 << 30)
    assert m.device_bytes(m.num_layers) == 2 * PRESETS["llama-3-8b"].param_count() + (2 << 30)


def test_the_ranking_compares_orders_and_a_tie_is_no_order():
    from tidal.simulate.validate import swapped
    att = lambda live, sim: {"live": live, "sim": sim}  # noqa: E731
    assert swapped({"lru": att(0.9, 0.8), "cost": att(0.8, 0.9)}) == [("lru", "cost")]
    assert swapped({"lru": att(0.9, 0.9), "cost": att(0.8, 0.85), "exclusive": att(0.5, 0.6)}) == []
    # every policy met every SLO live: any simulated order agrees; a simulated tie agrees with a live order
    assert swapped({"lru": att(1.0, 1.0), "cost": att(1.0, 1.0), "exclusive": att(1.0, 0.965)}) == []
    assert swapped({"lru": att(0.9, 0.7), "cost": att(0.8, 0.7)}) == []
