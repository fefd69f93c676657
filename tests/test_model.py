import pytest
import torch

import tidal
from hf_models import ARCHS, greedy, make_model
from tidal.errors import CheckpointError
from tidal.model import DecoderModel, ModelConfig

PROMPTS = [[5, 17, 99, 3, 42, 8, 71], [11], [64, 2, 90, 33]]  # three lengths, one a single token


STD = 0.5  # peaked attention: with small weights softmax is near uniform and hides rope and mask errors


def _saved(tmp_path, arch, **kw):
    model = make_model(arch, std=STD, **kw)
    model.save_pretrained(tmp_path, max_shard_size="300KB" if arch == "mistral" else "10GB")
    return model, tmp_path


def _generate(dec, prompts, n, block_size=4):
    c = dec.config
    cache = tidal.PagedKVCache(c.num_layers, c.num_kv_heads, c.head_dim, block_size, num_device_blocks=64,
                               num_host_blocks=4, dtype=torch.float32, device=str(dec.device))
    ids = list(range(len(prompts)))
    for i, p in zip(ids, prompts):
        cache.allocate(i, len(p))
    first = dec.prefill(cache, ids, prompts)
    out = [[int(l.argmax())] for l in first]
    for _ in range(n - 1):
        for i in ids:
            cache.append(i, 1)
        logits = dec.decode_step(cache, ids, [o[-1] for o in out])
        for o, l in zip(out, logits):
            o.append(int(l.argmax()))
    cache.close()
    return out, first


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_tokens_and_logits_match_transformers(arch, tmp_path, device):
    ref, path = _saved(tmp_path, arch)
    dec = DecoderModel.load(path, device=device, kernels="reference")
    got, first = _generate(dec, PROMPTS, 10)
    for prompt, tokens, logits in zip(PROMPTS, got, first):
        ids = torch.tensor([prompt])
        want = greedy(ref, ids, 10)[0, len(prompt):].tolist()
        assert tokens == want, (prompt, tokens, want)
        with torch.no_grad():
            ref_logits = ref(ids).logits[0, -1]
        assert (logits.cpu() - ref_logits).abs().max().item() <= 1e-4


def test_llama3_rope_scaling_matches_transformers(tmp_path, device):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 500000.0}
    from transformers import AutoModelForCausalLM

    from hf_models import make_config

    cfg = make_config("llama")
    cfg.rope_parameters = scaling
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, STD)
    ref.save_pretrained(tmp_path)
    dec = DecoderModel.load(tmp_path, device=device, kernels="reference")
    assert dec.config.rope_scaling is not None
    long_prompt = list(range(1, 40))  # past original_max_position_embeddings
    got, _ = _generate(dec, [long_prompt], 6)
    assert got[0] == greedy(ref, torch.tensor([long_prompt]), 6)[0, len(long_prompt):].tolist()


def test_the_triton_kernels_carry_a_whole_generation(tmp_path, device):
    """The same generation through the Triton kernels: compiled on CUDA, and on the CPU through Triton's
    interpreter (TRITON_INTERPRET=1, set by conftest without a GPU)."""
    ref, path = _saved(tmp_path, "qwen2", num_layers=2)
    dec = DecoderModel.load(path, device=device, kernels="triton")
    got, _ = _generate(dec, PROMPTS[:2], 4, block_size=8)
    for prompt, tokens in zip(PROMPTS[:2], got):
        assert tokens == greedy(ref, torch.tensor([prompt]), 4)[0, len(prompt):].tolist()


def test_unsupported_and_broken_configs():
    with pytest.raises(CheckpointError, match="model_type 'gpt2' unsupported"):
        ModelConfig.from_hf({"model_type": "gpt2"})
    with pytest.raises(CheckpointError, match="missing or malformed"):
        ModelConfig.from_hf({"model_type": "llama", "num_attention_heads": 4})
    base = dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                num_attention_heads=2)
    with pytest.raises(CheckpointError, match="rope_type 'yarn' unsupported"):
        ModelConfig.from_hf({**base, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
    with pytest.raises(CheckpointError, match="not a multiple"):
        ModelConfig.from_hf({**base, "num_key_value_heads": 3})


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("out_features", [2048, 2049, 3 * 1024 + 5])
@pytest.mark.parametrize("bias", [False, True])
def test_cpu_linear_in_slices_matches_float64(rows, out_features, bias):
    """Ops.linear slices tall weights on the CPU (several rows); the result is the whole product."""
    from tidal.model import Ops

    g = torch.Generator().manual_seed(rows * out_features)
    x = torch.randn(rows, 96, generator=g)
    w = torch.randn(out_features, 96, generator=g)
    b = torch.randn(out_features, generator=g) if bias else None
    got = Ops("reference", torch.device("cpu")).linear(x, w, b)
    want = x.double() @ w.double().T + (b.double() if bias else 0)
    assert got.shape == (rows, out_features) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
