"""What the cost policy builds on: cost models from `add_model`, a candidate plan's predicted outcome
(`Estimate`), and a plan built one checked action at a time (`Plan`). Torch-free."""
from __future__ import annotations

import dataclasses
import os
from ..errors import ConfigError, StateError
from ..policy import Preempt
from .state import SetResidency, Snapshot, Step, set_residency


def load_cost_model(value, name: str):
    """`add_model(cost_model=...)`: a CostModel as given, or one fitted to every decode and preemption row of
    the profile.json at a path (`tidal.study.costfit`'s samples). ConfigError naming `name` otherwise."""
    from ..costmodel import CostModel

    if isinstance(value, (str, os.PathLike)):
        from ..study import costfit, schema

        doc = schema.load(value)
        try:
            value = CostModel.fit(costfit.decode_samples(doc), costfit.transfer_samples(doc))
        except ConfigError as exc:
            raise ConfigError(f"model {name!r}: no cost model could be fitted from {value}: {exc}") from None
    if not isinstance(value, CostModel) or value.step is None or value.step.a0 is None:
        raise ConfigError(f"model {name!r}: cost_model={value!r} must be a CostModel with a fitted decode step, "
                          "or the path of a profile.json")
    return value


def over(seconds, slo) -> float:
    return 0.0 if seconds is None or slo is None else max(0.0, seconds / slo - 1.0)


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A candidate plan's predicted outcome: `violation`, the sum over models with work of the relative
    overshoot of predicted TPOT and TTFT over their SLOs (0: every SLO met); `seconds`, the predicted time to
    finish the work queued now."""

    kind: str  # "co-residency" or "time-slicing"
    violation: float
    seconds: float

    def key(self) -> tuple[float, float]:
        return round(self.violation, 9), self.seconds


class Plan:
    """Actions built one at a time over the snapshot, each checked as `check_actions` checks it (a refused one
    raises and is not added), with each one's predicted seconds."""

    def __init__(self, policy, snapshot: Snapshot):  # policy: the CostScheduling whose `cost` prices actions
        self.policy, self.snapshot, self.view = policy, snapshot, snapshot.pool()
        self.resident = {m.name: m.resident_layers() for m in snapshot.models}
        self.actions, self.costs = [], []

    @property
    def seconds(self) -> float:
        return sum(c or 0.0 for c in self.costs)

    def add(self, action) -> None:
        m = self.snapshot.model(action.model)
        if isinstance(action, (Step, SetResidency)) and not self.view.model(m.name).state.active:
            raise StateError(f"{action}: {m.name!r} is not active")
        if isinstance(action, SetResidency):
            view, new = set_residency(self.view, m, self.resident[m.name], action.fraction)
        elif isinstance(action, Step):
            view, new = self.view, self.resident[m.name]
        else:
            request = None if isinstance(action, Preempt) else \
                dataclasses.replace(m, view=self.view.model(m.name)).need()
            view, new = dataclasses.replace(self.view, request=request).apply(action), self.resident[m.name]
        self.costs.append(self.policy.cost(self.snapshot, m, self.resident[m.name], action))
        self.view, self.resident[m.name] = view, new
        self.actions.append(action)
