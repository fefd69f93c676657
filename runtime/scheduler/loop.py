"""`tidal.Scheduler`: request queues across the models of a `tidal.Runtime`, and the loop that serves them.

Each tick: apply aborts, take a frozen `Snapshot`, ask the policy for actions, check them against the
snapshot (`check_actions`), apply them through the Runtime (`preempt`, `load`/`resume` with `evict=None`:
the policy has made room already, and the Runtime still refuses anything over a budget), record each in the
trace, and update the aging counters. Only the thread that ticks touches engines; `submit` and `abort` take
a lock around the queues and may be called from any thread.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import threading
import time

from ..engine import Engine
from ..engine.request import token_list
from ..errors import ConfigError, OutOfDeviceMemory, PromptError, StateError
from ..policy import Load, Preempt, Resume
from ..sampling import SamplingParams
from ..text import eos_token_ids
from .plans import load_cost_model
from .policies import resolve
from . import snapshots
from .requests import ScheduledRequest, Trace
from .state import ARRIVAL_WINDOW_S, SetResidency, Snapshot, Step, Unload, check_actions

MAX_STALLED_TICKS = 1000  # ticks in a row with work waiting and no step before the loop calls the policy stuck


@dataclasses.dataclass(frozen=True)
class _Registered:
    path: object
    kwargs: dict
    device_bytes: int  # while active, from Engine.placement
    host_bytes: int
    resident_fraction: float
    max_len: int  # the model's positions
    capacity: int  # tokens its device KV pool holds
    vocab: int
    num_layers: int = 0
    layer_bytes: int = 0  # device bytes of one decoder layer
    ring_slots: int = 3  # streaming ring slots (prefetch_depth + 1)
    kv_block: tuple[int, int] = (1, 0)  # (tokens, bytes) of one KV block
    slo_ttft_s: float | None = None
    slo_tpot_s: float | None = None
    eos_token_ids: tuple[int, ...] = ()  # the checkpoint's, on which its requests stop by default


def _own_seconds(snap: Snapshot, action, report, measured: float) -> float:
    """What a policy learns an action cost: `measured`, except for a resume of a model with nothing in flight
    whose first step prefilled the requests the loop handed it: its copies and bookkeeping alone (the step
    overlapped them), as a resume without requests would have taken."""
    if isinstance(action, Resume) and report is not None and report.first_step_seconds > 0 and \
            not snap.model(action.model).in_flight:
        return max(0.0, measured - report.first_step_seconds + report.overlap_seconds)
    return measured


class Scheduler:
    """Schedules requests across the models of `runtime` (see the package docstring). `policy`: "exclusive",
    "lru", or an object with `decide(snapshot)`; `max_wait_s`/`max_skipped_ticks` set a named policy's aging
    bound. `trace_path`: a JSONL file for the trace (else `trace` keeps it in memory: the last `trace_keep`
    entries, all when None; `trace_since` reads it on from a position). `cost_models`: name ->
    `tidal.costmodel.CostModel`, passed to the policy in every snapshot (or `add_model(cost_model=...)`). A
    policy that needs them ("cost") refuses, with ConfigError naming it, a model loaded in `runtime` already
    without one."""

    def __init__(self, runtime, policy="lru", *, max_wait_s: float | None = None,
                 max_skipped_ticks: int | None = None, trace_path=None, trace_keep: int | None = None,
                 cost_models=None):
        aging = {k: v for k, v in (("max_wait_s", max_wait_s), ("max_skipped_ticks", max_skipped_ticks))
                 if v is not None}
        self.policy = resolve(policy, **aging)
        self.runtime = runtime
        self.cost_models = dict(cost_models or {})
        if getattr(self.policy, "needs_cost_models", False):
            self.cost_models = {n: load_cost_model(cm, n) for n, cm in self.cost_models.items()}
            missing = sorted(set(runtime.models) - set(self.cost_models))
            if missing:
                raise ConfigError(f"policy {self.policy!r} needs a cost model for every model; {missing[0]!r} "
                                  "(loaded in the runtime) has none: pass cost_models={name: CostModel}")
        self._models: dict[str, _Registered] = {}
        self._lock = threading.Lock()  # the queues, the aborts, the error
        self._wake = threading.Condition(self._lock)
        self._drive = threading.RLock()  # held by whoever ticks (`between_ticks`)
        self._queues: dict[str, collections.deque[ScheduledRequest]] = {}
        self._in_flight: dict[str, dict[int, ScheduledRequest]] = {}  # the ticking thread's
        self._aborts: list[ScheduledRequest] = []
        self._arrivals: dict[str, collections.deque[float]] = {}  # name -> recent submission times (the lock's)
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._tick, self._stalled, self._t0 = 0, 0, time.monotonic()
        self._last_used: dict[str, int] = {}
        self._last_step_at: dict[str, float] = {}
        self._active_since: dict[str, float] = {}  # when the loop last loaded or resumed each model
        self._skipped: dict[str, int] = {}
        self._trace = Trace(trace_path, trace_keep)

    @property
    def error(self) -> BaseException | None:
        """The exception that failed the loop (then every request was failed with it); None while it is sound."""
        with self._lock:
            return self._error

    @property
    def trace(self) -> list[dict]:
        """The trace kept in memory, oldest first (empty when it goes to `trace_path`; a copy)."""
        return self._trace.entries

    @contextlib.contextmanager
    def between_ticks(self):
        """Hold off the loop while the block runs (it waits for the tick in progress to end): another thread
        reads a consistent `snapshot()` and the Runtime's books inside it (the loop's thread changes them
        during a tick). Keep the block short: the loop waits."""
        with self._drive:
            yield self

    def trace_since(self, position: int = 0) -> tuple[list[dict], int, int]:
        """(the trace entries from absolute `position` on that memory keeps, the position after them, how many
        from `position` on `trace_keep` dropped unread): a reader in another thread polls with the position it
        was given last, and reads each entry once."""
        return self._trace.since(position)

    # -- models and requests -------------------------------------------------------------------------------
    def add_model(self, name: str, path, *, slo_ttft_s: float | None = None, slo_tpot_s: float | None = None,
                  cost_model=None, **engine_kwargs) -> None:
        """Register the checkpoint at `path` as `name`; the policy loads it when it has work. `slo_ttft_s`,
        `slo_tpot_s`: its SLOs on time to first token and per output token (seconds; None: none), and
        `cost_model`: a `tidal.costmodel.CostModel` or the path of a profile.json to fit one from, for the
        policy's snapshot (the "cost" policy needs one). ConfigError for a bad name or argument,
        OutOfDeviceMemory for a model that alone exceeds a budget; nothing changes then."""
        if not isinstance(name, str) or not name:
            raise ConfigError(f"name={name!r} must be a non-empty string")
        for key, slo in (("slo_ttft_s", slo_ttft_s), ("slo_tpot_s", slo_tpot_s)):
            if slo is not None and (isinstance(slo, bool) or not isinstance(slo, (int, float)) or not slo > 0):
                raise ConfigError(f"{key}={slo!r} must be a number of seconds > 0, or None")
        if cost_model is None:
            cost_model = self.cost_models.get(name)
        if cost_model is not None or getattr(self.policy, "needs_cost_models", False):
            if cost_model is None:
                raise ConfigError(f"policy {self.policy!r} needs a cost model for model {name!r}: pass "
                                  "add_model(..., cost_model=CostModel or profile.json path)")
            cost_model = load_cost_model(cost_model, name)
        if name in self._models or name in self.runtime.models:
            raise ConfigError(f"a model named {name!r} is registered or loaded already")
        if "device" in engine_kwargs:
            raise ConfigError("device is the runtime's; pass it to Runtime(device=...)")
        rt = self.runtime
        if rt.device_budget is not None and engine_kwargs.get("kv_cache_bytes") is None:
            raise ConfigError("with a device budget, give each model's kv_cache_bytes")
        p = Engine.placement(path, device=rt.device, **engine_kwargs)
        fp = p.footprint
        for tier, need, budget in (("device", fp.device, rt.device_budget), ("host", fp.host, rt.host_budget)):
            if budget is not None and need > budget:
                raise OutOfDeviceMemory(f"model {name!r} needs {need} {tier} bytes while active; the {tier} "
                                        f"budget is {budget}, so it can never be loaded")
        from .. import weights

        reg = _Registered(path, dict(engine_kwargs), fp.device, fp.host, p.plan.resident_fraction,
                          p.model.max_position_embeddings, p.kv.num_device_blocks * p.engine.block_size,
                          p.model.vocab_size, p.model.num_layers, weights.empty(p.model, p.plan, p.dtype).layer_bytes,
                          p.offload.prefetch_depth + 1, (p.engine.block_size, p.kv.block_bytes), slo_ttft_s, slo_tpot_s,
                          eos_token_ids(path))
        with self._lock:
            if cost_model is not None:
                self.cost_models[name] = cost_model
            self._models[name] = reg
            self._queues[name] = collections.deque()
            self._in_flight[name] = {}

    def remove_model(self, name: str) -> None:
        """Deregister `name`: its engine is closed (its device and host bytes freed, its trace entries kept) and
        it leaves the policy's snapshot; `add_model` may register it again. ConfigError for an unknown model,
        StateError while it has requests queued or in flight (abort them, or wait: `unfinished`). Thread-safe:
        it waits for the tick in progress."""
        with self._drive:
            with self._lock:
                if name not in self._models:
                    raise ConfigError(f"no model named {name!r} (registered: {sorted(self._models)})")
                busy = len(self._queues[name]) + len(self._in_flight.get(name, {}))
                if busy:
                    raise StateError(f"model {name!r} has {busy} requests queued or in flight; abort them first")
                del self._models[name], self._queues[name]
                self._in_flight.pop(name, None)
                self._arrivals.pop(name, None)
                self.cost_models.pop(name, None)
            for books in (self._last_used, self._last_step_at, self._active_since, self._skipped):
                books.pop(name, None)
            if name in self.runtime.models:
                self.runtime.unload(name)

    def unfinished(self, name: str) -> int:
        """Requests of `name` queued or in flight (0 for a model not registered). Thread-safe."""
        with self._lock:
            return len(self._queues.get(name, ())) + len(self._in_flight.get(name, {}))

    def submit(self, model: str, prompt, max_new_tokens: int = 16, temperature: float = 0.0, top_p: float = 1.0,
               seed: int | None = None, stop_token_ids=None) -> ScheduledRequest:
        """Queue `prompt` (token ids) for `model`; returns its ScheduledRequest. Thread-safe. ConfigError for an
        unknown model or bad sampling arguments, PromptError for a prompt that can never run; StateError once
        the loop has failed. A refused request changes nothing."""
        reg = self._models.get(model)
        if reg is None:
            raise ConfigError(f"no model named {model!r} (registered: {sorted(self._models)})")
        tokens = token_list(prompt)
        if not tokens:
            raise PromptError("prompt is empty")
        bad = [t for t in tokens if not 0 <= t < reg.vocab]
        if bad:
            raise PromptError(f"prompt token {bad[0]} outside the vocabulary [0, {reg.vocab})")
        if len(tokens) > reg.capacity:
            raise PromptError(f"prompt of {len(tokens)} tokens: {model!r}'s KV cache holds {reg.capacity}")
        if len(tokens) > reg.max_len:
            raise PromptError(f"prompt of {len(tokens)} tokens: {model!r} has {reg.max_len} positions")
        if stop_token_ids is None:  # the model's EOS ids, as Engine.add_request: [] asks for no stop ids
            stop_token_ids = reg.eos_token_ids
        params = SamplingParams(max_new_tokens, temperature, top_p, seed, stop_token_ids)
        req = ScheduledRequest(model, tokens, params)
        with self._lock:
            self._check_alive()
            if model not in self._queues:  # removed since the checks above
                raise ConfigError(f"no model named {model!r} (registered: {sorted(self._models)})")
            self._queues[model].append(req)
            arrivals = self._arrivals.setdefault(model, collections.deque())
            arrivals.append(req.submitted_at)
            while arrivals[0] < req.submitted_at - ARRIVAL_WINDOW_S:
                arrivals.popleft()
            self._wake.notify_all()
        return req

    def abort(self, req: ScheduledRequest) -> bool:
        """Stop `req` and free what it holds; False if it is done already. Thread-safe: while the loop runs in
        its thread the request is aborted at the next tick (`req.wait()` returns then)."""
        with self._lock:
            if req.done:
                return False
            queue = self._queues.get(req.model, ())
            if req in queue:
                queue.remove(req)
                req._finish("aborted", time.monotonic())
                return True
            self._aborts.append(req)
            self._wake.notify_all()
            threaded = self._thread is not None
        if not threaded:
            with self._drive:
                self._apply_aborts()
        return True

    # -- driving the loop ----------------------------------------------------------------------------------
    def run_until_idle(self) -> None:
        """Tick in this thread until no request is left."""
        if self._thread is not None:
            raise StateError("the loop runs in its own thread; stop() it first")
        while self.tick():
            pass

    def start(self) -> None:
        """Run the loop in a daemon thread until `stop()`."""
        with self._lock:
            self._check_alive()
            if self._thread is not None:
                raise StateError("the scheduler's loop is running already")
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="tidal-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop thread and join it; re-raises an error that failed the loop. Requests still queued
        stay queued (`run_until_idle` or `start` serves them)."""
        with self._lock:
            thread, self._stopping = self._thread, True
            self._wake.notify_all()
        if thread is not None:
            thread.join()
        self._thread = None
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Stop the loop and close the trace file (the runtime and its engines are the caller's)."""
        try:
            self.stop()
        finally:
            self._trace.close()

    def __enter__(self) -> Scheduler:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def tick(self) -> bool:
        """One tick of the loop; False when there was nothing to do. An error fails every pending request
        with it and is raised (then by `submit` and `stop` too)."""
        with self._drive:
            with self._lock:
                self._check_alive()
            try:
                return self._tick_once()
            except BaseException as exc:
                self._fail(exc)
                raise

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._stopping:
                    return
            try:
                worked = self.tick()
            except BaseException:
                return  # stored by tick(); stop() re-raises it
            if not worked:
                with self._lock:
                    if not self._stopping and not self._aborts and not any(self._queues.values()):
                        self._wake.wait(timeout=0.05)

    # -- one tick ------------------------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        """The frozen state a policy decides on (see `state.Snapshot`; built by `snapshots.build`)."""
        return snapshots.build(self)

    def _tick_once(self) -> bool:
        self._apply_aborts()
        snap = self.snapshot()
        work = snap.with_work
        if not work:
            return False
        actions = check_actions(snap, self.policy.decide(snap))
        predict = getattr(self.policy, "predict", None)
        observe = getattr(self.policy, "observe", None)  # a policy that learns from what its actions cost
        explain = getattr(self.policy, "explain", None)
        why = explain() if callable(explain) and any(not isinstance(a, Step) for a in actions) else None
        stepped = set()
        for action in actions:
            predicted = predict(snap, action) if callable(predict) else None
            t = time.monotonic()
            report = self._apply(action)
            measured = time.monotonic() - t
            self._trace.record(t - self._t0, self._tick, action, predicted, measured,
                               None if isinstance(action, Step) else why, report)
            if callable(observe):
                observe(snap, action, _own_seconds(snap, action, report, measured))
            if isinstance(action, (Step, Load, Resume)):
                self._last_used[action.model] = self._tick
            if isinstance(action, (Load, Resume)):
                self._active_since[action.model] = t
            if isinstance(action, Step):
                stepped.add(action.model)
        now = time.monotonic()
        self._skipped = {m.name: self._skipped.get(m.name, 0) for m in work}  # no work: nothing skipped
        for m in work:
            if m.name in stepped:
                self._skipped[m.name], self._last_step_at[m.name] = 0, now
            else:
                self._skipped[m.name] = self._skipped.get(m.name, 0) + 1
        self._stalled = 0 if stepped else self._stalled + 1
        if self._stalled >= MAX_STALLED_TICKS:
            raise StateError(f"policy {self.policy!r} stepped no model for {MAX_STALLED_TICKS} ticks while "
                             f"{[m.name for m in work]} had work")
        self._tick += 1
        return True

    def _apply(self, action):
        """Apply `action` through the Runtime; the report it returned (a preemption's, a resume's or a residency
        change's), else None."""
        rt, name = self.runtime, action.model
        if isinstance(action, Step):
            self._step(name)
        elif isinstance(action, Preempt):
            return rt.preempt(name, weights=action.weights, kv=action.kv)
        elif isinstance(action, Resume):
            self._hand(name)  # the resume's first step prefills them while the layers are still arriving
            return rt.resume(name, evict=None)[0]
        elif isinstance(action, Load):
            reg = self._models[name]
            rt.load(name, reg.path, evict=None, **reg.kwargs)
        elif isinstance(action, Unload):
            rt.unload(name)
        elif isinstance(action, SetResidency):
            if not hasattr(rt, "set_residency"):
                raise StateError(f"{action}: this Runtime has no set_residency")
            return rt.set_residency(name, resident_fraction=action.fraction)
        return None

    def _hand(self, name: str) -> Engine:
        """Give the model's queued requests to its engine (preempted or not); returns the engine."""
        engine = self.runtime.models[name]
        with self._lock:
            queue = self._queues.get(name)
            handed = list(queue or ())
            if queue:
                queue.clear()
        flight = self._in_flight.setdefault(name, {})
        for req in handed:
            p = req.params
            try:
                req.engine_id = engine.add_request(req.prompt, p.max_new_tokens, p.temperature, p.top_p, p.seed,
                                                   p.stop_token_ids)
            except PromptError as exc:  # checked at submit; an engine built differently may still refuse it
                req._finish("error", time.monotonic(), exc)
                continue
            req.started_at = time.monotonic()
            flight[req.engine_id] = req
        return engine

    def _step(self, name: str) -> None:
        engine = self._hand(name)
        flight = self._in_flight[name]
        outputs = engine.step()
        now = time.monotonic()
        for o in outputs:
            req = flight.get(o.request_id)
            if req is None:
                continue
            req._tokens(list(o.token_ids), now)
            if o.finished:
                del flight[o.request_id]
                req._finish(o.finish_reason, now)

    def _apply_aborts(self) -> None:
        with self._lock:
            aborts, self._aborts = self._aborts, []
        for req in aborts:
            if req.done:
                continue
            engine = self.runtime.models.get(req.model)
            if req.engine_id is not None:
                self._in_flight.get(req.model, {}).pop(req.engine_id, None)
                if engine is not None:
                    engine.abort(req.engine_id)
            req._finish("aborted", time.monotonic())

    def _fail(self, exc: BaseException) -> None:
        now = time.monotonic()
        with self._lock:
            if self._error is None:
                self._error = exc
            pending = [r for q in self._queues.values() for r in q] + self._aborts
            pending += [r for f in self._in_flight.values() for r in f.values()]
            for q in self._queues.values():
                q.clear()
            self._aborts = []
        for f in self._in_flight.values():
            f.clear()
        for req in pending:
            if not req.done:
                req._finish("error", now, exc)

    def _check_alive(self) -> None:
        if self._error is not None:
            raise StateError(f"the scheduler's loop failed: {self._error!r}") from self._error

