"""The bridge between the HTTP edge (asyncio) and the scheduler (its own thread).

The scheduler's loop runs in its thread and is the only one to touch engines; the event loop only tokenizes,
submits, detokenizes and formats. Each request's `ScheduledRequest.listen` callback runs in the loop's thread
and does one thing: `call_soon_threadsafe` hands the new tokens (or the finish) to the event loop, where the
request's `Generation` queues them for its consumer. The consumer (`Generation.deltas`) turns token ids into
text (incremental detokenization), matches stop strings on that text, and aborts the scheduled request when
one matches or when the client goes away.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

from ..errors import ConfigError, PromptError, StateError, TidalError
from .protocol import InvalidRequest, Sampling

log = logging.getLogger("tidal.serve")

# the engine's and the scheduler's finish reasons -> OpenAI's ("abort" as vLLM names it)
FINISH_REASONS = {"stop": "stop", "length": "length", "max_model_len": "length", "cache_full": "length",
                  "aborted": "abort"}


class GenerationFailed(TidalError, RuntimeError):
    """The scheduler failed the request (its loop or its engine raised); the message says why."""


@dataclasses.dataclass(frozen=True)
class ServedModel:
    """A model as the server offers it: its tokenizer (`tidal.text.Tokenizer`), its positions and the tokens
    its device KV cache holds (a prompt must fit both)."""

    name: str
    path: str
    tokenizer: object
    max_len: int
    capacity: int
    created: int  # unix time it was registered, for GET /v1/models


@dataclasses.dataclass(frozen=True)
class Delta:
    text: str
    finish_reason: str | None = None  # set on the last one


class Generation:
    """One request in flight: its ScheduledRequest, and the asyncio queue its tokens arrive on."""

    def __init__(self, service: Service, model: ServedModel, prompt_ids: list[int], sampling: Sampling,
                 max_new_tokens: int, stop_token_ids: frozenset[int]):
        from ..text import StopMatcher

        self.service, self.model, self.prompt_ids = service, model, prompt_ids
        self.prompt_tokens, self.completion_tokens = len(prompt_ids), 0
        self.finish_reason: str | None = None
        self.request = None  # the ScheduledRequest once submitted
        self.max_new_tokens = max_new_tokens
        self._stop_ids = stop_token_ids
        self._last_token: int | None = None
        self._detok = model.tokenizer.detokenizer(prompt_ids)
        self._matcher = StopMatcher(list(sampling.stop)) if sampling.stop else None
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._observed = False

    # -- the loop thread's side ------------------------------------------------------------------------------
    def _listener(self, token_ids: list[int], reason: str | None) -> None:
        try:
            self._loop.call_soon_threadsafe(self._arrive, token_ids, reason)
        except RuntimeError:  # the event loop has closed: nobody is left to read this request
            pass

    # -- the event loop's side -------------------------------------------------------------------------------
    def _arrive(self, token_ids: list[int], reason: str | None) -> None:
        self._queue.put_nowait((token_ids, reason))
        if reason is not None:
            self.service._finished(self, reason)

    def abort(self) -> None:
        """Stop the request (its consumer then sees finish_reason "abort", unless it finished first)."""
        if self.request is not None:
            self.service.scheduler.abort(self.request)

    async def deltas(self):
        """Yield `Delta`s of new text until the request finishes; the last carries its OpenAI finish_reason
        ("stop", "length" or "abort") and the text that came with the last token. GenerationFailed if the
        scheduler failed it. Leaving early (the client went away) aborts the request."""
        pieces = []
        try:
            while True:
                token_ids, reason = await self._queue.get()
                if token_ids:
                    self.completion_tokens += len(token_ids)
                    self._last_token = token_ids[-1]
                    # a stop token ends the request and is its last token: it is never text
                    text, stopped = self._match(self._detok.push([t for t in token_ids
                                                                  if t not in self._stop_ids]))
                    pieces.append(text)
                    if stopped:
                        self.abort()
                        self.finish_reason = "stop"
                        yield Delta("".join(pieces), "stop")
                        return
                if reason is not None:
                    if reason == "error":
                        raise GenerationFailed(f"model {self.model.name!r}: {self.request.error!r}")
                    text, stopped = self._match(self._detok.flush())
                    pieces.append(text)
                    if self._matcher is not None and not stopped:
                        pieces.append(self._matcher.flush())
                    self.finish_reason = "stop" if stopped else FINISH_REASONS[reason]
                    yield Delta("".join(pieces), self.finish_reason)
                    return
                # the loop reports a request's last tokens and its finish one after the other: when these
                # tokens must be the last (a stop token, or max_tokens reached), wait for the finish, so that
                # the last chunk carries both the text and the finish_reason
                if self._queue.empty() and not self._ends_here():
                    text, pieces = "".join(pieces), []
                    if text:
                        yield Delta(text)
        except TidalError as exc:  # the text could not be made: the server's failure, not the request's
            if isinstance(exc, GenerationFailed):
                raise
            raise GenerationFailed(f"model {self.model.name!r}: {exc}") from exc
        finally:
            if self.request is not None and not self.request.done:
                self.abort()

    def _ends_here(self) -> bool:
        return self.completion_tokens >= self.max_new_tokens or self._last_token in self._stop_ids

    def _match(self, text: str) -> tuple[str, bool]:
        if self._matcher is None:
            return text, False
        return self._matcher.push(text)


class Service:
    """Owns the scheduler (and its runtime) for the HTTP app: `models` by name, `submit` a tokenized request,
    `begin_shutdown`/`close`. Build it with `loading.build_service`."""

    def __init__(self, scheduler, models: dict[str, ServedModel], metrics=None,
                 shutdown_grace_s: float = 10.0):
        self.scheduler, self.models, self.metrics = scheduler, dict(models), metrics
        self.shutdown_grace_s = shutdown_grace_s
        self._live: set[Generation] = set()  # submitted, not yet finished by the scheduler
        self._closing = False

    # -- requests --------------------------------------------------------------------------------------------
    def model(self, name: str) -> ServedModel:
        m = self.models.get(name)
        if m is None:
            served = ", ".join(sorted(self.models))
            raise InvalidRequest(f"the model {name!r} does not exist (served: {served})", "model", status=404,
                                 code="model_not_found")
        return m

    def completion_prompt(self, m: ServedModel, prompt) -> list[int]:
        ids = m.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        return self._check_prompt(m, ids, "prompt")

    def chat_prompt(self, m: ServedModel, messages) -> list[int]:
        if not m.tokenizer.has_chat_template:
            raise InvalidRequest(f"model {m.name!r} has no chat template; use /v1/completions", "messages")
        return self._check_prompt(m, m.tokenizer.chat_prompt(list(messages)), "messages")

    @staticmethod
    def _check_prompt(m: ServedModel, ids: list[int], param: str) -> list[int]:
        n = len(ids)
        if n == 0:
            raise InvalidRequest("the prompt is empty once tokenized", param)
        if n > m.max_len:
            raise InvalidRequest(f"the prompt has {n} tokens, more than model {m.name!r}'s {m.max_len} "
                                 "positions", param, code="context_length_exceeded")
        if n > m.capacity:
            raise InvalidRequest(f"the prompt has {n} tokens, more than model {m.name!r}'s KV cache holds "
                                 f"({m.capacity} tokens)", param, code="context_length_exceeded")
        return ids

    def submit(self, m: ServedModel, prompt_ids: list[int], sampling: Sampling) -> Generation:
        """Queue the request on the scheduler; returns its Generation (call on the event loop)."""
        if self._closing:
            raise InvalidRequest("the server is shutting down", status=503, type="server_error",
                                 code="shutting_down")
        stop_ids = frozenset(m.tokenizer.eos_token_ids) | frozenset(sampling.stop_token_ids)
        max_new = sampling.max_tokens
        if max_new is None:  # as many as the context leaves
            max_new = max(1, min(m.max_len, m.capacity) - len(prompt_ids))
        gen = Generation(self, m, prompt_ids, sampling, max_new, stop_ids)
        try:
            req = self.scheduler.submit(m.name, prompt_ids, max_new_tokens=max_new,
                                        temperature=sampling.temperature, top_p=sampling.top_p,
                                        seed=sampling.seed, stop_token_ids=sorted(stop_ids))
        except PromptError as exc:
            raise InvalidRequest(str(exc), "prompt") from None
        except ConfigError as exc:
            raise InvalidRequest(str(exc)) from None
        except StateError as exc:
            raise InvalidRequest(f"the scheduler is down: {exc}", status=503, type="server_error") from None
        gen.request = req
        self._live.add(gen)
        req.listen(gen._listener)
        return gen

    def _finished(self, gen: Generation, reason: str) -> None:
        """The scheduler finished `gen`'s request (on the event loop): count it once."""
        self._live.discard(gen)
        if self.metrics is not None and not gen._observed:
            gen._observed = True
            req = gen.request
            finish = gen.finish_reason or ("error" if reason == "error" else FINISH_REASONS[reason])
            self.metrics.observe_finished(req, finish, gen.prompt_tokens, len(req.output_ids))

    def remove_model(self, name: str, wait_s: float | None = None) -> None:
        """Stop offering `name` (a request for it gets 404 from now on), give its requests in flight up to
        `wait_s` seconds to finish (default `shutdown_grace_s`), abort the rest (finish_reason "abort"), and
        deregister it (`Scheduler.remove_model`: its engine closed, its device and host bytes freed). Blocks
        while it waits: call it off the event loop."""
        self.models.pop(name, None)
        sched = self.scheduler
        deadline = time.monotonic() + (self.shutdown_grace_s if wait_s is None else wait_s)
        while sched.unfinished(name) and time.monotonic() < deadline:
            time.sleep(0.01)
        for gen in list(self._live):
            if gen.model.name == name:
                gen.abort()
        deadline = time.monotonic() + 5.0  # the loop applies the aborts at its next tick
        while sched.unfinished(name):
            if time.monotonic() > deadline:
                raise StateError(f"model {name!r}: {sched.unfinished(name)} aborted requests are still pending; "
                                 "is the scheduler's loop running?")
            time.sleep(0.005)
        sched.remove_model(name)
        log.info("tidal serve: model %s removed", name)

    # -- lifetime --------------------------------------------------------------------------------------------
    def start(self, warmup: bool = True) -> None:
        """Start the scheduler's loop; with `warmup`, run one token through each model and log where it is."""
        self.scheduler.start()
        if not warmup:
            return
        for name, m in self.models.items():
            t = time.monotonic()
            token = (m.tokenizer.eos_token_ids or (0,))[0]
            req = self.scheduler.submit(name, [token], max_new_tokens=1)
            req.wait(timeout=600)
            log.info("tidal serve: %s warmed up in %.2f s", name, time.monotonic() - t)
        with self.scheduler.between_ticks():  # the loop's thread changes the Runtime's books during a tick
            status = self.scheduler.runtime.status()
        for name, st in status.items():
            log.info("tidal serve: %s is %s", name, st)

    @property
    def closing(self) -> bool:
        return self._closing

    def begin_shutdown(self) -> None:
        """Refuse new requests (503); abort those still running after `shutdown_grace_s` (event loop)."""
        if self._closing:
            return
        self._closing = True
        log.info("tidal serve: shutting down; %d requests in flight get %.1f s to finish", len(self._live),
                 self.shutdown_grace_s)
        asyncio.get_running_loop().call_later(self.shutdown_grace_s, self.abort_all)

    def abort_all(self) -> None:
        if self._live:
            log.info("tidal serve: aborting %d requests (finish_reason \"abort\")", len(self._live))
        for gen in list(self._live):
            gen.abort()

    def close(self) -> None:
        """Stop the scheduler's loop (raising the error that failed it, if one did), abort what is left and
        release the models."""
        self._closing = True
        try:
            self.scheduler.stop()
        finally:
            try:
                for gen in list(self._live):  # the loop has stopped: each abort is applied here, at once
                    gen.abort()
            finally:
                self.scheduler.runtime.close()

    def health(self) -> str | None:
        """None when serving; else why not."""
        error = self.scheduler.error  # once set, submit refuses too
        if error is not None:
            return f"the scheduler's loop failed: {error!r}"
        if self._closing:
            return "shutting down"
        return None
