"""Random-weight Hugging Face checkpoints built locally (no hub), cached by their config."""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

log = logging.getLogger("tidal")


def cache_dir() -> Path:
    """tidal's cache of built checkpoints: $TIDAL_CACHE_DIR, else ~/.cache/tidal (shared with tidal.presets)."""
    from .presets import cache_root

    return cache_root()


def random_checkpoint(arch: str, config: dict, seed: int = 0, dtype: str = "float32") -> Path:
    """Path of a saved `arch` ("llama", "qwen2", "mistral") checkpoint with `config` and random weights.

    Built with transformers' `save_pretrained` on first use and reused afterwards.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    key = hashlib.sha256(json.dumps([arch, config, seed, dtype], sort_keys=True).encode()).hexdigest()[:12]
    path = cache_dir() / f"{arch}-{key}"
    if (path / "config.json").exists():
        return path
    cfg = AutoConfig.for_model(arch, **config)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    log.warning("tidal: writing a random %s checkpoint (%.0f MB) to %s", arch, nbytes / 1e6, path)
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    tmp.rename(path)  # a half-written checkpoint never looks complete
    return path
