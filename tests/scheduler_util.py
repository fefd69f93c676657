"""Shared by the live scheduler tests: tiny random Llama checkpoints and each prompt's tokens run alone."""
import torch

import tidal
from tidal.presets import Preset, build


def tiny(name: str, layers: int) -> Preset:
    return Preset(name, "llama", hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False,
                  rope_theta=10000.0, max_position_embeddings=48, rms_norm_eps=1e-5)


def build_models(preset: Preset, names, root) -> dict:
    """name -> checkpoint directory, one random model per name (seed = its position)."""
    return {n: build(preset, torch.float32, cache_dir=root, seed=i, log=lambda s: None) for i, n in enumerate(names)}


def alone(paths: dict, prompts: dict, engine_kwargs: dict) -> dict:
    """name -> prompt tuple -> greedy tokens, each prompt run alone in a plain Engine."""
    out = {}
    for name, path in paths.items():
        with tidal.Engine.from_pretrained(path, device="cpu", **engine_kwargs) as engine:
            out[name] = {tuple(p): engine.generate([p], max_new_tokens=n)[0] for p, n in prompts[name]}
    return out
