"""A Llama-family decoder (Llama, Qwen2, Qwen3, Mistral) on tidal's paged KV cache and kernels. Plain PyTorch
in the style of gpt-fast: prefill a few sequences in one pass (causal attention over each prompt), decode a
batch of sequences one token each with `paged_decode_attention`. Layers the residency plan streams are
acquired from a `LayerStreamer` for the duration of their compute; the rest of the code does not know the
difference.

Weights come from `weights.py` (fused q/k/v and gate/up); the engine (engine.py) drives the two phases."""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from .checkpoint import Checkpoint
from .errors import CheckpointError, ConfigError, TidalError

SUPPORTED = ("llama", "qwen2", "qwen3", "mistral")
KERNEL_CHOICES = ("auto", "triton", "reference")


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
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k (weights of head_dim) before RoPE

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
                # transformers defaults a missing Qwen3 head_dim to 128, not hidden / heads: required there
                head_dim=int(cfg["head_dim"] if model_type == "qwen3" else
                             cfg.get("head_dim") or int(cfg["hidden_size"]) // heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=float(rope.get("rope_theta", 10000.0)),
                rope_scaling=rope if rope_type == "llama3" else None,
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
                qk_norm=model_type == "qwen3")
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


CPU_LINEAR_ROWS = 1024  # output features per slice of a CPU linear (Ops.linear)


class Ops:
    """The kernels the decoder calls, all on one path: "triton" (CUDA, or the interpreter on CPU tensors) or
    "reference" (the torch references). `kernels="auto"` takes Triton on CUDA and the references on the CPU:
    the interpreter is a test tool, far too slow to serve from, so it runs only when asked for by name."""

    def __init__(self, kernels: str, device: torch.device):
        from tidal import kernels as K

        if kernels not in KERNEL_CHOICES:
            raise ConfigError(f"kernels={kernels!r} must be one of {KERNEL_CHOICES}")
        wanted = kernels if kernels != "auto" else ("triton" if device.type == "cuda" else "reference")
        self.path = K.resolve_path(torch.empty(0, device=device), wanted)  # BackendError if Triton cannot run
        # The references are called directly: the dispatcher's input checks guard callers' tensors, and the
        # decoder builds its own, so on the CPU they would only add per-op overhead to every step.
        self._K = K.reference if wanted == "reference" else K
        self._p = {} if wanted == "reference" else {"path": wanted}
        self._slice_rows = device.type == "cpu"

    def linear(self, x, w, bias=None):
        """x @ w.T (+ bias). On the CPU, with more than one row, in slices of at most CPU_LINEAR_ROWS output
        features: torch's CPU GEMM takes a far slower kernel for a few rows against a tall weight (measured
        here: an [8, 1024] x [32000, 1024]^T LM head in 34 ms whole, 21 ms in 1024-row slices; one row is
        a GEMV, 3% slower sliced; the decode effect is in docs/BENCHMARKS.md, engine)."""
        rows = x.numel() // x.shape[-1]
        if self._slice_rows and rows > 1 and w.shape[0] > 2 * CPU_LINEAR_ROWS:
            parts = [F.linear(x, w[i:i + CPU_LINEAR_ROWS], None if bias is None else bias[i:i + CPU_LINEAR_ROWS])
                     for i in range(0, w.shape[0], CPU_LINEAR_ROWS)]
            return torch.cat(parts, dim=-1)
        return F.linear(x, w, bias)

    def rms_norm(self, x, w, eps, residual=None):
        return self._K.rms_norm(x, w, eps, residual, **self._p)

    def rotary(self, positions, q, k, cache):
        return self._K.rotary_embedding(positions, q, k, cache, **self._p)

    def silu_and_mul(self, x):
        return self._K.silu_and_mul(x, **self._p)

    def write_kv(self, k, v, k_cache, v_cache, slots):
        return self._K.write_kv(k, v, k_cache, v_cache, slots, **self._p)

    def attention(self, q, k_cache, v_cache, block_tables, seq_lens, scale):
        if not self._p:
            return self._K.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale)
        return self._K.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale,
                                              check_lens=False, **self._p)


class DecoderModel:
    """A decoder over loaded weights (`weights.LoadedWeights`), ready for `prefill` and `decode_step` over a
    `PagedKVCache`. With a `streamer`, layers whose `weights.layers[i]` is None are streamed through it."""

    def __init__(self, config: ModelConfig, weights, kernels: str = "auto", streamer=None, backend=None):
        self.config, self.weights = config, weights
        self.device = weights.top["embed"].device
        self.ops = Ops(kernels, self.device)
        self.streamer, self.backend = streamer, backend
        self.streamed = frozenset(weights.streamed)
        if streamer is None and self.streamed:
            raise ConfigError("streamed layers need a LayerStreamer")
        # region key -> the Transfer bringing it back (pipelined resume): compute waits for it on first use
        self.arriving: dict = {}
        self.scale = config.head_dim ** -0.5
        self.rope = rope_cache(config, config.max_position_embeddings, self.device)

    @classmethod
    def load(cls, path, device="cpu", dtype: torch.dtype | None = None, kernels: str = "auto") -> "DecoderModel":
        """Every layer resident on `device`; for streaming, use `tidal.Engine.from_pretrained`."""
        from . import weights as W
        from .backends import make_backend
        from .plan import ResidencyPlan

        ckpt = Checkpoint(path)
        config = ModelConfig.from_hf(ckpt.config, str(ckpt.path / "config.json"))
        dtype = dtype or ckpt.info("model.embed_tokens.weight").dtype
        backend = make_backend(device)
        try:  # every layer resident: the backend only places tensors, nothing streams
            weights = W.load(ckpt, config, ResidencyPlan.from_fraction(config.num_layers, 1.0), backend, dtype)
        finally:
            backend.close()
        return cls(config, weights, kernels)

    # -- the two phases ----------------------------------------------------------------------------------------
    def prefill(self, cache, seq_ids: list, prompts: list[list[int]]) -> torch.Tensor:
        """Run new sequences' prompts in one pass, writing their K/V into `cache` (which must hold them
        already: `cache.allocate`); returns each sequence's last-position logits `[len(seq_ids), vocab]`."""
        lens = [len(p) for p in prompts]
        ids = torch.tensor([t for p in prompts for t in p], device=self.device)
        positions = torch.cat([torch.arange(n) for n in lens]).to(self.device)
        slots = torch.cat([cache.slot_mapping(s, 0, n) for s, n in zip(seq_ids, lens)])
        bounds = [0]
        for n in lens:
            bounds.append(bounds[-1] + n)

        def attend(q, k, v, layer):
            return torch.cat([self._causal(q[a:b], k[a:b], v[a:b]) for a, b in zip(bounds, bounds[1:])])
        h = self._run(ids, positions, cache, slots, attend)
        return self._logits(h[torch.tensor(bounds[1:], device=self.device) - 1])

    def decode_step(self, cache, seq_ids: list, tokens: list[int]) -> torch.Tensor:
        """One new token for each sequence, which must have room for it (`cache.append`); returns logits
        `[batch, vocab]`."""
        meta = cache.batch(seq_ids)
        ids = torch.tensor(tokens, device=self.device)
        positions = meta.seq_lens.long() - 1

        def attend(q, k, v, layer):
            k_cache, v_cache = cache.layer(layer)
            return self.ops.attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, self.scale)
        return self._logits(self._run(ids, positions, cache, meta.slot_mapping, attend))

    # -- the layer stack ---------------------------------------------------------------------------------------
    def _run(self, ids, positions, cache, slots, attend):
        c, ops, streamer = self.config, self.ops, self.streamer
        qd, kvd = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        if streamer is not None:
            streamer.begin_step()
        self._arrived("embed")
        top = self.weights.top
        if top is None:
            raise TidalError("the model's weights are preempted; resume it first")
        h = F.embedding(ids, top["embed"])
        residual = None
        for i in range(c.num_layers):
            if i in self.streamed:
                w = dict(zip(self.weights.names, streamer.acquire(i)))
            else:
                self._arrived(i)
                w = self.weights.layers[i]
            if residual is None:
                residual, x = h, ops.rms_norm(h, w["input_layernorm"], c.rms_norm_eps)
            else:
                x, residual = ops.rms_norm(h, w["input_layernorm"], c.rms_norm_eps, residual)
            qkv = ops.linear(x, w["qkv"], w.get("qkv_bias"))
            q = qkv[:, :qd].view(-1, c.num_heads, c.head_dim)
            k = qkv[:, qd:qd + kvd].view(-1, c.num_kv_heads, c.head_dim)
            v = qkv[:, qd + kvd:].view(-1, c.num_kv_heads, c.head_dim)
            if c.qk_norm:  # new tensors: the in-place RoPE below then leaves qkv as it was
                q = ops.rms_norm(q, w["q_norm"], c.rms_norm_eps)
                k = ops.rms_norm(k, w["k_norm"], c.rms_norm_eps)
            ops.rotary(positions, q, k, self.rope)
            k_cache, v_cache = cache.layer(i)
            ops.write_kv(k, v, k_cache, v_cache, slots)
            attn = attend(q, k, v, i).reshape(-1, qd)
            h = ops.linear(attn, w["o_proj"])
            x, residual = ops.rms_norm(h, w["post_attention_layernorm"], c.rms_norm_eps, residual)
            h = ops.linear(ops.silu_and_mul(ops.linear(x, w["gate_up"])), w["down"])
            if i in self.streamed:
                streamer.release(i)
        if streamer is not None:
            streamer.end_step()
        self._arrived("head")
        return ops.rms_norm(h, top["norm"], c.rms_norm_eps, residual)[0]

    def _arrived(self, key) -> None:
        if self.arriving:
            transfer = self.arriving.pop(key, None)
            if transfer is not None:
                self.backend.wait_for(transfer)
        if self.backend is not None and self.backend.checker is not None and key in self.weights.device:
            self.backend.compute_reads(self.weights.device[key], f"forward over weights region {key!r}")

    def _causal(self, q, k, v):
        """Causal attention of a prompt over itself: q `[n, Hq, D]`, k/v `[n, Hkv, D]`."""
        group = self.config.num_heads // self.config.num_kv_heads
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                             is_causal=True, scale=self.scale)
        return out.transpose(0, 1)

    def _logits(self, h):
        return self.ops.linear(h, self.weights.top["lm_head"]).float()
