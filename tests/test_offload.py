import importlib

import pytest
import torch

import tidal
from tidal.errors import ConfigError
from hf_models import ARCHS, greedy, make_model, twin

pytestmark = pytest.mark.usefixtures("ordering")  # each test also runs under the ordering check


def _layer_bytes(model, i):
    return sum(p.numel() * p.element_size() for p in model.model.layers[i].parameters())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("depth", [0, 1, 2])
def test_offloaded_model_matches_transformers(arch, fraction, depth, device):
    ref = make_model(arch, device=device)
    model = tidal.offload(twin(ref), resident_fraction=fraction, prefetch_depth=depth, device=device)
    ids = torch.randint(1, 128, (2, 11), device=device)
    with torch.no_grad():
        want, got = ref(ids).logits, model(ids).logits
    assert got.dtype == torch.float32
    assert (want - got).abs().max().item() <= 1e-5
    assert torch.equal(greedy(ref, ids, 12), greedy(model, ids, 12))
    st = tidal.stats(model)
    streamed = st.streamed_layers
    assert len(streamed) == 6 - round(6 * fraction)
    assert st.host_memory in ("pinned", "plain (CPU backend: no page-locking)")
    # every forward copies every streamed layer exactly once, in one copy each
    assert st.last.copies == st.last.layers_streamed == len(streamed)
    # one copy moves a layer's whole region: its parameters plus the alignment gaps between them (<256 B each)
    exact = sum(_layer_bytes(ref, i) for i in streamed)
    gaps = sum(len(list(ref.model.layers[i].parameters())) - 1 for i in streamed) * 255
    assert exact <= st.last.bytes_streamed <= exact + gaps
    if arch != "qwen2":  # no biases: every tensor is a multiple of 256 bytes, so no gaps at all
        assert st.last.bytes_streamed == exact
    assert st.forwards == 1 + 12
    # the lookahead at the end of a forward already loads the next forward's first layers
    in_flight = min(depth, max(len(streamed) - 1, 0))
    assert st.total.copies == st.forwards * len(streamed) + in_flight


def test_placement_and_restore(device):
    ref = make_model("qwen2", device=device)
    model = twin(ref)
    tidal.offload(model, resident_layers=[0, 3], prefetch_depth=1, device=device)
    st = tidal.stats(model)
    assert st.streamed_layers == (1, 2, 4, 5)
    assert st.host_bytes >= sum(_layer_bytes(ref, i) for i in st.streamed_layers)
    largest = max(_layer_bytes(ref, i) for i in st.streamed_layers)
    assert 2 * largest <= st.ring_bytes <= 2 * (largest + 255 * 8)  # 2 slots; qwen2's biases leave gaps
    dev_type = torch.device(device).type
    assert model.model.embed_tokens.weight.device.type == dev_type
    assert model.model.layers[3].self_attn.q_proj.weight.device.type == dev_type
    assert model.model.layers[1].self_attn.q_proj.weight.device.type == "cpu"  # host arena between forwards
    with pytest.raises(ConfigError, match="already offloaded"):
        tidal.offload(model)
    ids = torch.randint(1, 128, (1, 5), device=device)
    with torch.no_grad():
        model(ids)
    tidal.restore(model)
    assert not tidal.is_offloaded(model) and "forward" not in vars(model.model.layers[1])
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert p.device.type == dev_type and torch.equal(p, q), name
        assert p.requires_grad
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    with pytest.raises(ConfigError, match="not offloaded"):
        tidal.restore(model)
    tidal.offload(model, resident_fraction=0.0, device=device)  # a restored model can be offloaded again
    assert torch.equal(greedy(model, ids, 4), greedy(ref, ids, 4))


def test_budget_plan(device):
    ref = make_model("llama", device=device)
    layer = _layer_bytes(ref, 0)
    in_layers = {id(p) for p in ref.model.layers.parameters()}
    fixed = sum(p.numel() * p.element_size() for p in ref.parameters() if id(p) not in in_layers)
    fixed += sum(b.numel() * b.element_size() for b in ref.buffers())
    model = tidal.offload(twin(ref), device_budget_bytes=fixed + 4 * layer, prefetch_depth=1, device=device)
    st = tidal.stats(model)
    assert len(st.resident_layers) == 2  # 2 resident + 2 ring slots = 4 layers' bytes
    ids = torch.randint(1, 128, (1, 6), device=device)
    assert torch.equal(greedy(model, ids, 5), greedy(ref, ids, 5))


def test_copy_of_next_layer_is_issued_before_current_compute_ends():
    """With lookahead, the copy of layer i+1 is on the copy queue before layer i's compute ends, so the copy
    thread can load it meanwhile; with prefetch_depth=0 it is issued only when i+1 is needed (the control that
    shows this check can fail). Decided from the order in which the timeline records events (a copy when it
    is issued, a compute when it ends), not from their timestamps, which a loaded machine can shift."""
    def overlaps(depth):
        model = make_model("llama", num_layers=6)
        tidal.offload(model, resident_fraction=0.0, prefetch_depth=depth, device="cpu", record_timeline=True)
        ids = torch.randint(1, 128, (2, 8))
        with torch.no_grad():
            for _ in range(3):
                model(ids)
        rows = list(enumerate(tidal.stats(model).timeline))  # (position in the record, row)
        computes = [(at, r) for at, r in rows if r[0] == "compute"][6:]  # skip the first forward's start-up
        assert len(computes) == 12 and [r[1] for _, r in computes] == list(range(6)) * 2
        hits = 0
        for (cur_at, _), (nxt_at, nxt) in zip(computes, computes[1:]):
            # the copy that compute of the next layer read: that layer's last copy issued before it ended
            used = max(at for at, r in rows if r[0] == "copy" and r[1] == nxt[1] and at < nxt_at)
            hits += used < cur_at
        return hits, len(computes) - 1

    hits, total = overlaps(2)
    assert hits == total, f"copy of i+1 issued before compute of i ended in only {hits}/{total} layers"
    hits0, _ = overlaps(0)
    assert hits0 == 0


def _untouched(model, ref):
    assert not tidal.is_offloaded(model)
    assert all("forward" not in vars(m) for m in model.modules())
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q) and p.device == q.device and p.requires_grad, name
    assert not model._forward_hooks and not model._forward_pre_hooks


@pytest.mark.parametrize("kwargs, name", [
    (dict(resident_fraction=-0.1), "resident_fraction"),
    (dict(resident_fraction=1.5), "resident_fraction"),
    (dict(resident_fraction="half"), "resident_fraction"),
    (dict(resident_layers=[0, 6]), "resident_layers"),
    (dict(resident_layers=[-1]), "resident_layers"),
    (dict(resident_layers=5), "resident_layers"),
    (dict(prefetch_depth=-1), "prefetch_depth"),
    (dict(prefetch_depth=1.5), "prefetch_depth"),
    (dict(resident_fraction=0.5, resident_layers=[1]), "resident_layers"),
    (dict(device_budget_bytes=10), "device_budget_bytes"),
    (dict(device_budget_bytes=-1), "device_budget_bytes"),
    (dict(device="tpu"), "device"),
    (dict(device="cuda:7"), "device"),
])
def test_bad_arguments_raise_and_leave_the_model_untouched(kwargs, name):
    ref = make_model("llama")
    model = twin(ref)
    with pytest.raises(ConfigError, match=name):
        tidal.offload(model, **kwargs)
    _untouched(model, ref)


def test_model_without_decoder_layers():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ConfigError, match="model: .*no decoder layers"):
        tidal.offload(model)
    with pytest.raises(ConfigError, match="model"):
        tidal.offload("not a model")


def test_an_exception_inside_a_streamed_layer_leaves_streaming_usable(device):
    ref = make_model("mistral", device=device)
    model = tidal.offload(twin(ref), resident_fraction=0.0, prefetch_depth=2, device=device)
    calls = []

    def boom(module, args):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected")

    handle = model.model.layers[2].self_attn.register_forward_pre_hook(boom)
    ids = torch.randint(1, 128, (1, 7), device=device)
    with pytest.raises(RuntimeError, match="injected"), torch.no_grad():
        model(ids)
    handle.remove()
    # the failed forward released its slot; parameters point at the host copy again
    assert model.model.layers[2].self_attn.q_proj.weight.device.type == "cpu"
    with torch.no_grad():
        assert (model(ids).logits - ref(ids).logits).abs().max().item() <= 1e-5
    assert torch.equal(greedy(model, ids, 6), greedy(ref, ids, 6))


def test_streamed_parameters_survive_generate_unchanged(device):
    ref = make_model("llama", device=device)
    model = tidal.offload(twin(ref), resident_fraction=0.0, prefetch_depth=1, device=device)
    greedy(model, torch.randint(1, 128, (1, 4), device=device), 3)
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.equal(p.cpu(), q.cpu()), name  # host copies are never written by streaming


def test_inference_mode_and_no_grad_mix(device):
    ref = make_model("llama", device=device)
    model = tidal.offload(twin(ref), resident_fraction=0.0, prefetch_depth=1, device=device)
    ids = torch.randint(1, 128, (1, 5), device=device)
    with torch.no_grad():
        want = ref(ids).logits
    with torch.inference_mode():  # slot views are first made here ...
        assert torch.equal(model(ids).logits, want)
    with torch.no_grad():  # ... and reused here
        assert torch.equal(model(ids).logits, want)
    tidal.restore(model)
    assert not any(p.is_inference() for p in model.parameters())


def test_a_device_allocation_failure_leaves_the_model_untouched(monkeypatch, device):
    offload_module = importlib.import_module("tidal.offload")  # the module; tidal.offload is the function

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("injected: no room for the ring")

    ref = make_model("llama", device=device)
    model = twin(ref)
    monkeypatch.setattr(offload_module, "LayerStreamer", out_of_memory)
    with pytest.raises(tidal.errors.OutOfDeviceMemory, match="ran out of memory placing ResidencyPlan"):
        tidal.offload(model, resident_fraction=0.5, device=device)
    _untouched(model, ref)


def test_a_failure_while_packing_puts_every_tensor_back(monkeypatch, device):
    offload_module = importlib.import_module("tidal.offload")  # the module; tidal.offload is the function

    real_pack, calls = offload_module._pack, []

    def pack_then_fail(dst, params):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected: host copy failed")
        real_pack(dst, params)

    ref = make_model("qwen2", device=device)
    model = twin(ref)
    monkeypatch.setattr(offload_module, "_pack", pack_then_fail)
    with pytest.raises(RuntimeError, match="injected"):
        tidal.offload(model, resident_fraction=0.0, device=device)
    _untouched(model, ref)
    monkeypatch.setattr(offload_module, "_pack", real_pack)
    tidal.offload(model, resident_fraction=0.0, device=device)  # and it can still be offloaded
    ids = torch.randint(1, 128, (1, 5), device=device)
    assert torch.equal(greedy(model, ids, 3), greedy(ref, ids, 3))


def test_restore_keeps_each_parameters_requires_grad(device):
    model = make_model("llama", device=device)
    model.model.layers[1].mlp.up_proj.weight.requires_grad_(False)
    tidal.offload(model, resident_fraction=0.0, device=device)
    tidal.restore(model)
    assert not model.model.layers[1].mlp.up_proj.weight.requires_grad
    assert model.model.layers[1].mlp.down_proj.weight.requires_grad
