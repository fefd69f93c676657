"""Shared by the server tests: a small random Llama with SmolLM2's tokenizer, and a real `tidal serve` app run
by uvicorn in a thread on a free local port."""
import asyncio
import shutil
import socket
import threading
import time

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


class Running:
    """`tidal serve` in this process: the Service built from `config` (a ServeConfig; its port is ignored: a
    free one is bound) and uvicorn in a daemon thread. `url` is the /v1 base; `stop()` shuts both down."""

    def __init__(self, config, metrics=None):
        import uvicorn

        from tidal.serve.app import create_app
        from tidal.serve.loading import build_service

        self.service = build_service(config, metrics=metrics)
        self.service.start(warmup=config.warmup)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.service), log_level="warning"))
        serve = self.server.serve(sockets=[sock])
        self.thread = threading.Thread(target=asyncio.run, args=(serve,), daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    @property
    def base(self) -> str:
        return self.url.removesuffix("/v1")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.service.close()
