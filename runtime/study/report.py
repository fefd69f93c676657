"""`tidal study`: profile and compare several models, then a markdown report that restates the published
study's three findings (../shared/PAPER.md in the repository's workspace; arXiv 2605.19593) with this
machine's numbers, tidal's and a baseline's side by side.

1. Offloading: decode tokens/s against the resident fraction, normalised to the all-resident run, per model
   and output length; tidal against accelerate offloading the same layers.
2. Preemption: the round trip's total, its weight and KV shares, and the overhead against the uninterrupted
   run of the same tokens (predicted by the fitted cost model from the measured decode steps); tidal's tiers
   and resume modes against the transformers user's protocol. Where tidal changes the picture (pipelined
   resume, a few large KV copies), both numbers are given.
3. Context length and link bandwidth: the KV share as the context grows, and the cost model's prediction of
   reload and decode at other link bandwidths (a prediction, labelled as one).

The report is computed from the compare documents alone (`render(docs)`), so it can be rebuilt from saved
JSON without measuring again. Its command line is commands.py's.
"""
from __future__ import annotations

import dataclasses
import datetime
import statistics
from pathlib import Path

from ..costmodel import CostModel
from ..errors import ConfigError
from . import compare
from .common import link_text, normalised_curves, rows_of, writable_dir
from .figures import degradation_figure

REPORT_FILE = "REPORT.md"
DEGRADATION_FIGURE = "degradation.png"
# link bandwidths for the what-if of finding 3 (GB/s): PCIe Gen4 x16 and Gen5 x16 as specified, and the
# 13-16 GB/s the study measured host-to-device on Gen4 (PAPER.md)
WHAT_IF_GBPS = (("the study's measured PCIe Gen4 host-to-device", 14.5), ("PCIe Gen4 x16 (spec)", 31.5),
                ("PCIe Gen5 x16 (spec)", 63.0))


def _name(doc: dict) -> str:
    return doc["model"]["spec"]


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s"


def _speed(ratio: float) -> str:
    """'2.10x faster' or '0.62x, slower' for tidal's speed over a baseline's."""
    return f"{ratio:.2f}x faster" if ratio >= 1 else f"{ratio:.2f}x, slower"


def _table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _costmodel(doc: dict):
    fitted = doc.get("costmodel", {}).get("fitted")
    return CostModel.from_dict(fitted) if fitted else None


# -- finding 1 -----------------------------------------------------------------------------------------------
def _finding_offload(docs: list[dict], baseline: str | None) -> str:
    parts = ["## 1. Offloading slows decode non-linearly, and by model",
             "Decode tokens/s at each resident fraction over tidal's all-resident run of the same batch and "
             "output length (1.00 = no slowdown). tidal streams the non-resident layers through its copy ring; "
             f"{baseline or 'the baseline'} offloads exactly the same layers."]
    sensitivity = []
    for doc in docs:
        for system in ("tidal", baseline):
            if system is None:
                continue
            curves = normalised_curves(doc, system)
            if not curves:
                continue
            fractions = sorted({f for c in curves.values() for f, _, _ in c}, reverse=True)
            rows = []
            for (batch, n), points in curves.items():
                by_f = {f: norm for f, _, norm in points}
                rows.append([batch, n] + [f"{by_f[f]:.2f}" if f in by_f else "-" for f in fractions])
            parts.append(f"**{_name(doc)}**, {system}:\n\n" +
                         _table(["batch", "new tokens"] + [f"{f:g}" for f in fractions], rows))
            if system == "tidal":
                half = [norm for c in curves.values() for f, _, norm in c if abs(f - 0.5) < 1e-9]
                if half:
                    sensitivity.append((statistics.median(half), _name(doc)))
    if len(sensitivity) > 1:
        sensitivity.sort()
        parts.append("At half residency the most sensitive model here keeps "
                     f"{sensitivity[0][0]:.2f} of its resident speed ({sensitivity[0][1]}), the least "
                     f"{sensitivity[-1][0]:.2f} ({sensitivity[-1][1]}).")
    lengths = _output_length_effect(docs)
    if lengths:
        parts.append(lengths)
    versus = _versus_baseline(docs, baseline)
    if versus:
        parts.append(versus)
    return "\n\n".join(parts)


def _output_length_effect(docs: list[dict]) -> str:
    lines = []
    for doc in docs:
        curves = normalised_curves(doc, "tidal")
        low = min((f for c in curves.values() for f, _, _ in c), default=None)
        if low is None or low == 1.0:
            continue
        by_len: dict[int, list[float]] = {}
        for (_, n), points in curves.items():
            by_len.setdefault(n, []).extend(norm for f, _, norm in points if f == low)
        if len(by_len) > 1:
            lines.append(f"{_name(doc)} at resident {low:g}: " + ", ".join(
                f"{n} new tokens {statistics.median(v):.2f}" for n, v in sorted(by_len.items())))
    return ("Output length, at the lowest residency measured (normalised tokens/s):\n\n- " + "\n- ".join(lines)
            if lines else "")


def _versus_baseline(docs: list[dict], baseline: str | None) -> str:
    if baseline is None:
        return ""
    lines = []
    for doc in docs:
        theirs = {(r["resident_fraction"], r["batch"], r["output_tokens"]): r["tokens_per_second"]
                  for r in rows_of(doc, "decode", baseline)}
        ratios = [(r["resident_fraction"], r["tokens_per_second"] / theirs[k])
                  for r in rows_of(doc, "decode", "tidal")
                  if (k := (r["resident_fraction"], r["batch"], r["output_tokens"])) in theirs and theirs[k] > 0]
        if ratios:
            by_f: dict[float, list[float]] = {}
            for f, x in ratios:
                by_f.setdefault(f, []).append(x)
            lines.append(f"{_name(doc)}: " + ", ".join(
                f"resident {f:g}: {statistics.median(v):.2f}x" for f, v in sorted(by_f.items(), reverse=True)))
    return (f"tidal's decode tokens/s over {baseline}'s, same layers offloaded, same run (median over batch and "
            "output length):\n\n- " + "\n- ".join(lines)) if lines else ""


# -- finding 2 -----------------------------------------------------------------------------------------------
def uninterrupted_seconds(doc: dict, row: dict) -> float | None:
    """Seconds the preempted sequences take to decode their `context` tokens without interruption, from the
    fitted decode-step model: context x step(batch, context / 2) (the step grows linearly with the
    context)."""
    model = _costmodel(doc)
    if model is None or model.step is None:
        return None
    resident = round(row["resident_fraction"] * doc["model"]["num_layers"])
    try:
        return row["context"] * model.predict_step(resident, row["batch"], row["context"] // 2)
    except ConfigError:
        return None


def _case(r: dict) -> str:
    what = f"weights={r['weights']}, kv={r['kv']}"
    return what + (", pipelined" if r.get("pipelined") else "")


def _finding_preemption(docs: list[dict]) -> str:
    parts = ["## 2. Preemption is dominated by reloading weights, not by moving the KV cache",
             "One preempt + resume round trip with the sequences' KV in flight (tidal: synthetic context of the "
             "given length, see `tidal.study.runs.add_synthetic_context`). Shares are of the round trip's total; "
             "the rest is bookkeeping and the first step. \"vs uninterrupted\": the round trip against the time "
             "the same sequences take to decode their context without interruption (cost-model prediction from "
             "the measured steps)."]
    rows = []
    for doc in docs:
        for system in ("tidal", "transformers"):
            for r in rows_of(doc, "preemption", system):
                total = r["total_seconds"]
                base = uninterrupted_seconds(doc, r) if system == "tidal" else None
                rows.append([_name(doc), system, _case(r), r["batch"], r["context"], _ms(total),
                             _pct(r["weight_seconds"] / total if total else None),
                             _pct(r["kv_seconds"] / total if total else None),
                             _pct(total / base if base else None)])
    if not rows:
        return parts[0] + "\n\nNo preemption rows were measured."
    parts.append(_table(["model", "system", "case", "batch", "context", "round trip", "weights", "KV",
                         "vs uninterrupted"], rows))
    parts += [p for p in (_pipelined_effect(docs), _versus_protocol(docs)) if p]
    return "\n\n".join(parts)


def _pipelined_effect(docs: list[dict]) -> str:
    lines = []
    for doc in docs:
        rows = rows_of(doc, "preemption", "tidal")
        for full in (r for r in rows if r["weights"] == "host" and r["kv"] == "swap" and not r["pipelined"]):
            pipe = next((r for r in rows if r["weights"] == "host" and r["kv"] == "swap" and r["pipelined"]
                         and r["context"] == full["context"]), None)
            if pipe is None:
                continue
            share = lambda r: r["weight_in_seconds"] / r["resume_seconds"] if r["resume_seconds"] else None  # noqa: E731
            lines.append(f"{_name(doc)}, context {full['context']}: first token after resume "
                         f"{_ms(pipe['first_token_seconds'])} pipelined against {_ms(full['first_token_seconds'])} "
                         f"reload-then-decode ({pipe['first_token_seconds'] / full['first_token_seconds']:.2f}x); "
                         f"weight reload is {_pct(share(full))} of the full resume and overlaps the first step "
                         f"when pipelined.")
    return ("Where tidal changes the picture: pipelined resume starts decoding before the last layer is back.\n\n- "
            + "\n- ".join(lines)) if lines else ""


def _versus_protocol(docs: list[dict]) -> str:
    lines = []
    for doc in docs:
        ours = {(r["weights"], r["context"]): r for r in rows_of(doc, "preemption", "tidal")
                if r["kv"] == "swap" and not r["pipelined"]}
        for r in rows_of(doc, "preemption", "transformers"):
            mine = ours.get((r["weights"], r["context"]))
            if mine is None or not mine["total_seconds"]:
                continue
            kv = (f"; KV {_ms(mine['kv_seconds'])} in two batched copies against {_ms(r['kv_seconds'])} tensor by "
                  f"tensor" if r["kv_seconds"] else "")
            speedup = r["total_seconds"] / mine["total_seconds"]
            lines.append(f"{_name(doc)}, weights={r['weights']}, context {r['context']}: round trip "
                         f"{_ms(mine['total_seconds'])} against {_ms(r['total_seconds'])} "
                         f"({_speed(speedup)}){kv}")
    if not lines:
        return ""
    notes = sorted({r["note"] for d in docs for r in rows_of(d, "preemption", "transformers") if r.get("note")})
    return ("tidal against the transformers user's protocol (`model.to`, KV tensors one by one, "
            "`from_pretrained` for a cold reload), same model, same run:\n\n- " + "\n- ".join(lines)
            + "".join(f"\n\nHow the protocol was measured: {n}." for n in notes))


# -- finding 3 -----------------------------------------------------------------------------------------------
def _finding_context_and_links(docs: list[dict]) -> str:
    parts = ["## 3. Context length and link bandwidth amplify data movement"]
    rows = []
    for doc in docs:
        for r in rows_of(doc, "preemption", "tidal"):
            if r["weights"] == "host" and r["kv"] == "swap" and not r["pipelined"]:
                total = r["weight_seconds"] + r["kv_seconds"]
                rows.append([_name(doc), r["batch"], r["context"], f"{r['kv_bytes'] / 1e6:.1f}",
                             f"{r['weight_bytes'] / 1e6:.1f}", _ms(r["kv_seconds"]),
                             _pct(r["kv_seconds"] / total if total else None)])
    if rows:
        parts.append("KV against weights as the context grows (weights=host, kv=swap, full resume):\n\n" +
                     _table(["model", "batch", "context", "KV MB", "weights MB", "KV seconds",
                             "KV share of moves"], rows))
    links = [[_name(d), f"{d['links']['h2d_gbps']:.2f}", f"{d['links']['d2h_gbps']:.2f}",
              f"{d['links']['disk_read_gbps']:.2f}", d["links"]["disk_path"]] for d in docs if d.get("links")]
    if links:
        parts.append("Links measured in the same runs (GB/s):\n\n" +
                     _table(["model", "host->device", "device->host", "disk read", "disk path"], links))
    what_if = _what_if(docs)
    if what_if:
        parts.append(what_if)
    return "\n\n".join(parts)


def _what_if(docs: list[dict]) -> str:
    """Predicted weight reload and half-resident decode step at other link bandwidths: the fitted model with
    its bandwidths replaced (latencies and compute kept)."""
    rows = []
    for doc in docs:
        model = _costmodel(doc)
        if model is None or model.step is None or model.step.stream_bandwidth is None:
            continue
        m = doc["model"]
        weight_bytes = m["num_layers"] * m["layer_bytes"] + m["top_bytes"]
        half = m["num_layers"] // 2
        measured = model.step.stream_bandwidth / 1e9
        for label, gbps in (("measured streaming", measured),) + WHAT_IF_GBPS:
            scale = measured / gbps
            step = _scaled_step(model.step, scale, half)
            rows.append([_name(doc), label, f"{gbps:.1f}", _ms(weight_bytes / (gbps * 1e9)), _ms(step)])
    if not rows:
        return ""
    return ("Predicted by the fitted cost model with the streaming bandwidth replaced (compute, overheads "
            "kept; a prediction, not a measurement): reload of all weights at link speed, and a batch-1 decode "
            "step with half the layers resident.\n\n" +
            _table(["model", "link", "GB/s", "weight reload", "step at half residency"], rows))


def _scaled_step(step, scale: float, resident: int) -> float:
    return dataclasses.replace(step, stream_bandwidth=step.stream_bandwidth / scale).seconds(resident, 1, 64)


# -- the report ----------------------------------------------------------------------------------------------
def render(docs: list[dict], figures: dict[str, str], command: str, baseline: str | None) -> str:
    """The report's markdown from compare documents (one per model) and the figures' relative paths."""
    if not docs:
        raise ConfigError("no model was measured; nothing to report")
    first = docs[0]["machine"]
    head = [f"# tidal study: {', '.join(_name(d) for d in docs)}",
            f"Produced by `{command}` on {datetime.date.today().isoformat()}, tidal {docs[0]['tidal_version']}.\n",
            f"Machine: {first['device']} ({first['device_name']}), {first['cpu_count']} CPUs, torch "
            f"{first['torch_version']}, {first['native']}.",
            "Each model is measured in one run for tidal and the baseline side by side; the published study's "
            "numbers (fp16 3B-14B models on PCIe Gen4 GPUs: preemption overheads of 2.6-7.3 s, 98.5-99.4% of "
            "it weight reload) are the comparison, not re-measured here."]
    incomplete = [f"{_name(d)} (stopped at {d['interrupted_at']})" for d in docs if not d["complete"]]
    if incomplete:
        head.append("**Incomplete runs:** " + ", ".join(incomplete) + ".")
    links = [f"{_name(d)}: {link_text(d['link'])}" for d in docs if d.get("link") is not None]
    if links:
        head.append("**Emulated link.** tidal's copies (weight streaming, KV swap, preemption and resume) went "
                    "through an emulated host<->device link (`--link`): " + "; ".join(links) + ". The "
                    "baselines' moves did not; their rows are not slowed by it.")
    if first["device"] == "cpu":
        head.append("On the CPU backend \"device\" memory is host memory: copies between tiers are memcpy on "
                    "tidal's copy thread, so link bandwidths are memory bandwidths, and baselines that would "
                    "move nothing on a CPU are emulated by copies (their notes say so).")
    figs = "\n\n".join(f"![{name}]({path})" for name, path in figures.items())
    sections = [_finding_offload(docs, baseline), _finding_preemption(docs), _finding_context_and_links(docs)]
    notes = [f"- {_name(d)}: {n}" for d, m in zip(docs, map(_costmodel, docs)) for n in (m.fit_notes if m else ())]
    model_errors = [f"- {_name(d)}: held-out error median {h['median_relative_error']:.1%}, max "
                    f"{h['max_relative_error']:.1%} over {h['n']} samples" for d in docs
                    if (h := d["costmodel"].get("holdout"))]
    tail = ["## The cost model", "Fitted per model from its own rows, with part of the grid held out "
            "(`tidal.costmodel`, docs/COSTMODEL.md):\n\n" + ("\n".join(model_errors) or "- not evaluated")]
    if notes:
        tail.append("Fit notes:\n\n" + "\n".join(notes))
    return "\n\n".join(head + [figs] + sections + tail) + "\n"


# -- the run -------------------------------------------------------------------------------------------------
def _slug(spec: str) -> str:
    name = Path(spec).name if Path(spec).is_dir() else spec
    return "".join(c if c.isalnum() or c in "-._" else "_" for c in name) or "model"


def run_study(specs, settings=None, out_dir=".", baseline: str = "accelerate", device=None, dtype=None,
              progress: bool = True, command: str = "tidal study", link=None) -> tuple[Path, bool]:
    """`tidal compare` (`compare.run_compare`, `link` included: a target is calibrated on each model) of
    each model in `specs` into `out_dir`/<model>/, then
    `out_dir`/REPORT.md and its figures. Returns (report path, complete). Ctrl-C stops at once: the models
    measured so far, and the interrupted one's partial rows, still make the report, marked incomplete."""
    specs = list(specs)
    if not specs:
        raise ConfigError("tidal study: name at least one model (a preset or a checkpoint directory)")
    slugs = [_slug(s) for s in specs]
    if len(set(slugs)) != len(slugs):
        raise ConfigError(f"tidal study: models named twice: {specs}")
    compare.check_baseline(baseline)
    out = writable_dir(out_dir)
    docs, complete = [], True
    for spec, slug in zip(specs, slugs):
        doc = compare.run_compare(spec, settings, baseline, out / slug, device=device, dtype=dtype,
                                  progress=progress, link=link)
        docs.append(doc)
        if not doc["complete"]:
            complete = False
            break
    figures = {"decode against residency, all models": degradation_figure(docs, out / DEGRADATION_FIGURE,
                                                                         baseline).name}
    for doc, slug in zip(docs, slugs):
        figures[f"{_name(doc)}: tidal and {baseline}"] = f"{slug}/{compare.FIGURE_FILE}"
    path = out / REPORT_FILE
    path.write_text(render(docs, figures, command, baseline))
    return path, complete
