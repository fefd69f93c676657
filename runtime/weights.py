"""Loading a checkpoint's weights straight into their tier: the device for resident layers and the rest of
the model, the host arena for streamed layers (read from the file into the arena region, no copy between).

A decoder layer is stored as seven tensors, plus Qwen2's q/k/v biases or Qwen3's q/k norms. q/k/v and gate/up are fused at load
time: each source tensor is read into its row range of the fused tensor, which is contiguous, so fusing costs
nothing and every step runs two fewer matmuls per block. A streamed layer's tensors sit back to back in one
arena region (`arena.layout`), so one copy brings the whole layer in (streaming.py).

Every tensor's presence, shape and dtype is checked before anything is allocated, so a bad checkpoint fails
with a CheckpointError naming the file and tensor and leaves nothing behind.
"""
from __future__ import annotations

import dataclasses

import torch

from .arena import HostArena, TensorSlot, align_up, layout
from .backends import Backend, Event, Transfer
from .checkpoint import Checkpoint
from .errors import CheckpointError
from .native import LoadInfo
from .plan import ResidencyPlan
from .streaming import StreamedLayer

# fused name -> the checkpoint tensors (under model.layers.{i}.) stacked along dim 0, in order
FUSED = {
    "input_layernorm": ("input_layernorm.weight",),
    "qkv": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "qkv_bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "q_norm": ("self_attn.q_norm.weight",),  # Qwen3: RMSNorm of each head of q and of k, before RoPE
    "k_norm": ("self_attn.k_norm.weight",),
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
        "self_attn.q_norm.weight": (c.head_dim,), "self_attn.k_norm.weight": (c.head_dim,),
    }
    absent = set() if c.attention_bias else {"qkv_bias"}
    if not c.qk_norm:
        absent |= {"q_norm", "k_norm"}
    out = []
    for name, sources in FUSED.items():
        if name in absent:
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


EMBED, HEAD = "embed", "head"  # region keys of the embeddings and of the final norm + LM head; layers: index
TOP_REGIONS = {EMBED: ("embed",), HEAD: ("norm", "lm_head")}


@dataclasses.dataclass
class LoadedWeights:
    """Weights in their tiers. Every tensor lives in a region: "embed", "head" (final norm and LM head) and one
    per layer, each laid out as `arena.layout` says, so that one copy moves a whole region between tiers.

    `device[key]` is the device region of "embed", "head" and each resident layer (absent while preempted);
    `layers[i]` holds views of its tensors, or None for a streamed layer, whose bytes are in `streamed[i]`
    (a region of the host `arena`). `parked` is the host copy of the device regions while they are preempted
    to the host."""

    config: object
    dtype: torch.dtype
    names: tuple[str, ...]  # layer tensor names, in region order
    layer_slots: tuple[TensorSlot, ...]
    layer_bytes: int
    top_layout: dict  # "embed"/"head" -> (names, slots, nbytes)
    resident: tuple[int, ...]
    device: dict
    top: dict[str, torch.Tensor] | None
    layers: list[dict[str, torch.Tensor] | None]
    streamed: dict[int, StreamedLayer]
    arena: HostArena | None
    parked: dict | None = None  # key -> host region
    parked_arena: HostArena | None = None
    load_info: LoadInfo | None = None  # the reads of the last load from the checkpoint
    # Host copies of resident layers that were streamed once (a live residency change, engine/residency.py):
    # weights never change, so a later demotion streams from them again and copies nothing.
    spare: dict = dataclasses.field(default_factory=dict)  # layer -> host region
    copy_arenas: list = dataclasses.field(default_factory=list)  # the arenas demotions copied layers into

    def region_bytes(self, key) -> int:
        return self.top_layout[key][2] if key in TOP_REGIONS else self.layer_bytes

    @property
    def device_keys(self) -> list:
        """The regions that live on the device when the model is active, in the order a forward reads them."""
        return [EMBED] + list(self.resident) + [HEAD]

    @property
    def device_bytes(self) -> int:
        return sum(r.numel() for r in self.device.values())

    @property
    def host_bytes(self) -> int:
        return sum(a.nbytes for a in (self.arena, self.parked_arena, *self.copy_arenas) if a is not None)

    def bind(self, key, region: torch.Tensor) -> None:
        """Make `region` the device home of `key` and point the views at it."""
        self.device[key] = region
        if key in TOP_REGIONS:
            names, slots, _ = self.top_layout[key]
            self.top = {**(self.top or {}), **{n: s.view(region) for n, s in zip(names, slots)}}
            if "embed" in self.top and self.config.tie_word_embeddings:
                self.top["lm_head"] = self.top["embed"]
        else:
            self.layers[key] = {n: s.view(region) for n, s in zip(self.names, self.layer_slots)}

    def unbind_device(self) -> int:
        """Drop every device region (their memory goes back to the allocator); returns the bytes dropped."""
        dropped = self.device_bytes
        self.device.clear()
        self.top = None
        for i in self.resident:
            self.layers[i] = None
        return dropped

    def drop_layer_copies(self) -> int:
        """Release the arenas demotions copied layers into and forget the spare host copies; returns the
        bytes released. No copy may still use them."""
        released = sum(a.nbytes for a in self.copy_arenas)
        for arena in self.copy_arenas:
            arena.release()
        self.copy_arenas, self.spare = [], {}
        return released

    def release(self) -> None:
        for name in ("arena", "parked_arena"):
            arena = getattr(self, name)
            if arena is not None:
                arena.release()
                setattr(self, name, None)
        self.parked = None
        self.drop_layer_copies()


def load(ckpt: Checkpoint, config, plan: ResidencyPlan, backend: Backend, dtype: torch.dtype,
         keep_host_copy: bool = False) -> LoadedWeights:
    """Read every weight of `ckpt` into its tier under `plan`, converted to `dtype`. With `keep_host_copy`,
    the device regions are read into a pinned host arena that stays (`parked`), and copied from there. On
    failure, nothing is left allocated. `w.load_info` says what the reads cost and which loader path served
    them."""
    check(ckpt, config)
    w = empty(config, plan, dtype)
    streamed = plan.streamed_layers
    w.arena = HostArena(backend, len(streamed) * align_up(w.layer_bytes)) if streamed else None
    infos = []
    try:
        regions, allocated = fresh_regions(backend, w, w.device_keys)
        if keep_host_copy:
            w.parked_arena = HostArena(backend, host_copy_bytes(w), label="host copy of the weights")
            w.parked = {key: w.parked_arena.alloc(w.region_bytes(key)) for key in regions}
            infos.append(read_regions(ckpt, w, w.parked))
            backend.copy([regions[k] for k in regions], [w.parked[k] for k in regions],
                         after=[allocated], op="load: weights from the host copy").wait()
        elif backend.device.type == "cpu":  # the device regions are host memory: read straight into them
            infos.append(read_regions(ckpt, w, regions))
        else:  # one region's worth of staging at a time, never a second copy of the model
            for key, region in regions.items():
                host = torch.empty(region.numel(), dtype=torch.uint8)
                infos.append(read_regions(ckpt, w, {key: host}))
                region.copy_(host)
        for key, region in regions.items():
            w.bind(key, region)
        arena_regions = {i: w.arena.alloc(w.layer_bytes) for i in streamed}
        if arena_regions:
            infos.append(read_regions(ckpt, w, arena_regions))
        for i, region in arena_regions.items():
            w.streamed[i] = StreamedLayer(i, region, w.layer_slots)
    except BaseException:
        w.unbind_device()
        w.release()
        raise
    w.load_info = merge_load_infos(infos)
    return w


def host_copy_bytes(w: LoadedWeights, keys=None) -> int:
    """Bytes of one host arena holding a copy of the device regions `keys` (default: every one, as a
    preemption to the host copies)."""
    return sum(align_up(w.region_bytes(k)) for k in (w.device_keys if keys is None else keys))


def fresh_regions(backend: Backend, w: LoadedWeights, keys) -> tuple[dict, Event]:
    """New device regions for `keys`, and an event recorded after their allocation that every copy into them
    must wait on: the allocator may hand out memory whose earlier owners are still queued on compute."""
    regions = {k: backend.empty(w.region_bytes(k), label=f"weights region {k!r}") for k in keys}
    return regions, backend.record()


def copy_to_host(backend: Backend, w: LoadedWeights, keys, label: str, op: str) -> tuple[HostArena, dict, Transfer]:
    """A new host arena with a region for each device region `keys`, and the one batched copy into them, in
    flight, after the compute issued so far (which last read or wrote them). The caller waits for it, and
    releases the arena if it fails; a copy that cannot be enqueued releases it here and raises."""
    arena = HostArena(backend, host_copy_bytes(w, keys), label=label)
    hosts = {k: arena.alloc(w.region_bytes(k)) for k in keys}
    try:
        transfer = backend.copy([hosts[k] for k in keys], [w.device[k] for k in keys], after=[backend.record()],
                                op=op)
    except BaseException:
        arena.release()
        raise
    return arena, hosts, transfer


def empty(config, plan: ResidencyPlan, dtype: torch.dtype) -> LoadedWeights:
    """The layout of `config`'s weights under `plan`, with nothing allocated."""
    fused = layer_layout(config)
    slots, nbytes = layout([(t.shape, dtype) for t in fused])
    top = top_tensors(config)
    top_layout = {}
    for key, names in TOP_REGIONS.items():
        names = tuple(n for n in names if n in top)
        region_slots, region_bytes = layout([(top[n][1], dtype) for n in names])
        top_layout[key] = (names, tuple(region_slots), region_bytes)
    return LoadedWeights(config, dtype, tuple(t.name for t in fused), tuple(slots), nbytes, top_layout,
                         plan.resident_layers, {}, None, [None] * config.num_layers, {}, None)


def read_regions(ckpt: Checkpoint, w: LoadedWeights, regions: dict) -> LoadInfo:
    """Read the tensors of each region `key` into its host bytes `regions[key]`. Tensors already in `w.dtype`
    go straight from the file into place, all of them in one batched read; a region with tensors to convert
    is read on its own, through temporaries of that region alone, so conversion never holds a second copy
    of the model."""
    direct, infos = [], []
    for key, region in regions.items():
        items = [(name, out) for name, out in _region_tensors(ckpt, w, key, region)]
        if all(ckpt.info(name).dtype == out.dtype for name, out in items):
            direct += items
            continue
        temps = [(name, out, torch.empty(ckpt.info(name).shape, dtype=ckpt.info(name).dtype)) for name, out in items]
        infos.append(ckpt.read_many([(name, tmp) for name, _, tmp in temps]))
        for _, out, tmp in temps:
            out.copy_(tmp.view(out.shape))
    if direct:
        infos.append(ckpt.read_many(direct))
    return merge_load_infos(infos)


def _region_tensors(ckpt: Checkpoint, w: LoadedWeights, key, region: torch.Tensor):
    """(checkpoint name, destination view in `region`) of every tensor of region `key`."""
    if key in TOP_REGIONS:
        top = top_tensors(w.config)
        names, slots, _ = w.top_layout[key]
        for ours, slot in zip(names, slots):
            yield top[ours][0], slot.view(region)
        return
    for t, slot in zip(layer_layout(w.config), w.layer_slots):
        out = slot.view(region)
        for p in t.parts:
            yield f"model.layers.{key}.{p.source}", out[p.rows[0]:p.rows[1]]


def merge_load_infos(infos: list[LoadInfo]) -> LoadInfo:
    """One LoadInfo for several reads done one after another: bytes and seconds add up."""
    paths = list(dict.fromkeys(i.path for i in infos))
    return LoadInfo(sum(i.bytes for i in infos), sum(i.seconds for i in infos), "; ".join(paths) or "none",
                    sum(i.files for i in infos), sum(i.spans for i in infos),
                    sum(i.direct_bytes for i in infos), sum(i.bounce_bytes for i in infos),
                    sum(i.buffered_bytes for i in infos))
