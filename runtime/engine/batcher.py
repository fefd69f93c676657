"""The request batcher: the queues of one engine, and the decisions of each step (which requests decode,
which are suspended to make room, which are admitted and prefilled). Bookkeeping only: it calls the KV
cache's allocate/free/swap calls, and never builds a tensor; the engine runs the batches it returns.

A step, as `Engine.step` drives it:
1. `decode_batch()`: settle finished swap-ins (those requests rejoin the batch); make room for one more
   token per running request: while the device pool is short, suspend the most recently added running
   request: swap its blocks out to the host pool (`suspend="swap"`), or free them (`suspend="recompute"`,
   or when the host pool is full, which is logged and counted). Returns the running requests.
2. the engine decodes them, and `finish_tokens()` records each new token;
3. `prefill_batch()`: admit, oldest first: suspended requests swap back in first (asynchronously: they rejoin
   once the copy is done); then, only when none is waiting to come back, new (or recomputed) requests, whose
   blocks it allocates. Returns those to prefill.
A request that finishes frees its blocks and its place in the batch at once.

Invariant of a running request: the cache holds every token of prompt + output except the last output token,
which the next decode step feeds.

Whole-model preemption (`preemption.py`) parks the running requests (`park`) and brings them back
(`unpark`); parked requests are neither waiting nor suspended, so no step admits them meanwhile.
"""
from __future__ import annotations

import bisect
import logging
from typing import TYPE_CHECKING

from ..errors import OutOfBlocks, PromptError, StateError, TransferError
from .request import Request, RequestState, StepOutput
from .stats import Counters

if TYPE_CHECKING:
    from .placement import EngineConfig

log = logging.getLogger("tidal")

S = RequestState


def _by_id(r: Request) -> int:
    return r.id


class Batcher:
    """The queues of one engine. `waiting`, `running` and `suspended` are sorted by request id (a recomputed
    request comes back before newer ones; the last running request is the most recently added);
    `swapping_in` holds requests whose swap-in is in flight; `parked` those a model preemption moved out."""

    def __init__(self, cache, config: EngineConfig, counters: Counters, max_batch_size: int, max_model_len: int,
                 vocab_size: int):
        self.cache, self.config, self.counters = cache, config, counters
        self.max_batch_size, self.max_model_len, self.vocab_size = max_batch_size, max_model_len, vocab_size
        self.capacity = cache.config.num_device_blocks * config.block_size  # tokens the device pool holds
        self.requests: dict[int, Request] = {}  # every unfinished request, by id
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.swapping_in: list[Request] = []
        self.suspended: list[Request] = []
        self.parked: dict[int, Request] = {}
        self._next_id = 0
        self._finished_now: list[tuple[int, str]] = []  # (request id, reason) finished in this step

    @property
    def num_unfinished(self) -> int:
        """Requests queued, running, swapping in, suspended or parked."""
        return (len(self.waiting) + len(self.running) + len(self.swapping_in) + len(self.suspended) +
                len(self.parked))

    # -- adding ----------------------------------------------------------------------------------------------
    def add(self, tokens: list[int], params) -> int:
        """Queue a prompt for a prefill; returns its id. PromptError if it can never run."""
        if not tokens:
            raise PromptError("prompt is empty")
        bad = [t for t in tokens if not 0 <= t < self.vocab_size]
        if bad:
            raise PromptError(f"prompt token {bad[0]} outside the vocabulary [0, {self.vocab_size})")
        self._check_fits("prompt", len(tokens))
        if len(tokens) > self.max_model_len:
            raise PromptError(f"prompt of {len(tokens)} tokens: the model has {self.max_model_len} positions")
        r = self._register(Request(self._next_id, tokens, params, params.generator()))
        self.waiting.append(r)
        return r.id

    def add_running(self, prompt: list[int], output: list[int], params) -> tuple[Request, list[int]]:
        """Seat a request that skips its prefill (`Engine.add_synthetic_request`): its prompt's blocks are
        allocated now; returns it and those block ids. StateError without a free seat, OutOfBlocks without
        room; either way nothing changes."""
        if not self.can_seat():
            raise StateError(f"{self.max_batch_size} requests running (max_batch_size); no seat for another")
        r = Request(self._next_id, prompt, params, params.generator(), output=output, state=S.RUNNING)
        blocks = self.cache.allocate(r.id, len(prompt))
        self._register(r)
        bisect.insort(self.running, r, key=_by_id)
        return r, blocks

    def can_seat(self) -> bool:
        return len(self.running) + len(self.swapping_in) < self.max_batch_size

    def check_context(self, num_tokens: int) -> None:
        """PromptError for a context the device pool could never hold."""
        self._check_fits("context", num_tokens)

    def _check_fits(self, what: str, n: int) -> None:
        if n > self.capacity:
            raise PromptError(f"{what} of {n} tokens: the KV cache holds {self.capacity} "
                              f"({self.cache.config.num_device_blocks} blocks of {self.config.block_size})")

    def _register(self, r: Request) -> Request:
        self._next_id += 1
        self.requests[r.id] = r
        return r

    # -- decode ----------------------------------------------------------------------------------------------
    def decode_batch(self) -> list[Request]:
        """The requests to decode this step, with room made for one more token each."""
        self.settle_swap_ins(block=not self.running)  # with nothing to decode, there is nothing to overlap
        self._make_decode_room()
        return list(self.running)

    def _blocks(self, num_tokens: int) -> int:
        return -(-num_tokens // self.config.block_size)

    def _growth(self) -> int:
        """Device blocks the running requests need for one more token each."""
        return sum(1 for r in self.running if self.cache.num_tokens(r.id) % self.config.block_size == 0)

    def _make_decode_room(self) -> None:
        while self.running or self.swapping_in:
            if self._growth() <= self.cache.device_pool.num_free:
                return
            if self.swapping_in:  # they hold device blocks too; once back they can be suspended like the rest
                self.settle_swap_ins(block=True)
                continue
            victim = self.running[-1]
            if len(self.running) == 1:
                log.warning("tidal: request %d alone fills the KV cache (%d tokens); finishing it", victim.id,
                            self.cache.num_tokens(victim.id))
                self._finish(victim, "cache_full")
                continue
            self._suspend(victim)

    def _suspend(self, r: Request) -> None:
        self.running.remove(r)
        r.suspensions += 1
        c = self.counters
        if self.config.suspend == "swap":
            try:
                handle = self.cache.swap_out([r.id])
                handle.wait()  # the device blocks are free only once the copy has read them
            except (OutOfBlocks, TransferError) as exc:
                log.warning("tidal: request %d: swap-out failed (%s); recomputing it instead", r.id, exc)
                c.recompute_fallbacks += 1
            else:
                c.suspend_swap_seconds += handle.seconds()
                c.suspend_swap_outs += 1
                c.suspend_swap_bytes += handle.bytes
                r.state = S.SUSPENDED
                bisect.insort(self.suspended, r, key=_by_id)
                return
        self.cache.free(r.id)
        c.recomputes += 1
        r.state = S.WAITING
        bisect.insort(self.waiting, r, key=_by_id)

    def settle_swap_ins(self, block: bool, raise_errors: bool = True) -> None:
        """Requests whose swap-in is done (every one, with `block`) rejoin the running batch. A failed copy
        raises TransferError (unless not `raise_errors`); its request stays suspended."""
        for r in list(self.swapping_in):
            if block or r.swap.done():
                try:
                    self._wait_swap_in(r)
                except TransferError:
                    if raise_errors:
                        raise

    def _wait_swap_in(self, r: Request) -> None:
        """Wait for r's swap-in; r runs from the next decode on. On a failed copy the cache has put r back
        in the host pool: it stays suspended, and the error propagates."""
        handle, r.swap = r.swap, None
        self.swapping_in.remove(r)
        try:
            handle.wait()
        except TransferError:
            r.state = S.SUSPENDED
            bisect.insort(self.suspended, r, key=_by_id)
            raise
        if r.swap_timed:
            self.counters.suspend_swap_seconds += handle.seconds()
        r.state = S.RUNNING
        bisect.insort(self.running, r, key=_by_id)

    # -- admission -------------------------------------------------------------------------------------------
    def prefill_batch(self) -> list[Request]:
        """Admit what fits beside the running requests' next tokens (so that admission never forces a
        suspension in the next step): suspended requests first, as swap-ins; then, when none is waiting to
        come back, waiting requests up to `max_prefill_tokens`, their blocks allocated. Returns those."""
        free = self.cache.device_pool.num_free - self._growth()
        seats = self.max_batch_size - len(self.running) - len(self.swapping_in)
        while self.suspended and seats > 0:
            r = self.suspended[0]
            need = min(self._blocks(self.cache.num_tokens(r.id) + 1), self.cache.config.num_device_blocks)
            if need > free:
                break
            handle = self.cache.swap_in([r.id])
            self.suspended.pop(0)
            r.state, r.swap, r.swap_timed = S.SWAPPING_IN, handle, True
            self.swapping_in.append(r)
            self.counters.suspend_swap_ins += 1
            self.counters.suspend_swap_bytes += handle.bytes
            free -= need
            seats -= 1
        if self.suspended or self.swapping_in:
            return []  # first come, first served: new prompts wait until suspended requests are back
        batch, tokens = [], 0
        while self.waiting and seats > 0:
            r = self.waiting[0]
            n = len(r.tokens)
            if n > self.capacity:  # a recomputed request that grew to the whole cache
                self.waiting.pop(0)
                self._finish(r, "cache_full")
                continue
            need = min(self._blocks(n + 1), self.cache.config.num_device_blocks)
            if need > free:
                break
            if batch and tokens + n > self.config.max_prefill_tokens:
                break
            self.waiting.pop(0)
            self.cache.allocate(r.id, n)
            batch.append(r)
            tokens += n
            free -= need
            seats -= 1
        return batch

    def prefilled(self, batch: list[Request]) -> None:
        """The engine prefilled `batch`: its requests join the running batch."""
        self.counters.prefill_passes += 1
        self.counters.prefill_tokens += sum(len(r.tokens) for r in batch)
        for r in batch:
            r.state = S.RUNNING
            bisect.insort(self.running, r, key=_by_id)

    def requeue(self, batch: list[Request]) -> None:
        """The prefill of `batch` failed: free its blocks and queue it again, as it was."""
        for r in batch:
            self.cache.free(r.id)
            bisect.insort(self.waiting, r, key=_by_id)

    # -- tokens and finishing --------------------------------------------------------------------------------
    def finish_tokens(self, batch: list[Request], tokens: list[int], produced: dict) -> None:
        """Record each request's new token (in `produced` too); finish those that are done."""
        for r, t in zip(batch, tokens):
            r.output.append(t)
            produced.setdefault(r.id, []).append(t)
            p = r.params
            if t in p.stop_token_ids:
                self._finish(r, "stop")
            elif len(r.output) >= p.max_new_tokens:
                self._finish(r, "length")
            elif len(r.tokens) > self.max_model_len:  # the next token would be fed at an unknown position
                self._finish(r, "max_model_len")

    def outputs(self, produced: dict) -> list[StepOutput]:
        """This step's StepOutputs: one per request that produced a token or finished."""
        done, self._finished_now = dict(self._finished_now), []
        outputs = [StepOutput(rid, tuple(toks), rid in done, done.pop(rid, None)) for rid, toks in produced.items()]
        return outputs + [StepOutput(rid, (), True, reason) for rid, reason in done.items()]

    def _finish(self, r: Request, reason: str) -> None:
        if r in self.running:
            self.running.remove(r)
            self.cache.free(r.id)
        r.state, r.finish_reason = S.FINISHED, reason
        del self.requests[r.id]
        self._finished_now.append((r.id, reason))

    def abort(self, request_id: int) -> bool:
        """Stop a request and free its blocks; False if it is unknown or already finished."""
        r = self.requests.pop(request_id, None)
        if r is None:
            return False
        if r.is_swapping_in:
            self._wait_swap_in(r)  # a sequence with a copy in flight cannot be freed
        for queue in (self.waiting, self.running, self.suspended):
            if r in queue:
                queue.remove(r)
        self.parked.pop(r.id, None)
        if r.holds_blocks:
            self.cache.free(r.id)
        r.state, r.finish_reason = S.FINISHED, "aborted"
        return True

    # -- whole-model preemption (preemption.py) --------------------------------------------------------------
    def park(self, swapped: list[Request], recomputed: list[Request]) -> None:
        """The model is preempted: `swapped` running requests' KV went to the host pool (they wait, parked,
        for `unpark`); `recomputed` running requests' KV is freed and they queue for a prefill again."""
        for r in swapped:
            self.running.remove(r)
            r.state = S.PARKED
            self.parked[r.id] = r
        for r in recomputed:
            self.running.remove(r)
            self.cache.free(r.id)
            self.counters.recomputes += 1
            r.state = S.WAITING
            bisect.insort(self.waiting, r, key=_by_id)

    def park_suspended(self, ids) -> list[Request]:
        """Park the suspended requests among `ids` (a resume's swap-in of them failed: their KV is on the
        host); returns them."""
        back = [r for r in self.suspended if r.id in ids]
        for r in back:
            self.suspended.remove(r)
            r.state = S.PARKED
            self.parked[r.id] = r
        return back

    def unpark(self, ids, handle) -> None:
        """The model is resumed: the parked requests `ids` come back with the one batched swap-in `handle`
        (its seconds are the resume's, not the suspend counters')."""
        for rid in ids:
            r = self.parked.pop(rid)
            r.state, r.swap, r.swap_timed = S.SWAPPING_IN, handle, False
            self.swapping_in.append(r)
