"""Random-weight checkpoints of real models' shapes for the benchmarks: the names they import, over
`tidal.presets` (which holds the shapes and the writer).

A shape here is a dict of config.json fields (LLAMA_3_2_1B, ...), so that a benchmark can derive a variant
with `dict(TINY, hidden_size=192)`; head_dim is left out where it is hidden_size / heads, so such a variant
derives its own. Fields a dict lacks take the values this module always wrote: 4096 positions, eps 1e-5.
"""
from __future__ import annotations

import dataclasses

import torch

from tidal import presets
from tidal.presets import checkpoint_bytes

__all__ = ["LLAMA_3_2_1B", "LLAMA_3_8B", "QWEN2_5_0_5B", "TINY", "checkpoint_bytes", "config_json", "preset_of",
           "shape_of", "write_checkpoint"]
_DEFAULTS = dict(name="custom", max_position_embeddings=4096, rms_norm_eps=1e-5)


def shape_of(preset: presets.Preset) -> dict:
    """The config.json fields of `preset` as a JSON-able dict."""
    d = {k: v for k, v in dataclasses.asdict(preset).items() if k != "name" and v is not None}
    if d["head_dim"] == d["hidden_size"] // d["num_attention_heads"]:
        del d["head_dim"]
    if preset.rope_scaling is not None:
        d["rope_scaling"] = preset.rope_scaling.as_dict()
    return d


def preset_of(shape: dict) -> presets.Preset:
    return presets.Preset(**{**_DEFAULTS, **shape})


LLAMA_3_2_1B = shape_of(presets.get("llama-3.2-1b"))
QWEN2_5_0_5B = shape_of(presets.get("qwen2.5-0.5b"))
LLAMA_3_8B = shape_of(presets.get("llama-3-8b"))
TINY = shape_of(presets.get("micro"))  # smoke runs on the CPU


def config_json(shape: dict, dtype: torch.dtype, max_positions: int | None = None) -> dict:
    p = preset_of(shape)
    if max_positions is not None:
        p = dataclasses.replace(p, max_position_embeddings=max_positions)
    return p.config_json(dtype)


def write_checkpoint(path, shape: dict, dtype: torch.dtype = torch.bfloat16, device="cpu",
                     layers_per_shard: int = 4, seed: int = 0, std: float = presets.STD):
    """`tidal.presets.write_checkpoint` of a shape dict."""
    return presets.write_checkpoint(path, preset_of(shape), dtype, device, layers_per_shard, seed, std)
