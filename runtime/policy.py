"""Which models leave the device, and how, so that another fits: policies as decisions over a snapshot.

A policy reads a `PoolView` (frozen: the budgets, every model's state and bytes, and the request: which model
needs how many more device and host bytes to load or resume) and returns a list of actions: `Preempt`s,
ending with the request's own `Load` or `Resume`. It changes nothing. `tidal.Runtime` builds the view,
validates the plan against it (`PoolView.apply`, which refuses an action the state does not allow) and
applies it; a trace-driven simulator can run the same policy objects over views it builds itself.

Torch-free: this module imports only `tidal.errors` and `tidal.modes`.

Bytes after a preemption, as the engines behave (`preemption.preempt`): a model preempted with its weights
to the host or to disk holds no device bytes. To the host it holds `host_copy_bytes` more host bytes (a
pinned copy of its device regions; 0 when it keeps one already). To disk it releases `host_release_bytes`
(its weights' host arenas) and keeps its KV host pool.
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Protocol, runtime_checkable

from .errors import ConfigError, OutOfDeviceMemory, StateError
from .modes import KV_MODES, check_modes

SWAP = KV_MODES[0]  # "swap": the KV mode of today's evictions


class ModelState(enum.Enum):
    """Where a model is. Shown to people through `ModelStatus.__str__`, never stored as text."""

    UNLOADED = enum.auto()  # known to the pool, not loaded: only in a view, as the model a Load brings in
    ACTIVE = enum.auto()
    PREEMPTED_HOST = enum.auto()  # weights in a host copy
    PREEMPTED_DISK = enum.auto()  # weights only in the checkpoint
    PREEMPTED_KEEP = enum.auto()  # weights kept on the device, KV gone (`Runtime.preempt(weights="keep")`)

    @property
    def active(self) -> bool:
        return self is ModelState.ACTIVE

    @property
    def preempted(self) -> bool:
        return self in _PREEMPTED.values()

    @property
    def weights(self) -> str | None:
        """The weights mode of a preemption ("host", "disk", "keep"); None when not preempted."""
        for mode, state in _PREEMPTED.items():
            if state is self:
                return mode
        return None

    @staticmethod
    def preempted_to(weights: str) -> ModelState:
        check_modes(weights=weights)
        return _PREEMPTED[weights]


_PREEMPTED = {"host": ModelState.PREEMPTED_HOST, "disk": ModelState.PREEMPTED_DISK,
              "keep": ModelState.PREEMPTED_KEEP}


# -- the snapshot ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ModelView:
    """One model in a `PoolView`. Bytes are what it holds now; `active_*` what it holds while active."""

    name: str
    state: ModelState
    device_bytes: int
    host_bytes: int
    active_device_bytes: int
    active_host_bytes: int
    host_copy_bytes: int = 0  # host bytes a preemption to the host adds
    host_release_bytes: int = 0  # host bytes a preemption to disk releases
    last_used: float = 0  # any increasing measure of last use: the runtime gives its rank, a simulator a time
    running_requests: int = 0
    waiting_requests: int = 0
    pinned: bool = False  # never chosen as a victim (a scheduler pins a model with work in flight)


@dataclasses.dataclass(frozen=True)
class Request:
    """`model` needs `device_bytes` more device bytes and `host_bytes` more host bytes (a disk resume's staging
    included) to be loaded (its state is UNLOADED) or resumed (it is preempted)."""

    model: str
    device_bytes: int
    host_bytes: int


@dataclasses.dataclass(frozen=True)
class PoolView:
    """The pool as a policy sees it: budgets in bytes (None: no limit on that tier), the models, the request."""

    device_budget: int | None
    host_budget: int | None
    models: tuple[ModelView, ...]
    request: Request | None = None

    @property
    def device_used(self) -> int:
        return sum(m.device_bytes for m in self.models)

    @property
    def host_used(self) -> int:
        return sum(m.host_bytes for m in self.models)

    def fits(self, device: int, host: int) -> bool:
        """Whether `device` more device bytes and `host` more host bytes fit the budgets."""
        ok_device = self.device_budget is None or self.device_used + device <= self.device_budget
        ok_host = self.host_budget is None or self.host_used + host <= self.host_budget
        return ok_device and ok_host

    def model(self, name: str) -> ModelView:
        for m in self.models:
            if m.name == name:
                return m
        raise StateError(f"no model named {name!r} in the pool (models: {[m.name for m in self.models]})")

    def lru_order(self) -> list[ModelView]:
        """Least recently used first; ties by name."""
        return sorted(self.models, key=lambda m: (m.last_used, m.name))

    def apply(self, action: Action) -> PoolView:
        """The view after `action`. StateError for an action this state does not allow; OutOfDeviceMemory for a
        Preempt to the host that the host budget cannot take, or a Load/Resume that does not fit."""
        m = self.model(action.model)
        if isinstance(action, Preempt):
            if not m.state.active:
                raise StateError(f"{action}: model {m.name!r} is not active ({m.state.name})")
            if self.request is not None and m.name == self.request.model:
                raise StateError(f"{action}: {m.name!r} is the model the room is for")
            if m.pinned:
                raise StateError(f"{action}: model {m.name!r} is pinned")
            if action.weights == "host":
                if self.host_budget is not None and self.host_used + m.host_copy_bytes > self.host_budget:
                    raise OutOfDeviceMemory(f"{action} needs up to {m.host_copy_bytes} host bytes; {self.host_used} "
                                            f"of {self.host_budget} are in use (use weights='disk')")
                new = dataclasses.replace(m, state=ModelState.PREEMPTED_HOST, device_bytes=0,
                                          host_bytes=m.host_bytes + m.host_copy_bytes)
            else:
                new = dataclasses.replace(m, state=ModelState.PREEMPTED_DISK, device_bytes=0,
                                          host_bytes=m.host_bytes - m.host_release_bytes)
            request = self.request
        else:
            want = ModelState.UNLOADED if isinstance(action, Load) else None
            if (want is not None and m.state is not want) or (want is None and not m.state.preempted):
                raise StateError(f"{action}: model {m.name!r} is {m.state.name}")
            need = self.request if self.request is not None and self.request.model == m.name else \
                Request(m.name, m.active_device_bytes - m.device_bytes, m.active_host_bytes - m.host_bytes)
            if not self.fits(need.device_bytes, need.host_bytes):
                raise OutOfDeviceMemory(f"{action} needs {need.device_bytes} device and {need.host_bytes} host bytes; "
                                        f"in use: {self.device_used} of {_budget(self.device_budget)} device, "
                                        f"{self.host_used} of {_budget(self.host_budget)} host")
            new = dataclasses.replace(m, state=ModelState.ACTIVE, device_bytes=m.active_device_bytes,
                                      host_bytes=m.active_host_bytes)
            request = None if self.request is not None and self.request.model == m.name else self.request
        models = tuple(new if x.name == m.name else x for x in self.models)
        return dataclasses.replace(self, models=models, request=request)


# -- actions ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Preempt:
    """Move `model` off the device: weights to the "host" or "disk", KV "swap"ped or "recompute"d at resume."""

    model: str
    weights: str = "host"
    kv: str = SWAP

    def __post_init__(self):
        check_modes(weights=self.weights, kv=self.kv)
        if self.weights == "keep":
            raise ConfigError("a policy's Preempt frees the device: weights='host' or 'disk', not 'keep'")

    def __str__(self) -> str:
        return f"Preempt({self.model!r}, weights={self.weights!r}, kv={self.kv!r})"


@dataclasses.dataclass(frozen=True)
class Load:
    """Load `model` (the request's, when it is UNLOADED)."""

    model: str

    def __str__(self) -> str:
        return f"Load({self.model!r})"


@dataclasses.dataclass(frozen=True)
class Resume:
    """Resume the preempted `model`."""

    model: str

    def __str__(self) -> str:
        return f"Resume({self.model!r})"


Action = Preempt | Load | Resume
ACTIONS = (Preempt, Load, Resume)


@runtime_checkable
class Policy(Protocol):
    """`decide(view)`: the actions that serve `view.request`, in order; it changes nothing. A policy that cannot
    serve the request raises OutOfDeviceMemory saying why."""

    def decide(self, view: PoolView) -> list: ...


def serve(view: PoolView) -> Action:
    """The request's own action: Load an UNLOADED model, Resume a preempted one."""
    m = view.model(view.request.model)
    return Load(m.name) if m.state is ModelState.UNLOADED else Resume(m.name)


def _budget(b) -> str:
    return "unlimited" if b is None else str(b)


def _no_room(view: PoolView, hint: str) -> OutOfDeviceMemory:
    r = view.request
    return OutOfDeviceMemory(
        f"model {r.model!r} needs {r.device_bytes} device and {r.host_bytes} host bytes; in use: {view.device_used} "
        f"of {_budget(view.device_budget)} device, {view.host_used} of {_budget(view.host_budget)} host" + hint)


# -- policies --------------------------------------------------------------------------------------------------
class NoEviction:
    """`evict=None`: serve the request if it fits, preempt nothing."""

    def decide(self, view: PoolView) -> list:
        r = view.request
        if not view.fits(r.device_bytes, r.host_bytes):
            raise _no_room(view, "; pass evict='lru'")
        return [serve(view)]

    def __repr__(self) -> str:
        return "NoEviction()"


class LruPolicy:
    """`evict="lru"`: preempt active models, least recently used first (ties by name), until the request fits.
    Each victim's weights go to the host when the host budget can take its copy as well as the request's host
    bytes, to disk otherwise; its KV is swapped. If preempting every active model (pinned ones and the request's
    own aside) would not make room, it raises OutOfDeviceMemory and the plan is not applied at all."""

    def decide(self, view: PoolView) -> list:
        r = view.request
        actions, now = [], view
        while not now.fits(r.device_bytes, r.host_bytes):
            victims = [m for m in now.lru_order() if m.state.active and m.name != r.model and not m.pinned]
            if not victims:
                hint = "; nothing left to evict" if not actions else \
                    f"; preempting every active model ({len(actions)}) would not make room, so none was"
                raise _no_room(view, hint)
            m = victims[0]
            to_host = now.host_budget is None or now.host_used + m.host_copy_bytes + r.host_bytes <= now.host_budget
            action = Preempt(m.name, weights="host" if to_host else "disk", kv=SWAP)
            actions.append(action)
            now = now.apply(action)
        return actions + [serve(view)]

    def __repr__(self) -> str:
        return "LruPolicy()"


POLICIES = {None: NoEviction, "lru": LruPolicy}


def resolve(evict) -> Policy:
    """The policy for `evict=`: None, "lru", or a Policy object (anything with `decide(view)`)."""
    if isinstance(evict, Policy) and not isinstance(evict, type):
        return evict
    try:
        return POLICIES[evict]()
    except (KeyError, TypeError):
        raise ConfigError(f"evict={evict!r} must be None, 'lru' or a Policy (an object with decide(view))") from None
