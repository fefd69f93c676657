"""What an action costs, as the cost policy predicts it (`Pricing`): each model's fitted `CostModel`, scaled by
the online correction learnt from the loop's measurements (`online.OnlineCorrection`). Torch-free."""
from __future__ import annotations

from ..errors import ConfigError
from ..policy import Load, Preempt, Resume
from .online import OnlineCorrection
from .state import ModelSnapshot, SetResidency, Snapshot, Step

TIERS = (("host", "swap"), ("host", "recompute"), ("disk", "swap"), ("disk", "recompute"))  # ties: the first
DISK_MARGIN = 0.5  # weights go to disk, when the host budget takes them, only for a round trip this much cheaper:
# a profile measures the disk read once, at one size, from a warm page cache (a lower bound of a cold read)


def require_cost_model(snapshot: Snapshot, m: ModelSnapshot):
    """`m`'s CostModel in the snapshot; ConfigError naming `m` when it has none with a decode step, or one
    fitted for another number of layers."""
    cm = snapshot.cost_models.get(m.name)
    if cm is None or getattr(cm, "step", None) is None:
        raise ConfigError(f"the cost policy needs a cost model with a decode step for model {m.name!r}; pass "
                          "add_model(..., cost_model=CostModel or profile.json path)")
    if m.num_layers and cm.step.num_layers != m.num_layers:
        raise ConfigError(f"model {m.name!r} has {m.num_layers} layers; its cost model was fitted for "
                          f"{cm.step.num_layers}")
    return cm


class Pricing:
    """Predicted seconds of actions; `online=False` leaves them the cost models' own."""

    def __init__(self, online: bool = True):
        if not isinstance(online, bool):
            raise ConfigError(f"online={online!r} must be a bool")
        self.correction = OnlineCorrection() if online else None

    def cost(self, snapshot: Snapshot, m: ModelSnapshot, resident: int, action) -> float | None:
        """Predicted seconds of `action` on `m` with `resident` layers resident before it (None: no cost model,
        or it cannot predict that). Step: a decode step of its batch; Preempt: `predict_preempt`; Resume:
        `predict_resume`'s first token (the loop's Resume includes the first step) or its total; Load: the
        resident weights read from disk; SetResidency: the demoted layers copied out or the promoted ones in.
        Steps, preemptions and resumes are scaled by the correction's factor."""
        return self.price(snapshot, m, resident, action)[0]

    def price(self, snapshot: Snapshot, m: ModelSnapshot, resident: int, action) -> tuple:
        """(corrected seconds, the cost model's own seconds, the correction's kind or None) of `action`."""
        raw = self._raw(snapshot.cost_models.get(m.name), m, resident, action)
        kind = self.sample_kind(m, resident, action)
        return self._scaled(m.name, kind, raw), raw, kind

    def _scaled(self, name: str, kind: str | None, seconds: float | None) -> float | None:
        if seconds is None or kind is None or self.correction is None:
            return seconds
        return seconds * self.correction.factor(name, kind)

    def step(self, cm, m: ModelSnapshot, resident: int) -> float:
        """A decode step of `m`'s batch (queued and in flight, at least 1) at `resident` layers, corrected."""
        step = Step(m.name)
        return self._scaled(m.name, self.sample_kind(m, resident, step), self._raw(cm, m, resident, step))

    def steps(self, cm, m: ModelSnapshot) -> list[float | None]:
        """`step` at every residency of `m`, 0 to its cost model's layers resident, from one prediction call."""
        step = Step(m.name)
        if getattr(cm, "step", None) is None:
            return [None] * (m.num_layers + 1)
        try:
            raw = cm.step.seconds_all(max(1, m.queued + m.in_flight), m.context)
        except ConfigError:
            raw = [None] * (cm.step.num_layers + 1)
        factors: dict = {}  # each kind's correction looked up once (a step has two)
        out = []
        for r, x in enumerate(raw):
            kind = self.sample_kind(m, r, step)
            if kind not in factors:
                factors[kind] = self._scaled(m.name, kind, 1.0)
            out.append(None if x is None else x * factors[kind])
        return out

    @staticmethod
    def sample_kind(m: ModelSnapshot, resident: int, action) -> str | None:
        """The correction's kind of `action` (None: not corrected)."""
        if isinstance(action, Step):
            return "step" if not m.num_layers or resident >= m.num_layers else "step_streamed"
        if isinstance(action, Preempt):
            return f"preempt_{action.weights}"
        if isinstance(action, Resume):
            return f"resume_{m.state.weights or 'host'}"
        return None

    def _raw(self, cm, m: ModelSnapshot, resident: int, action) -> float | None:
        if getattr(cm, "step", None) is None:
            return None
        w, n = cm.step.layer_bytes, cm.step.num_layers
        try:
            if isinstance(action, Step):
                return cm.predict_step(resident, max(1, m.queued + m.in_flight), m.context)
            if isinstance(action, Preempt):
                return cm.predict_preempt(resident * w, m.kv_bytes if action.kv == "swap" else 0, action.weights,
                                          action.kv)["total"]
            if isinstance(action, Resume):
                weights, kv = m.state.weights or "host", m.preempted_kv or "swap"
                r = self.resume(cm, m, resident, weights, kv)
                return r["first_token"] if r["first_token"] is not None else r["total"]
            if isinstance(action, Load):
                return cm.predict_transfer("weights_disk_in", resident * w)
            if isinstance(action, SetResidency):
                new = round(action.fraction * n)
                kind = "weights_host_out" if new < resident else "weights_host_in"
                return cm.predict_transfer(kind, abs(new - resident) * w) if new != resident else 0.0
            return 0.0  # Unload
        except ConfigError:
            return None

    @staticmethod
    def resume(cm, m: ModelSnapshot, resident: int, weights: str, kv: str) -> dict:
        """`CostModel.predict_resume` of `m` from this tier with `resident` layers resident."""
        w, n = cm.step.layer_bytes, cm.step.num_layers
        return cm.predict_resume((resident if weights == "host" else n) * w, m.kv_bytes if kv == "swap" else 0,
                                 weights, kv, m.context * m.in_flight if kv == "recompute" else 0,
                                 resident_layers=resident, batch=m.in_flight, context=m.context)

    def round_trip(self, cm, m: ModelSnapshot, resident: int, weights: str, kv: str) -> float:
        """Predicted seconds to preempt `m` to this tier and resume it (corrected as a preemption and a resume
        to that tier)."""
        out = cm.predict_preempt(resident * cm.step.layer_bytes, m.kv_bytes if kv == "swap" else 0, weights, kv)
        back = self.resume(cm, m, resident, weights, kv)["total"]
        return self._scaled(m.name, f"preempt_{weights}", out["total"]) + \
            self._scaled(m.name, f"resume_{weights}", back)

    def tier(self, cm, m: ModelSnapshot, resident: int, host_fits: bool) -> tuple[float, str, str] | None:
        """(predicted round trip, weights, kv) of the tier `m` is preempted to: the host whenever `host_fits`,
        unless disk's round trip is cheaper by DISK_MARGIN (its prediction is the profile's warm-cache read, and
        a host copy is no dearer to keep: the copy-out is the only term disk saves); KV swap or recompute,
        whichever is cheaper. None when no tier can be predicted."""
        best = {}
        for weights, kv in TIERS:
            if weights == "host" and not host_fits:
                continue
            try:
                seconds = self.round_trip(cm, m, resident, weights, kv)
            except ConfigError:
                continue
            if weights not in best or seconds < best[weights][0]:
                best[weights] = (seconds, weights, kv)
        host, disk = best.get("host"), best.get("disk")
        if host is not None and (disk is None or not disk[0] < (1 - DISK_MARGIN) * host[0]):
            return host
        return disk
