"""Shared by the engine-level tests (preemption, live residency): a saved transformers reference with its
greedy tokens, and driving an engine's requests step by step."""
import torch

from hf_models import greedy, make_model


def saved_qwen2(tmp_path_factory, prompts, new_tokens):
    """(transformers model, its checkpoint directory, each prompt's greedy tokens). Qwen2 with tied embeddings
    and q/k/v bias, so that every weight region kind is there."""
    ref = make_model("qwen2", std=0.5)
    path = tmp_path_factory.mktemp("qwen2")
    ref.save_pretrained(path)
    want = [greedy(ref, torch.tensor([p]), new_tokens)[0, len(p):].tolist() for p in prompts]
    return ref, path, want


def start(eng, prompts, new_tokens, steps=0):
    """Add every prompt, run `steps` steps; returns the request ids and their tokens so far."""
    ids = [eng.add_request(p, max_new_tokens=new_tokens) for p in prompts]
    out = {i: [] for i in ids}
    for _ in range(steps):
        collect(eng.step(), out)
    return ids, out


def collect(outputs, out):
    for o in outputs:
        out[o.request_id] += o.token_ids


def finish(eng, ids, out):
    """Step until nothing is unfinished; the tokens of `ids`, in order."""
    while eng.has_unfinished():
        collect(eng.step(), out)
    return [out[i] for i in ids]
