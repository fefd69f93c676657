"""The server's Prometheus metrics (`GET /metrics`), named as vLLM names them (without its `vllm:` prefix) so
that existing dashboards work, each labelled by `model_name`; and tidal's own, prefixed `tidal_`.

Per request, at its end (`ServeMetrics.observe_finished`): the latency histograms and the token and request
counters. Before each scrape (`ServeMetrics.update`): the gauges, from the scheduler's snapshot and the engines'
KV pools, and the model switches, read from the scheduler's trace since the last update. The switches' totals
are kept in a custom collector, so that they are only ever added to: each trace entry is read once (a cursor),
whatever the number of scrapes.

Buckets (seconds) span both backends: a GPU decodes a step in milliseconds, the CPU backend in tens to hundreds
of milliseconds, and queueing under load or a preemption in the way adds seconds to minutes. So every
histogram runs 1-2.5-5 steps from a millisecond (half of one for inter-token latency) up to minutes.
"""
from __future__ import annotations

import itertools
import threading

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily

from ..errors import ConfigError, StateError

TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0)
QUEUE_BUCKETS = TTFT_BUCKETS
ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
               0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0,
               240.0, 480.0, 960.0, 1920.0, 7680.0)

# the parts of a switch a report times, by trace action: report field -> `part` label
_PARTS = {"Preempt": {"weight_seconds": "weights", "kv_seconds": "kv"},
          "Resume": {"disk_seconds": "disk", "weight_seconds": "weights", "kv_seconds": "kv",
                     "recompute_seconds": "recompute"}}


class ServeMetrics:
    """The metrics of one server, in their own `registry` (a new CollectorRegistry when None: several servers
    may share a process). Thread-safe: `observe_finished` may run on any thread, `update` and `render` on the
    thread that serves the scrape.

    Histograms (seconds): `time_to_first_token_seconds`, `inter_token_latency_seconds` (every gap between two
    consecutive tokens of a request), `e2e_request_latency_seconds`, `request_queue_time_seconds` (submitted
    until handed to its engine). Counters: `prompt_tokens_total`, `generation_tokens_total`,
    `request_success_total{finished_reason}` (every finished request, with the reason the server gives).
    Gauges: `num_requests_running` (handed to the model's engine, not finished: running, or parked while the
    model is preempted), `num_requests_waiting` (queued in the scheduler), `kv_cache_usage_perc` (used
    fraction of the device KV pool, 0 to 1 as in vLLM; 0 while preempted or unloaded), `tidal_resident_fraction`
    (fraction of the decoder layers on the device; 0 unless active). tidal's switches, from the scheduler's
    trace: `tidal_preemptions_total` and `tidal_resumes_total` by `weights` tier and `kv` mode (a resume is
    labelled with its preemption's), `tidal_preemption_seconds_total` and `tidal_resume_seconds_total` (the loop's
    measured time of each, same labels), and, from the report a trace entry carries under "report",
    `tidal_preemption_part_seconds_total` and `tidal_resume_part_seconds_total` by `part` (weights, kv; a resume's
    disk and recompute too) and `tidal_bytes_moved_total` by `path` (device_to_host, host_to_device,
    disk_to_host), `what` (weights, kv) and `cause` (preemption, resume, residency: a SetResidency's report).
    `tidal_trace_entries_dropped_total`: entries a bounded trace (`trace_keep`) dropped before an update read
    them, whose switches the counters miss (a resume whose preemption was missed is labelled "unknown")."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = CollectorRegistry() if registry is None else registry
        r, m = self.registry, ["model_name"]
        self._ttft = Histogram("time_to_first_token_seconds", "Time to first token.", m, registry=r,
                               buckets=TTFT_BUCKETS)
        self._itl = Histogram("inter_token_latency_seconds", "Time between consecutive output tokens.", m,
                              registry=r, buckets=ITL_BUCKETS)
        self._e2e = Histogram("e2e_request_latency_seconds", "Submission to finish.", m, registry=r,
                              buckets=E2E_BUCKETS)
        self._queue = Histogram("request_queue_time_seconds", "Submission until handed to the model's engine.", m,
                                registry=r, buckets=QUEUE_BUCKETS)
        self._prompt = Counter("prompt_tokens", "Prompt tokens of finished requests.", m, registry=r)
        self._generated = Counter("generation_tokens", "Generated tokens of finished requests.", m, registry=r)
        self._success = Counter("request_success", "Finished requests by finish reason.", m + ["finished_reason"],
                                registry=r)
        self._running = Gauge("num_requests_running", "Requests handed to the model's engine, not finished.", m,
                              registry=r)
        self._waiting = Gauge("num_requests_waiting", "Requests queued in the scheduler.", m, registry=r)
        self._kv = Gauge("kv_cache_usage_perc", "Used fraction of the device KV pool (0 to 1).", m, registry=r)
        self._resident = Gauge("tidal_resident_fraction", "Fraction of decoder layers on the device (0 unless "
                               "active).", m, registry=r)
        self._switches = SwitchCollector()
        r.register(self._switches)

    def observe_finished(self, req, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        """Record the finished ScheduledRequest `req` (its model is `req.model`): its latencies from its own
        timestamps, and its token counts as the server counted them. StateError for a request not finished."""
        if req.finished_at is None:
            raise StateError(f"{req!r} is not finished; observe it once it is")
        model = req.model
        if req.first_token_at is not None:  # an aborted or failed request may have none
            self._ttft.labels(model).observe(req.first_token_at - req.submitted_at)
        itl = self._itl.labels(model)
        times = req.token_times
        for a, b in itertools.pairwise(times):
            itl.observe(b - a)
        self._e2e.labels(model).observe(req.finished_at - req.submitted_at)
        if req.started_at is not None:  # None: aborted or failed before the loop handed it to its engine
            self._queue.labels(model).observe(req.started_at - req.submitted_at)
        self._prompt.labels(model).inc(prompt_tokens)
        self._generated.labels(model).inc(completion_tokens)
        self._success.labels(model, finish_reason).inc()

    def update(self, scheduler) -> None:
        """Refresh the gauges from `scheduler.snapshot()` and its runtime's engines, and add the switches its
        trace recorded since the last update. Call it before each scrape, off the event loop: it waits for the
        tick in progress to end."""
        # snapshot() reads the engines and the Runtime's books, which the loop's thread mutates during a tick
        # (measured: 'OrderedDict mutated during iteration' every few thousand scrapes)
        with scheduler.between_ticks():
            snap = scheduler.snapshot()
            used = {}
            for m in snap.models:
                engine = scheduler.runtime.models.get(m.name)
                pool = engine.cache.device_pool if engine is not None and m.state.active else None
                used[m.name] = pool.num_used / pool.num_blocks if pool is not None and pool.num_blocks else 0.0
        for m in snap.models:
            for family in (self._ttft, self._itl, self._e2e, self._queue, self._prompt, self._generated):
                family.labels(m.name)  # every model's series from the first scrape, at 0 until observed
            self._running.labels(m.name).set(m.in_flight)
            self._waiting.labels(m.name).set(m.queued)
            self._resident.labels(m.name).set(m.resident_fraction if m.state.active else 0.0)
            self._kv.labels(m.name).set(used[m.name])
        self._switches.consume(scheduler)

    def render(self) -> tuple[bytes, str]:
        """The registry in Prometheus' text format, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class SwitchCollector:
    """Cumulative totals of the model switches in a scheduler's trace (a Prometheus custom collector): each
    entry is read once, from the position the last `consume` reached, so the totals only grow. A scheduler that
    writes its trace to a file (`trace_path`) keeps none in memory: then there is nothing to read here."""

    def __init__(self):
        self._lock = threading.Lock()
        self._scheduler = None  # the scheduler whose trace is read, and the position read up to
        self._position = 0
        self._dropped = 0  # entries the trace's bound dropped before they were read
        self._tier: dict[str, tuple[str, str]] = {}  # model -> (weights, kv) of its last preemption
        self._count: dict[tuple, int] = {}  # (action, model, weights, kv) -> switches
        self._seconds: dict[tuple, float] = {}  # (action, model, weights, kv) -> measured seconds
        self._parts: dict[tuple, float] = {}  # (action, model, part) -> seconds, from reports
        self._bytes: dict[tuple, int] = {}  # (model, path, what, cause) -> bytes, from reports

    def consume(self, scheduler) -> None:
        """Add the entries `scheduler`'s trace recorded since the last call (`Scheduler.trace_since`)."""
        with self._lock:
            if self._scheduler is None:
                self._scheduler = scheduler
            elif scheduler is not self._scheduler:
                raise ConfigError("these metrics read one scheduler's trace; this is another's")
            entries, self._position, dropped = scheduler.trace_since(self._position)
            self._dropped += dropped
            for entry in entries:
                self._add(entry)

    def _add(self, entry: dict) -> None:
        action, model = entry["action"], entry["model"]
        if action == "SetResidency":
            report = entry.get("report")
            if report is not None:
                self._moved(model, "residency", {("host_to_device", "weights"): report["to_device_bytes"],
                                                 ("device_to_host", "weights"): report["to_host_bytes"]})
            return
        if action == "Preempt":
            tier = self._tier[model] = (entry["args"]["weights"], entry["args"]["kv"])
        elif action == "Resume":
            # its Preempt unread: dropped by the trace's bound (counted), or done before this scheduler
            tier = self._tier.pop(model, ("unknown", "unknown"))
        else:
            return
        key = (action, model) + tier
        self._count[key] = self._count.get(key, 0) + 1
        self._seconds[key] = self._seconds.get(key, 0.0) + entry["measured_s"]
        report = entry.get("report")
        if report is None:
            return
        for field, part in _PARTS[action].items():
            k = (action, model, part)
            self._parts[k] = self._parts.get(k, 0.0) + report[field]
        if action == "Preempt":
            copied = report["weights"] == "host" and not report["host_copy_reused"]  # else released, not moved
            moved = {("device_to_host", "weights"): report["weight_bytes"] if copied else 0,
                     ("device_to_host", "kv"): report["kv_bytes"]}
        else:
            moved = {("disk_to_host", "weights"): report["disk_bytes"],
                     ("host_to_device", "weights"): report["weight_bytes"],
                     ("host_to_device", "kv"): report["kv_bytes"]}
        self._moved(model, "preemption" if action == "Preempt" else "resume", moved)

    def _moved(self, model: str, cause: str, moved: dict) -> None:
        for (path, what), n in moved.items():
            k = (model, path, what, cause)
            self._bytes[k] = self._bytes.get(k, 0) + n

    def collect(self):
        with self._lock:
            count, seconds = dict(self._count), dict(self._seconds)
            parts, moved, dropped = dict(self._parts), dict(self._bytes), self._dropped
        labels = ["model_name", "weights", "kv"]
        for action, noun in (("Preempt", "preemption"), ("Resume", "resume")):
            n = CounterMetricFamily(f"tidal_{noun}s", f"Model {noun}s by weights tier and KV mode.", labels=labels)
            s = CounterMetricFamily(f"tidal_{noun}_seconds", f"Measured seconds of model {noun}s.", labels=labels)
            p = CounterMetricFamily(f"tidal_{noun}_part_seconds", f"Seconds of model {noun}s by part (reports).",
                                    labels=["model_name", "part"])
            for key, v in count.items():
                if key[0] == action:
                    n.add_metric(list(key[1:]), v)
                    s.add_metric(list(key[1:]), seconds[key])
            for key, v in parts.items():
                if key[0] == action:
                    p.add_metric(list(key[1:]), v)
            yield from (n, s, p)
        b = CounterMetricFamily("tidal_bytes_moved", "Bytes moved by model switches and residency changes, by "
                                "path, content and cause (reports).", labels=["model_name", "path", "what", "cause"])
        for key, v in moved.items():
            b.add_metric(list(key), v)
        yield b
        yield CounterMetricFamily("tidal_trace_entries_dropped", "Scheduler trace entries dropped by its bound "
                                  "before these metrics read them (their switches are missing above).", value=dropped)
