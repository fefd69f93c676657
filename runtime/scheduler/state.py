"""What a scheduling policy sees and what it may return: the frozen `Snapshot` of one tick, and the actions.

Torch-free: this module imports only `tidal.policy`, `tidal.modes` and `tidal.errors`, so that a simulator
builds snapshots and applies actions without an engine.

The actions are `policy.py`'s `Preempt`, `Load` and `Resume` (one way to move a model), and the scheduler's
own: `Step` (one batching step of a model's engine), `SetResidency` (change how much of an active model's
weights stay on the device) and `Unload` (close its engine; it stays registered and can be loaded again).
`check_actions` replays a list over a snapshot and refuses one the state does not allow, before the loop
applies anything.
"""
from __future__ import annotations

import dataclasses
import functools
import types
from typing import Mapping

from ..errors import ConfigError, OutOfDeviceMemory, StateError
from ..policy import Load, ModelState, ModelView, PoolView, Preempt, Request, Resume


ARRIVAL_WINDOW_S = 10.0  # a model's arrival rate in the snapshot: its submissions over the last this many seconds


def layer_device_bytes(resident: int, num_layers: int, layer_bytes: int, ring_slots: int) -> int:
    """Device bytes of a model's decoder layers with `resident` of them resident: those layers, plus the
    streaming ring's slots when any layer streams."""
    return (resident + min(ring_slots, num_layers - resident)) * layer_bytes


# -- the snapshot ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ModelSnapshot:
    """One registered model at one tick. `view` is `policy.py`'s ModelView: its state (UNLOADED when registered
    but not loaded), its bytes now and while active, and `last_used` (the tick it last ran; -1 never)."""

    view: ModelView
    resident_fraction: float  # of its decoder layers kept on the device while active
    queued: int = 0  # submitted, not yet handed to its engine
    in_flight: int = 0  # handed to its engine, not finished
    oldest_age_s: float | None = None  # age of its oldest unfinished request; None without work
    waited_s: float = 0.0  # seconds it has had work without a step (0 without work)
    skipped_ticks: int = 0  # ticks in a row it had work and was not stepped
    resume_staging_bytes: int = 0  # host bytes a resume holds while it runs (weights read back from disk)
    # what the cost policy reads (the others ignore it); defaults: unknown / none
    slo_ttft_s: float | None = None  # its SLO on time to first token (None: none)
    slo_tpot_s: float | None = None  # its SLO on time per output token (None: none)
    context: int = 0  # mean tokens (prompt + generated) of its unfinished requests
    remaining_tokens: int = 0  # most tokens any unfinished request may still generate (max_new_tokens left)
    kv_bytes: int = 0  # device KV bytes its in-flight requests hold (what a swap moves)
    first_token_wait_s: float | None = None  # age of its oldest request without a token yet; None: none
    first_token_waiting: int = 0  # its unfinished requests without a token yet
    active_s: float = 0.0  # seconds since it was last loaded or resumed (0 when not active)
    preempted_kv: str | None = None  # the KV mode of its preemption ("swap", "recompute"); None if not preempted
    ring_slots: int = 3  # layer slots its streaming ring holds when a layer streams (prefetch_depth + 1)
    num_layers: int = 0  # decoder layers (0: unknown; a SetResidency then changes no bytes in `check_actions`)
    layer_bytes: int = 0  # device bytes of one decoder layer
    arrival_rate: float = 0.0  # requests a second submitted to it lately (ARRIVAL_WINDOW_S): work to come

    @property
    def name(self) -> str:
        return self.view.name

    @property
    def state(self) -> ModelState:
        return self.view.state

    @property
    def has_work(self) -> bool:
        return self.queued + self.in_flight > 0

    def resident_layers(self, fraction: float | None = None) -> int:
        """Decoder layers resident at `fraction` (default: now), rounded as `ResidencyPlan.from_fraction`."""
        return round((self.resident_fraction if fraction is None else fraction) * self.num_layers)

    def layer_device_bytes(self, resident: int) -> int:
        """Device bytes of its decoder layers with `resident` of them resident (`layer_device_bytes`)."""
        return layer_device_bytes(resident, self.num_layers, self.layer_bytes, self.ring_slots)

    def residency_change(self, old: int, new: int) -> tuple[int, int]:
        """(device, host) bytes a change from `old` to `new` resident layers adds (negative: frees). The host
        side counts a new host copy of every demoted layer (an upper bound: a layer that streamed before, or a
        kept host copy, needs none); promotions keep their host copies."""
        device = self.layer_device_bytes(new) - self.layer_device_bytes(old)
        return device, max(0, old - new) * self.layer_bytes

    def need(self, view: ModelView | None = None) -> Request:
        """The device and host bytes a Load or Resume of this model needs (staging included), from its `view` or
        the one given (the model as a plan has left it so far)."""
        v = self.view if view is None else view
        return Request(v.name, max(0, v.active_device_bytes - v.device_bytes),
                       max(0, v.active_host_bytes - v.host_bytes) + self.resume_staging_bytes)


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """The scheduler's state at one tick, as a policy sees it: `time` (seconds since the scheduler started),
    `tick`, the budgets in bytes (None: no limit), every registered model, and optional cost models by name
    (`tidal.costmodel.CostModel`; a policy without one ignores them)."""

    time: float
    tick: int
    device_budget: int | None
    host_budget: int | None
    models: tuple[ModelSnapshot, ...]
    cost_models: Mapping[str, object] = dataclasses.field(default_factory=lambda: types.MappingProxyType({}))

    @functools.cached_property
    def _by_name(self) -> dict[str, ModelSnapshot]:  # a policy looks models up by name many times a tick
        return {m.name: m for m in reversed(self.models)}  # the first of a name wins, as a scan would find it

    def model(self, name: str) -> ModelSnapshot:
        m = self._by_name.get(name)
        if m is not None:
            return m
        raise StateError(f"no model named {name!r} (registered: {[m.name for m in self.models]})")

    def pool(self, request: Request | None = None) -> PoolView:
        """The models as `policy.py`'s PoolView, for its policies' choices and `PoolView.apply`."""
        return PoolView(self.device_budget, self.host_budget, tuple(m.view for m in self.models), request)

    @property
    def with_work(self) -> list[ModelSnapshot]:
        return [m for m in self.models if m.has_work]


# -- the scheduler's actions -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Step:
    """Run one batching step of `model` (active), after handing its queued requests to its engine."""

    model: str

    def __str__(self) -> str:
        return f"Step({self.model!r})"


@dataclasses.dataclass(frozen=True)
class SetResidency:
    """Keep `fraction` of the active `model`'s decoder layers on the device (`Runtime.set_residency`)."""

    model: str
    fraction: float

    def __post_init__(self):
        f = self.fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f <= 1.0:
            raise ConfigError(f"SetResidency fraction={f!r} must be a number in [0, 1]")

    def __str__(self) -> str:
        return f"SetResidency({self.model!r}, {self.fraction})"


@dataclasses.dataclass(frozen=True)
class Unload:
    """Close `model`'s engine (it stays registered; a later Load brings it back). Only without requests in
    flight: those would be lost."""

    model: str

    def __str__(self) -> str:
        return f"Unload({self.model!r})"


ACTIONS = (Step, SetResidency, Preempt, Resume, Load, Unload)


def check_actions(snapshot: Snapshot, actions) -> list:
    """`actions` as a list once each applies, in order, to the state the ones before it leave; otherwise
    StateError or OutOfDeviceMemory naming the action, before anything is applied."""
    if not isinstance(actions, (list, tuple)):
        raise ConfigError(f"a policy returned {actions!r}, not a list of actions")
    view = snapshot.pool()
    resident = {m.name: m.resident_layers() for m in snapshot.models}
    for action in actions:
        if not isinstance(action, ACTIONS):
            raise ConfigError(f"a policy returned {action!r}, not one of {[a.__name__ for a in ACTIONS]}")
        m = view.model(action.model)  # StateError for an unknown model
        try:
            if isinstance(action, (Preempt, Load, Resume)):
                request = None if isinstance(action, Preempt) else _need(snapshot, m)
                view = dataclasses.replace(view, request=request).apply(action)
            elif isinstance(action, Unload):
                if snapshot.model(m.name).in_flight:
                    raise StateError(f"{m.name!r} has {snapshot.model(m.name).in_flight} requests in flight")
                if m.state is ModelState.UNLOADED:
                    raise StateError(f"{m.name!r} is not loaded")
                gone = dataclasses.replace(m, state=ModelState.UNLOADED, device_bytes=0, host_bytes=0)
                view = dataclasses.replace(view, models=tuple(gone if x.name == m.name else x for x in view.models))
            elif not m.state.active:  # Step, SetResidency
                raise StateError(f"{m.name!r} is not active ({m.state.name})")
            elif isinstance(action, SetResidency):
                view, resident[m.name] = set_residency(view, snapshot.model(m.name), resident[m.name],
                                                       action.fraction)
        except (StateError, OutOfDeviceMemory) as exc:
            raise type(exc)(f"cannot apply {action}: {exc}; nothing was applied") from None
    return list(actions)


def _need(snapshot: Snapshot, m: ModelView) -> Request:
    s = snapshot.model(m.name)
    return s.need(m)


def set_residency(view: PoolView, m: ModelSnapshot, old: int, fraction: float) -> tuple[PoolView, int]:
    """The view after `SetResidency(m, fraction)` on the active model `m` with `old` layers resident, and its
    resident layers then (`ModelSnapshot.residency_change`; no bytes change when its layers are unknown).
    OutOfDeviceMemory when what it adds does not fit the budgets."""
    new = m.resident_layers(fraction)
    device, host = m.residency_change(old, new)
    if not view.fits(max(0, device), host):
        raise OutOfDeviceMemory(f"{new}/{m.num_layers} resident layers add {device} device and {host} host bytes; "
                                f"in use: {view.device_used} of {view.device_budget} device, {view.host_used} of "
                                f"{view.host_budget} host")
    v = view.model(m.name)
    v = dataclasses.replace(v, device_bytes=v.device_bytes + device, active_device_bytes=v.active_device_bytes + device,
                            host_bytes=v.host_bytes + host, active_host_bytes=v.active_host_bytes + host)
    return dataclasses.replace(view, models=tuple(v if x.name == m.name else x for x in view.models)), new
