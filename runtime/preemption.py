"""Compatibility: a model's preemption and resume live in `tidal.engine.preemption`, their reports in
`tidal.engine.reports`, the weights and KV modes in `tidal.modes`."""
from .engine.preemption import Preempted, host_copy_growth, preempt, resume, staging_bytes
from .engine.reports import PreemptionReport, ResumeReport
from .modes import KV_MODES, WEIGHT_MODES

__all__ = ["KV_MODES", "WEIGHT_MODES", "Preempted", "PreemptionReport", "ResumeReport", "host_copy_growth",
           "preempt", "resume", "staging_bytes"]
