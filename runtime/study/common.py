"""Helpers every study command shares, none of which measures anything: output directories, the default dtype,
how an emulated link and a decode curve are shown, and the size of a KV pool for a grid."""
from __future__ import annotations

import tempfile
from pathlib import Path

from ..errors import ConfigError


def writable_dir(out_dir) -> Path:
    """`out_dir`, created if needed; ConfigError naming it when it cannot be created or written into."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".tidal-write-check."):
            pass
    except OSError as exc:
        raise ConfigError(f"--out {out}: not a writable directory ({exc.strerror or exc})") from None
    return out


def default_dtype(device):
    """float32 on the CPU backend (its bfloat16 matmuls are slow and not what serving there would use),
    bfloat16 on CUDA."""
    import torch

    return torch.float32 if device.type == "cpu" else torch.bfloat16


def link_text(link: dict) -> str:
    """A document's `link` section in a line: its bandwidth, and what it stands for if that was said."""
    return f"{link['gbps']:.4g} GB/s" + (f", {link['label']}" if link["label"] else "")


def rows_of(doc: dict, section: str, system: str) -> list[dict]:
    """The rows of `doc[section]` ("decode" or "preemption") measured on `system`."""
    return [r for r in doc[section] if r["system"] == system]


def normalised_curves(doc: dict, system: str) -> dict[tuple[int, int], list[tuple[float, float, float]]]:
    """(batch, output tokens) -> [(resident fraction, tokens/s, tokens/s over the all-resident tokens/s)],
    by fraction. The all-resident reference is tidal's own (both systems are normalised to the same run, so
    the curves compare in absolute terms too); series without it are left out."""
    ref = {(r["batch"], r["output_tokens"]): r["tokens_per_second"]
           for r in rows_of(doc, "decode", "tidal") if r["resident_fraction"] == 1.0}
    out: dict = {}
    for r in rows_of(doc, "decode", system):
        key = (r["batch"], r["output_tokens"])
        if key in ref:
            out.setdefault(key, []).append((r["resident_fraction"], r["tokens_per_second"],
                                            r["tokens_per_second"] / ref[key]))
    return {k: sorted(v) for k, v in sorted(out.items())}


def kv_pool_bytes(engine_tokens: int, batch: int, placement_kv) -> int:
    """Bytes of a KV pool for `batch` sequences of up to `engine_tokens` tokens, two blocks to spare each."""
    blocks = batch * (-(-engine_tokens // placement_kv.block_size) + 2)
    return blocks * placement_kv.block_bytes
