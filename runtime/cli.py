"""The `tidal` command line. `tidal demo` serves a small local Llama checkpoint with tidal's engine at several
resident fractions, then once with a KV cache too small for the batch, so that requests are preempted."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time

from .errors import TidalError

DEMO_MODEL = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                  num_key_value_heads=4, vocab_size=8192, max_position_embeddings=1024, tie_word_embeddings=False)


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    fractions: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25, 0.0)
    prefetch_depth: int = 2
    prompt_tokens: int = 16
    new_tokens: int = 32
    batch: int = 4
    device: str | None = None

    def __post_init__(self):
        from .config import OffloadConfig

        for f in self.fractions:
            OffloadConfig(resident_fraction=f, prefetch_depth=self.prefetch_depth)  # validates both
        if self.new_tokens < 2 or self.prompt_tokens < 1 or self.batch < 1:
            raise TidalError("--new-tokens must be >= 2, --prompt-tokens and --batch >= 1")


def _serve(engine, prompts, new_tokens) -> tuple[list[list[int]], float]:
    """Generate through the step API; returns the outputs and the decode seconds (every step after the first,
    which prefills)."""
    ids = [engine.add_request(p, max_new_tokens=new_tokens) for p in prompts]
    out = {i: [] for i in ids}
    decode_from = None
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id] += o.token_ids
        decode_from = decode_from or time.perf_counter()
    return [out[i] for i in ids], time.perf_counter() - decode_from


def demo(cfg: DemoConfig) -> int:
    import torch

    from . import Engine, native
    from .backends import resolve_device
    from .checkpoints import random_checkpoint
    from .report import format_table

    device = resolve_device(cfg.device)
    path = random_checkpoint("llama", DEMO_MODEL)
    print(f"checkpoint: {path}\ndevice: {device}; tidal._C: {native.describe()}")
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(1, DEMO_MODEL["vocab_size"], (cfg.batch, cfg.prompt_tokens), generator=gen).tolist()
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    rows, reference = [], None
    for fraction in cfg.fractions:
        with Engine.from_pretrained(path, device=device, dtype=dtype, resident_fraction=fraction,
                                    prefetch_depth=cfg.prefetch_depth) as engine:
            _serve(engine, prompts[:1], 2)  # warm-up
            before = engine.stats()
            out, decode_s = _serve(engine, prompts, cfg.new_tokens)
            s = engine.stats()
        steps = s.decode_steps - before.decode_steps
        per = lambda x: x / steps  # noqa: E731
        reference = out if reference is None else reference
        rows.append([f"{fraction:.2f}", f"{len(s.resident_layers)}/{DEMO_MODEL['num_hidden_layers']}",
                     (s.decode_tokens - before.decode_tokens) / decode_s,
                     per(s.streaming.bytes_streamed - before.streaming.bytes_streamed) / 1e6,
                     per(s.streaming.stall_seconds - before.streaming.stall_seconds) * 1e3,
                     "yes" if out == reference else "NO"])
    print(f"engine: batch {cfg.batch}, {cfg.prompt_tokens} prompt + {cfg.new_tokens} new tokens each, kernels "
          f"{s.kernel_path}, {dtype}")
    print(format_table(["resident", "layers", "decode tok/s", "MB streamed/step", "stall ms/step", "same tokens"],
                       rows))

    # A KV cache of too few blocks for the whole batch: the newest requests are swapped out and back.
    block_size = 16
    need = cfg.batch * -(-(cfg.prompt_tokens + cfg.new_tokens) // block_size)
    blocks = max(need // 2, -(-(cfg.prompt_tokens + cfg.new_tokens) // block_size) + 1)
    c = DEMO_MODEL
    block_bytes = 2 * c["num_hidden_layers"] * block_size * c["num_key_value_heads"] * \
        (c["hidden_size"] // c["num_attention_heads"]) * dtype.itemsize
    with Engine.from_pretrained(path, device=device, dtype=dtype, block_size=block_size,
                                kv_cache_bytes=blocks * block_bytes) as engine:
        out, _ = _serve(engine, prompts, cfg.new_tokens)
        s = engine.stats()
    same = out == reference
    print(f"preemption: {blocks} KV blocks for a batch needing {need}: {s.swap_outs} swap-outs, {s.swap_ins} "
          f"swap-ins, {s.swap_bytes / 1e6:.1f} MB moved in {s.swap_seconds * 1e3:.1f} ms, {s.recomputes} "
          f"recomputes; same tokens: {'yes' if same else 'NO'}")
    return 0 if same and all(r[-1] == "yes" for r in rows) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tidal", description="tidal: offload and preemption runtime for LLM inference")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="serve a small local Llama checkpoint at several resident fractions")
    d.add_argument("--fractions", default="1,0.75,0.5,0.25,0", help="comma list of resident fractions")
    d.add_argument("--prefetch-depth", type=int, default=2)
    d.add_argument("--new-tokens", type=int, default=32)
    d.add_argument("--batch", type=int, default=4)
    d.add_argument("--device", default=None, help="cpu or cuda[:n] (default: cuda when available)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        fractions = tuple(float(x) for x in args.fractions.split(",") if x)
        cfg = DemoConfig(fractions=fractions, prefetch_depth=args.prefetch_depth, new_tokens=args.new_tokens,
                         batch=args.batch, device=args.device)
        return demo(cfg)
    except (TidalError, ValueError) as exc:
        print(f"tidal: error: {exc}", file=sys.stderr)
        return 2
