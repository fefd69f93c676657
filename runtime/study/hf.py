"""transformers plumbing the baselines share: the check that it is installed, quiet loads, the device's sync,
freeing memory between models, and the device and dtype a baseline runs in."""
from __future__ import annotations

import contextlib
import gc

from ..errors import ConfigError
from .common import default_dtype


def require_hf() -> None:
    try:
        import accelerate  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"tidal compare needs transformers and accelerate (pip install 'tidal[hf]'): "
                          f"{exc}") from None


@contextlib.contextmanager
def quiet_loads():
    """transformers' per-load progress bar off for the duration (a run loads the model many times)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def sync(device) -> None:
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device) -> None:
    import torch

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def resolve(device, dtype):
    from ..backends import resolve_device

    dev = resolve_device(device)
    return dev, dtype or default_dtype(dev)
