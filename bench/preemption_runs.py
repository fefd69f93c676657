"""Preemption measurements (issue 6), shared by preemption_summary.py, bench_preemption.py and
gpu_preemption.py.

Two measurements on `tidal.Engine`:

- `breakdown`: one `preempt(weights="host", kv="swap")` + `resume(pipelined=False)` round trip of an engine
  whose decoder layers are all resident, with `batch` sequences of `context` tokens in its KV cache. The
  reports give the weight and KV parts of each direction (bytes, seconds on the copy queue, GB/s), so a row
  says which of the two dominates at that batch and context.
- `ttft_rounds`: time to first token after `resume(pipelined=True)` against `resume(pipelined=False)`, on
  requests with a short real prompt, the two modes interleaved (alternating which goes first).

Long contexts are synthetic (`add_synthetic_context`): prefilling 16k tokens x 8 sequences is far too slow on
a CPU, and what preemption moves does not depend on what the KV blocks hold, only on how many there are. The
synthetic context and the round trips are `tidal.study.runs`'s (`tidal profile` uses them too).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import statistics
from pathlib import Path

import torch

from shaped_checkpoint import LLAMA_3_2_1B, LLAMA_3_8B, TINY, config_json, write_checkpoint
from tidal.study.runs import clear, drain, round_trips

# SmolLM2-135M's shape (a small Llama: 30 layers, 9/3 heads of 64, tied embeddings). Its KV is large for its
# weights (22.5 KiB per token in bf16 against 269 MB of weights): its KV overtakes the weights early.
SMALL_135M = dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                  rope_theta=10000.0)
MODELS = {"SmolLM2-135M": SMALL_135M, "Llama-3.2-1B": LLAMA_3_2_1B, "Llama-3-8B": LLAMA_3_8B, "tiny": TINY}
MAX_POSITIONS = 32768  # room for 16k-token contexts plus the tokens decoded after each resume
BLOCK = 16
SLACK_BLOCKS = 2  # per sequence, beyond its context: room for the tokens decoded after resumes


# -- checkpoints ---------------------------------------------------------------------------------------------
def write_shaped(path, shape: dict, dtype: torch.dtype = torch.bfloat16, device="cpu") -> Path:
    """A random checkpoint of `shape` (shaped_checkpoint.write_checkpoint) with MAX_POSITIONS positions."""
    path = write_checkpoint(path, shape, dtype, device=device)
    (path / "config.json").write_text(json.dumps(config_json(shape, dtype, MAX_POSITIONS), indent=1))
    return path


def cached_shaped(name: str, dtype: torch.dtype = torch.bfloat16) -> Path:
    """`write_shaped` of MODELS[name], written once under tidal's cache directory and reused."""
    from tidal.presets import cache_root

    shape = MODELS[name]
    key = json.dumps([shape, str(dtype), MAX_POSITIONS], sort_keys=True)
    key = hashlib.sha256(key.encode()).hexdigest()[:12]
    path = cache_root() / f"preemption-{name}-{key}"
    if (path / "config.json").exists():
        return path
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write_shaped(tmp, shape, dtype)
    tmp.rename(path)  # a half-written checkpoint never looks complete
    return path


def shape_bytes(shape: dict, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Weight bytes (all of them) and KV bytes per token of a shape, from its dimensions."""
    h, i, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    n = shape["num_hidden_layers"]
    d = h // shape["num_attention_heads"]
    q, kv = shape["num_attention_heads"] * d, shape["num_key_value_heads"] * d
    layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h
    params = n * layer + v * h * (1 if shape["tie_word_embeddings"] else 2) + h
    return dict(params=params, weight_bytes=params * dtype.itemsize, kv_per_token=2 * n * kv * dtype.itemsize)


def describe(name: str) -> str:
    s = MODELS[name]
    b = shape_bytes(s)
    return (f"{name}-shaped: {s['num_hidden_layers']} layers, hidden {s['hidden_size']}, intermediate "
            f"{s['intermediate_size']}, {s['num_attention_heads']}/{s['num_key_value_heads']} heads of "
            f"{s['hidden_size'] // s['num_attention_heads']}, vocab {s['vocab_size']}"
            f"{', tied' if s['tie_word_embeddings'] else ''}: {b['params'] / 1e6:.0f}M parameters, "
            f"KV {b['kv_per_token'] / 1024:.0f} KiB per token in bf16")


def kv_pool_bytes(shape: dict, tokens_by_seq: list[int], dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of a KV pool holding sequences of these lengths, each with SLACK_BLOCKS to grow."""
    s = shape
    head_dim = s["hidden_size"] // s["num_attention_heads"]
    per_block = 2 * s["num_hidden_layers"] * s["num_key_value_heads"] * head_dim * BLOCK * dtype.itemsize
    return per_block * sum(-(-n // BLOCK) + SLACK_BLOCKS for n in tokens_by_seq)


# -- the breakdown -------------------------------------------------------------------------------------------
def breakdown(engine, model: str, batch: int, context: int, reps: int, warmup: int = 1) -> dict:
    """Medians over `reps` round trips (after `warmup` unrecorded ones) of the weight and KV parts of a
    preemption and of the resume after it, with `batch` synthetic sequences of `context` tokens. Each round
    trip gets a context of its own (the first step after resume adds a token, which may start a new block)."""
    got = round_trips(engine, batch, context, reps, warmup, label=model)
    pres, ress = [p for p, _ in got], [r for _, r in got]
    med = lambda xs, f: statistics.median(getattr(x, f) for x in xs)  # noqa: E731
    row = dict(model=model, batch=batch, context=context, reps=reps, synthetic=True,
               weight_bytes=ress[0].weight_bytes, kv_bytes=ress[0].kv_bytes,
               reload_s=med(ress, "weight_seconds"), kv_in_s=med(ress, "kv_seconds"),
               offload_s=med(pres, "weight_seconds"), kv_out_s=med(pres, "kv_seconds"),
               first_step_s=med(ress, "first_step_seconds"), resume_s=med(ress, "total_seconds"),
               preempt_s=med(pres, "total_seconds"), ttft_s=med(ress, "time_to_first_token"))
    row["reload_gbps"] = row["weight_bytes"] / row["reload_s"] / 1e9
    row["kv_in_gbps"] = row["kv_bytes"] / row["kv_in_s"] / 1e9
    row["offload_gbps"] = row["weight_bytes"] / row["offload_s"] / 1e9 if row["offload_s"] else 0.0
    row["kv_out_gbps"] = row["kv_bytes"] / row["kv_out_s"] / 1e9 if row["kv_out_s"] else 0.0
    row["kv_share_resume"] = row["kv_in_s"] / (row["kv_in_s"] + row["reload_s"])
    row["kv_share_preempt"] = row["kv_out_s"] / (row["kv_out_s"] + row["offload_s"])
    row["dominant"] = "KV" if row["kv_share_resume"] > 0.5 else "weights"
    return row


BREAKDOWN_HEADERS = ["model", "batch", "context", "weights MB", "KV MB", "reload ms", "reload GB/s",
                     "KV in ms", "KV in GB/s", "KV share (resume)", "offload ms", "KV out ms",
                     "KV share (preempt)", "dominant", "first step ms", "resume ms"]


def breakdown_table_rows(rows: list[dict]) -> list[list]:
    out = []
    for r in rows:
        if "skipped" in r:  # listed by skipped_lines
            continue
        out.append([r["model"], r["batch"], r["context"], r["weight_bytes"] / 1e6, r["kv_bytes"] / 1e6,
                    r["reload_s"] * 1e3, r["reload_gbps"], r["kv_in_s"] * 1e3, r["kv_in_gbps"],
                    f"{r['kv_share_resume']:.1%}", r["offload_s"] * 1e3, r["kv_out_s"] * 1e3,
                    f"{r['kv_share_preempt']:.1%}", r["dominant"], r["first_step_s"] * 1e3,
                    r["resume_s"] * 1e3])
    return out


# -- pipelined against full resume ---------------------------------------------------------------------------
def ttft_rounds(engine, model: str, fraction: float, batch: int, prompt_len: int, reps: int,
                warmup: int = 1) -> dict:
    """Time to first token after resume(pipelined=True) and resume(pipelined=False), `reps` rounds of one
    preempt + resume each, the two modes' order alternating from round to round, after `warmup` rounds of
    both. The requests have real `prompt_len`-token prompts, prefilled (and decoded once) before the first
    round. Medians per mode, the ratio of the medians and the per-round ratios."""
    vocab = engine.model.config.vocab_size
    prompts = [[(7 * b + 3 * t + 1) % vocab for t in range(prompt_len)] for b in range(batch)]
    ids = [engine.add_request(p, max_new_tokens=MAX_POSITIONS) for p in prompts]
    try:
        engine.step()  # prefill
        engine.step()  # one decode: every kernel has run once
        got = {True: [], False: []}
        for i in range(warmup + reps):
            for pipelined in ((True, False) if i % 2 == 0 else (False, True)):
                engine.preempt(weights="host", kv="swap")
                res = engine.resume(pipelined=pipelined)
                drain(engine)
                if i >= warmup:
                    got[pipelined].append(res)
    finally:
        clear(engine, ids)
    row = dict(model=model, resident_fraction=fraction, batch=batch, prompt_len=prompt_len, reps=reps,
               weight_bytes=got[False][0].weight_bytes, kv_bytes=got[False][0].kv_bytes)
    for pipelined, name in ((True, "pipelined"), (False, "full")):
        rs = got[pipelined]
        for f in ("time_to_first_token", "time_to_first_layer", "weight_seconds", "kv_seconds",
                  "first_step_seconds", "overlap_seconds", "total_seconds"):
            row[f"{name}_{f}"] = statistics.median(getattr(r, f) or 0.0 for r in rs)
    row["ratio"] = row["pipelined_time_to_first_token"] / row["full_time_to_first_token"]
    per_round = [p.time_to_first_token / f.time_to_first_token for p, f in zip(got[True], got[False])]
    row["round_ratio_min"], row["round_ratio_max"] = min(per_round), max(per_round)
    # What perfect overlap of the reload copies with the first step could reach, from the full resume's parts.
    copies, step = row["full_weight_seconds"] + row["full_kv_seconds"], row["full_first_step_seconds"]
    full = row["full_time_to_first_token"]
    row["overlap_bound"] = (full - min(copies, step)) / full
    return row


TTFT_HEADERS = ["model", "resident", "batch", "weights MB", "full TTFT ms", "pipelined TTFT ms",
                "pipelined / full", "per-round range", "overlap bound (est.)", "full: copies ms",
                "full: step ms", "pipelined: first layer ms", "pipelined: overlap ms"]


def ttft_table_rows(rows: list[dict]) -> list[list]:
    out = []
    for r in rows:
        if "skipped" in r:  # listed by skipped_lines
            continue
        out.append([r["model"], r["resident_fraction"], r["batch"], r["weight_bytes"] / 1e6,
                    r["full_time_to_first_token"] * 1e3, r["pipelined_time_to_first_token"] * 1e3,
                    f"{r['ratio']:.3f}", f"{r['round_ratio_min']:.2f}-{r['round_ratio_max']:.2f}",
                    f"{r['overlap_bound']:.3f}", (r["full_weight_seconds"] + r["full_kv_seconds"]) * 1e3,
                    r["full_first_step_seconds"] * 1e3, r["pipelined_time_to_first_layer"] * 1e3,
                    r["pipelined_overlap_seconds"] * 1e3])
    return out


def skipped_lines(rows: list[dict]) -> list[str]:
    """One line per row that did not run: its model, cell or resident fraction, and why."""
    out = []
    for r in rows:
        if "skipped" in r:
            where = (f"batch {r['batch']} x {r['context']} tokens" if "context" in r
                     else f"resident {r['resident_fraction']}")
            out.append(f"not run: {r['model']} {where}: {r['skipped']}")
    return out
