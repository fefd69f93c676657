"""Exceptions raised by tidal. Every error tidal raises on bad input or a failed transfer is one of these."""


class TidalError(Exception):
    """Base class of every tidal error."""


class ConfigError(TidalError, ValueError):
    """An argument or configuration value is invalid; the message names it."""


class ShapeError(TidalError, ValueError):
    """A tensor has the wrong shape, dtype, device or layout; the message names the argument."""


class BackendError(TidalError, RuntimeError):
    """The device backend is unavailable or failed."""


class TransferError(TidalError, RuntimeError):
    """A host/device copy failed; the objects it touched are left as they were before it."""


class KVCacheError(TidalError, RuntimeError):
    """Misuse of the KV cache or its allocator (double free, unknown sequence, ...)."""


class OutOfBlocks(KVCacheError):
    """Not enough free KV blocks; nothing was changed."""

    def __init__(self, needed: int, free: int, where: str = "device"):
        super().__init__(f"need {needed} {where} KV blocks, {free} free")
        self.needed, self.free, self.where = needed, free, where


class CheckpointError(TidalError, RuntimeError):
    """A checkpoint file or tensor is missing, malformed or unsupported; the message names it."""


class OutOfDeviceMemory(TidalError, RuntimeError):
    """A model does not fit the device budget; the message gives the numbers."""


class StateError(TidalError, RuntimeError):
    """An operation that the object's state does not allow (resuming a model that is not preempted, ...)."""


class PromptError(TidalError, ValueError):
    """A prompt the engine can never run (empty, a token outside the vocabulary, longer than the cache or the
    model's positions). Raised by `add_request` for that request alone."""


class GenerationError(TidalError, RuntimeError):
    """Some prompts of a `generate` call failed; the others ran. `outputs[i]` is None for a failed prompt i,
    whose error is `errors[i]`."""

    def __init__(self, outputs: list, errors: dict[int, Exception]):
        detail = "; ".join(f"prompt {i}: {e}" for i, e in errors.items())
        super().__init__(f"{len(errors)} of {len(outputs)} prompts failed ({detail})")
        self.outputs, self.errors = outputs, errors


class OrderingError(TidalError, RuntimeError):
    """The stream-ordering check (TIDAL_CHECK_ORDERING=1) found a use of a region that does not wait for what
    it must: the message names the region and both operations."""
