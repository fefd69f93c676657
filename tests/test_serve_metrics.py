"""tidal.serve.metrics against a real Scheduler: three tiny random models under a device budget that fits one,
so that the lru policy preempts and resumes them. Every value scraped is checked against the requests' own
timestamps and token counts, and the switch counters against the scheduler's trace; counters never go back
and never count twice across scrapes."""
import types

import pytest
import tidal
import torch
from prometheus_client.parser import text_string_to_metric_families
from scheduler_util import build_models, tiny
from tidal.errors import StateError
from tidal.scheduler import SetResidency, Trace
from tidal.serve.metrics import ITL_BUCKETS, ServeMetrics

TINY = tiny("metrics-tiny", layers=2)
KW = {"dtype": torch.float32, "kv_cache_bytes": 1 << 15, "host_kv_bytes": 1 << 15, "block_size": 4,
      "kernels": "reference"}
NAMES = ("m0", "m1", "m2")
PROMPTS = [[1, 2, 3, 4], [9, 8, 7], [5] * 10, [3, 1, 4, 1, 5]]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return build_models(TINY, NAMES, tmp_path_factory.mktemp("metrics"))


class ReportingRuntime(tidal.Runtime):
    """Keeps the report of every preempt and resume as the Runtime returned it: the reference the trace
    entries' reports (and the metrics read from them) are checked against."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.reports = []

    def preempt(self, name, weights="host", kv="swap"):
        r = super().preempt(name, weights=weights, kv=kv)
        self.reports.append(r)
        return r

    def resume(self, name, pipelined=True, evict=None):
        r, evicted = super().resume(name, pipelined=pipelined, evict=evict)
        self.reports.append(r)
        return r, evicted


def make(paths, runtime=tidal.Runtime, **sched_kwargs):
    size = tidal.Engine.placement(paths["m0"], device="cpu", **KW).footprint.device
    rt = runtime(device="cpu", device_budget_bytes=size)  # fits one model at a time
    sched = tidal.Scheduler(rt, policy="lru", max_skipped_ticks=1, **sched_kwargs)  # the models take turns
    for name in NAMES:
        sched.add_model(name, paths[name], **KW)
    return rt, sched


def scrape(metrics, sched) -> dict:
    """(sample name, frozenset of labels) -> value."""
    metrics.update(sched)
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for f in text_string_to_metric_families(body.decode()) for s in f.samples}


def value(samples, name, **labels):
    return samples[(name, frozenset(labels.items()))]


def counters(samples) -> dict:
    return {k: v for k, v in samples.items() if k[0].endswith("_total") or k[0].endswith(("_count", "_sum"))}


def test_requests_and_gauges_match_the_requests_own_records(paths):
    rt, sched = make(paths)
    metrics = ServeMetrics()
    with rt, sched:
        reqs = [sched.submit(n, p, max_new_tokens=3 + i) for i, p in enumerate(PROMPTS) for n in NAMES]
        s = scrape(metrics, sched)
        for n in NAMES:
            assert value(s, "num_requests_waiting", model_name=n) == len(PROMPTS)
            assert value(s, "num_requests_running", model_name=n) == 0
            assert value(s, "kv_cache_usage_perc", model_name=n) == 0.0
        sched.tick()
        sched.tick()
        s = scrape(metrics, sched)
        active = [n for n, e in rt.models.items() if e.preempted is None]
        assert len(active) == 1
        pool = rt.models[active[0]].cache.device_pool
        assert 0 < value(s, "kv_cache_usage_perc", model_name=active[0]) == pool.num_used / pool.num_blocks
        assert value(s, "tidal_resident_fraction", model_name=active[0]) == 1.0
        assert value(s, "num_requests_running", model_name=active[0]) == len(PROMPTS)
        assert value(s, "num_requests_waiting", model_name=active[0]) == 0
        sched.run_until_idle()
        for r in reqs:
            metrics.observe_finished(r, r.finish_reason, len(r.prompt), len(r.output_ids))
        s = scrape(metrics, sched)
        with pytest.raises(StateError, match="not finished"):
            metrics.observe_finished(sched.submit("m0", [1]), "length", 1, 0)
    for n in NAMES:
        mine = [r for r in reqs if r.model == n]
        assert all(r.finish_reason == "length" and len(r.token_times) == len(r.output_ids) for r in mine)
        ttft = [r.first_token_at - r.submitted_at for r in mine]
        gaps = [b - a for r in mine for a, b in zip(r.token_times, r.token_times[1:])]
        e2e = [r.finished_at - r.submitted_at for r in mine]
        for name, xs in (("time_to_first_token_seconds", ttft), ("inter_token_latency_seconds", gaps),
                         ("e2e_request_latency_seconds", e2e)):
            assert value(s, name + "_count", model_name=n) == len(xs)
            assert value(s, name + "_sum", model_name=n) == pytest.approx(sum(xs), rel=1e-12, abs=1e-12)
        for le in ITL_BUCKETS[:8]:
            assert value(s, "inter_token_latency_seconds_bucket", model_name=n, le=repr(le)) == \
                sum(g <= le for g in gaps)
        queue = [r.started_at - r.submitted_at for r in mine]
        assert all(0 <= q <= t for q, t in zip(queue, ttft))
        assert value(s, "request_queue_time_seconds_count", model_name=n) == len(queue)
        assert value(s, "request_queue_time_seconds_sum", model_name=n) == pytest.approx(sum(queue), rel=1e-12)
        assert value(s, "prompt_tokens_total", model_name=n) == sum(len(r.prompt) for r in mine)
        assert value(s, "generation_tokens_total", model_name=n) == sum(len(r.output_ids) for r in mine) == \
            sum(3 + i for i in range(len(PROMPTS)))
        assert value(s, "request_success_total", model_name=n, finished_reason="length") == len(PROMPTS)
        assert value(s, "num_requests_running", model_name=n) == value(s, "num_requests_waiting", model_name=n) == 0


def test_switch_counters_match_the_trace_and_never_count_twice(paths):
    rt, sched = make(paths, ReportingRuntime)
    metrics = ServeMetrics()
    with rt, sched:
        reqs = [sched.submit(n, p, max_new_tokens=6) for p in PROMPTS[:2] for n in NAMES]
        for _ in range(6):
            sched.tick()
        first = scrape(metrics, sched)
        again = scrape(metrics, sched)  # nothing new: nothing added
        assert counters(again) == counters(first)
        sched.run_until_idle()
        for r in reqs:
            metrics.observe_finished(r, r.finish_reason, len(r.prompt), len(r.output_ids))
        second = scrape(metrics, sched)
        for key, v in counters(first).items():
            assert second[key] >= v, key
        trace = sched.trace
        switches = [e for e in trace if e["action"] in ("Preempt", "Resume")]
        assert sum(e["action"] == "Preempt" for e in switches) >= 3
        assert len(rt.reports) == len(switches)
        tier, want_n, want_s = {}, {}, {}
        for e in switches:
            if e["action"] == "Preempt":
                tier[e["model"]] = (e["args"]["weights"], e["args"]["kv"])
            key = ("tidal_preemptions_total" if e["action"] == "Preempt" else "tidal_resumes_total",
                   e["model"]) + tier[e["model"]]
            want_n[key] = want_n.get(key, 0) + 1
            want_s[key] = want_s.get(key, 0.0) + e["measured_s"]
        for (name, model, weights, kv), n in want_n.items():
            assert value(second, name, model_name=model, weights=weights, kv=kv) == n
            seconds = name.replace("s_total", "_seconds_total")
            assert value(second, seconds, model_name=model, weights=weights, kv=kv) == \
                pytest.approx(want_s[(name, model, weights, kv)], rel=1e-12)
        got = {k for k in second if k[0] in ("tidal_preemptions_total", "tidal_resumes_total")}
        assert len(got) == len(want_n)
        # each switch's trace entry carries the Runtime's report, which the parts and bytes are read from
        assert [e["report"] for e in switches] == [r.to_dict() for r in rt.reports]
        s = second
    for model in NAMES:
        pre = [r for r in rt.reports if r.model == model and type(r).__name__ == "PreemptionReport"]
        res = [r for r in rt.reports if r.model == model and type(r).__name__ == "ResumeReport"]
        assert pre and res
        for noun, reps, parts in (("preemption", pre, {"weights": "weight_seconds", "kv": "kv_seconds"}),
                                  ("resume", res, {"weights": "weight_seconds", "kv": "kv_seconds",
                                                   "disk": "disk_seconds", "recompute": "recompute_seconds"})):
            for part, field in parts.items():
                assert value(s, f"tidal_{noun}_part_seconds_total", model_name=model, part=part) == \
                    pytest.approx(sum(getattr(r, field) for r in reps), rel=1e-12, abs=1e-15)
        copied = sum(r.weight_bytes for r in pre if r.weights == "host" and not r.host_copy_reused)
        for path, what, n in (("device_to_host", "weights", copied),
                              ("device_to_host", "kv", sum(r.kv_bytes for r in pre)),
                              ("disk_to_host", "weights", sum(r.disk_bytes for r in res)),
                              ("host_to_device", "weights", sum(r.weight_bytes for r in res)),
                              ("host_to_device", "kv", sum(r.kv_bytes for r in res))):
            cause = "preemption" if path == "device_to_host" else "resume"
            assert value(s, "tidal_bytes_moved_total", model_name=model, path=path, what=what, cause=cause) == n
        assert value(s, "tidal_bytes_moved_total", model_name=model, path="host_to_device", what="weights",
                     cause="resume") > 0


def test_registries_are_separate():
    a, b = ServeMetrics(), ServeMetrics()
    assert a.registry is not b.registry
    assert b"time_to_first_token_seconds" in a.render()[0]


def test_scrapes_while_the_loop_runs_in_its_thread(paths):
    rt, sched = make(paths)
    metrics = ServeMetrics()
    with rt:
        sched.start()
        reqs = [sched.submit(n, p, max_new_tokens=8) for p in PROMPTS for n in NAMES]
        scrapes, last = 0, {}
        while not all(r.done for r in reqs) or scrapes < 3:
            s = scrape(metrics, sched)  # a snapshot racing the loop's thread would raise here
            for key, v in counters(s).items():
                assert v >= last.get(key, 0), key
            last, scrapes = counters(s), scrapes + 1
        sched.stop()
        s = scrape(metrics, sched)
        preempts = sum(e["action"] == "Preempt" for e in sched.trace)
        sched.close()
    assert preempts > 0 and sum(v for k, v in s.items() if k[0] == "tidal_preemptions_total") == preempts


def test_residency_change_bytes_from_its_report(paths):
    with tidal.Engine.from_pretrained(paths["m0"], device="cpu", **KW) as engine:
        down = engine.set_residency(resident_fraction=0.5, wait=True)
        up = engine.set_residency(resident_fraction=1.0, wait=True)
    assert down.to_host_bytes > 0 and up.to_device_bytes > 0
    trace = Trace()
    for f, r in ((0.5, down), (1.0, up)):  # as the scheduler's hook would record them: the report in the entry
        trace.record(0.0, 0, SetResidency("m0", f), None, 0.0)["report"] = r.to_dict()
    metrics = ServeMetrics()
    metrics._switches.consume(types.SimpleNamespace(trace_since=trace.since))  # the scheduler's reader alone
    s = {(x.name, frozenset(x.labels.items())): x.value
         for f in text_string_to_metric_families(metrics.render()[0].decode()) for x in f.samples}
    for path, n in (("device_to_host", down.to_host_bytes + up.to_host_bytes),
                    ("host_to_device", down.to_device_bytes + up.to_device_bytes)):
        assert value(s, "tidal_bytes_moved_total", model_name="m0", path=path, what="weights", cause="residency") == n


def test_a_request_aborted_in_the_queue_has_no_first_token_or_queue_time(paths):
    rt, sched = make(paths)
    metrics = ServeMetrics()
    with rt, sched:
        r = sched.submit("m1", [1, 2, 3], max_new_tokens=4)
        assert sched.abort(r) and r.started_at is None and r.first_token_at is None
        metrics.observe_finished(r, "abort", 3, 0)
        s = scrape(metrics, sched)
    assert value(s, "e2e_request_latency_seconds_count", model_name="m1") == 1
    assert value(s, "e2e_request_latency_seconds_sum", model_name="m1") == r.finished_at - r.submitted_at
    assert value(s, "time_to_first_token_seconds_count", model_name="m1") == 0
    assert value(s, "request_queue_time_seconds_count", model_name="m1") == 0
    assert value(s, "inter_token_latency_seconds_count", model_name="m1") == 0
    assert value(s, "request_success_total", model_name="m1", finished_reason="abort") == 1
    assert value(s, "prompt_tokens_total", model_name="m1") == 3
    assert value(s, "generation_tokens_total", model_name="m1") == 0


def test_entries_a_bounded_trace_dropped_are_counted(paths):
    rt, sched = make(paths, trace_keep=5)
    metrics = ServeMetrics()
    with rt, sched:
        for n in NAMES:
            sched.submit(n, [1, 2, 3], max_new_tokens=6)
        sched.run_until_idle()
        kept, _, dropped = sched.trace_since(0)
        s = scrape(metrics, sched)
    assert dropped > 0 and value(s, "tidal_trace_entries_dropped_total") == dropped
    switches = [e for e in kept if e["action"] in ("Preempt", "Resume")]
    assert sum(v for k, v in s.items() if k[0] in ("tidal_preemptions_total", "tidal_resumes_total")) == len(switches)
