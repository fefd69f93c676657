"""tidal: an offload and preemption runtime for LLM inference.

`tidal.offload(model, ...)` streams a transformers model's decoder layers; `tidal.stats(model)` reports on it;
`tidal.restore(model)` undoes it. `tidal.PagedKVCache` holds a paged KV cache that swaps to host memory.
`tidal.Engine.from_pretrained(path, ...)` serves a Hugging Face checkpoint on tidal's own decoder (streamed
weights, paged KV cache, Triton kernels); `engine.preempt()`/`engine.resume()` move it off the device and back
with a report of what each part cost. `tidal.Runtime` holds several engines under device and host budgets.
`tidal.native.path()` names the host-copy path in use. `tidal.presets` builds random-weight checkpoints of
published model shapes; `tidal.costmodel` predicts step, preemption and resume costs from a profile (`tidal
profile`, `tidal compare`, `tidal study`: `tidal.study`).
"""
from . import costmodel, errors, native, presets
from .backends import make_backend
from .config import OffloadConfig
from .engine import Engine, EngineStats, Footprint, StepOutput
from .multimodel import ModelStatus, Runtime
from .errors import GenerationError, PromptError
from .preemption import PreemptionReport, ResumeReport
from .kv import BlockAllocator, PagedKVCache
from .offload import OffloadStats, find_decoder_layers, is_offloaded, offload, restore, stats
from .plan import ResidencyPlan
from .streaming import LayerStreamer, StepStats, StreamedLayer

__version__ = "0.1.0"

__all__ = ["costmodel", "errors", "native", "presets", "make_backend", "OffloadConfig", "Engine", "EngineStats", "Footprint", "StepOutput",
           "GenerationError", "PromptError", "Runtime", "ModelStatus", "PreemptionReport", "ResumeReport",
           "BlockAllocator", "PagedKVCache", "OffloadStats", "find_decoder_layers", "is_offloaded", "offload",
           "restore", "stats", "ResidencyPlan", "LayerStreamer", "StepStats", "StreamedLayer"]
