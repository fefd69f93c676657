"""`tidal.Runtime`: several engines sharing one device under byte budgets, preempted and resumed by name.

The runtime admits a model only if the bytes it will hold fit: its device bytes (weights, streaming ring, KV
pool) within `device_budget_bytes`, and its host bytes (streamed weights, KV host pool, and the host copy
of anything preempted to the host) within `host_budget_bytes`. Before loading, it knows those bytes from
`Engine.placement`, which reads only the checkpoint's headers. Which models leave the device to make room is
a policy's decision (`policy.py`): the runtime gives it a frozen `PoolView`, checks the actions it returns
against that view, and applies them. `evict=None` preempts nothing and raises OutOfDeviceMemory with the
numbers; `evict="lru"` preempts active models, least recently used first, each keeping its host copy when
the host budget allows and going to disk otherwise; a Policy object decides for itself. The accounting is
pure bookkeeping over `Engine.memory()` and `Engine.placement()`; the engines move the bytes.
"""
from __future__ import annotations

import collections
import dataclasses
import logging

from .backends import resolve_device
from .engine import Engine
from .errors import ConfigError, OutOfDeviceMemory, StateError
from .policy import ACTIONS, ModelState, ModelView, Policy, PoolView, Preempt, Request, resolve, serve
from .engine import residency
from .engine.preemption import host_copy_growth, staging_bytes

log = logging.getLogger("tidal")


@dataclasses.dataclass(frozen=True)
class ModelStatus:
    state: ModelState  # ACTIVE, PREEMPTED_HOST, PREEMPTED_DISK or PREEMPTED_KEEP
    device_bytes: int
    host_bytes: int
    disk_bytes: int
    running_requests: int  # admitted and not finished: running, swapped or waiting to resume
    waiting_requests: int
    kv: str | None = None  # the KV mode of the preemption ("swap" or the engine's word for recompute)

    @property
    def active(self) -> bool:
        return self.state.active

    @property
    def preempted(self) -> bool:
        return self.state.preempted

    @property
    def weights(self) -> str | None:
        """Where a preempted model's weights went ("host", "disk", "keep"); None while active."""
        return self.state.weights

    def __str__(self) -> str:
        state = "active" if self.active else f"preempted (weights={self.weights}, kv={self.kv})"
        return (f"{state}: {self.device_bytes} device, {self.host_bytes} host, {self.disk_bytes} disk bytes; "
                f"{self.running_requests} running, {self.waiting_requests} waiting requests")


class Runtime:
    """A pool of models on one device under byte budgets: the mechanism. `load`, `generate`, `preempt`,
    `resume`, `unload` and `status` take a model's name. Budgets are in bytes; None means no limit on that tier.

    It keeps the books (each model's bytes per tier, its use order) and moves models when told to. It decides
    nothing: which models a load or resume preempts comes from the policy passed as `evict=` (`policy.py`).
    The name stays `Runtime`, not "Pool", although a scheduler will sit above it: what it runs is the pool's
    mechanism, and `tidal.Runtime(device_budget_bytes=..., host_budget_bytes=...)` is the object a
    `tidal.Scheduler` is built over (issue 14)."""

    def __init__(self, device=None, device_budget_bytes: int | None = None, host_budget_bytes: int | None = None):
        for name, value in (("device_budget_bytes", device_budget_bytes), ("host_budget_bytes", host_budget_bytes)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ConfigError(f"{name}={value!r} must be an int >= 0 or None")
        self.device = resolve_device(device)
        self.device_budget, self.host_budget = device_budget_bytes, host_budget_bytes
        self.models: collections.OrderedDict[str, Engine] = collections.OrderedDict()  # least recently used first
        self._active_bytes: dict[str, tuple[int, int]] = {}  # name -> (device, host) once loaded and active

    # -- the API ---------------------------------------------------------------------------------------------
    def load(self, name: str, path, evict: None | str | Policy = None, **engine_kwargs) -> list:
        """Load the checkpoint at `path` as `name`; returns the PreemptionReports of models evicted for it.
        `evict`: None, "lru" or a Policy (see `policy.resolve`). `engine_kwargs` go to `Engine.from_pretrained`;
        an emulated `link=` paces this model's copies alone."""
        if not isinstance(name, str) or not name:
            raise ConfigError(f"name={name!r} must be a non-empty string")
        if name in self.models:
            raise ConfigError(f"a model named {name!r} is loaded already; unload it first")
        policy = resolve(evict)
        if "device" in engine_kwargs:
            raise ConfigError("device is the runtime's; pass it to Runtime(device=...)")
        if self.device_budget is not None and engine_kwargs.get("kv_cache_bytes") is None:
            raise ConfigError("with a device budget, give each model's kv_cache_bytes")
        placement = Engine.placement(path, device=self.device, **engine_kwargs)
        need = placement.footprint
        loading = ModelView(name, ModelState.UNLOADED, 0, 0, need.device, need.host, last_used=len(self.models))
        reports = self._evict_for(Request(name, need.device, need.host), policy, loading)
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

    def resume(self, name: str, pipelined: bool = True, evict: None | str | Policy = None):
        """Resume model `name`; returns (ResumeReport, PreemptionReports of the models evicted for it)."""
        engine = self._get(name)
        if engine.preempted is None:
            raise StateError(f"model {name!r} is not preempted")
        policy = resolve(evict)
        active_device, active_host = self._active_bytes[name]
        now = engine.memory()
        # a disk resume stages the device regions in host memory while it runs: that must fit too
        host_peak = max(0, active_host - now.host) + staging_bytes(engine)
        reports = self._evict_for(Request(name, active_device - now.device, host_peak), policy)
        report = engine.resume(pipelined=pipelined)
        self.models.move_to_end(name)
        return report, reports

    def set_residency(self, name: str, resident_fraction: float | None = None, resident_layers=None,
                      device_bytes: int | None = None, *, wait: bool = False):
        """`Engine.set_residency` on the active model `name`, checked first: the bytes it will hold once the
        change has landed (`residency.footprint`) must fit the budgets with the other models'. ConfigError
        for bad arguments, OutOfDeviceMemory naming the numbers; either way nothing changes. Returns the
        ResidencyReport; the model's active bytes follow."""
        engine = self._get(name)
        if engine.preempted is not None:
            raise StateError(f"model {name!r} is preempted; resume it before changing its residency")
        plan = residency.new_plan(engine, resident_fraction, resident_layers, device_bytes)
        now, after = engine.memory(), residency.footprint(engine, plan)
        for tier, budget, used, mine, need in (
                ("device", self.device_budget, self._device_used(), now.device, after.device),
                ("host", self.host_budget, self._host_used(), now.host, after.host)):
            if budget is not None and need > mine and used - mine + need > budget:
                raise OutOfDeviceMemory(
                    f"model {name!r} under {plan} needs {need} {tier} bytes (it holds {mine}); with the other "
                    f"models' {used - mine} that is {used - mine + need}, over the {tier} budget of {budget}; "
                    f"nothing was changed")
        report = engine.set_residency(resident_layers=plan.resident_layers, wait=wait)
        used = engine.memory()
        self._active_bytes[name] = (used.device, used.host)
        return report

    def unload(self, name: str) -> None:
        self._get(name).close()
        del self.models[name]
        del self._active_bytes[name]

    def status(self) -> dict[str, ModelStatus]:
        out = {}
        for name, engine in self.models.items():
            m = engine.memory()
            p = engine.preempted
            running, waiting = _request_counts(engine)
            out[name] = ModelStatus(_state(engine), m.device, m.host, m.disk, running, waiting,
                                    kv=None if p is None else p.kv)
        return out

    def close(self) -> None:
        for name in list(self.models):
            self.unload(name)

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- budgets ---------------------------------------------------------------------------------------------
    def _device_used(self) -> int:
        return sum(e.memory().device for e in self.models.values())

    def _host_used(self) -> int:
        return sum(e.memory().host for e in self.models.values())

    def view(self, request: Request | None = None) -> PoolView:
        """A frozen snapshot of the pool (budgets, every loaded model's state and bytes), as a policy sees it;
        `request` is the model that needs room, if any."""
        return self._view(request)

    def _view(self, request: Request | None, loading: ModelView | None = None) -> PoolView:
        """The frozen snapshot a policy decides on; `loading` is the model a load would add."""
        models = []
        for rank, (name, engine) in enumerate(self.models.items()):  # least recently used first
            m = engine.memory()
            running, waiting = _request_counts(engine)
            active_device, active_host = self._active_bytes[name]
            models.append(ModelView(
                name, _state(engine), m.device, m.host, active_device, active_host,
                host_copy_bytes=host_copy_growth(engine), host_release_bytes=engine.weights.host_bytes,
                last_used=rank, running_requests=running, waiting_requests=waiting))
        if loading is not None:
            models.append(loading)
        return PoolView(self.device_budget, self.host_budget, tuple(models), request)

    def _evict_for(self, request: Request, policy, loading: ModelView | None = None) -> list:
        """Ask `policy` what to preempt so that `request` fits, check the whole plan against the snapshot (an
        action it cannot apply raises and nothing changes), then preempt; returns the PreemptionReports."""
        view = self._view(request, loading)
        preempts = _check_plan(policy, view, policy.decide(view))
        reports = []
        for action in preempts:
            log.warning("tidal: evicting %r (weights to %s) to make room for %r", action.model, action.weights,
                        request.model)
            reports.append(self.models[action.model].preempt(weights=action.weights, kv=action.kv))
        if not self._fits(request.device_bytes, request.host_bytes):  # the engines freed less than the view said
            raise OutOfDeviceMemory(
                f"model {request.model!r} needs {request.device_bytes} device and {request.host_bytes} host bytes; "
                f"after preempting {[a.model for a in preempts]} {self._device_used()} device and "
                f"{self._host_used()} host bytes are in use, more than policy {policy!r} was told")
        return reports

    def _fits(self, device: int, host: int) -> bool:
        ok_device = self.device_budget is None or self._device_used() + device <= self.device_budget
        ok_host = self.host_budget is None or self._host_used() + host <= self.host_budget
        return ok_device and ok_host

    def _get(self, name: str) -> Engine:
        try:
            return self.models[name]
        except KeyError:
            raise ConfigError(f"no model named {name!r} (loaded: {list(self.models)})") from None


def _state(engine) -> ModelState:
    p = engine.preempted
    return ModelState.ACTIVE if p is None else ModelState.preempted_to(p.weights)


def _request_counts(engine) -> tuple[int, int]:
    """(running, waiting): running counts every request admitted and not finished."""
    waiting = len(engine.waiting)
    total = engine.num_unfinished
    return total - waiting, waiting


def _check_plan(policy, view: PoolView, actions) -> list[Preempt]:
    """The plan's Preempts, once every action is known to apply to `view` in order and the last one is the
    request's own Load or Resume; otherwise a tidal error, before anything has changed."""
    who = f"policy {policy!r}"
    if not isinstance(actions, (list, tuple)):
        raise ConfigError(f"{who} returned {actions!r}, not a list of actions; nothing was changed")
    actions = list(actions)
    for action in actions:
        if not isinstance(action, ACTIONS):
            raise ConfigError(f"{who} returned {action!r}, not a Preempt, Load or Resume; nothing was changed")
    want = serve(view)
    if not actions or actions[-1] != want:
        raise StateError(f"{who} returned [{', '.join(map(str, actions))}]: the plan must end with {want}; "
                         "nothing was changed")
    now = view
    for i, action in enumerate(actions):
        if i < len(actions) - 1 and not isinstance(action, Preempt):
            raise StateError(f"{who}: {action} before {want}; the runtime applies only Preempts there; "
                             "nothing was changed")
        try:
            now = now.apply(action)
        except (StateError, OutOfDeviceMemory) as exc:
            raise type(exc)(f"{who}: cannot apply {action}: {exc}; nothing was changed") from None
    return actions[:-1]
