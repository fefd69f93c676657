"""GPU-shaped cost models (`gpu_model`): a `SimModelConfig` for a published model shape (tidal's presets) on a
stated device and host link, for simulating machines we do not have. Assumptions (every number below is one;
measured profiles replace them whenever a GPU run exists):

- Device: an H100 SXM-class GPU, 80 GB HBM3 at 3.35 TB/s (NVIDIA's datasheet) of which decode reaches 75%
  (`HBM_EFFICIENCY`); bf16 weights and KV. A decode step reads every resident weight once and each sequence's KV
  once: T0 = weights / bandwidth + per-layer launch overhead (`LAUNCH_S`) + batch x context x KV bytes per token
  / bandwidth, plus a per-sequence cost (`PER_SEQUENCE_S`).
- Prefill (also a recompute): compute-bound at 40% of the bf16 dense peak (989 TFLOP/s): 2 x params FLOP a
  token.
- Host link: PCIe Gen4 x16 as the study measured it (shared/PAPER.md): 13-16 GB/s host-to-device and 9-12 GB/s
  device-to-host against 31.5 GB/s nominal; 14 and 10.5 GB/s here. A streamed layer crosses it once per step,
  with `STREAM_OVERHEAD_S` per layer (per-tensor copy overhead the study blames for the gap).
- Or the host link is GH200's NVLink-C2C (`LINKS["c2c"]`): 450 GB/s a direction on the datasheet, taken at
  the same 45% of nominal the study saw on PCIe.
- Disk: a PCIe Gen4 NVMe read at 5 GB/s into the device (the resume from disk path).
"""
from __future__ import annotations

import dataclasses

from .engine import SimModelConfig

HBM_BYTES_S = 3.35e12
HBM_EFFICIENCY = 0.75
LAUNCH_S = 20e-6  # per decoder layer and step: kernel launches of a layer's ~10 kernels, CUDA-graph free
PER_SEQUENCE_S = 20e-6
PEAK_FLOPS = 989e12
MFU = 0.40
H2D_BYTES_S, D2H_BYTES_S = 14e9, 10.5e9
DISK_BYTES_S = 5e9
STREAM_OVERHEAD_S = 50e-6
BYTES = 2  # bf16


@dataclasses.dataclass(frozen=True)
class Shape:
    """The numbers a cost model needs from a model: its layers, the bytes of one, the rest, KV per token."""

    name: str
    num_layers: int
    layer_bytes: int
    top_bytes: int
    kv_bytes_per_token: int
    params: int


def shape(preset_name: str) -> Shape:
    """The shape of the preset `preset_name` (tidal.presets.PRESETS: published configs) in bf16."""
    from ..presets import PRESETS

    p = PRESETS[preset_name]
    head = p.head_dim or p.hidden_size // p.num_attention_heads
    h, kv = p.hidden_size, p.num_key_value_heads * head
    layer = h * p.num_attention_heads * head * 2 + h * kv * 2 + 3 * h * p.intermediate_size + 2 * h
    if p.model_type == "qwen2":
        layer += p.num_attention_heads * head + 2 * kv  # q, k, v biases
    top = p.vocab_size * h * (1 if p.tie_word_embeddings else 2) + h
    return Shape(preset_name, p.num_hidden_layers, layer * BYTES, top * BYTES, 2 * p.num_hidden_layers * kv * BYTES,
                 layer * p.num_hidden_layers + top)


# host links (host-to-device, device-to-host bytes/s): the study's PCIe Gen4 x16 measurements, and NVIDIA
# GH200's NVLink-C2C (900 GB/s both ways, 450 per direction, datasheet) at the same 45% of nominal the study saw
LINKS = {"pcie4": (H2D_BYTES_S, D2H_BYTES_S), "c2c": (0.45 * 450e9, 0.45 * 450e9)}


def cost_model(s: Shape, link: str = "pcie4"):
    """The CostModel of `s` under this module's assumptions, behind the host `link` (LINKS)."""
    from ..costmodel import CostModel, LinkFit, RecomputeFit, StepFit

    h2d, d2h = LINKS[link]
    hbm = HBM_BYTES_S * HBM_EFFICIENCY
    a0 = (s.top_bytes + s.num_layers * s.layer_bytes) / hbm + s.num_layers * LAUNCH_S
    step = StepFit(s.num_layers, s.layer_bytes, a0, PER_SEQUENCE_S, s.kv_bytes_per_token / hbm, h2d,
                   STREAM_OVERHEAD_S, 1)
    links = (LinkFit("weights_host_in", 0.0, h2d, 1), LinkFit("weights_host_out", 0.0, d2h, 1),
             LinkFit("weights_disk_in", 0.0, min(DISK_BYTES_S, h2d), 1), LinkFit("kv_swap_in", 0.0, h2d, 1),
             LinkFit("kv_swap_out", 0.0, d2h, 1))
    return CostModel(step, links, RecomputeFit(1e-3, 2 * s.params / (PEAK_FLOPS * MFU), 0.0, 1))


def gpu_model(name: str, preset_name: str, kv_cache_bytes: int, link: str = "pcie4", **kwargs) -> SimModelConfig:
    """A simulated model `name` of the preset's shape on the assumed GPU behind `link` (kwargs:
    SimModelConfig's)."""
    s = shape(preset_name)
    return SimModelConfig(name, cost_model(s, link), s.num_layers, s.layer_bytes, s.top_bytes, s.kv_bytes_per_token,
                          kv_cache_bytes, **kwargs)
