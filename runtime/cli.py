"""The `tidal` command line. `tidal demo` streams a small local Llama checkpoint at several residencies."""
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
    device: str | None = None

    def __post_init__(self):
        from .config import OffloadConfig

        for f in self.fractions:
            OffloadConfig(resident_fraction=f, prefetch_depth=self.prefetch_depth)  # validates both
        if self.new_tokens < 2 or self.prompt_tokens < 1:
            raise TidalError("--new-tokens must be >= 2 and --prompt-tokens >= 1")


def demo(cfg: DemoConfig) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from . import native, offload, stats
    from .backends import resolve_device
    from .checkpoints import random_checkpoint
    from .report import format_table

    device = resolve_device(cfg.device)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = random_checkpoint("llama", DEMO_MODEL)
    print(f"checkpoint: {path}\ndevice: {device}; tidal._C: {native.describe()}")
    prompt = torch.randint(1, DEMO_MODEL["vocab_size"], (1, cfg.prompt_tokens))
    rows, reference = [], None
    for fraction in cfg.fractions:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        offload(model, resident_fraction=fraction, prefetch_depth=cfg.prefetch_depth, device=device)
        ids = prompt.to(device)

        def generate(n):
            t0 = time.perf_counter()
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                     min_new_tokens=n, do_sample=False, pad_token_id=0)
            return out, time.perf_counter() - t0

        generate(2)  # warm-up
        _, prefill = generate(1)
        before = stats(model).total
        out, total = generate(cfg.new_tokens + 1)
        after = stats(model)
        decode_s = total - prefill
        steps = after.forwards - 1  # less the prefill forward
        per = lambda x: x / steps  # noqa: E731
        reference = out if reference is None else reference
        rows.append([f"{fraction:.2f}", f"{len(after.resident_layers)}/{DEMO_MODEL['num_hidden_layers']}",
                     cfg.new_tokens / decode_s, per(after.total.bytes_streamed - before.bytes_streamed) / 1e6,
                     per(after.total.stall_seconds - before.stall_seconds) * 1e3,
                     per(after.total.bookkeeping_seconds - before.bookkeeping_seconds) * 1e3,
                     "yes" if torch.equal(out.cpu(), reference.cpu()) else "NO"])
    print(format_table(["resident", "layers", "decode tok/s", "MB streamed/token", "stall ms/token",
                        "tidal ms/token", "same tokens"], rows))
    print("tidal ms/token is tidal's own host bookkeeping. Tokens are compared with the first row's run.")
    return 0 if all(r[-1] == "yes" for r in rows) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tidal", description="tidal: offload and preemption runtime for LLM inference")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="stream a small local Llama checkpoint at several resident fractions")
    d.add_argument("--fractions", default="1,0.75,0.5,0.25,0", help="comma list of resident fractions")
    d.add_argument("--prefetch-depth", type=int, default=2)
    d.add_argument("--new-tokens", type=int, default=32)
    d.add_argument("--device", default=None, help="cpu or cuda[:n] (default: cuda when available)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        fractions = tuple(float(x) for x in args.fractions.split(",") if x)
        cfg = DemoConfig(fractions=fractions, prefetch_depth=args.prefetch_depth, new_tokens=args.new_tokens,
                         device=args.device)
        return demo(cfg)
    except (TidalError, ValueError) as exc:
        print(f"tidal: error: {exc}", file=sys.stderr)
        return 2
