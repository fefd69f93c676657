"""A request as the scheduler hands it back (`ScheduledRequest`), and the trace of its decisions (`Trace`).
Torch-free."""
from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import threading
import time

from ..errors import ConfigError, StateError


class ScheduledRequest:
    """What `Scheduler.submit` returns. Read `output_ids`, `finish_reason` and `done`; `wait()` blocks until it
    is done and returns its tokens (or raises the error that failed it). Timestamps are `time.monotonic()`:
    `submitted_at`, `started_at` (when the loop handed it to its model's engine; None before),
    `first_token_at` (None before the first token), `token_times` (one per output token), `finished_at`.
    `listen(fn)` has the loop's thread call `fn` on every new token and on the finish. `finish_reason`: the
    engine's ("stop", "length", "max_model_len", "cache_full"), "aborted", or "error" (then `error` holds the
    exception)."""

    def __init__(self, model: str, prompt: list[int], params):
        self.model, self.prompt, self.params = model, prompt, params
        self.output_ids: list[int] = []
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.submitted_at = time.monotonic()
        self.first_token_at: float | None = None
        self.token_times: list[float] = []
        self.finished_at: float | None = None
        self.started_at: float | None = None
        self.engine_id: int | None = None  # its id in the model's engine once handed over (the loop's)
        self._done = threading.Event()
        self._lock = threading.Lock()  # orders the listener's calls: the replay in listen(), then the loop's
        self._listener = None

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> list[int]:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request to {self.model!r} not done after {timeout} s")
        if self.error is not None:
            raise self.error
        return self.output_ids

    def listen(self, fn) -> None:
        """Have `fn(token_ids, finish_reason)` called on every batch of new tokens (`finish_reason` None) and
        once when the request finishes (`token_ids` empty, `finish_reason` set), in order, from the thread
        that produces them (the loop's; an abort of a queued request finishes it in the aborting thread). What
        happened before the call is replayed at once, in this thread, so no token is missed. `fn` must be
        quick and must not raise: it runs inside the scheduler's loop. One listener per request."""
        with self._lock:
            if self._listener is not None:
                raise StateError(f"{self!r} has a listener already")
            self._listener = fn
            if self.output_ids:
                fn(list(self.output_ids), None)
            if self.done:
                fn([], self.finish_reason)

    # -- the loop's side ---------------------------------------------------------------------------------------
    def _tokens(self, token_ids, now: float) -> None:
        with self._lock:
            if token_ids and self.first_token_at is None:
                self.first_token_at = now
            self.output_ids += token_ids
            self.token_times += [now] * len(token_ids)
            if token_ids and self._listener is not None:
                self._listener(list(token_ids), None)

    def _finish(self, reason: str, now: float, error: BaseException | None = None) -> None:
        with self._lock:
            self.finish_reason, self.error, self.finished_at = reason, error, now
            self._done.set()
            if self._listener is not None:
                self._listener([], reason)

    def __repr__(self) -> str:
        state = self.finish_reason or "pending"
        return f"ScheduledRequest({self.model!r}, {len(self.prompt)} prompt, {len(self.output_ids)} out, {state})"


class Trace:
    """Every decision the loop applied, one dict per action: `time` (seconds since the scheduler started),
    `tick`, `action` (the action's class name), `model`, `args` (the action's other fields), `predicted_s`
    (the policy's predicted seconds; None without a cost model), `measured_s` (seconds applying it took), and
    for an action other than a step, `why` when the policy explains its choice (`explain()`: the cost policy's
    candidate plans as it predicted them, the chosen one first), and `report` for a preemption, a resume or a
    residency change (the Runtime's report, `to_dict()`: bytes and seconds split into weights and KV). Written
    as JSON lines to `path` when given
    (flushed per line), else kept in memory: the last `keep` entries (None: all; a server sets a bound, since
    every step is an entry). `recorded` counts every entry ever recorded; `since(position)` reads on from an
    absolute position, so that a reader polling from another thread sees each entry once."""

    def __init__(self, path=None, keep: int | None = None):
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
            raise ConfigError(f"trace_keep={keep!r} must be an int >= 1, or None")
        self._entries: collections.deque[dict] = collections.deque(maxlen=keep)
        self._lock = threading.Lock()  # the loop records while other threads read
        self.recorded = 0
        self._file = open(path, "a", encoding="utf-8") if path is not None else None

    @property
    def entries(self) -> list[dict]:
        """The entries kept in memory, oldest first (a copy)."""
        with self._lock:
            return list(self._entries)

    def since(self, position: int) -> tuple[list[dict], int, int]:
        """(the entries kept from absolute `position` on, the position after them, how many entries from
        `position` on were dropped before they could be read)."""
        with self._lock:
            first = self.recorded - len(self._entries)
            start = max(position, first)
            return list(itertools.islice(self._entries, start - first, None)), self.recorded, start - position

    def record(self, time_s: float, tick: int, action, predicted_s, measured_s: float, why=None,
               report=None) -> dict:
        args = {f.name: getattr(action, f.name) for f in dataclasses.fields(action) if f.name != "model"}
        entry = {"time": round(time_s, 6), "tick": tick, "action": type(action).__name__, "model": action.model,
                 "args": args, "predicted_s": predicted_s, "measured_s": round(measured_s, 6)}
        if why is not None:
            entry["why"] = why
        if report is not None:
            entry["report"] = report.to_dict()
        if self._file is None:
            with self._lock:
                self._entries.append(entry)
                self.recorded += 1
        else:
            self._file.write(json.dumps(entry) + "\n")
            self._file.flush()
        return entry

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
