"""The words for what happens to a model's weights and KV when it leaves the device, defined once (torch-free:
the cost model, the policies and the simulator import them without torch).

A model is *preempted* (it leaves the device; `Engine.preempt`) and *resumed*. Its weights go to the `host`
(a pinned copy, resumed by a copy), to `disk` (nothing kept; resumed from the checkpoint) or `keep` (stay on
the device). Its KV is `swap`ped to host memory, or dropped and computed again at resume: `recompute`.
Inside one engine a request whose KV no longer fits is *suspended*, with the same two KV modes.
"""
from __future__ import annotations

from .errors import ConfigError

WEIGHT_MODES = ("host", "disk", "keep")
KV_MODES = ("swap", "recompute")


def check_modes(weights: str | None = None, kv: str | None = None) -> None:
    """ConfigError naming the argument for a weights or KV mode that is not one of the above."""
    if weights is not None and weights not in WEIGHT_MODES:
        raise ConfigError(f"weights={weights!r} must be one of {WEIGHT_MODES}")
    if kv is not None and kv not in KV_MODES:
        hint = ' (it was called "drop" before)' if kv == "drop" else ""
        raise ConfigError(f"kv={kv!r} must be one of {KV_MODES}{hint}")
