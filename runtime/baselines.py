"""Baselines tidal is measured against, set up the way their users set them up.

accelerate: `dispatch_model` with the offloaded decoder layers mapped to "cpu". Its hooks
(`AlignDevicesHook`) copy each offloaded module's weights to the execution device, tensor by tensor, at every
forward, and drop them afterwards. On a CPU-only machine `dispatch_model` treats "cpu" as the main device and
attaches no offload hooks at all, so there the same hooks are attached with the CPU as the execution device.
That keeps accelerate's per-layer host work, but it moves no bytes: `.to("cpu")` of a CPU tensor returns the
tensor itself, so the weights it binds are its host copies (checked: same storage). Compare transfer cost
on a GPU; on the CPU only the host overhead is comparable.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .backends import resolve_device
from .errors import ConfigError
from .offload import _LAYER_PATHS, find_decoder_layers


def layer_device_map(model: nn.Module, offloaded: Iterable[int], device: torch.device) -> dict[str, str]:
    """A device map with each decoder layer as an entry ("cpu" when offloaded) and every other module on
    `device`."""
    layers = find_decoder_layers(model)
    offloaded = set(offloaded)
    bad = [i for i in offloaded if not 0 <= i < len(layers)]
    if bad:
        raise ConfigError(f"offloaded: layer indices {bad} outside [0, {len(layers)})")
    path = next(p for p in _LAYER_PATHS if _get(model, p) is layers)
    device_map, prefix, module = {}, "", model
    for part in path.split("."):
        for name, _ in module.named_children():
            if name != part:
                device_map[prefix + name] = str(device)
        prefix, module = prefix + part + ".", getattr(module, part)
    for i in range(len(layers)):
        device_map[f"{prefix}{i}"] = "cpu" if i in offloaded else str(device)
    return device_map


def accelerate_offload(model: nn.Module, offloaded: Iterable[int], device=None) -> nn.Module:
    """Offload decoder layers `offloaded` with accelerate, executing on `device`; returns the model."""
    from accelerate import dispatch_model
    from accelerate.hooks import attach_align_device_hook_on_blocks
    from accelerate.utils import OffloadedWeightsLoader, extract_submodules_state_dict

    device = resolve_device(device)
    offloaded = sorted(set(offloaded))
    device_map = layer_device_map(model, offloaded, device)
    if device.type != "cpu":
        return dispatch_model(model, device_map=device_map, main_device=str(device))
    # Every entry reads "cpu" here, so the offloaded ones are named from the layer indices.
    layer_prefix = next(n for n in device_map if n.endswith(".0")).removesuffix("0")
    cpu_modules = [f"{layer_prefix}{i}" for i in offloaded]
    if not cpu_modules:
        return model.to(device)
    weights_map = OffloadedWeightsLoader(state_dict=extract_submodules_state_dict(model.state_dict(), cpu_modules))
    attach_align_device_hook_on_blocks(
        model, execution_device={**{n: str(device) for n in device_map}, "": str(device)},
        offload={n: n in cpu_modules for n in device_map}, offload_buffers=False,
        weights_map=weights_map, tied_params_map={})
    return model


def _get(obj, path: str):
    for name in path.split("."):
        obj = getattr(obj, name, None)
    return obj
