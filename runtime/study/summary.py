"""The plain-text tables the commands print: a profile's (`summary`) and a comparison's (`side_by_side`)."""
from __future__ import annotations

from ..tables import format_table
from .common import link_text
from .protocol import PROTOCOL_SYSTEM


def summary(doc: dict) -> str:
    """The tables the CLI prints: links, decode tokens/s per cell, preemption round trips, the cost model's
    held-out error."""
    parts = []
    if doc["link"] is not None:
        parts.append(f"emulated link: {link_text(doc['link'])}")
    links = doc["links"]
    if links is not None:
        parts.append(f"links: host->device {links['h2d_gbps']:.2f} GB/s, device->host "
                     f"{links['d2h_gbps']:.2f} GB/s, disk read {links['disk_read_gbps']:.2f} GB/s "
                     f"({links['disk_path']})")
    rows = [r for r in doc["decode"] if r["system"] == "tidal"]
    if rows:
        top = {(r["batch"], r["output_tokens"]): r["tokens_per_second"]
               for r in rows if r["resident_fraction"] == 1.0}
        table = []
        for r in rows:
            ref = top.get((r["batch"], r["output_tokens"]))
            table.append([f"{r['resident_fraction']:.2f}",
                          f"{r['resident_layers']}/{doc['model']['num_layers']}",
                          r["batch"], r["output_tokens"], r["tokens_per_second"], _range(r), r["repeats"],
                          f"{r['tokens_per_second'] / ref:.2f}" if ref else "-", r["step_seconds"] * 1e3,
                          r["bytes_streamed_per_step"] / 1e6, r["stall_seconds_per_step"] * 1e3])
        parts.append(format_table(["resident", "layers", "batch", "new tokens", "decode tok/s", "min-max",
                                   "rounds", "vs resident",
                                   "ms/step", "MB streamed/step", "stall ms/step"], table))
    rows = [r for r in doc["preemption"] if r["system"] == "tidal"]
    if rows:
        table = [[r["weights"], r["kv"], "pipelined" if r["pipelined"] else "full", r["batch"], r["context"],
                  r["weight_bytes"] / 1e6, r["kv_bytes"] / 1e6, r["weight_seconds"] * 1e3,
                  r["kv_seconds"] * 1e3, r["recompute_seconds"] * 1e3, r["preempt_seconds"] * 1e3,
                  r["resume_seconds"] * 1e3, r["first_token_seconds"] * 1e3] for r in rows]
        parts.append(format_table(["weights", "kv", "resume", "batch", "context", "weights MB", "KV MB",
                                   "weights ms", "KV ms", "recompute ms", "preempt ms", "resume ms",
                                   "first token ms"], table))
    cm = doc["costmodel"]
    if cm["holdout"] is not None:
        h = cm["holdout"]
        parts.append(f"cost model: held-out error over {h['n']} samples: median "
                     f"{h['median_relative_error']:.1%}, max {h['max_relative_error']:.1%}")
    else:
        parts.append(f"cost model: not evaluated ({cm['reason']})")
    return "\n\n".join(parts)


def _range(row: dict) -> str:
    lo, hi = row["tokens_per_second_min"], row["tokens_per_second_max"]
    return "-" if lo is None else f"{lo:.4g}-{hi:.4g}" if hi is not None else f"{lo:.4g}-"


def baseline_of(doc: dict) -> str | None:
    """The baseline whose decode rows a compare document holds (None before any was measured)."""
    return next((r["system"] for r in doc["decode"] if r["system"] != "tidal"), None)


def side_by_side(doc: dict) -> str:
    """The CLI's comparison tables: decode tokens/s per cell and preemption round trips per tier and context,
    tidal's beside the baseline's, with tidal's speedup (baseline seconds over tidal's)."""
    parts = []
    baseline = baseline_of(doc)
    if baseline is not None:
        theirs = {(r["resident_fraction"], r["batch"], r["output_tokens"]): r
                  for r in doc["decode"] if r["system"] == baseline}
        table = []
        for r in (r for r in doc["decode"] if r["system"] == "tidal"):
            b = theirs.get((r["resident_fraction"], r["batch"], r["output_tokens"]))
            table.append([f"{r['resident_fraction']:.2f}", r["resident_layers"],
                          b["resident_layers"] if b else "-", r["batch"], r["output_tokens"],
                          r["tokens_per_second"], b["tokens_per_second"] if b else "-",
                          f"{r['tokens_per_second'] / b['tokens_per_second']:.2f}x" if b else "-"])
        parts.append(f"decode: tidal against {baseline}\n" + format_table(
            ["resident", "tidal layers", f"{baseline} layers", "batch", "new tokens", "tidal tok/s",
             f"{baseline} tok/s", "tidal speedup"], table))
    ours = {(r["weights"], r["batch"], r["context"]): r for r in doc["preemption"]
            if r["system"] == "tidal" and r["kv"] == "swap" and not r["pipelined"]}
    table = []
    for b in (r for r in doc["preemption"] if r["system"] == PROTOCOL_SYSTEM):
        t = ours.get((b["weights"], b["batch"], b["context"]))
        ms = lambda r, k: r[k] * 1e3 if r else "-"  # noqa: E731
        table.append([b["weights"], b["batch"], b["context"], ms(t, "total_seconds"), ms(b, "total_seconds"),
                      f"{b['total_seconds'] / t['total_seconds']:.2f}x" if t and t["total_seconds"] else "-",
                      ms(t, "weight_seconds"), ms(b, "weight_seconds"), ms(t, "kv_seconds"),
                      ms(b, "kv_seconds"), ms(t, "first_token_seconds"), ms(b, "first_token_seconds")])
    if table:
        parts.append("preemption round trip (kv swap, full resume): tidal against the transformers user's "
                     "protocol\n" + format_table(
                         ["weights", "batch", "context", "tidal ms", "transformers ms", "tidal speedup",
                          "tidal weights ms", "transformers weights ms", "tidal KV ms", "transformers KV ms",
                          "tidal first token ms", "transformers first token ms"], table))
    return "\n\n".join(parts) or "no baseline rows measured"
