"""A Llama-family decoder (Llama, Qwen2, Mistral) on tidal's paged KV cache and kernels, loaded from a
Hugging Face checkpoint with `tidal.checkpoint`. Plain PyTorch in the style of gpt-fast: prefill one
sequence at a time with causal attention over its prompt, decode a batch of sequences one token each
with `paged_decode_attention`."""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from .checkpoint import Checkpoint
from .errors import CheckpointError, ConfigError

SUPPORTED = ("llama", "qwen2", "mistral")
LAYER_TENSORS = ("input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                 "self_attn.v_proj.weight", "self_attn.o_proj.weight", "post_attention_layernorm.weight",
                 "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
BIASES = ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The fields of a checkpoint's config.json that the decoder uses, validated."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool

    @classmethod
    def from_hf(cls, cfg: dict, source: str = "config.json") -> "ModelConfig":
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED:
            raise CheckpointError(f"{source}: model_type {model_type!r} unsupported (supported: {SUPPORTED})")
        try:
            heads = int(cfg["num_attention_heads"])
            rope = dict(cfg.get("rope_parameters") or {})
            if not rope:  # older config.json: rope_theta and rope_scaling at the top level
                rope = {**(cfg.get("rope_scaling") or {}), "rope_theta": cfg.get("rope_theta", 10000.0)}
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            if rope_type not in ("default", "llama3"):
                raise CheckpointError(f"{source}: rope_type {rope_type!r} unsupported (default, llama3)")
            config = cls(
                model_type=model_type, vocab_size=int(cfg["vocab_size"]), hidden_size=int(cfg["hidden_size"]),
                intermediate_size=int(cfg["intermediate_size"]), num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads, num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=float(rope.get("rope_theta", 10000.0)),
                rope_scaling=rope if rope_type == "llama3" else None,
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")))
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{source}: missing or malformed field ({exc!r})") from None
        if config.num_heads % config.num_kv_heads:
            raise CheckpointError(f"{source}: {config.num_heads} heads not a multiple of {config.num_kv_heads} kv heads")
        return config


def rope_cache(config: ModelConfig, max_positions: int, device=None) -> torch.Tensor:
    """`[max_positions, head_dim]` fp32: cos then sin of position x inverse frequency (Llama 3 scaling too)."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = config.rope_scaling
    if s is not None:
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) * ~(wavelen > old / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], -1).to(device)


class _Ops:
    """The kernels the decoder calls: the dispatcher ("auto") or the torch references ("reference")."""

    def __init__(self, path: str):
        from tidal import kernels as K

        if path not in ("auto", "reference"):
            raise ConfigError(f"kernels={path!r} must be 'auto' or 'reference'")
        self.path = path
        mod = K if path == "auto" else K.reference
        self.rms_norm, self.rotary, self.silu_and_mul, self.write_kv = (
            mod.rms_norm, mod.rotary_embedding, mod.silu_and_mul, mod.write_kv)
        self._K = K

    def attention(self, q, k_cache, v_cache, block_tables, seq_lens, scale):
        if self.path == "auto":
            return self._K.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, check_lens=False)
        return self._K.reference.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale)


class DecoderModel:
    """Weights on the device, ready for `prefill` and `decode_step` over a `PagedKVCache`."""

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], layers: list[dict[str, torch.Tensor]],
                 kernels: str = "auto"):
        self.config, self.weights, self.layers = config, weights, layers
        self.ops = _Ops(kernels)
        self.scale = config.head_dim ** -0.5
        device = weights["embed"].device
        self.rope = rope_cache(config, config.max_position_embeddings, device)

    @classmethod
    def load(cls, path, device="cpu", dtype: torch.dtype | None = None, kernels: str = "auto") -> "DecoderModel":
        ckpt = Checkpoint(path)
        config = ModelConfig.from_hf(ckpt.config, str(ckpt.path / "config.json"))
        c = config
        qd, kvd = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        shapes = {"input_layernorm.weight": (c.hidden_size,), "post_attention_layernorm.weight": (c.hidden_size,),
                  "self_attn.q_proj.weight": (qd, c.hidden_size), "self_attn.k_proj.weight": (kvd, c.hidden_size),
                  "self_attn.v_proj.weight": (kvd, c.hidden_size), "self_attn.o_proj.weight": (c.hidden_size, qd),
                  "mlp.gate_proj.weight": (c.intermediate_size, c.hidden_size),
                  "mlp.up_proj.weight": (c.intermediate_size, c.hidden_size),
                  "mlp.down_proj.weight": (c.hidden_size, c.intermediate_size),
                  "self_attn.q_proj.bias": (qd,), "self_attn.k_proj.bias": (kvd,), "self_attn.v_proj.bias": (kvd,)}

        def get(name, shape):
            return ckpt.load(name, dtype=dtype, shape=shape).to(device)

        weights = {"embed": get("model.embed_tokens.weight", (c.vocab_size, c.hidden_size)),
                   "norm": get("model.norm.weight", (c.hidden_size,))}
        weights["lm_head"] = (weights["embed"] if c.tie_word_embeddings
                              else get("lm_head.weight", (c.vocab_size, c.hidden_size)))
        names = LAYER_TENSORS + (BIASES if c.attention_bias else ())
        layers = [{n: get(f"model.layers.{i}.{n}", shapes[n]) for n in names} for i in range(c.num_layers)]
        return cls(config, weights, layers, kernels)

    # -- the two phases ----------------------------------------------------------------------------------------
    def prefill(self, cache, seq_id, tokens: list[int]) -> torch.Tensor:
        """Run a new sequence's prompt, writing its K/V into `cache`; returns the last position's logits `[vocab]`."""
        n = len(tokens)
        cache.allocate(seq_id, n)
        ids = torch.tensor(tokens, device=self.weights["embed"].device)
        positions = torch.arange(n, device=ids.device)
        slots = cache.slot_mapping(seq_id, 0, n)
        h = self._run(ids, positions, cache, slots, lambda q, k, v, layer: self._causal(q, k, v))
        return self._logits(h[-1:])[0]

    def decode_step(self, cache, seq_ids: list, tokens: list[int]) -> torch.Tensor:
        """One new token for each sequence (already in `cache`); returns logits `[batch, vocab]`."""
        for s in seq_ids:
            cache.append(s, 1)
        meta = cache.batch(seq_ids)
        ids = torch.tensor(tokens, device=self.weights["embed"].device)
        positions = meta.seq_lens.long() - 1

        def attend(q, k, v, layer):
            k_cache, v_cache = cache.layer(layer)
            return self.ops.attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, self.scale)
        return self._logits(self._run(ids, positions, cache, meta.slot_mapping, attend))

    # -- the layer stack ---------------------------------------------------------------------------------------
    def _run(self, ids, positions, cache, slots, attend):
        c, ops = self.config, self.ops
        h = F.embedding(ids, self.weights["embed"])
        residual = None
        for i, w in enumerate(self.layers):
            if residual is None:
                residual, x = h, ops.rms_norm(h, w["input_layernorm.weight"], c.rms_norm_eps)
            else:
                x, residual = ops.rms_norm(h, w["input_layernorm.weight"], c.rms_norm_eps, residual)
            q = F.linear(x, w["self_attn.q_proj.weight"], w.get("self_attn.q_proj.bias")).view(-1, c.num_heads, c.head_dim)
            k = F.linear(x, w["self_attn.k_proj.weight"], w.get("self_attn.k_proj.bias")).view(-1, c.num_kv_heads, c.head_dim)
            v = F.linear(x, w["self_attn.v_proj.weight"], w.get("self_attn.v_proj.bias")).view(-1, c.num_kv_heads, c.head_dim)
            ops.rotary(positions, q, k, self.rope)
            k_cache, v_cache = cache.layer(i)
            ops.write_kv(k, v, k_cache, v_cache, slots)
            attn = attend(q, k, v, i).reshape(-1, c.num_heads * c.head_dim)
            h = F.linear(attn, w["self_attn.o_proj.weight"])
            x, residual = ops.rms_norm(h, w["post_attention_layernorm.weight"], c.rms_norm_eps, residual)
            gate_up = torch.cat([F.linear(x, w["mlp.gate_proj.weight"]), F.linear(x, w["mlp.up_proj.weight"])], -1)
            h = F.linear(ops.silu_and_mul(gate_up), w["mlp.down_proj.weight"])
        return ops.rms_norm(h, self.weights["norm"], c.rms_norm_eps, residual)[0]

    def _causal(self, q, k, v):
        """Causal attention of a prompt over itself: q `[n, Hq, D]`, k/v `[n, Hkv, D]`."""
        group = self.config.num_heads // self.config.num_kv_heads
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                             is_causal=True, scale=self.scale)
        return out.transpose(0, 1)

    def _logits(self, h):
        return F.linear(h, self.weights["lm_head"]).float()
