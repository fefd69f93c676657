"""A request as the scheduler hands it back (`ScheduledRequest`), and the trace of its decisions (`Trace`).
Torch-free."""
from __future__ import annotations

import dataclasses
import json
import threading
import time


class ScheduledRequest:
    """What `Scheduler.submit` returns. Read `output_ids`, `finish_reason` and `done`; `wait()` blocks until it
    is done and returns its tokens (or raises the error that failed it). Timestamps are `time.monotonic()`:
    `submitted_at`, `first_token_at` (None before the first token), `token_times` (one per output token),
    `finished_at`. `finish_reason`: the engine's ("stop", "length", "max_model_len", "cache_full"), "aborted",
    or "error" (then `error` holds the exception)."""

    def __init__(self, model: str, prompt: list[int], params):
        self.model, self.prompt, self.params = model, prompt, params
        self.output_ids: list[int] = []
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.submitted_at = time.monotonic()
        self.first_token_at: float | None = None
        self.token_times: list[float] = []
        self.finished_at: float | None = None
        self.engine_id: int | None = None  # its id in the model's engine once handed over (the loop's)
        self._done = threading.Event()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> list[int]:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request to {self.model!r} not done after {timeout} s")
        if self.error is not None:
            raise self.error
        return self.output_ids

    # -- the loop's side ---------------------------------------------------------------------------------------
    def _tokens(self, token_ids, now: float) -> None:
        if token_ids and self.first_token_at is None:
            self.first_token_at = now
        self.output_ids += token_ids
        self.token_times += [now] * len(token_ids)

    def _finish(self, reason: str, now: float, error: BaseException | None = None) -> None:
        self.finish_reason, self.error, self.finished_at = reason, error, now
        self._done.set()

    def __repr__(self) -> str:
        state = self.finish_reason or "pending"
        return f"ScheduledRequest({self.model!r}, {len(self.prompt)} prompt, {len(self.output_ids)} out, {state})"


class Trace:
    """Every decision the loop applied, one dict per action: `time` (seconds since the scheduler started),
    `tick`, `action` (the action's class name), `model`, `args` (the action's other fields), `predicted_s`
    (the policy's predicted seconds; None without a cost model), `measured_s` (seconds applying it took).
    Written as JSON lines to `path` when given (flushed per line), else kept in `entries`."""

    def __init__(self, path=None):
        self.entries: list[dict] = []
        self._file = open(path, "a", encoding="utf-8") if path is not None else None

    def record(self, time_s: float, tick: int, action, predicted_s, measured_s: float) -> dict:
        args = {f.name: getattr(action, f.name) for f in dataclasses.fields(action) if f.name != "model"}
        entry = {"time": round(time_s, 6), "tick": tick, "action": type(action).__name__, "model": action.model,
                 "args": args, "predicted_s": predicted_s, "measured_s": round(measured_s, 6)}
        if self._file is None:
            self.entries.append(entry)
        else:
            self._file.write(json.dumps(entry) + "\n")
            self._file.flush()
        return entry

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
