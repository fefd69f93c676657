"""Qwen3 on tidal.Engine against transformers: per-head q/k RMSNorm before RoPE, and a head_dim of its own
(32 here, against hidden 64 / 4 heads = 16), so q is wider than the hidden state and o_proj narrows it back."""
import json

import pytest
import torch

import tidal
from hf_models import assert_first_step_logits, greedy, make_model
from tidal.errors import CheckpointError

PROMPTS = [[5, 17, 99, 3, 42, 8, 71, 2, 9], [11], [64, 2, 90, 33]]  # 9 tokens (block 4: not a multiple), 1, 4
STD = 0.5  # peaked attention, and q/k norm weights far from one, so a skipped or misplaced norm shows
NEW = 10
HEAD_DIM = 32


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = make_model("qwen3", std=STD, head_dim=HEAD_DIM)
    assert model.config.head_dim * model.config.num_attention_heads != model.config.hidden_size
    path = tmp_path_factory.mktemp("qwen3")
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="module")
def expected(saved):
    model, _ = saved
    return [greedy(model, torch.tensor([p]), NEW)[0, len(p):].tolist() for p in PROMPTS]


def engine(path, device, **kw):
    return tidal.Engine.from_pretrained(path, device=device, **{"block_size": 4, "kv_cache_bytes": 1 << 20, **kw})


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_qwen3_greedy_matches_transformers(saved, expected, fraction, device):
    _, path = saved
    with engine(path, device, resident_fraction=fraction) as eng:
        assert eng.model.config.qk_norm and eng.model.config.head_dim == HEAD_DIM
        assert "q_norm" in eng.weights.names and "k_norm" in eng.weights.names
        assert eng.generate(PROMPTS, max_new_tokens=NEW) == expected
        assert len(eng.stats().streamed_layers) == (0 if fraction == 1.0 else 3)


def test_qwen3_first_step_logits_within_1e_4(saved, device):
    model, path = saved
    with engine(path, device, resident_fraction=0.5) as eng:
        assert_first_step_logits(eng, model, PROMPTS)


def test_qwen3_on_the_triton_kernels(saved, expected, device):
    """The q/k norms through Triton's rms_norm (the interpreter on the CPU), on [tokens, heads, head_dim]."""
    _, path = saved
    with engine(path, device, resident_fraction=0.5, kernels="triton") as eng:
        assert eng.generate(PROMPTS[:2], max_new_tokens=4) == [e[:4] for e in expected[:2]]


def test_qwen3_config_without_head_dim_is_refused(saved, tmp_path):
    """transformers would take 128 for a Qwen3 config without head_dim; tidal refuses rather than guess."""
    _, path = saved
    cfg = json.loads((path / "config.json").read_text())
    del cfg["head_dim"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    for f in path.glob("*.safetensors"):
        (tmp_path / f.name).symlink_to(f)
    with pytest.raises(CheckpointError, match="head_dim"):
        tidal.Engine.from_pretrained(tmp_path, device="cpu")
