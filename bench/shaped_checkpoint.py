"""Random-weight Hugging Face checkpoints of real models' shapes, written tensor by tensor (no transformers
model is built, so an 8B-shaped checkpoint takes seconds of the GPU and the disk's write time, not minutes).

The files are what `save_pretrained` writes for the same config: config.json, safetensors shards of a few
layers each, and model.safetensors.index.json, with transformers' tensor names. Weights are N(0, std = 0.02)
drawn on `device` (fast on a GPU), norms are ones, q/k/v biases (Qwen2) small random. A tied model has no
lm_head.weight, as transformers saves it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

LLAMA_3_2_1B = dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                    tie_word_embeddings=True, rope_theta=500000.0)
QWEN2_5_0_5B = dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                    num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                    tie_word_embeddings=True, rope_theta=1000000.0)
LLAMA_3_8B = dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
                  rope_theta=500000.0)
TINY = dict(model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False,
            rope_theta=10000.0)  # smoke runs on the CPU

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def config_json(shape: dict, dtype: torch.dtype, max_positions: int = 4096) -> dict:
    cfg = dict(shape, architectures=[ARCHITECTURES[shape["model_type"]]], hidden_act="silu",
               rms_norm_eps=1e-5, max_position_embeddings=max_positions, bos_token_id=None, eos_token_id=None,
               pad_token_id=0,
               dtype=str(dtype).removeprefix("torch."), attention_dropout=0.0)
    if shape["model_type"] == "llama":
        cfg.update(attention_bias=False, mlp_bias=False,
                   head_dim=shape["hidden_size"] // shape["num_attention_heads"])
    else:
        cfg.update(use_sliding_window=False, sliding_window=None,
                   max_window_layers=shape["num_hidden_layers"])
    return cfg


def layer_tensors(shape: dict) -> dict[str, tuple[int, ...]]:
    """Names (under model.layers.{i}.) and shapes of one decoder layer's tensors."""
    h, inter = shape["hidden_size"], shape["intermediate_size"]
    d = h // shape["num_attention_heads"]
    q, kv = shape["num_attention_heads"] * d, shape["num_key_value_heads"] * d
    out = {"self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
           "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, q),
           "mlp.gate_proj.weight": (inter, h), "mlp.up_proj.weight": (inter, h),
           "mlp.down_proj.weight": (h, inter),
           "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,)}
    if shape["model_type"] == "qwen2":
        out.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
                    "self_attn.v_proj.bias": (kv,)})
    return out


def _tensor(name: str, shape: tuple, dtype, device, gen, std: float) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32 if device == "cpu" else dtype)
    return t.mul_(std).to(dtype).cpu()


def write_checkpoint(path, shape: dict, dtype: torch.dtype = torch.bfloat16, device="cpu",
                     layers_per_shard: int = 4, seed: int = 0, std: float = 0.02) -> Path:
    """Write a random checkpoint of `shape` (one of the dicts above) to the directory `path`; returns it. A
    larger `std` than real models' 0.02 makes a tiny model's greedy tokens vary, for comparisons."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=device).manual_seed(seed)
    h, v, n = shape["hidden_size"], shape["vocab_size"], shape["num_hidden_layers"]
    shards: list[dict[str, tuple]] = [{"model.embed_tokens.weight": (v, h)}]
    for first in range(0, n, layers_per_shard):
        shards.append({f"model.layers.{i}.{name}": s for i in range(first, min(n, first + layers_per_shard))
                       for name, s in layer_tensors(shape).items()})
    shards.append({"model.norm.weight": (h,)})
    if not shape["tie_word_embeddings"]:
        shards[-1]["lm_head.weight"] = (v, h)
    weight_map, total = {}, 0
    for k, names in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: _tensor(name, s, dtype, device, gen, std) for name, s in names.items()}
        save_file(tensors, str(path / fname), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, fname))
        del tensors
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (path / "config.json").write_text(json.dumps(config_json(shape, dtype), indent=1))
    return path


def checkpoint_bytes(path) -> int:
    return sum(os.path.getsize(p) for p in Path(path).glob("*.safetensors"))
