"""`tidal.Runtime`: several engines sharing one device under byte budgets, preempted and resumed by name.

The runtime admits a model only if the bytes it will hold fit: its device bytes (weights, streaming ring, KV
pool) within `device_budget_bytes`, and its host bytes (streamed weights, KV host pool, and the host copy
of anything preempted to the host) within `host_budget_bytes`. Before loading, it knows those bytes from
`Engine.placement`, which reads only the checkpoint's headers. With `evict="lru"`, a model that does not fit
preempts active models, least recently used first. Each of those keeps its host copy when the host budget
allows, and goes to disk otherwise. Without it, the call raises OutOfDeviceMemory with the numbers. The
accounting is pure bookkeeping over `Engine.memory()` and `Engine.placement()`; the engines move the bytes.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Optional

from .backends import resolve_device
from .engine import Engine
from .errors import ConfigError, OutOfDeviceMemory, StateError
from .preemption import host_copy_growth, staging_bytes

log = logging.getLogger("tidal")

EVICT_POLICIES = (None, "lru")


@dataclasses.dataclass(frozen=True)
class ModelStatus:
    state: str  # "active" or "preempted (weights/kv)"
    device_bytes: int
    host_bytes: int
    disk_bytes: int
    running_requests: int  # admitted and not finished: running, swapped or waiting to resume
    waiting_requests: int


class Runtime:
    """Several models on one device. `load`, `generate`, `preempt`, `resume`, `unload` and `status` take a
    model's name. Budgets are in bytes; None means no limit on that tier."""

    def __init__(self, device=None, device_budget_bytes: int | None = None, host_budget_bytes: int | None = None):
        for name, value in (("device_budget_bytes", device_budget_bytes), ("host_budget_bytes", host_budget_bytes)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ConfigError(f"{name}={value!r} must be an int >= 0 or None")
        self.device = resolve_device(device)
        self.device_budget, self.host_budget = device_budget_bytes, host_budget_bytes
        self.models: collections.OrderedDict[str, Engine] = collections.OrderedDict()  # least recently used first
        self._active_bytes: dict[str, tuple[int, int]] = {}  # name -> (device, host) once loaded and active

    # -- the API ---------------------------------------------------------------------------------------------
    def load(self, name: str, path, evict: Optional[str] = None, **engine_kwargs) -> list:
        """Load the checkpoint at `path` as `name`; returns the PreemptionReports of models evicted for it.
        `engine_kwargs` go to `Engine.from_pretrained`; an emulated `link=` paces this model's copies alone."""
        if not isinstance(name, str) or not name:
            raise ConfigError(f"name={name!r} must be a non-empty string")
        if name in self.models:
            raise ConfigError(f"a model named {name!r} is loaded already; unload it first")
        _check_policy(evict)
        if "device" in engine_kwargs:
            raise ConfigError("device is the runtime's; pass it to Runtime(device=...)")
        if self.device_budget is not None and engine_kwargs.get("kv_cache_bytes") is None:
            raise ConfigError("with a device budget, give each model's kv_cache_bytes")
        placement = Engine.placement(path, device=self.device, **engine_kwargs)
        need = placement.footprint
        reports = self._make_room(name, need.device, need.host, evict)
        engine = Engine.from_pretrained(path, device=self.device, **engine_kwargs)
        engine.name = name
        self.models[name] = engine
        used = engine.memory()
        self._active_bytes[name] = (used.device, used.host)
        return reports

    def generate(self, name: str, prompts, **kwargs) -> list[list[int]]:
        """`Engine.generate` on the model `name`, which must be active."""
        engine = self._get(name)
        if engine.preempted is not None:
            raise StateError(f"model {name!r} is preempted; resume it first")
        self.models.move_to_end(name)
        return engine.generate(prompts, **kwargs)

    def preempt(self, name: str, weights: str = "host", kv: str = "swap"):
        """Preempt model `name` (see `Engine.preempt`); returns its PreemptionReport."""
        engine = self._get(name)
        if engine.preempted is not None:
            raise StateError(f"model {name!r} is preempted already")
        if weights == "host" and self.host_budget is not None:
            grow = host_copy_growth(engine)
            if self._host_used() + grow > self.host_budget:
                raise OutOfDeviceMemory(f"preempting {name!r} to the host needs up to {grow} host bytes; "
                                        f"{self._host_used()} of {self.host_budget} are in use (use weights='disk')")
        return engine.preempt(weights=weights, kv=kv)

    def resume(self, name: str, pipelined: bool = True, evict: Optional[str] = None):
        """Resume model `name`; returns (ResumeReport, PreemptionReports of the models evicted for it)."""
        engine = self._get(name)
        if engine.preempted is None:
            raise StateError(f"model {name!r} is not preempted")
        _check_policy(evict)
        active_device, active_host = self._active_bytes[name]
        now = engine.memory()
        # a disk resume stages the device regions in host memory while it runs: that must fit too
        host_peak = max(0, active_host - now.host) + staging_bytes(engine)
        reports = self._make_room(name, active_device - now.device, host_peak, evict)
        report = engine.resume(pipelined=pipelined)
        self.models.move_to_end(name)
        return report, reports

    def unload(self, name: str) -> None:
        self._get(name).close()
        del self.models[name]
        del self._active_bytes[name]

    def status(self) -> dict[str, ModelStatus]:
        out = {}
        for name, engine in self.models.items():
            m = engine.memory()
            p = engine.preempted
            state = "active" if p is None else f"preempted (weights={p.weights}, kv={p.kv})"
            waiting = len(engine.waiting)
            total = waiting + len(engine.running) + len(engine.swapping_in) + len(engine.swapped) + len(engine._parked)
            out[name] = ModelStatus(state, m.device, m.host, m.disk, total - waiting, waiting)
        return out

    def close(self) -> None:
        for name in list(self.models):
            self.unload(name)

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- budgets ---------------------------------------------------------------------------------------------
    def _device_used(self) -> int:
        return sum(e.memory().device for e in self.models.values())

    def _host_used(self) -> int:
        return sum(e.memory().host for e in self.models.values())

    def _make_room(self, name: str, device: int, host: int, evict: Optional[str]) -> list:
        """Evict (with evict="lru") until `device` more device bytes and `host` more host bytes fit."""
        reports = []
        while not self._fits(device, host):
            victims = [n for n, e in self.models.items() if n != name and e.preempted is None]
            if evict != "lru" or not victims:
                raise OutOfDeviceMemory(
                    f"model {name!r} needs {device} device and {host} host bytes; in use: {self._device_used()} "
                    f"of {self._budget(self.device_budget)} device, {self._host_used()} of "
                    f"{self._budget(self.host_budget)} host" + ("" if evict == "lru" else "; pass evict='lru'")
                    + ("" if victims or evict != "lru" else "; nothing left to evict"))
            victim = victims[0]
            engine = self.models[victim]
            to_host = self.host_budget is None or \
                self._host_used() + host_copy_growth(engine) + host <= self.host_budget
            weights = "host" if to_host else "disk"
            log.warning("tidal: evicting %r (weights to %s) to make room for %r", victim, weights, name)
            reports.append(engine.preempt(weights=weights, kv="swap"))
        return reports

    def _fits(self, device: int, host: int) -> bool:
        ok_device = self.device_budget is None or self._device_used() + device <= self.device_budget
        ok_host = self.host_budget is None or self._host_used() + host <= self.host_budget
        return ok_device and ok_host

    @staticmethod
    def _budget(b) -> str:
        return "unlimited" if b is None else str(b)

    def _get(self, name: str) -> Engine:
        try:
            return self.models[name]
        except KeyError:
            raise ConfigError(f"no model named {name!r} (loaded: {list(self.models)})") from None


def _check_policy(evict) -> None:
    if evict not in EVICT_POLICIES:
        raise ConfigError(f"evict={evict!r} must be None or 'lru'")
