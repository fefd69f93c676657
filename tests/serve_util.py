"""Shared by the server tests: a small random Llama with SmolLM2's tokenizer. (A real `tidal serve` run by
uvicorn in a thread on a free local port is `tidal.serve.server.Background`.)"""
import shutil

import torch

import tidal
from tidal.presets import Preset, write_checkpoint

# vocab_size 49152: SmolLM2's tokenizer fits it, so the random model's tokens decode to real (random) text
RANDOM = Preset("serve-random", "llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=False,
                rope_theta=10000.0, max_position_embeddings=1024, rms_norm_eps=1e-5)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def smollm2() -> str:
    """The real SmolLM2-135M-Instruct checkpoint (preset `smollm2-135m`, built once into tidal's cache)."""
    return str(tidal.presets.resolve("smollm2-135m", log=lambda s: None))


def random_model(root, seed: int = 0) -> str:
    """A random-weight RANDOM checkpoint in `root`, with SmolLM2's tokenizer files copied in. std 0.2, so that
    greedy decoding has clear winners (0.02 leaves near-ties that batch shapes can flip)."""
    path = write_checkpoint(root, RANDOM, torch.float32, seed=seed, std=0.2)
    for name in TOKENIZER_FILES:
        shutil.copy(f"{smollm2()}/{name}", path / name)
    return str(path)
