"""`tidal.offload`: stream a transformers causal LM's decoder layers from host memory, in place.

The model object keeps its class, modules and `generate()`. Non-layer modules and resident layers move to the
device. Each streamed layer's parameters are packed into the host arena and its `forward` is wrapped:
acquire the layer from the streamer, point the parameters at the device slot, run the original forward,
point them back at the host copy, release the slot. Nothing else in the model changes.
"""
from __future__ import annotations

import dataclasses
import time

import torch
from torch import nn

from . import native
from .arena import HostArena, align_up, layout
from .backends import Backend, make_backend, resolve_device
from .config import OffloadConfig
from .errors import ConfigError, OutOfDeviceMemory
from .plan import ResidencyPlan
from .streaming import LayerStreamer, StepStats, StreamedLayer

_ATTR = "_tidal_offload"
_LAYER_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "layers")


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers: `model.model.layers` for Llama, Qwen2, Mistral and kin."""
    for path in _LAYER_PATHS:
        obj = model
        for name in path.split("."):
            obj = getattr(obj, name, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    raise ConfigError(f"model: {type(model).__name__} has no decoder layers at any of {list(_LAYER_PATHS)}")


@dataclasses.dataclass(frozen=True)
class OffloadStats:
    """What `tidal.stats(model)` returns. `last` is the most recent forward pass, `total` all of them."""

    backend: str
    native_path: str
    plan: str
    resident_layers: tuple[int, ...]
    streamed_layers: tuple[int, ...]
    prefetch_depth: int
    host_bytes: int  # the host arena holding streamed layers
    pinned_bytes: int  # of which page-locked (0 on the CPU backend, which has no pinning)
    host_memory: str  # "pinned"; "pageable (...)" where page-locking failed, saying why; or the CPU backend's
    ring_bytes: int  # device slots the streamed layers pass through
    forwards: int
    last: StepStats
    total: StepStats
    timeline: tuple[tuple[str, int, float, float], ...] = ()  # (kind, layer, start, end), record_timeline only

    def __str__(self) -> str:
        l = self.last
        return (f"{self.plan} on {self.backend}, prefetch_depth={self.prefetch_depth}: last forward streamed "
                f"{l.bytes_streamed / 1e6:.2f} MB in {l.copies} copies, stall {l.stall_seconds * 1e3:.2f} ms, "
                f"bookkeeping {l.bookkeeping_seconds * 1e3:.3f} ms; host {self.host_bytes / 1e6:.1f} MB "
                f"({self.pinned_bytes / 1e6:.1f} MB pinned), ring {self.ring_bytes / 1e6:.1f} MB, {self.forwards} forwards")


@dataclasses.dataclass
class _State:
    config: OffloadConfig
    backend: Backend
    plan: ResidencyPlan
    arena: HostArena | None
    streamer: LayerStreamer
    params: dict[int, list[nn.Parameter]]  # streamed layer -> its parameters, in region order
    host_views: dict[int, list[torch.Tensor]]
    requires_grad: dict[int, list[bool]]  # as they were before offload, for restore
    wrapped: list[nn.Module]
    hooks: list


def offload(model: nn.Module, resident_fraction: float = 1.0, resident_layers=None, prefetch_depth: int = 2,
            device=None, *, device_budget_bytes: int | None = None, record_timeline: bool = False,
            link=None) -> nn.Module:
    """Keep a plan's share of `model`'s decoder layers on the device and stream the rest from host memory.

    `model` is a transformers causal LM (or any module with decoder layers at `model.model.layers`).
    Residency comes from `resident_fraction` in [0, 1] (streamed layers spread evenly among resident ones),
    an explicit `resident_layers` list, or `device_budget_bytes`. Streamed layers are copied `prefetch_depth`
    layers ahead on the backend's copy queue. `device` is "cpu", "cuda[:n]" or None (CUDA when available).
    `link` (CPU backend only): an emulated host<->device link, a `tidal.backends.LinkEmulation` or GB/s.
    Returns the same model object; `tidal.restore(model)` undoes it, `tidal.stats(model)` reports on it.
    Streamed parameters are for inference: their `requires_grad` is off until `restore`.
    Raises ConfigError, naming the argument, before touching the model.
    """
    if hasattr(model, _ATTR):
        raise ConfigError("model: already offloaded by tidal; call tidal.restore(model) first")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    config = OffloadConfig(resident_fraction=resident_fraction, resident_layers=resident_layers,
                           prefetch_depth=prefetch_depth, device=device, device_budget_bytes=device_budget_bytes,
                           record_timeline=record_timeline, link=link)
    layers = find_decoder_layers(model)
    target = resolve_device(config.device)
    layer_params = [list(layer.parameters()) for layer in layers]
    plan = _make_plan(model, config, layer_params)
    _check_not_shared(model, layers, plan)

    backend = make_backend(target, link=config.link)
    streamed = plan.streamed_layers
    regions = {i: layout([(tuple(p.shape), p.dtype) for p in layer_params[i]]) for i in streamed}

    # From here on the model changes. A failure (an allocation, say) puts every tensor back as it was.
    params = [(p, p.data, p.requires_grad) for p in model.parameters()]
    buffers = [(m, name, b) for m in model.modules() for name, b in m.named_buffers(recurse=False)]
    arena = None
    try:
        if streamed:
            arena = HostArena(backend, sum(align_up(size) for _, size in regions.values()))
        state = _install(model, config, backend, plan, arena, layer_params, regions, target)
    except BaseException as exc:
        for p, data, grad in params:
            p.data = data
            p.requires_grad_(grad)
        for m, name, b in buffers:
            m._buffers[name] = b
        if arena is not None:
            arena.release()
        backend.close()
        if isinstance(exc, torch.OutOfMemoryError):
            raise OutOfDeviceMemory(f"offload: {target} ran out of memory placing {plan}: {exc}") from exc
        raise
    setattr(model, _ATTR, state)
    return model


def _install(model, config, backend, plan, arena, layer_params, regions, target) -> "_State":
    streamed = plan.streamed_layers
    specs = {}
    for i in streamed:
        slots, size = regions[i]
        specs[i] = StreamedLayer(i, arena.alloc(size), tuple(slots))
    # the ring first: the largest device allocation, made before any parameter moves
    streamer = LayerStreamer(backend, plan, specs, config.prefetch_depth, record_timeline=config.record_timeline)
    streamed_ids = {id(p) for i in streamed for p in layer_params[i]}
    for p in model.parameters():
        if id(p) not in streamed_ids:
            p.data = p.data.to(target)
    for module in model.modules():
        for name, buf in module.named_buffers(recurse=False):
            module._buffers[name] = buf.to(target)
    host_views, grads = {}, {}
    for i in streamed:
        views = [s.view(specs[i].host) for s in specs[i].tensors]
        _pack(views, layer_params[i])
        grads[i] = [p.requires_grad for p in layer_params[i]]
        for p, v in zip(layer_params[i], views):
            p.data = v
            p.requires_grad_(False)
        host_views[i] = views
    state = _State(config, backend, plan, arena, streamer, {i: layer_params[i] for i in streamed}, host_views,
                   grads, [], [])
    layers = find_decoder_layers(model)
    for i in streamed:
        _wrap_layer(layers[i], i, state)
    state.hooks.append(model.register_forward_pre_hook(lambda m, a: streamer.begin_step()))
    state.hooks.append(model.register_forward_hook(lambda m, a, o: streamer.end_step()))
    return state


def restore(model: nn.Module) -> nn.Module:
    """Undo `offload`: every parameter back on the device as an ordinary tensor, hooks removed."""
    state = _state(model)
    state.streamer.close()
    target = state.backend.device
    for i, params in state.params.items():
        for p, grad in zip(params, state.requires_grad[i]):
            p.data = p.data.to(target, copy=True)  # own storage, so the arena can go
            p.requires_grad_(grad)
    for module in state.wrapped:
        del module.forward  # the instance attribute; the class's forward shows through again
    for h in state.hooks:
        h.remove()
    if state.arena is not None:
        state.arena.release()
    state.backend.close()
    delattr(model, _ATTR)
    return model


def stats(model: nn.Module) -> OffloadStats:
    """Streaming counters for an offloaded model. Waits for outstanding device work (not a hot-path call)."""
    state = _state(model)
    s = state.streamer
    last, total = s.summary()
    timeline = ()
    if s.timeline is not None:
        timeline = tuple(_timeline_rows(s.timeline))
    arena = state.arena
    return OffloadStats(
        backend=state.backend.name, native_path=native.path(), plan=str(state.plan),
        resident_layers=state.plan.resident_layers, streamed_layers=state.plan.streamed_layers,
        prefetch_depth=state.config.prefetch_depth,
        host_bytes=arena.nbytes if arena else 0, pinned_bytes=arena.nbytes if arena and arena.pinned else 0,
        host_memory=state.backend.host_memory(),
        ring_bytes=s.slot_bytes, forwards=s.steps, last=last, total=total, timeline=timeline)


def is_offloaded(model: nn.Module) -> bool:
    return hasattr(model, _ATTR)


def _state(model: nn.Module) -> _State:
    state = getattr(model, _ATTR, None)
    if state is None:
        raise ConfigError("model: not offloaded by tidal")
    return state


def _make_plan(model: nn.Module, config: OffloadConfig, layer_params: list[list[nn.Parameter]]) -> ResidencyPlan:
    layer_bytes = [sum(_nbytes(p) for p in ps) for ps in layer_params]
    in_layers = {id(p) for ps in layer_params for p in ps}
    fixed = sum(_nbytes(p) for p in model.parameters() if id(p) not in in_layers)
    fixed += sum(_nbytes(b) for b in model.buffers())
    return config.plan(layer_bytes, fixed)


def _check_not_shared(model: nn.Module, layers: nn.ModuleList, plan: ResidencyPlan) -> None:
    owners: dict[int, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for pname, p in module.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(p), []).append(f"{name}.{pname}" if name else pname)
    for i in plan.streamed_layers:
        for p in layers[i].parameters():
            if len(owners[id(p)]) > 1:
                raise ConfigError(f"model: parameter shared by {owners[id(p)]} cannot be streamed with layer {i}; "
                                  f"keep layer {i} resident (resident_layers)")


def _pack(dst: list[torch.Tensor], params: list[nn.Parameter]) -> None:
    src = [p.detach() for p in params]
    if all(s.device.type == "cpu" and s.is_contiguous() for s in src):
        native.copy_spans(dst, src)
    else:
        for d, s in zip(dst, src):
            d.copy_(s)


def _wrap_layer(layer: nn.Module, index: int, state: _State) -> None:
    original = layer.forward  # bound method of the class's forward
    streamer, params, host_views = state.streamer, state.params[index], state.host_views[index]
    timeline = streamer.timeline

    def forward(*args, **kwargs):
        views = streamer.acquire(index)
        t0 = time.perf_counter()
        for p, v in zip(params, views):
            p.data = v
        t1 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            t2 = time.perf_counter()
            for p, v in zip(params, host_views):
                p.data = v
            streamer.add_timing(bookkeeping_seconds=(t1 - t0) + (time.perf_counter() - t2))
            streamer.release(index)
            if timeline is not None:
                timeline.append(("compute", index, (t1, t2)))

    layer.forward = forward
    state.wrapped.append(layer)


def _timeline_rows(raw) -> list[tuple[str, int, float, float]]:
    rows = []
    for kind, layer, what in raw:
        interval = what if isinstance(what, tuple) else what.interval()
        if interval is not None:
            rows.append((kind, layer, interval[0], interval[1]))
    return rows


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
