"""`tidal.Scheduler`: one control loop over a `tidal.Runtime`, scheduling requests across its models.

Two words at two levels: inside one model the engine *batches* (`engine/batcher.py` decides each step's
batch); across models the scheduler *schedules* (which model is on the device, how much of it, and which
models step at each tick). The policies (`policies.py`) read a frozen `Snapshot` and return actions
(`state.py`); the loop (`loop.py`) applies them through the Runtime. The policies, the snapshot and the
actions import without torch, so that a simulator runs the same objects; `Scheduler` itself (it touches
engines) is imported on first use. See docs/SCHEDULER.md.
"""
from __future__ import annotations

import importlib

from .cost import CostScheduling  # registers "cost" in POLICIES
from .policies import POLICIES, Aging, ExclusiveScheduling, LruScheduling, SchedulingPolicy, resolve
from .requests import ScheduledRequest, Trace
from .state import ACTIONS, ModelSnapshot, SetResidency, Snapshot, Step, Unload, check_actions

__all__ = ["Scheduler", "Aging", "ExclusiveScheduling", "LruScheduling", "CostScheduling", "SchedulingPolicy", "POLICIES", "resolve",
           "ScheduledRequest", "Trace", "ACTIONS", "ModelSnapshot", "SetResidency", "Snapshot", "Step", "Unload",
           "check_actions"]


def __getattr__(name: str):
    if name == "Scheduler":  # imports the engines, and torch with them
        value = importlib.import_module(".loop", __name__).Scheduler
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tidal.scheduler' has no attribute {name!r}")
