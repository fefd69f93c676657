"""A simulated engine (`SimEngine`): one model's requests, continuous batching and paged KV blocks as
`tidal.Engine` keeps them, with every duration predicted by the model's fitted `CostModel` instead of run.
Torch-free.

What it models, as the engine does it: requests handed to it wait, then join the running batch (at most
`max_batch_size`) when the KV pool has blocks for their prompt; a step decodes one token for every running
request, then prefills the newly admitted ones (their first token); each token may need a new block, and when
the pool runs out the newest running request is preempted inside the engine (its blocks freed, back to the
front of the waiting queue; it prefills its prompt and the tokens it had again when readmitted). Times: a
decode step is `CostModel.predict_step(resident layers, batch, mean context)`; a prefill of n tokens is
`CostModel.predict_prefill(resident layers, n)`: the `kv_recompute` fit's (the profile measures it as a
prefill, all-resident) behind the streamed layers, which the prefill's pass streams again as the engine's
does; without that fit, a decode step at that context.
"""
from __future__ import annotations

import collections
import dataclasses
import heapq
import itertools

from ..errors import ConfigError
from ..scheduler.state import layer_device_bytes


@dataclasses.dataclass
class SimRequest:
    """One request in the simulation, with its timestamps (seconds of simulated time)."""

    id: int
    model: str
    prompt_tokens: int
    output_tokens: int
    arrival_s: float
    generated: int = 0
    started_s: float | None = None  # handed to its engine
    first_token_s: float | None = None
    finished_s: float | None = None
    engine_preemptions: int = 0  # times its engine dropped its KV for room

    @property
    def context(self) -> int:
        return self.prompt_tokens + self.generated

    @property
    def done(self) -> bool:
        return self.finished_s is not None


@dataclasses.dataclass(frozen=True)
class SimModelConfig:
    """A simulated model: its fitted cost model and the shape its footprint follows (`from_profile` reads both
    from a `tidal profile` document). Bytes: one decoder layer, everything else of the weights (`top_bytes`:
    embeddings, norms, head), and the KV cache per token; `kv_cache_bytes`: its device KV pool."""

    name: str
    cost_model: object  # tidal.costmodel.CostModel
    num_layers: int
    layer_bytes: int
    top_bytes: int
    kv_bytes_per_token: int
    kv_cache_bytes: int
    max_batch_size: int = 8
    block_size: int = 16
    resident_fraction: float = 1.0
    ring_slots: int = 3
    slo_ttft_s: float | None = None
    slo_tpot_s: float | None = None

    def __post_init__(self):
        for f in ("num_layers", "layer_bytes", "kv_bytes_per_token", "kv_cache_bytes", "max_batch_size",
                  "block_size", "ring_slots"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"model {self.name!r}: {f}={v!r} must be an int >= 1")
        if getattr(self.cost_model, "step", None) is None:
            raise ConfigError(f"model {self.name!r}: its cost model has no decode step")
        if self.cost_model.step.num_layers != self.num_layers:
            raise ConfigError(f"model {self.name!r}: {self.num_layers} layers, its cost model was fitted for "
                              f"{self.cost_model.step.num_layers}")
        if not 0.0 <= self.resident_fraction <= 1.0:
            raise ConfigError(f"model {self.name!r}: resident_fraction={self.resident_fraction!r} must be in [0, 1]")
        if self.blocks < 1:
            raise ConfigError(f"model {self.name!r}: kv_cache_bytes={self.kv_cache_bytes} holds no block of "
                              f"{self.block_size} tokens")

    @classmethod
    def from_profile(cls, name: str, path, **kwargs) -> SimModelConfig:
        """The model profiled in the profile.json at `path` (its cost model fitted as the scheduler fits it),
        with `kwargs` for the rest (kv_cache_bytes is required)."""
        from ..scheduler.plans import load_cost_model
        from ..study import schema

        doc = schema.load(path)
        m = doc["model"]
        return cls(name, load_cost_model(str(path), name), m["num_layers"], m["layer_bytes"], m["top_bytes"],
                   m["kv_bytes_per_token"], **kwargs)

    @property
    def blocks(self) -> int:
        return self.kv_cache_bytes // (self.kv_bytes_per_token * self.block_size)

    def blocks_for(self, tokens: int) -> int:
        """KV blocks `tokens` tokens take."""
        return -(-tokens // self.block_size)

    def layer_device_bytes(self, resident: int) -> int:
        """Device bytes of its decoder layers with `resident` resident (`scheduler.state.layer_device_bytes`)."""
        return layer_device_bytes(resident, self.num_layers, self.layer_bytes, self.ring_slots)

    def device_bytes(self, resident: int) -> int:
        """Device bytes while active at `resident` layers: weights on the device, the ring, the KV pool."""
        return self.top_bytes + self.layer_device_bytes(resident) + self.kv_cache_bytes

    def host_bytes(self, resident: int) -> int:
        """Host bytes while active: the streamed layers' weights."""
        return (self.num_layers - resident) * self.layer_bytes


class Backlog:
    """Requests waiting in order (a model's queue, an engine's waiting requests), with what a snapshot reads of
    them kept as they come and go, so that a tick costs the same beside ten or ten thousand of them: their count,
    summed context, the most tokens any may still generate, the oldest, and the oldest without a token yet.
    Requests with a token (preempted inside the engine) only ever join at the front."""

    def __init__(self):
        self._queue: collections.deque[SimRequest] = collections.deque()
        self.context = 0
        self.with_token = 0
        self._remaining: list[tuple[int, int]] = []  # (-tokens left, id), stale entries dropped when on top
        self._present: dict[int, int] = {}  # id -> tokens left, of those here

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self):
        return iter(self._queue)

    def __getitem__(self, i: int) -> SimRequest:
        return self._queue[i]

    def _joined(self, r: SimRequest) -> None:
        self.context += r.context
        self.with_token += r.first_token_s is not None
        left = r.output_tokens - r.generated
        self._present[r.id] = left
        heapq.heappush(self._remaining, (-left, r.id))

    def append(self, r: SimRequest) -> None:
        self._queue.append(r)
        self._joined(r)

    def appendleft(self, r: SimRequest) -> None:
        self._queue.appendleft(r)
        self._joined(r)

    def popleft(self) -> SimRequest:
        r = self._queue.popleft()
        self.context -= r.context
        self.with_token -= r.first_token_s is not None
        del self._present[r.id]
        return r

    def max_remaining(self) -> int:
        """The most tokens any request here may still generate (0: none here)."""
        while self._remaining and self._present.get(self._remaining[0][1]) != -self._remaining[0][0]:
            heapq.heappop(self._remaining)
        return -self._remaining[0][0] if self._remaining else 0

    def oldest_arrival(self) -> float | None:
        """The earliest arrival here: among those with a token (at the front) and the first without one."""
        return min((r.arrival_s for r in itertools.islice(self._queue, self.with_token + 1)), default=None)

    def oldest_without_token(self) -> float | None:
        """The earliest arrival of a request here without a token yet."""
        if self.with_token == len(self._queue):
            return None
        return next(r.arrival_s for r in itertools.islice(self._queue, self.with_token, None)
                    if r.first_token_s is None)


class SimEngine:
    """One simulated model's engine (see the module docstring). `resident` is its resident layers.

    A decode step costs O(1) and its finished requests, not O(batch): each running request's `generated` is
    written when it joins or leaves the batch and brought up to date on reading (`running`); the books the
    step needs (the contexts' sum, which requests need a new block, who finishes when) are kept as requests
    come and go. Over an hour of traffic the batch's bookkeeping was most of the simulator's own time."""

    def __init__(self, config: SimModelConfig):
        self.config = config
        self.resident = round(config.resident_fraction * config.num_layers)
        self.waiting = Backlog()
        self.used_blocks = 0
        self._running: list[SimRequest] = []  # oldest first
        self._steps = 0  # decode steps taken
        self._since: dict[int, tuple[int, int]] = {}  # running id -> (decode steps when `generated` was written, seq)
        self._phase = [0] * config.block_size  # running requests by (context - decode steps) mod block size
        self._context = 0  # the running requests' summed context
        self._ends: list[tuple[int, int, SimRequest]] = []  # (the decode step that finishes it, seq, request)
        self._seq = itertools.count()  # joins, in order (a stale end's seq is no longer its request's)

    @property
    def running(self) -> list[SimRequest]:
        """The running requests, oldest first, their `generated` up to date."""
        for r in self._running:
            since, seq = self._since[r.id]
            r.generated += self._steps - since
            self._since[r.id] = (self._steps, seq)
        return self._running

    def _join(self, r: SimRequest) -> None:
        seq, c = next(self._seq), r.prompt_tokens + r.generated
        self._since[r.id] = (self._steps, seq)
        self._running.append(r)
        self._phase[(c - self._steps) % self.config.block_size] += 1
        self._context += c
        # decode step s (counted from 0) makes its token number generated + s - steps + 1
        heapq.heappush(self._ends, (self._steps + r.output_tokens - r.generated - 1, seq, r))

    def _leave(self, r: SimRequest) -> int:
        """Take `r` off the books (not off `_running`), its `generated` written; its context."""
        since, _ = self._since.pop(r.id)
        r.generated += self._steps - since
        c = r.prompt_tokens + r.generated
        self._phase[(c - self._steps) % self.config.block_size] -= 1
        self._context -= c
        return c

    def hand(self, req: SimRequest, now: float) -> None:
        req.started_s = now
        self.waiting.append(req)

    @property
    def unfinished(self) -> int:
        return len(self.waiting) + len(self._running)

    def kv_bytes(self) -> int:
        """Device KV bytes its running requests hold (what a swap would move)."""
        return self.used_blocks * self.config.block_size * self.config.kv_bytes_per_token

    def drop_kv(self) -> None:
        """A preemption with KV recompute: every running request goes back to wait, its blocks freed."""
        for req in reversed(self.running):
            self.waiting.appendleft(req)
        self._running, self._since, self._ends, self._context, self.used_blocks = [], {}, [], 0, 0
        self._phase = [0] * self.config.block_size

    def prefill_seconds(self, tokens: int) -> float:
        return self.config.cost_model.predict_prefill(self.resident, tokens)

    def step(self, now: float, not_before: float = 0.0) -> tuple[float, list[SimRequest]]:
        """One step at `now`: (its seconds, the requests it finished). Decode first, then admit and prefill.
        Tokens are out no earlier than `not_before` (a resume's step waits for the last layer to land)."""
        cfg, cm, block = self.config, self.config.cost_model, self.config.block_size
        seconds, finished, run = 0.0, [], self._running
        if run:
            # a request whose context fills its last block needs a new one for its next token: the newest
            # leave (their blocks freed) until the rest fit
            new = self._phase[-self._steps % block]
            while self.used_blocks + new > cfg.blocks and len(run) > 1:
                victim = run.pop()
                c = self._leave(victim)
                new -= c % block == 0
                self.used_blocks -= cfg.blocks_for(c)
                victim.engine_preemptions += 1
                self.waiting.appendleft(victim)
            seconds += cm.predict_step(self.resident, len(run), self._context // len(run))
            self.used_blocks += new
            t = max(now + seconds, not_before)
            step, ends = self._steps, self._ends
            self._steps += 1
            self._context += len(run)
            while ends and ends[0][0] <= step:
                _, seq, r = heapq.heappop(ends)
                if self._since.get(r.id, (0, -1))[1] != seq:
                    continue  # it left before (preempted inside the engine), and may be back under another seq
                r.finished_s = t
                self.used_blocks -= cfg.blocks_for(self._leave(r))
                finished.append(r)
            if finished:
                self._running = run = [r for r in run if r.id in self._since]
        admitted = []
        while self.waiting and len(run) + len(admitted) < cfg.max_batch_size:
            r = self.waiting[0]
            blocks = self.config.blocks_for(r.context + 1)
            if self.used_blocks + blocks > cfg.blocks:
                break
            self.waiting.popleft()
            self.used_blocks += blocks
            admitted.append(r)
        if admitted:
            seconds += self.prefill_seconds(sum(r.context for r in admitted))
            t = max(now + seconds, not_before)
            for r in admitted:
                if r.first_token_s is None:
                    r.first_token_s = t
                r.generated += 1  # a prefill's token: the first, or the next after a recompute
                if r.generated >= r.output_tokens:
                    r.finished_s = t
                    self.used_blocks -= self.config.blocks_for(r.context)
                    finished.append(r)
                else:
                    self._join(r)
        return seconds, finished
