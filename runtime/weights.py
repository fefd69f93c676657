"""Loading a checkpoint's weights straight into their tier: the device for resident layers and the rest of
the model, the host arena for streamed layers (read from the file into the arena region, no copy between).

A decoder layer is stored as seven tensors (eight with Qwen2's bias). q/k/v and gate/up are fused at load
time: each source tensor is read into its row range of the fused tensor, which is contiguous, so fusing costs
nothing and every step runs two fewer matmuls per block. A streamed layer's tensors sit back to back in one
arena region (`arena.layout`), so one copy brings the whole layer in (streaming.py).

Every tensor's presence, shape and dtype is checked before anything is allocated, so a bad checkpoint fails
with a CheckpointError naming the file and tensor and leaves nothing behind.
"""
from __future__ import annotations

import dataclasses

import torch

from .arena import HostArena, align_up, layout
from .backends import Backend
from .checkpoint import Checkpoint
from .errors import CheckpointError
from .plan import ResidencyPlan
from .streaming import StreamedLayer

# fused name -> the checkpoint tensors (under model.layers.{i}.) stacked along dim 0, in order
FUSED = {
    "input_layernorm": ("input_layernorm.weight",),
    "qkv": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "qkv_bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "o_proj": ("self_attn.o_proj.weight",),
    "post_attention_layernorm": ("post_attention_layernorm.weight",),
    "gate_up": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "down": ("mlp.down_proj.weight",),
}


@dataclasses.dataclass(frozen=True)
class Part:
    """One checkpoint tensor and the rows of a fused tensor it fills."""

    source: str
    rows: tuple[int, int]
    shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class FusedTensor:
    name: str
    shape: tuple[int, ...]
    parts: tuple[Part, ...]


def layer_layout(config) -> list[FusedTensor]:
    """The fused tensors of one decoder layer of `config` (a ModelConfig), in region order."""
    c = config
    h, qd, kvd, inter = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size
    source_shapes = {
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (qd, h), "self_attn.k_proj.weight": (kvd, h), "self_attn.v_proj.weight": (kvd, h),
        "self_attn.q_proj.bias": (qd,), "self_attn.k_proj.bias": (kvd,), "self_attn.v_proj.bias": (kvd,),
        "self_attn.o_proj.weight": (h, qd), "mlp.gate_proj.weight": (inter, h), "mlp.up_proj.weight": (inter, h),
        "mlp.down_proj.weight": (h, inter),
    }
    out = []
    for name, sources in FUSED.items():
        if name == "qkv_bias" and not c.attention_bias:
            continue
        parts, row = [], 0
        for s in sources:
            shape = source_shapes[s]
            parts.append(Part(s, (row, row + shape[0]), shape))
            row += shape[0]
        out.append(FusedTensor(name, (row, *source_shapes[sources[0]][1:]), tuple(parts)))
    return out


def top_tensors(config) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The non-layer weights: our name -> (checkpoint name, shape)."""
    c = config
    names = {"embed": ("model.embed_tokens.weight", (c.vocab_size, c.hidden_size)),
             "norm": ("model.norm.weight", (c.hidden_size,))}
    if not c.tie_word_embeddings:
        names["lm_head"] = ("lm_head.weight", (c.vocab_size, c.hidden_size))
    return names


@dataclasses.dataclass
class LoadedWeights:
    """Weights in their tiers. `layers[i]` is a dict of device tensors for a resident layer, None for a
    streamed one (its bytes are in `streamed[i]`, in the host arena)."""

    top: dict[str, torch.Tensor]
    layers: list[dict[str, torch.Tensor] | None]
    names: tuple[str, ...]  # fused tensor names, in region order
    streamed: dict[int, StreamedLayer]
    arena: HostArena | None

    def release(self) -> None:
        if self.arena is not None:
            self.arena.release()
            self.arena = None


def layer_bytes(config, dtype: torch.dtype) -> int:
    n = 0
    for t in layer_layout(config):
        numel = 1
        for d in t.shape:
            numel *= d
        n += numel * dtype.itemsize
    return n


def top_bytes(config, dtype: torch.dtype) -> int:
    return sum(shape[0] * (shape[1] if len(shape) > 1 else 1) for _, shape in top_tensors(config).values()) \
        * dtype.itemsize


def check(ckpt: Checkpoint, config) -> None:
    """Every tensor the model needs is in the checkpoint with the expected shape and a floating dtype."""
    wanted = [(name, shape) for name, shape in top_tensors(config).values()]
    for i in range(config.num_layers):
        wanted += [(f"model.layers.{i}.{p.source}", p.shape) for t in layer_layout(config) for p in t.parts]
    for name, shape in wanted:
        info = ckpt.info(name)
        if info.shape != tuple(shape):
            raise CheckpointError(f"{info.file}: tensor {name} has shape {info.shape}, expected {tuple(shape)}")
        if not info.dtype.is_floating_point:
            raise CheckpointError(f"{info.file}: tensor {name} has dtype {info.dtype}, expected a float dtype")


def load(ckpt: Checkpoint, config, plan: ResidencyPlan, backend: Backend, dtype: torch.dtype) -> LoadedWeights:
    """Read every weight of `ckpt` into its tier under `plan`, converted to `dtype`. On failure, nothing is
    left allocated."""
    check(ckpt, config)
    fused = layer_layout(config)
    slots, region_bytes = layout([(t.shape, dtype) for t in fused])
    streamed = plan.streamed_layers
    arena = HostArena(backend, len(streamed) * align_up(region_bytes)) if streamed else None
    try:
        top = {}
        for ours, (name, shape) in top_tensors(config).items():
            top[ours] = _to_device(_read(ckpt, name, torch.empty(shape, dtype=dtype)), backend)
        if config.tie_word_embeddings:
            top["lm_head"] = top["embed"]
        layers: list[dict[str, torch.Tensor] | None] = []
        specs = {}
        for i in range(config.num_layers):
            if plan.resident[i]:
                layers.append({t.name: _to_device(_read_fused(ckpt, i, t, torch.empty(t.shape, dtype=dtype)),
                                                  backend) for t in fused})
                continue
            region = arena.alloc(region_bytes)
            for t, slot in zip(fused, slots):
                _read_fused(ckpt, i, t, slot.view(region))
            specs[i] = StreamedLayer(i, region, tuple(slots))
            layers.append(None)
    except BaseException:
        if arena is not None:
            arena.release()
        raise
    return LoadedWeights(top, layers, tuple(t.name for t in fused), specs, arena)


def _read_fused(ckpt: Checkpoint, layer: int, t: FusedTensor, out: torch.Tensor) -> torch.Tensor:
    for p in t.parts:
        _read(ckpt, f"model.layers.{layer}.{p.source}", out[p.rows[0]:p.rows[1]])
    return out


def _read(ckpt: Checkpoint, name: str, out: torch.Tensor) -> torch.Tensor:
    """Tensor `name` into the contiguous host tensor `out`: straight from the file when the dtypes agree,
    else through one temporary of this tensor alone."""
    info = ckpt.info(name)
    if info.dtype == out.dtype:
        return ckpt.read_into(name, out)
    out.copy_(ckpt.read_into(name, torch.empty(info.shape, dtype=info.dtype)).view(out.shape))
    return out


def _to_device(t: torch.Tensor, backend: Backend) -> torch.Tensor:
    return t if backend.device.type == "cpu" else t.to(backend.device)
