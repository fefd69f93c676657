"""Named model shapes and random-weight checkpoints of them, so that tidal can be run and measured on a real
model's shape without downloading it.

A `Preset` holds the fields of a model's config.json that decide its tensors and its numerics. `build(name)`
writes a checkpoint of that shape with random weights into a cache directory and reuses it afterwards;
`resolve(spec)` takes a preset name or a checkpoint directory. The files are what transformers'
`save_pretrained` writes for the same config: config.json, safetensors shards of a few layers each and
model.safetensors.index.json, with transformers' tensor names (a tied model has no lm_head.weight). They are
written tensor by tensor, with no transformers model built, so an 8B shape costs the disk's write time and one
shard of host memory.

Weights are N(0, std) (0.02, as real models are initialised), q/k/v biases (Qwen2) too; norm weights,
Qwen3's q_norm/k_norm included, are ones.

`resolve` also takes the names in `PRETRAINED`: published models with their real weights and tokenizer,
built once from a package (`smollm2-135m`: tidal.smollm2, docs/TEXT.md).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

import safetensors.torch
import torch

from .errors import ConfigError

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
STD = 0.02
LAYERS_PER_SHARD = 4
_FORMAT = 1  # bump when the files a build writes change, so that older cache entries are not reused
_CHUNK = 1 << 24  # elements drawn at a time: bounds the fp32 temporary of a large tensor to 64 MiB


@dataclasses.dataclass(frozen=True)
class Llama3Rope:
    """Llama 3.1/3.2's RoPE frequency scaling (config.json `rope_scaling` with rope_type "llama3")."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def as_dict(self) -> dict:
        return {"rope_type": "llama3", **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class Preset:
    """A model's shape, named after config.json's fields. `head_dim` 0 means hidden_size / heads. Qwen2 has
    q/k/v biases (`attention_bias`), Qwen3 a per-head RMSNorm of q and k (`qk_norm`)."""

    name: str
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool
    rope_theta: float
    max_position_embeddings: int
    rms_norm_eps: float
    head_dim: int = 0
    rope_scaling: Llama3Rope | None = None

    def __post_init__(self):
        if self.model_type not in ARCHITECTURES:
            raise ConfigError(f"preset {self.name!r}: model_type {self.model_type!r} unsupported "
                              f"({', '.join(ARCHITECTURES)})")
        if isinstance(self.rope_scaling, dict):  # as config.json spells it
            s = {k: v for k, v in self.rope_scaling.items() if k not in ("rope_type", "type")}
            object.__setattr__(self, "rope_scaling", Llama3Rope(**s))
        if not self.head_dim and self.num_attention_heads > 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        for f in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "vocab_size", "max_position_embeddings", "head_dim"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"preset {self.name!r}: {f}={v!r} must be a positive int")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"preset {self.name!r}: {self.num_attention_heads} heads not a multiple of "
                              f"{self.num_key_value_heads} kv heads")
        if self.head_dim % 2:
            raise ConfigError(f"preset {self.name!r}: head_dim {self.head_dim} must be even (RoPE)")

    @property
    def attention_bias(self) -> bool:
        return self.model_type == "qwen2"

    @property
    def qk_norm(self) -> bool:
        return self.model_type == "qwen3"

    def layer_tensors(self) -> dict[str, tuple[int, ...]]:
        """Names (under model.layers.{i}.) and shapes of one decoder layer's tensors."""
        h, inter, d = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        out = {"input_layernorm.weight": (h,), "self_attn.q_proj.weight": (q, h),
               "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
               "self_attn.o_proj.weight": (h, q), "post_attention_layernorm.weight": (h,),
               "mlp.gate_proj.weight": (inter, h), "mlp.up_proj.weight": (inter, h),
               "mlp.down_proj.weight": (h, inter)}
        if self.attention_bias:
            out.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
                        "self_attn.v_proj.bias": (kv,)})
        if self.qk_norm:
            out.update({"self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,)})
        return out

    def shards(self, layers_per_shard: int = LAYERS_PER_SHARD) -> list[dict[str, tuple[int, ...]]]:
        """Every tensor's name and shape, grouped by file: embeddings, `layers_per_shard` layers per file,
        then the final norm and the LM head (absent when tied)."""
        h, n = self.hidden_size, self.num_hidden_layers
        layer = self.layer_tensors()
        out = [{"model.embed_tokens.weight": (self.vocab_size, h)}]
        for first in range(0, n, layers_per_shard):
            out.append({f"model.layers.{i}.{name}": s for i in range(first, min(n, first + layers_per_shard))
                        for name, s in layer.items()})
        out.append({"model.norm.weight": (h,)})
        if not self.tie_word_embeddings:
            out[-1]["lm_head.weight"] = (self.vocab_size, h)
        return out

    def param_count(self) -> int:
        return sum(_numel(s) for shard in self.shards() for s in shard.values())

    def nbytes(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes of the weights in `dtype` (the checkpoint's size, less a few KB of headers)."""
        return self.param_count() * dtype.itemsize

    def config_json(self, dtype: torch.dtype = torch.bfloat16) -> dict:
        """config.json as transformers 5's `save_pretrained` writes it for this model (less
        "transformers_version"), plus top-level rope_theta/rope_scaling, which transformers 4 reads instead of
        rope_parameters (transformers 5 reads either). bos/eos ids are left out: random weights have no
        tokenizer, and an eos id would make transformers' `generate` stop on a random token where tidal's
        engine does not."""
        rope = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling is not None:
            rope.update(self.rope_scaling.as_dict())
        cfg = dict(
            architectures=[ARCHITECTURES[self.model_type]], model_type=self.model_type,
            dtype=str(dtype).removeprefix("torch."), hidden_act="silu", attention_dropout=0.0,
            initializer_range=0.02, use_cache=True, bos_token_id=None, eos_token_id=None, pad_token_id=None,
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, vocab_size=self.vocab_size,
            tie_word_embeddings=self.tie_word_embeddings, rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings, rope_parameters=rope,
            rope_theta=self.rope_theta)
        if self.rope_scaling is not None:
            cfg["rope_scaling"] = self.rope_scaling.as_dict()
        if self.model_type in ("llama", "qwen3"):
            cfg.update(attention_bias=False, head_dim=self.head_dim)
        if self.model_type == "llama":
            cfg.update(mlp_bias=False, pretraining_tp=1)
        else:  # Qwen: sliding window off, as in the published configs
            cfg.update(layer_types=["full_attention"] * self.num_hidden_layers, sliding_window=None,
                       max_window_layers=self.num_hidden_layers, use_sliding_window=False)
        return dict(sorted(cfg.items()))


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# The published numbers come from each model's config.json on the Hugging Face hub (Qwen/Qwen2.5-0.5B,
# meta-llama/Llama-3.2-1B, Qwen/Qwen2.5-3B, meta-llama/Meta-Llama-3-8B, Qwen/Qwen3-8B, Qwen/Qwen2.5-14B).
PRESETS: dict[str, Preset] = {p.name: p for p in (
    # a small Llama for CPU smoke runs and the demo: a decode step in milliseconds
    Preset("tiny", "llama", hidden_size=256, intermediate_size=768, num_hidden_layers=8,
           num_attention_heads=8, num_key_value_heads=4, vocab_size=2048, tie_word_embeddings=False,
           rope_theta=10000.0, max_position_embeddings=4096, rms_norm_eps=1e-5),
    # smaller still: the benchmarks' CPU smoke shape (bench/shaped_checkpoint.py's TINY)
    Preset("micro", "llama", hidden_size=128, intermediate_size=256, num_hidden_layers=4,
           num_attention_heads=4, num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False,
           rope_theta=10000.0, max_position_embeddings=4096, rms_norm_eps=1e-5),
    Preset("qwen2.5-0.5b", "qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
           num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
           rope_theta=1000000.0, max_position_embeddings=32768, rms_norm_eps=1e-6),
    Preset("llama-3.2-1b", "llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
           num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True,
           rope_theta=500000.0, max_position_embeddings=131072, rms_norm_eps=1e-5, head_dim=64,
           rope_scaling=Llama3Rope(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                   original_max_position_embeddings=8192)),
    Preset("qwen2.5-3b", "qwen2", hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
           num_attention_heads=16, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
           rope_theta=1000000.0, max_position_embeddings=32768, rms_norm_eps=1e-6),
    Preset("llama-3-8b", "llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
           num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
           rope_theta=500000.0, max_position_embeddings=8192, rms_norm_eps=1e-5),
    Preset("qwen3-8b", "qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
           num_attention_heads=32, num_key_value_heads=8, vocab_size=151936, tie_word_embeddings=False,
           rope_theta=1000000.0, max_position_embeddings=40960, rms_norm_eps=1e-6, head_dim=128),
    Preset("qwen2.5-14b", "qwen2", hidden_size=5120, intermediate_size=13824, num_hidden_layers=48,
           num_attention_heads=40, num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False,
           rope_theta=1000000.0, max_position_embeddings=131072, rms_norm_eps=1e-5),
)}


def _smollm2(cache_dir, log) -> Path:
    from . import smollm2

    return smollm2.build(cache_root(cache_dir), log=log)


# Presets with a published model's real weights and tokenizer, each built by its own module from a package
# (an optional extra) rather than drawn: name -> builder(cache_dir, log). `resolve` takes their names.
PRETRAINED: dict[str, Callable[..., Path]] = {"smollm2-135m": _smollm2}


def names() -> tuple[str, ...]:
    """The random-weight preset names, smallest model first (`PRETRAINED` holds the real ones)."""
    return tuple(sorted(PRESETS, key=lambda n: PRESETS[n].param_count()))


def _known() -> str:
    return f"presets: {', '.join(names())}; pretrained: {', '.join(PRETRAINED)}"


def get(name: str) -> Preset:
    """The random-weight preset called `name`; ConfigError naming the presets if there is none."""
    if name in PRETRAINED:
        raise ConfigError(f"preset {name!r} has real weights, not a random shape: tidal.presets.resolve("
                          f"{name!r}) builds it")
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r} ({_known()})")
    return PRESETS[name]


def cache_root(path: str | os.PathLike | None = None) -> Path:
    """Where built presets live: `path`, else $TIDAL_CACHE_DIR, else ~/.cache/tidal."""
    if path is not None:
        return Path(path)
    return Path(os.environ.get("TIDAL_CACHE_DIR") or Path.home() / ".cache" / "tidal")


def write_checkpoint(path: str | os.PathLike, preset: Preset, dtype: torch.dtype = torch.bfloat16,
                     device="cpu", layers_per_shard: int = LAYERS_PER_SHARD, seed: int = 0,
                     std: float = STD) -> Path:
    """Write a random-weight checkpoint of `preset` into the directory `path` (created if needed); returns it.
    Weights are drawn on `device` (a GPU draws an 8B model in seconds) from a generator seeded with `seed`.
    A larger `std` than 0.02 makes a tiny model's greedy tokens vary, for comparisons. Not atomic: `build`
    writes through this into a temporary directory."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=device).manual_seed(seed)
    shards = preset.shards(layers_per_shard)
    weight_map, total = {}, 0
    for k, tensors in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        data = {name: _random(name, shape, dtype, device, gen, std) for name, shape in tensors.items()}
        safetensors.torch.save_file(data, str(path / fname), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in data.values())
        weight_map.update(dict.fromkeys(data, fname))
        del data
    # the index and config.json last: a directory without them is not a checkpoint
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (path / "config.json").write_text(json.dumps(preset.config_json(dtype), indent=2) + "\n")
    return path


def _random(name: str, shape: tuple, dtype: torch.dtype, device, gen: torch.Generator, std: float):
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    out = torch.empty(shape, dtype=dtype)
    flat = out.view(-1)
    # fp32 draws on the CPU, rounded to dtype; a GPU draws in dtype directly. In chunks, so that an 8B
    # model's embeddings never need a 2 GB fp32 temporary
    draw = torch.float32 if torch.device(device).type == "cpu" else dtype
    for a in range(0, flat.numel(), _CHUNK):
        n = min(_CHUNK, flat.numel() - a)
        flat[a:a + n] = torch.randn(n, generator=gen, device=device, dtype=draw).mul_(std).to(dtype).cpu()
    return out


def checkpoint_bytes(path: str | os.PathLike) -> int:
    """Bytes of a checkpoint directory's safetensors files."""
    return sum(os.path.getsize(p) for p in Path(path).glob("*.safetensors"))


def _key(preset: Preset, dtype: torch.dtype, seed: int, device: str = "cpu") -> str:
    spec = json.dumps([_FORMAT, preset.config_json(dtype), STD, LAYERS_PER_SHARD, seed], sort_keys=True)
    dtype_name = str(dtype).removeprefix("torch.")
    drawn = "" if device == "cpu" else f"-{device}"  # another generator: other values from the same seed
    return f"{preset.name}-{dtype_name}-seed{seed}{drawn}-{hashlib.sha256(spec.encode()).hexdigest()[:10]}"


def _complete(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors.index.json").is_file()


def build(name: str | Preset, dtype: torch.dtype = torch.bfloat16, cache_dir: str | os.PathLike | None = None,
          seed: int = 0, log: Callable[[str], object] = print, device: str = "cpu") -> Path:
    """The directory of a random-weight checkpoint of preset `name` (or of a `Preset`) in `dtype`, drawn on
    `device` ("cuda" draws an 8B model in seconds) and built on first use under the cache directory (`cache_dir`, else $TIDAL_CACHE_DIR, else ~/.cache/tidal) and reused
    afterwards. A build says what it writes through `log` first, and raises ConfigError when the disk has
    no room for it. It writes into a temporary directory renamed into place at the end, so an interrupted
    build is never taken for a complete one."""
    preset = name if isinstance(name, Preset) else get(name)
    root = cache_root(cache_dir)
    device = torch.device(device).type
    path = root / _key(preset, dtype, seed, device)
    if _complete(path):
        return path
    nbytes = preset.nbytes(dtype)
    gb = f"{nbytes / 1e9:.2f} GB"
    log(f"building preset {preset.name} ({str(dtype).removeprefix('torch.')}, {gb}) in {path}")
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if free < nbytes + (64 << 20):  # the shards plus room for headers, the index and the file system
        raise ConfigError(f"not enough disk space to build preset {preset.name}: it needs {gb}, "
                          f"{free / 1e9:.2f} GB free in {root} (set TIDAL_CACHE_DIR or pass cache_dir)")
    tmp = root / f".{path.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        write_checkpoint(tmp, preset, dtype, device=device, seed=seed)
        if path.exists():  # an incomplete leftover (or another process's build, complete: keep that one)
            if _complete(path):
                shutil.rmtree(tmp)
                return path
            shutil.rmtree(path)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def resolve(spec: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
            cache_dir: str | os.PathLike | None = None, log: Callable[[str], object] = print,
            device: str = "cpu") -> Path:
    """A checkpoint directory for `spec`: a preset name is built (or reused, `build`, drawing on `device`); a
    pretrained preset's name (`PRETRAINED`, e.g. "smollm2-135m") is built from its package once, in its own
    dtype whatever `dtype` says (an engine converts at load); a directory holding a config.json is returned
    as is. A preset name wins over a directory of the same name (write ./tiny for the directory)."""
    if isinstance(spec, str) and spec in PRESETS:
        return build(spec, dtype, cache_dir, log=log, device=device)
    if isinstance(spec, str) and spec in PRETRAINED:
        return PRETRAINED[spec](cache_dir, log)
    path = Path(spec)
    if (path / "config.json").is_file():
        return path
    raise ConfigError(f"unknown preset {str(spec)!r} ({_known()}) and not a checkpoint directory")
