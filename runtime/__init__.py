"""tidal: an offload and preemption runtime for LLM inference.

`tidal.offload(model, ...)` streams a transformers model's decoder layers; `tidal.stats(model)` reports on it;
`tidal.restore(model)` undoes it. `tidal.PagedKVCache` holds a paged KV cache that swaps to host memory.
`tidal.Engine.from_pretrained(path, ...)` serves a Hugging Face checkpoint on tidal's own decoder (streamed
weights, paged KV cache, Triton kernels); `engine.preempt()`/`engine.resume()` move it off the device and back
with a report of what each part cost. `tidal.Runtime` holds several engines under device and host budgets.
`tidal.native.path()` names the host-copy path in use. `tidal.presets` builds random-weight checkpoints of
published model shapes; `tidal.costmodel` predicts step, preemption and resume costs from a profile (`tidal
profile`, `tidal compare`, `tidal study`: `tidal.study`).

Every public name is imported on first use (PEP 562 `__getattr__`), not by `import tidal`: the bookkeeping
(`tidal.costmodel`, `tidal.plan`, `tidal.kv.allocator`, `tidal.modes`, `tidal.errors`) imports without torch,
and `import tidal` stays cheap.
"""
from __future__ import annotations

import sys
import types

from .lazy import exports

__version__ = "0.1.0"

# public name -> the submodule that defines it (a submodule itself when the name is the module's)
_EXPORTS = {
    "costmodel": ".costmodel", "errors": ".errors", "native": ".native", "presets": ".presets",
    "make_backend": ".backends", "OffloadConfig": ".config",
    "Engine": ".engine", "EngineStats": ".engine", "Footprint": ".engine", "StepOutput": ".engine",
    "GenerationError": ".errors", "PromptError": ".errors",
    "Runtime": ".multimodel", "ModelStatus": ".multimodel",
    "PreemptionReport": ".engine", "ResumeReport": ".engine",
    "BlockAllocator": ".kv", "PagedKVCache": ".kv",
    "OffloadStats": ".offload", "find_decoder_layers": ".offload", "is_offloaded": ".offload",
    "offload": ".offload", "restore": ".offload", "stats": ".offload",
    "ResidencyPlan": ".plan",
    "modes": ".modes", "policy": ".policy",
    "ModelState": ".policy", "Policy": ".policy", "LruPolicy": ".policy", "NoEviction": ".policy",
    "PoolView": ".policy", "ModelView": ".policy", "Preempt": ".policy", "Load": ".policy", "Resume": ".policy",
    "Scheduler": ".scheduler", "scheduler": ".scheduler", "ExclusiveScheduling": ".scheduler",
    "LruScheduling": ".scheduler", "CostScheduling": ".scheduler", "SchedulingPolicy": ".scheduler", "Snapshot": ".scheduler",
    "ScheduledRequest": ".scheduler", "Step": ".scheduler", "SetResidency": ".scheduler", "Unload": ".scheduler",
    "LayerStreamer": ".streaming", "StepStats": ".streaming", "StreamedLayer": ".streaming",
}
_MODULES = {"costmodel", "errors", "native", "presets", "modes", "policy", "scheduler"}

__all__ = list(_EXPORTS)

__getattr__, __dir__ = exports(__name__, _EXPORTS, _MODULES)


class _Package(types.ModuleType):
    """`tidal.offload` is a function and a submodule of the same name. Importing the submodule binds it on the
    package; that binding is skipped, so that `tidal.offload` stays the function (as when it was imported
    eagerly) whichever is imported first. The submodule is still `sys.modules["tidal.offload"]`."""

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and name in _EXPORTS and name not in _MODULES:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
