"""gpu_check section "streaming": pinned copy bandwidth, and decode on a Llama-3.2-1B-shaped model (random
weights, bf16) at resident fractions 1.0 to 0, tidal beside accelerate offloading the same layers."""
import statistics
import time

import torch

import tidal
from tidal.baselines import accelerate_offload
from tidal.measure import copy_bandwidth
from tidal.report import format_table

LLAMA_3_2_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                    max_position_embeddings=4096)
QUICK_SHAPE = dict(LLAMA_3_2_1B, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=1024)  # --quick: a smoke run of the same code
FRACTIONS = [1.0, 0.75, 0.5, 0.25, 0.0]


def _model(device, shape):
    from transformers import AutoModelForCausalLM, LlamaConfig

    with torch.device(device):
        return AutoModelForCausalLM.from_config(LlamaConfig(**shape), dtype=torch.bfloat16).eval()


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _decode_step_time(model, device, budget_s: float, context: int = 128) -> float:
    """Median wall time of a one-token forward over a `context`-token prefix cache."""
    from transformers import DynamicCache

    ids = torch.randint(0, 1000, (1, context), device=device)
    with torch.no_grad():
        prefix = model(ids, use_cache=True).past_key_values
    token, pos = torch.randint(0, 1000, (1, 1), device=device), torch.tensor([[context]], device=device)
    times, end = [], time.monotonic() + budget_s
    while len(times) < 3 or (len(times) < 30 and time.monotonic() < end):
        cache = DynamicCache()
        for i, layer in enumerate(prefix.layers):
            cache.update(layer.keys, layer.values, i)
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            model(token, past_key_values=cache, position_ids=pos, use_cache=True)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def run(ctx) -> dict:
    shape = QUICK_SHAPE if ctx.quick else LLAMA_3_2_1B
    layers = shape["num_hidden_layers"]
    bw = copy_bandwidth(ctx.device, nbytes=(64 << 20) if ctx.quick else (1 << 30))
    ctx.log(f"pinned copy: {bw['h2d_gbps']:.1f} GB/s H2D, {bw['d2h_gbps']:.1f} GB/s D2H")
    fractions = [1.0, 0.0] if ctx.quick else FRACTIONS
    per_run = max(1.0, (ctx.seconds_left() - 20) / (2 * len(fractions)) - 3)
    rows, results, base = [], [], None
    for fraction in fractions:
        for kind in ("tidal", "accelerate"):
            if ctx.seconds_left() < 15:
                ctx.log("time budget spent; stopping early")
                break
            model = _model("cpu" if kind == "accelerate" and fraction < 1 else ctx.device, shape)
            streamed = tidal.ResidencyPlan.from_fraction(layers, fraction).streamed_layers
            if kind == "tidal":
                tidal.offload(model, resident_fraction=fraction, prefetch_depth=2, device=ctx.device)
            else:
                accelerate_offload(model, streamed, device=ctx.device)
            step = _decode_step_time(model, ctx.device, per_run)
            r = {"kind": kind, "resident_fraction": fraction, "step_ms": step * 1e3, "tok_s": 1 / step}
            if kind == "tidal":
                st = tidal.stats(model)
                r.update(mb_per_token=st.last.bytes_streamed / 1e6, stall_ms=st.last.stall_seconds * 1e3,
                         bound_ms=st.last.bytes_streamed / (bw["h2d_gbps"] * 1e9) * 1e3)
                if fraction == 1.0:
                    base = step
            r["vs_resident"] = base / step if base else None
            results.append(r)
            rows.append([kind, fraction, r["step_ms"], r["tok_s"], r.get("mb_per_token", ""), r.get("stall_ms", ""),
                         r.get("bound_ms", ""), r["vs_resident"] or ""])
            del model
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    table = (f"pinned H2D {bw['h2d_gbps']:.1f} GB/s, D2H {bw['d2h_gbps']:.1f} GB/s\n" +
             format_table(["impl", "resident", "step ms", "tok/s", "MB/token", "stall ms", "link bound ms",
                           "x resident"], rows))
    return {"model": shape, "bandwidth": bw, "decode": results, "table": table}
