"""The engine, one role per module: `request` (a request, its states, a step's output), `batcher` (the
queues and each step's batching decisions, no tensors), `placement` (settings and where the bytes go),
`stats` (counters), `engine` (construction, and `step()`: batch, run, emit), `preemption` and `reports` (a
whole model leaving the device and coming back, and what that cost), `residency` (layers moving between
the device and streaming while requests decode).

The names are imported on first use (PEP 562 `__getattr__`), so that the bookkeeping (`request`, `batcher`,
`stats`, `reports`) imports without torch, for a simulator or a policy to reuse."""
from __future__ import annotations

from ..lazy import exports

# public name -> the submodule that defines it
_EXPORTS = {"Engine": ".engine", "Batcher": ".batcher", "Request": ".request", "RequestState": ".request",
            "StepOutput": ".request", "Counters": ".stats", "EngineStats": ".stats",
            "PreemptionReport": ".reports", "ResumeReport": ".reports", "ResidencyReport": ".reports",
            "EngineConfig": ".placement",
            "Footprint": ".placement", "Placement": ".placement", "CPU_KV_BYTES": ".placement",
            "HOST_KV_CAP": ".placement", "CUDA_KV_FRACTION": ".placement", "CUDA_HEADROOM": ".placement"}

__all__ = list(_EXPORTS)

__getattr__, __dir__ = exports(__name__, _EXPORTS)
