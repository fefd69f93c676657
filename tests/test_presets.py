"""tidal.presets against transformers: each preset's config.json is what save_pretrained writes and has the
parameter count transformers builds from it; built checkpoints load alike in tidal and transformers; the
cache is reused, never left half-written, and refuses a full disk."""
import collections
import dataclasses
import json
import shutil

import pytest
import safetensors.torch
import torch

import tidal
from hf_models import greedy
from tidal import presets
from tidal.errors import ConfigError

# Independent of presets.py: the models' published config.json numbers (hidden, intermediate, layers, heads,
# kv heads, head_dim, vocab, tied, rope_theta) and their parameter counts as their model cards give them.
PUBLISHED = {
    "qwen2.5-0.5b": ((896, 4864, 24, 14, 2, 64, 151936, True, 1e6), 494_032_768),
    "llama-3.2-1b": ((2048, 8192, 16, 32, 8, 64, 128256, True, 5e5), 1_235_814_400),
    "qwen2.5-3b": ((2048, 11008, 36, 16, 2, 128, 151936, True, 1e6), 3_085_938_688),
    "llama-3-8b": ((4096, 14336, 32, 32, 8, 128, 128256, False, 5e5), 8_030_261_248),
    "qwen3-8b": ((4096, 12288, 36, 32, 8, 128, 151936, False, 1e6), 8_190_735_360),
    "qwen2.5-14b": ((5120, 13824, 48, 40, 8, 128, 152064, False, 1e6), 14_770_033_664),
}
FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
          "head_dim", "vocab_size", "tie_word_embeddings", "rope_theta")
# what save_pretrained writes that a config.json from presets leaves out, and the reverse (for transformers 4)
ONLY_THEIRS, ONLY_OURS = {"transformers_version"}, {"rope_theta", "rope_scaling"}


def hf_config(p: presets.Preset, dtype=torch.bfloat16):
    """transformers' own config of the preset's model, built from its fields (not from config_json)."""
    from transformers import AutoConfig

    kw = dict(hidden_size=p.hidden_size, intermediate_size=p.intermediate_size,
              num_hidden_layers=p.num_hidden_layers, num_attention_heads=p.num_attention_heads,
              num_key_value_heads=p.num_key_value_heads, vocab_size=p.vocab_size,
              tie_word_embeddings=p.tie_word_embeddings, rope_theta=p.rope_theta,
              max_position_embeddings=p.max_position_embeddings, rms_norm_eps=p.rms_norm_eps, dtype=dtype,
              bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if p.model_type != "qwen2":
        kw["head_dim"] = p.head_dim
    if p.model_type != "llama":
        kw["max_window_layers"] = p.num_hidden_layers
    if p.rope_scaling is not None:
        kw["rope_scaling"] = p.rope_scaling.as_dict()
    cfg = AutoConfig.for_model(p.model_type, **kw)
    cfg.architectures = [presets.ARCHITECTURES[p.model_type]]  # as a model's save_pretrained sets it
    return cfg


def test_names_and_published_shapes():
    assert set(PUBLISHED) | {"tiny"} <= set(presets.names())
    for name, (fields, params) in PUBLISHED.items():
        p = presets.get(name)
        assert tuple(getattr(p, f) for f in FIELDS) == fields, name
        assert p.param_count() == params, name
        assert p.nbytes(torch.bfloat16) == 2 * params
    llama32 = presets.get("llama-3.2-1b").rope_scaling.as_dict()
    assert llama32 == dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                           original_max_position_embeddings=8192)
    assert presets.get("qwen2.5-0.5b").attention_bias and presets.get("qwen3-8b").qk_norm


@pytest.mark.parametrize("name", presets.names())
def test_config_json_is_what_transformers_writes(name, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    p = presets.get(name)
    ours = p.config_json(torch.bfloat16)
    hf_config(p).save_pretrained(tmp_path / "theirs")
    theirs = json.loads((tmp_path / "theirs" / "config.json").read_text())
    assert {k: v for k, v in ours.items() if k not in ONLY_OURS} == \
        {k: v for k, v in theirs.items() if k not in ONLY_THEIRS}
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "config.json").write_text(json.dumps(ours))
    loaded = AutoConfig.from_pretrained(tmp_path / "ours")
    reloaded = AutoConfig.from_pretrained(tmp_path / "theirs")
    assert {**loaded.to_dict(), "_name_or_path": ""} == {**reloaded.to_dict(), "_name_or_path": ""}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(loaded)
    assert sum(t.numel() for t in model.parameters()) == p.param_count()
    names = {f"model.layers.0.{n}" for n in p.layer_tensors()}
    assert names == {n for n, _ in model.named_parameters() if n.startswith("model.layers.0.")}


def test_tiny_builds_once_and_runs_alike_in_tidal_and_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    lines = []
    path = presets.build("tiny", cache_dir=tmp_path, log=lines.append)
    assert len(lines) == 1 and lines[0].startswith("building preset tiny (bfloat16, 0.01 GB) in ")
    assert str(path) in lines[0] and path.parent == tmp_path
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 4  # embeddings, 2 x 4 layers, head
    stamps = {f.name: f.stat().st_mtime_ns for f in path.iterdir()}
    assert presets.build("tiny", cache_dir=tmp_path, log=lines.append) == path
    assert presets.resolve("tiny", cache_dir=tmp_path, log=lines.append) == path
    assert len(lines) == 1 and stamps == {f.name: f.stat().st_mtime_ns for f in path.iterdir()}
    assert presets.resolve(str(path)) == path  # a checkpoint directory is taken as it is

    prompt = [5, 900, 17, 1234, 99, 3, 2047, 8]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    want = greedy(hf, torch.tensor([prompt]), 8)[0, len(prompt):].tolist()
    with tidal.Engine.from_pretrained(path, dtype=torch.float32) as engine:
        assert engine.generate([prompt], max_new_tokens=8) == [want]


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_written_qwen_checkpoints_run_alike(model_type, tmp_path):
    """The writer's Qwen tensors (q/k/v bias, tied head; q/k norms with a head_dim of its own) as transformers
    and tidal read them: the same greedy tokens in fp32. A larger std than 0.02 makes the tokens vary."""
    from transformers import AutoModelForCausalLM

    p = presets.Preset("small", model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                       tie_word_embeddings=model_type == "qwen2", rope_theta=10000.0,
                       max_position_embeddings=512, rms_norm_eps=1e-6, head_dim=32 if model_type == "qwen3" else 0)
    path = presets.write_checkpoint(tmp_path, p, torch.float32, layers_per_shard=2, std=0.3)
    prompts = [[3, 200, 41, 7, 99], [12, 8, 250, 1, 77]]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    want = greedy(hf, torch.tensor(prompts), 8)[:, 5:].tolist()
    with tidal.Engine.from_pretrained(path, resident_fraction=0.5) as engine:
        got = engine.generate(prompts, max_new_tokens=8)
    assert got == want and len({t for row in got for t in row}) > 4


def test_an_interrupted_build_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    real, calls = safetensors.torch.save_file, []

    def interrupted(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)
    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        presets.build("micro", cache_dir=tmp_path, log=lambda s: None)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    path = presets.build("micro", cache_dir=tmp_path, log=lambda s: None)
    assert [f.name for f in tmp_path.iterdir()] == [path.name] and (path / "config.json").exists()


def test_a_killed_build_is_not_reused(tmp_path):
    """A build killed outright leaves its temporary directory: the entry itself is never there."""
    lines = []
    path = presets.build("micro", cache_dir=tmp_path, log=lines.append)
    shutil.move(path, tmp_path / f".{path.name}.partial-killed")
    assert presets.build("micro", cache_dir=tmp_path, log=lines.append) == path and len(lines) == 2


def test_unknown_preset_or_directory(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown preset 'nope' \(presets: micro, tiny, .*\) and not a "
                                          r"checkpoint directory"):
        presets.resolve("nope", cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="not a checkpoint directory"):
        presets.resolve(tmp_path, cache_dir=tmp_path)  # a directory without config.json
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        presets.build("nope", cache_dir=tmp_path)


def test_not_enough_disk_space(tmp_path, monkeypatch):
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 << 30, 10 << 30, 1 << 20))
    lines = []
    with pytest.raises(ConfigError, match=r"not enough disk space to build preset qwen2.5-0.5b: it needs "
                                          r"0.99 GB, 0.00 GB free in"):
        presets.build("qwen2.5-0.5b", cache_dir=tmp_path, log=lines.append)
    assert len(lines) == 1 and "0.99 GB" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_cache_dir_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TIDAL_CACHE_DIR", str(tmp_path / "env"))
    path = presets.resolve("micro", dtype=torch.float16, log=lambda s: None)
    assert path.parent == tmp_path / "env" and "micro" in path.name and "float16" in path.name
    assert presets.build("micro", torch.float16, seed=1, log=lambda s: None) != path  # seed in the key


def test_preset_validation():
    base = dataclasses.asdict(presets.get("tiny"))
    with pytest.raises(ConfigError, match="model_type 'gpt2' unsupported"):
        presets.Preset(**{**base, "model_type": "gpt2"})
    with pytest.raises(ConfigError, match="8 heads not a multiple of 3 kv heads"):
        presets.Preset(**{**base, "num_key_value_heads": 3})
    with pytest.raises(ConfigError, match="hidden_size=0 must be a positive int"):
        presets.Preset(**{**base, "hidden_size": 0})
