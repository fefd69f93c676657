"""tidal: an offload and preemption runtime for LLM inference."""
from . import errors, native

__version__ = "0.1.0"
