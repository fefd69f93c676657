"""tidal.Engine against transformers: greedy tokens and logits, streaming, KV exhaustion (swap and recompute),
the step API, sampling, and every checkpoint and prompt error."""
import json
import struct

import pytest
import torch

import tidal
from hf_models import ARCHS, assert_first_step_logits, greedy, make_model
from tidal.errors import CheckpointError, ConfigError, GenerationError, PromptError

pytestmark = pytest.mark.usefixtures("ordering")  # each test also runs under the ordering check

PROMPTS = [[5, 17, 99, 3, 42, 8, 71, 2, 9], [11], [64, 2, 90, 33]]  # 9 tokens (block 4: not a multiple), 1, 4
STD = 0.5  # peaked attention, so position and masking errors change the tokens (see test_model.py)
NEW = 10


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """arch -> (transformers model, checkpoint dir). Mistral's is saved in shards."""
    out = {}
    for arch in ARCHS:
        model = make_model(arch, std=STD)
        path = tmp_path_factory.mktemp(arch)
        model.save_pretrained(path, max_shard_size="300KB" if arch == "mistral" else "10GB")
        out[arch] = (model, path)
    return out


@pytest.fixture(scope="module")
def expected(saved):
    """arch -> greedy continuations of PROMPTS by transformers, each prompt alone."""
    return {arch: [greedy(model, torch.tensor([p]), NEW)[0, len(p):].tolist() for p in PROMPTS]
            for arch, (model, _) in saved.items()}


def engine(path, device, **kw):
    kw = {"block_size": 4, "kv_cache_bytes": 1 << 20, **kw}
    return tidal.Engine.from_pretrained(path, device=device, **kw)


def blocks_bytes(path, n, block_size=4):
    """kv_cache_bytes for exactly n blocks of the test models (6 layers, 2 kv heads, head_dim 16, fp32)."""
    return n * 2 * 6 * block_size * 2 * 16 * 4


def assert_clean(eng):
    """Every KV block is back in its pool and the allocators agree with themselves."""
    eng.cache.check()
    assert eng.cache.device_pool.num_free == eng.cache.config.num_device_blocks
    assert eng.cache.host_pool.num_free == eng.cache.config.num_host_blocks
    assert not eng.has_unfinished()


@pytest.mark.parametrize("fraction", [1.0, 0.5])
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_transformers(saved, expected, arch, fraction, device):
    _, path = saved[arch]
    with engine(path, device, resident_fraction=fraction) as eng:
        assert eng.generate(PROMPTS, max_new_tokens=NEW) == expected[arch]
        s = eng.stats()
        # auto: the references on the CPU (even with TRITON_INTERPRET=1 set), Triton on CUDA
        assert s.kernel_path == ("reference" if device == "cpu" else "triton")
        assert s.host_memory == ("pinned" if device.startswith("cuda") else "plain (CPU backend: no page-locking)")
        assert len(s.streamed_layers) == (0 if fraction == 1.0 else 3)
        # each forward streams every streamed layer once; the last one's lookahead (prefetch_depth = 2 layers
        # of the next forward) is copied too
        copies = (s.prefill_passes + s.decode_steps) * len(s.streamed_layers) + (2 if s.streamed_layers else 0)
        assert s.bytes_streamed == copies * (eng.weights.streamed[1].nbytes if s.streamed_layers else 0)
        assert s.prefill_passes == 1 and s.decode_tokens == len(PROMPTS) * (NEW - 1)
        assert_clean(eng)


@pytest.mark.parametrize("arch", ARCHS)
def test_first_step_logits_within_1e_4(saved, arch, device):
    model, path = saved[arch]
    with engine(path, device, resident_fraction=0.5) as eng:
        assert_first_step_logits(eng, model, PROMPTS)


@pytest.mark.parametrize("mode,host_blocks", [("swap", 64), ("recompute", 64), ("swap", 1)])
def test_kv_exhaustion_mid_decode_keeps_greedy_output(saved, expected, mode, host_blocks, device):
    """8 blocks of 4 tokens: the three prompts need 3 + 1 + 1 blocks after prefill and 5 + 3 + 4 by the end,
    so requests must be suspended. A host pool of one block cannot take a swap: the engine recomputes instead."""
    _, path = saved["llama"]
    with engine(path, device, kv_cache_bytes=blocks_bytes(path, 8),
                host_kv_bytes=blocks_bytes(path, host_blocks),
                suspend=mode) as eng:
        assert eng.generate(PROMPTS, max_new_tokens=NEW) == expected["llama"]
        s = eng.stats()
        if mode == "swap" and host_blocks > 1:
            assert s.suspend_swap_outs >= 1 and s.suspend_swap_ins == s.suspend_swap_outs
            assert s.recomputes == 0 and s.suspend_swap_bytes > 0
        else:
            assert s.recomputes >= 1 and s.suspend_swap_outs == 0
            assert s.recompute_fallbacks == (s.recomputes if mode == "swap" else 0)
        assert_clean(eng)


def test_kv_exhaustion_with_streaming_and_the_triton_kernels(saved, expected, device):
    """Streamed layers, swap suspension and every Triton kernel (interpreter) in one generation."""
    _, path = saved["qwen2"]
    with engine(path, device, resident_fraction=0.5, kernels="triton",
                kv_cache_bytes=blocks_bytes(path, 8)) as eng:
        assert eng.stats().kernel_path == ("triton-interpreter" if device == "cpu" else "triton")
        assert eng.generate(PROMPTS, max_new_tokens=NEW) == expected["qwen2"]
        assert eng.stats().suspend_swap_outs >= 1
        assert_clean(eng)


def test_a_lone_request_that_fills_the_cache_finishes_with_cache_full(saved, expected, device):
    _, path = saved["llama"]
    with engine(path, device, kv_cache_bytes=blocks_bytes(path, 3)) as eng:  # 12 tokens
        rid = eng.add_request(PROMPTS[0], max_new_tokens=NEW)  # 9 prompt tokens
        outs = []
        while eng.has_unfinished():
            outs += eng.step()
        tokens = [t for o in outs for t in o.token_ids]
        assert tokens == expected["llama"][0][:len(tokens)] and len(tokens) == 4  # 9 + 3 fed = 12 slots
        assert outs[-1] == tidal.StepOutput(rid, (), True, "cache_full")
        assert_clean(eng)


def test_step_api_continuous_batching_and_abort(saved, expected, device):
    _, path = saved["mistral"]
    with engine(path, device, max_batch_size=2) as eng:
        a = eng.add_request(PROMPTS[0], max_new_tokens=3)
        b = eng.add_request(PROMPTS[1], max_new_tokens=NEW)
        c = eng.add_request(PROMPTS[2], max_new_tokens=NEW)
        got = {a: [], b: [], c: []}
        first = eng.step()  # prefill of a and b; c waits for a seat
        assert sorted(o.request_id for o in first) == [a, b] and eng.waiting[0].id == c
        for o in first:
            got[o.request_id] += o.token_ids
        for _ in range(2):
            for o in eng.step():
                got[o.request_id] += o.token_ids
        assert got[a] == expected["mistral"][0][:3]  # a finished in the last step ...
        assert [r.id for r in eng.running] == [b, c]  # ... and c took its seat in the same step
        used = eng.cache.device_pool.num_used
        assert eng.abort(b) and not eng.abort(b) and not eng.abort(a)
        assert eng.cache.device_pool.num_used < used
        while eng.has_unfinished():
            for o in eng.step():
                got[o.request_id] += o.token_ids
        assert got[c] == expected["mistral"][2]
        assert got[b] == expected["mistral"][1][:len(got[b])]
        assert_clean(eng)


def test_stop_tokens_and_single_token_prompt(saved, expected, device):
    _, path = saved["llama"]
    want = expected["llama"][1]  # continuation of the one-token prompt
    stop = want[4]
    cut = want[:want.index(stop) + 1]
    with engine(path, device) as eng:
        outs = eng.generate([PROMPTS[1], PROMPTS[0]], max_new_tokens=NEW, stop_token_ids=[stop])
        assert outs[0] == cut  # the stop token ends the request and is returned
        other = expected["llama"][0]
        assert outs[1] == (other[:other.index(stop) + 1] if stop in other else other)
        assert_clean(eng)


def test_seeded_sampling_is_reproducible(saved, device):
    _, path = saved["qwen2"]
    with engine(path, device, kv_cache_bytes=blocks_bytes(path, 8)) as eng:
        runs = [eng.generate(PROMPTS, max_new_tokens=NEW, temperature=1.0, top_p=0.9, seed=s) for s in (3, 3, 4)]
        assert runs[0] == runs[1]
        assert runs[0] != runs[2]
        alone = eng.generate([PROMPTS[2]], max_new_tokens=NEW, temperature=1.0, top_p=0.9, seed=5)
        assert alone[0] == runs[0][2]  # prompt 2 drew from seed 3 + 2, whatever shared its batch
        assert_clean(eng)


def test_sampling_follows_temperature_and_top_p():
    from tidal.sampling import SamplingParams, sample

    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]])
    p = SamplingParams(temperature=0.7, top_p=0.6, seed=0)
    g = p.generator()
    draws = [sample(logits, [p], [g])[0] for _ in range(2000)]
    probs = torch.softmax(logits[0].double() / 0.7, -1)  # 0.71, 0.17, ...: top_p 0.6 keeps token 0 alone
    assert set(draws) == {0} and probs[0] > 0.6
    p = SamplingParams(temperature=1.0, top_p=0.95, seed=1)
    g = p.generator()
    draws = torch.tensor([sample(logits, [p], [g])[0] for _ in range(4000)])
    probs = torch.softmax(logits[0].double(), -1)
    ranked = probs.sort(descending=True)  # 0.56, 0.21, 0.13, 0.08, 0.03: 0.95 is reached by the fourth
    kept = ranked.indices[:int((ranked.values.cumsum(0) < 0.95).sum()) + 1]
    assert len(kept) == 4
    freq = torch.bincount(draws, minlength=5).double() / len(draws)
    want = torch.zeros(5, dtype=torch.float64)
    want[kept] = probs[kept] / probs[kept].sum()
    assert (freq - want).abs().max() < 0.03
    with pytest.raises(ConfigError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ConfigError, match="temperature"):
        SamplingParams(temperature=-1)


def test_bad_prompts_fail_alone(saved, expected, device):
    _, path = saved["llama"]
    with engine(path, device, kv_cache_bytes=blocks_bytes(path, 4)) as eng:  # 16 tokens
        with pytest.raises(PromptError, match="KV cache holds 16"):
            eng.add_request(list(range(1, 18)))
        with pytest.raises(PromptError, match="outside the vocabulary"):
            eng.add_request([1, 128])
        with pytest.raises(PromptError, match="empty"):
            eng.add_request([])
        with pytest.raises(PromptError, match="token ids"):
            eng.add_request("hello")
        with pytest.raises(GenerationError, match="1 of 3 prompts failed") as info:
            eng.generate([PROMPTS[1], list(range(1, 30)), PROMPTS[2]], max_new_tokens=NEW)
        outputs = info.value.outputs
        assert outputs[0] == expected["llama"][1] and outputs[2] == expected["llama"][2] and outputs[1] is None
        assert isinstance(info.value.errors[1], PromptError)
        assert_clean(eng)


def test_bad_engine_arguments(saved, device):
    _, path = saved["llama"]
    for kw, match in [({"suspend": "drop"}, "suspend"), ({"kernels": "cuda"}, "kernels"),
                      ({"block_size": 0}, "block_size"), ({"resident_fraction": 2.0}, "resident_fraction"),
                      ({"kv_cache_bytes": 100}, "holds no KV block"), ({"max_batch_size": 0}, "max_batch_size")]:
        with pytest.raises(ConfigError, match=match):
            engine(path, device, **kw)
    eng = engine(path, device)
    eng.close()
    with pytest.raises(ConfigError, match="closed"):
        eng.generate(PROMPTS)


# -- checkpoint errors ---------------------------------------------------------------------------------------
def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _rewrite_header(file, edit):
    data = file.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def test_checkpoint_errors_name_the_file_and_tensor(saved, tmp_path, device):
    _, single = saved["llama"]
    _, sharded = saved["mistral"]

    shards = _copy(sharded, tmp_path / "shard")
    index = json.loads((shards / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (shards / victim).unlink()
    with pytest.raises(CheckpointError, match=f"{victim}: shard missing"):
        engine(shards, device)

    missing = _copy(single, tmp_path / "missing")
    _rewrite_header(missing / "model.safetensors", lambda h: h.pop("model.layers.3.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.3\.mlp\.up_proj\.weight not in"):
        engine(missing, device)

    shape = _copy(single, tmp_path / "shape")

    def wrong_shape(h):
        t = h["model.layers.2.self_attn.k_proj.weight"]
        t["shape"] = [t["shape"][1], t["shape"][0]]
    _rewrite_header(shape / "model.safetensors", wrong_shape)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor model\.layers\.2\.self_attn\.k_proj"
                                              r"\.weight has shape \(64, 32\), expected \(32, 64\)"):
        engine(shape, device)

    truncated = _copy(single, tmp_path / "truncated")
    f = truncated / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="model.safetensors: truncated: tensor"):
        engine(truncated, device)

    corrupt = _copy(single, tmp_path / "corrupt")
    f = corrupt / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:16] = b"\xff" * 8
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors: corrupted header"):
        engine(corrupt, device)

    for field, value, match in [("model_type", "gpt2", "model_type 'gpt2' unsupported"),
                                ("rope_scaling", {"rope_type": "yarn", "factor": 2.0}, "rope_type 'yarn'"),
                                ("num_key_value_heads", 3, "not a multiple")]:
        bad = _copy(single, tmp_path / f"config-{field}")
        cfg = json.loads((bad / "config.json").read_text())
        cfg[field] = value
        cfg.pop("rope_parameters", None) if field == "rope_scaling" else None
        (bad / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(CheckpointError, match=match):
            engine(bad, device)


# -- synthetic requests (measurement) ------------------------------------------------------------------------
def greedy_over_cache(model, kv, token, n):
    """transformers' greedy tokens after feeding `token` at position len(context), over a DynamicCache
    holding `kv`: per layer (keys, values), each `[context, kv_heads, head_dim]`, as tidal's cache holds them
    (keys after RoPE)."""
    import inspect

    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for i, (k, v) in enumerate(kv):
        cache.update(k.transpose(0, 1)[None].clone(), v.transpose(0, 1)[None].clone(), i)
    arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out, ids = [], torch.tensor([[token]])
    with torch.no_grad():
        for _ in range(n):
            ids = model(input_ids=ids, use_cache=True, **{arg: cache}).logits[:, -1].argmax(-1, keepdim=True)
            out.append(ids.item())
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_a_synthetic_request_decodes_from_its_blocks(saved, arch, device):
    model, path = saved[arch]
    context, token = 10, 7  # 3 blocks of 4, the last one part full
    with engine(path, device, kv_cache_bytes=blocks_bytes(path, 16)) as eng:
        layers = [eng.cache.layer(i) for i in range(6)]
        for part in (p for kv in layers for p in kv):  # NaN first: a block left unwritten fails the check
            part.fill_(float("nan"))
        rid = eng.add_synthetic_request(context, max_new_tokens=NEW, token=token)
        blocks = eng.cache.block_ids(rid)
        assert eng.cache.where(rid) == "device" and eng.cache.num_tokens(rid) == context and len(blocks) == 3
        assert eng.cache.device_pool.num_free == 16 - 3 and [r.id for r in eng.running] == [rid]
        value = layers[0][0][blocks[0], 0, 0, 0].item()
        for part in (p for kv in layers for p in kv):  # one constant in every element of K and V, every layer
            assert torch.equal(part[blocks].cpu(), torch.full_like(part[blocks].cpu(), value))
        # Random contents instead of the constant (which a decode hardly depends on), put where the block
        # table says, so that the tokens below depend on every position and on where decoding starts
        g = torch.Generator().manual_seed(1)
        kv = [tuple(torch.randn(context, 2, 16, generator=g) for _ in range(2)) for _ in range(6)]
        for (k_cache, v_cache), (k, v) in zip(layers, kv):
            for cache_part, ref in ((k_cache, k), (v_cache, v)):
                held = cache_part[blocks].cpu()
                held.view(-1, 2, 16)[:context] = ref
                cache_part[blocks] = held.to(cache_part.device)
        out = []
        first = eng.step()  # a decode, no prefill
        assert [(o.request_id, len(o.token_ids)) for o in first] == [(rid, 1)]
        assert eng.cache.num_tokens(rid) == context + 1 and eng.stats().prefill_passes == 0
        out += first[0].token_ids
        eng.preempt(weights="host", kv="swap")  # its blocks move like any request's
        eng.resume(pipelined=False)
        while eng.has_unfinished():
            outs = eng.step()
            out += [t for o in outs for t in o.token_ids]
        assert outs[-1].finished and outs[-1].finish_reason == "length"
        assert out == greedy_over_cache(model, kv, token, NEW - 1)  # max_new_tokens counts the first token
        assert_clean(eng)


def test_synthetic_request_errors_change_nothing(saved, device):
    from tidal.errors import OutOfBlocks, StateError

    _, path = saved["llama"]
    with engine(path, device, kv_cache_bytes=blocks_bytes(path, 70), max_batch_size=2) as eng:  # 280 tokens
        for context, match in [(0, "context_tokens"), (True, "context_tokens"), ("8", "context_tokens")]:
            with pytest.raises(ConfigError, match=match):
                eng.add_synthetic_request(context)
        with pytest.raises(ConfigError, match="max_new_tokens=1 must be an int >= 2"):
            eng.add_synthetic_request(8, max_new_tokens=1)
        for token in (-1, 128):
            with pytest.raises(PromptError, match="outside the vocabulary"):
                eng.add_synthetic_request(8, token=token)
        with pytest.raises(PromptError, match="KV cache holds 280"):
            eng.add_synthetic_request(281)
        with pytest.raises(PromptError, match="256 positions"):  # the test models' max_position_embeddings
            eng.add_synthetic_request(256)
        eng.add_synthetic_request(255)  # 64 blocks: 6 left
        with pytest.raises(OutOfBlocks, match="need 7 device KV blocks, 6 free"):
            eng.add_synthetic_request(25)
        b = eng.add_synthetic_request(24)
        assert eng.cache.device_pool.num_free == 0
        eng.abort(b)
        eng.add_synthetic_request(4)
        with pytest.raises(StateError, match="max_batch_size"):
            eng.add_synthetic_request(4)
        assert len(eng.running) == 2 and eng.cache.device_pool.num_free == 5
        eng.cache.check()
        eng.preempt()
        with pytest.raises(StateError, match="preempted"):
            eng.add_synthetic_request(4)
        eng.resume()
        while eng.has_unfinished():
            eng.step()
        assert_clean(eng)
