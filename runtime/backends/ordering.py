"""The stream-ordering check: proves on any backend that every copy and every compute use of a region waits
for what it must, the way a GPU's two streams require, although the CPU backend would hide the fault.

On with `TIDAL_CHECK_ORDERING=1` in the environment (seed: `TIDAL_CHECK_ORDERING_SEED`), or
`make_backend(..., check_ordering=True)`. It models the two queues of `backends/base.py` as clocks:

* compute is one ordered queue; each compute use of a region and each `record()` takes the next position;
  an event recorded at position p stands for "every compute use before p is done";
* copies run in submission order; copy n is ordered after every compute position its `after` events (or an
  earlier copy's) named, and after whatever the host had already seen complete when it was submitted;
* compute is ordered after copy n once it `wait_for`s copy n (or a later one), or once the host has seen
  copy n complete (`wait()`, a `done()` that returned True, `synchronize()`); the host sees only the latter.

Each region (device memory by address, host memory by address, or units of a logical pool such as KV
blocks) remembers its last writer and readers on each queue, and the check raises `OrderingError` naming
the region and both operations when:

* compute reads (or writes) a region whose filling copy it has not waited on;
* a copy writes a region whose last compute use it has not waited on: a ring slot reused, or memory just
  allocated (the caching allocator may hand out memory whose earlier users are still queued on compute);
* a copy reads a region before the compute that wrote it;
* host memory that a copy reads or writes is released or rewritten before the host saw that copy complete.

The check is bookkeeping only; the backend adds a seeded random delay before each copy in this mode, so that
a missing wait also shows as wrong bytes in tests that compare results.
"""
from __future__ import annotations

import dataclasses
import os
import random
import threading
from typing import Iterable

from ..errors import OrderingError

ENV = "TIDAL_CHECK_ORDERING"
SEED_ENV = "TIDAL_CHECK_ORDERING_SEED"
MAX_DELAY_S = 0.002  # per copy; enough to let compute run ahead on the CPU, small enough for the test suite
MEMORY = "memory"


def enabled_by_env() -> bool:
    return os.environ.get(ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


@dataclasses.dataclass(frozen=True)
class Span:
    """Part of a region: bytes [start, stop) of the address space (`space="memory"`), or units [start, stop)
    of a logical pool (`space` names the pool, e.g. one KV cache's device blocks)."""

    space: object
    start: int
    stop: int
    label: str


def memory_span(tensor, label: str) -> Span:
    """The bytes a tensor (or view) can touch: from its lowest to its highest element."""
    start = tensor.data_ptr()
    if tensor.numel() == 0:
        return Span(MEMORY, start, start, label)
    extent = 1 + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride()) if n > 0)
    return Span(MEMORY, start, start + extent * tensor.element_size(), label)


def unit_spans(space, units: Iterable[int], label: str) -> list[Span]:
    """One span per unit of a logical pool (KV block ids, say), labelled `label` with the unit appended."""
    return [Span(space, u, u + 1, f"{label} {u}") for u in units]


@dataclasses.dataclass(frozen=True)
class Mark:
    """Where an event sits: ("compute", position) or ("copy", sequence number)."""

    queue: str
    at: int
    op: str


class _Record:
    __slots__ = ("label", "copy_write", "copy_read", "compute_use", "compute_write")

    def __init__(self, label: str):
        self.label = label
        self.copy_write: tuple[int, str] | None = None  # (copy seq, op)
        self.copy_read: tuple[int, str] | None = None
        self.compute_use: tuple[int, str] | None = None  # (compute position, op), read or write
        self.compute_write: tuple[int, str] | None = None

    def copy(self) -> "_Record":
        twin = _Record(self.label)
        for field in self.__slots__[1:]:
            setattr(twin, field, getattr(self, field))
        return twin


class OrderingChecker:
    def __init__(self, seed: int | None = None, max_delay_s: float = MAX_DELAY_S):
        if seed is None:
            seed = int(os.environ.get(SEED_ENV, "0"))
        self.seed, self.max_delay_s = seed, max_delay_s
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._records: dict[object, dict[tuple[int, int], _Record]] = {}
        self._compute_pos = 0  # next compute position
        self._copies = 0  # copies submitted (the last one's sequence number)
        self._copy_horizon = 0  # compute positions < this are done before any copy submitted from now on
        self._compute_sees = 0  # copies <= this are done before any compute issued from now on
        self._host_sees = 0  # copies <= this are known complete to the host
        self.checks = 0  # operations checked, for tests and reports

    # -- the queues ------------------------------------------------------------------------------------------
    def compute_event(self, op: str = "record") -> Mark:
        with self._lock:
            self._compute_pos += 1
            return Mark("compute", self._compute_pos, op)

    def delay(self) -> float:
        """A random pause to put before a copy (seconds)."""
        with self._lock:
            return self._rng.uniform(0.0, self.max_delay_s)

    def compute_waits(self, mark: Mark | None) -> None:
        """Compute issued from now on waits for `mark` (wait_for)."""
        if mark is not None and mark.queue == "copy":
            with self._lock:
                self._compute_sees = max(self._compute_sees, mark.at)

    def host_saw(self, mark: Mark | None) -> None:
        """The host saw `mark` complete: whatever it issues from now on, on either queue, comes after it."""
        if mark is None:
            return
        with self._lock:
            if mark.queue == "copy":
                self._host_sees = max(self._host_sees, mark.at)
                self._compute_sees = max(self._compute_sees, mark.at)
            else:
                self._copy_horizon = max(self._copy_horizon, mark.at)

    def synchronized(self) -> None:
        with self._lock:
            self._host_sees = self._compute_sees = self._copies
            self._compute_pos += 1
            self._copy_horizon = self._compute_pos

    # -- uses of regions -------------------------------------------------------------------------------------
    def allocated(self, spans: Iterable[Span], op: str, compute: bool = True) -> None:
        """Fresh memory: what was recorded for the same addresses before is forgotten. Device memory
        (`compute=True`) counts as used by compute now, so a copy into it must wait on a later compute event:
        the caching allocator hands out memory whose earlier users may still be queued on compute."""
        with self._lock:
            pos = self._next_compute()
            for span in spans:
                records = self._space(span.space)
                for a, b in [k for k in records if k[0] < span.stop and span.start < k[1]]:
                    old = records.pop((a, b))  # memory freed since: keep only what lies outside the new span
                    for lo, hi in ((a, span.start), (span.stop, b)):
                        if lo < hi:
                            records[(lo, hi)] = old.copy()
                rec = records[(span.start, span.stop)] = _Record(span.label)
                if compute:
                    rec.compute_use = (pos, op)

    def compute_uses(self, spans: Iterable[Span], op: str, write: bool = False) -> None:
        with self._lock:
            pos = self._next_compute()
            for span in spans:
                for rec in self._touch(span):
                    self.checks += 1
                    if rec.copy_write is not None and rec.copy_write[0] > self._compute_sees:
                        raise OrderingError(
                            f"compute '{op}' {'writes' if write else 'reads'} {rec.label} whose filling copy "
                            f"'{rec.copy_write[1]}' it has not waited on")
                    if write and rec.copy_read is not None and rec.copy_read[0] > self._compute_sees:
                        raise OrderingError(f"compute '{op}' writes {rec.label} that copy '{rec.copy_read[1]}' "
                                            f"may still be reading (not waited on)")
                    rec.compute_use = (pos, op)
                    if write:
                        rec.compute_write = (pos, op)

    def copy_submitted(self, after: Iterable[Mark | None], reads: Iterable[Span], writes: Iterable[Span],
                       op: str) -> Mark:
        """A copy enqueued after `after`: check it against compute, then record what it reads and writes."""
        with self._lock:
            horizon = self._copy_horizon
            for mark in after:
                if mark is not None and mark.queue == "compute":
                    horizon = max(horizon, mark.at)
            self._copy_horizon = horizon  # the queue is in order: later copies inherit the wait
            self._copies += 1
            seq = self._copies
            for span in writes:
                for rec in self._touch(span):
                    self.checks += 1
                    if rec.compute_use is not None and rec.compute_use[0] >= horizon:
                        raise OrderingError(
                            f"copy '{op}' writes {rec.label} whose last compute use '{rec.compute_use[1]}' it "
                            f"has not waited on")
                    rec.copy_write = (seq, op)
            for span in reads:
                for rec in self._touch(span):
                    self.checks += 1
                    if rec.compute_write is not None and rec.compute_write[0] >= horizon:
                        raise OrderingError(f"copy '{op}' reads {rec.label} before compute "
                                            f"'{rec.compute_write[1]}' that wrote it (not waited on)")
                    rec.copy_read = (seq, op)
            return Mark("copy", seq, op)

    def host_changes(self, spans: Iterable[Span], op: str) -> None:
        """The host releases or rewrites these bytes now: every copy touching them must be seen complete."""
        with self._lock:
            for span in spans:
                for rec in self._touch(span, create=False):
                    self.checks += 1
                    for kind, last in (("reads", rec.copy_read), ("writes", rec.copy_write)):
                        if last is not None and last[0] > self._host_sees:
                            raise OrderingError(f"'{op}' changes {rec.label} while copy '{last[1]}' that {kind} "
                                                f"it may still run (its event was not waited on)")

    # -- internals -------------------------------------------------------------------------------------------
    def _next_compute(self) -> int:
        self._compute_pos += 1
        return self._compute_pos

    def _space(self, space) -> dict[tuple[int, int], _Record]:
        return self._records.setdefault(space, {})

    def _touch(self, span: Span, create: bool = True) -> list[_Record]:
        """The records a span overlaps; a span with no exact record gets one that starts from the state of
        every record it overlaps (conservative: it inherits their pending uses)."""
        records = self._space(span.space)
        exact = records.get((span.start, span.stop))
        if span.space != MEMORY:  # logical pools are touched in whole units: exact keys only
            if exact is None and create:
                exact = records[(span.start, span.stop)] = _Record(span.label)
            return [] if exact is None else [exact]
        hits = [r for (a, b), r in records.items() if a < span.stop and span.start < b]
        if exact is None and create and span.stop > span.start:
            exact = records[(span.start, span.stop)] = _Record(span.label)
            for r in hits:
                for field in ("copy_write", "copy_read", "compute_use", "compute_write"):
                    mine, theirs = getattr(exact, field), getattr(r, field)
                    if theirs is not None and (mine is None or theirs[0] > mine[0]):
                        setattr(exact, field, theirs)
            hits.append(exact)
        return hits
