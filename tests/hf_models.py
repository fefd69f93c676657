"""Small random-weight transformers models of the architectures tidal supports, built locally (no hub)."""
import torch

ARCHS = ("llama", "qwen2", "mistral")  # every engine test runs each; qwen3 has tests of its own (test_qwen3.py)


def make_config(arch: str, num_layers: int = 6, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                vocab: int = 128, intermediate: int = 128, head_dim: int | None = None):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=num_layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                  max_position_embeddings=256, eos_token_id=None, bos_token_id=0, pad_token_id=0)
    if head_dim is not None or arch == "qwen3":  # Qwen3Config's own default is 128, not hidden / heads
        common["head_dim"] = head_dim or hidden // heads
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":  # attention bias on q/k/v, tied embeddings
        return Qwen2Config(**common, tie_word_embeddings=True)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if arch == "qwen3":  # q/k RMSNorm per head, no attention bias
        return Qwen3Config(**common)
    raise ValueError(arch)


def make_model(arch: str, seed: int = 0, dtype=torch.float32, device="cpu", std: float = 0.05, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(arch, **kw), dtype=dtype)
    # Random init leaves biases at zero; fill everything so a missed copy cannot hide behind a zero.
    # A larger `std` makes attention peaked, so position (rope) and masking errors change the output.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model.to(device).eval()


def twin(model):
    """An independent copy with identical weights (reference for comparisons)."""
    import copy

    return copy.deepcopy(model)


def greedy(model, ids, n: int):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0)


def assert_first_step_logits(eng, model, prompts, tol: float = 1e-4) -> None:
    """The engine's prefill logits of each prompt's last token are within `tol` of transformers' `model`."""
    ids = list(range(len(prompts)))
    for i, p in zip(ids, prompts):
        eng.cache.allocate(i, len(p))
    with torch.inference_mode():
        logits = eng.model.prefill(eng.cache, ids, prompts)
    for p, got in zip(prompts, logits.cpu()):
        with torch.no_grad():
            want = model(torch.tensor([p])).logits[0, -1]
        assert (got - want).abs().max().item() <= tol
    for i in ids:
        eng.cache.free(i)
