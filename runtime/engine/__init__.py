"""The engine, one role per module: `request` (a request, its states, a step's output), `batcher` (the
queues and each step's batching decisions, no tensors), `placement` (settings and where the bytes go),
`stats` (counters), `engine` (construction, and `step()`: batch, run, emit), `preemption` and `reports` (a
whole model leaving the device and coming back, and what that cost), `residency` (layers moving between
the device and streaming while requests decode).

The names are imported on first use (PEP 562 `__getattr__`), so that the bookkeeping (`request`, `batcher`,
`stats`, `reports`) imports without torch, for a simulator or a policy to reuse."""
from __future__ import annotations

import importlib

# public name -> the submodule that defines it
_EXPORTS = {"Engine": ".engine", "Batcher": ".batcher", "Request": ".request", "RequestState": ".request",
            "StepOutput": ".request", "Counters": ".stats", "EngineStats": ".stats",
            "PreemptionReport": ".reports", "ResumeReport": ".reports", "ResidencyReport": ".reports",
            "EngineConfig": ".placement",
            "Footprint": ".placement", "Placement": ".placement", "CPU_KV_BYTES": ".placement",
            "HOST_KV_CAP": ".placement", "CUDA_KV_FRACTION": ".placement", "CUDA_HEADROOM": ".placement"}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tidal.engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
