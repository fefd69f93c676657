"""Figures of profile documents (profile.schema.json), drawn with matplotlib's Agg backend (no display).

`profile_figure`: decode tokens/s against the resident fraction, normalised per batch to the all-resident
point, with bars from the slowest to the fastest repeat; and the preemption round trip's weight, KV and
recompute seconds, stacked, per tier and context. A document measured through an emulated link says so in
every title.
"""
from __future__ import annotations

from pathlib import Path

from .common import link_text, normalised_curves


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: never open a window, never need a display
    import matplotlib.pyplot as plt

    return plt


def profile_figure(doc: dict, path) -> Path:
    """Write the two-panel PNG of profile document `doc` to `path`; returns the path. Panels with no rows yet
    (an interrupted run) say so instead of plotting."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    try:
        _decode_panel(left, doc)
        _preemption_panel(right, doc)
        fig.suptitle(_title(doc))
        return _save(fig, path)
    finally:
        plt.close(fig)


def _save(fig, path, **layout) -> Path:
    fig.tight_layout(**layout)
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def link_title(link: dict | None) -> str:
    """The title line of an emulated link (a document's `link` section); empty without one."""
    return "" if link is None else f"\nemulated link: {link_text(link)}"


def _title(doc: dict, what: str = "") -> str:
    model = doc["model"]
    title = f"{model['spec']} ({model['dtype']}) on {doc['machine']['device_name']}{what}"
    if doc["interrupted_at"]:
        title += f"\nINCOMPLETE, interrupted at {doc['interrupted_at']}"
    elif not doc["complete"]:
        title += ": INCOMPLETE"
    return title + link_title(doc.get("link"))


def _residency_axes(ax, ylabel: str, legend_size: str) -> None:
    """Axes of a decode-against-residency panel: resident fraction in % on x, from 0."""
    ax.set_xlabel("resident fraction of decoder layers (%)")
    ax.set_ylabel(ylabel)
    ax.set_xlim(-3, 103)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)


def _empty(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} rows measured", ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _decode_panel(ax, doc: dict) -> None:
    rows = [r for r in doc["decode"] if r["system"] == "tidal"]
    ax.set_title("decode throughput against residency")
    if not rows:
        return _empty(ax, "decode")
    # one line per (batch, output length); each normalised to its own all-resident point, if measured
    series: dict[tuple[int, int], list[dict]] = {}
    for r in rows:
        series.setdefault((r["batch"], r["output_tokens"]), []).append(r)
    normalised = True
    for (batch, n), points in sorted(series.items()):
        points.sort(key=lambda r: r["resident_fraction"])
        top = next((r["tokens_per_second"] for r in points if r["resident_fraction"] == 1.0), None)
        normalised &= top is not None
        _spread_line(ax, points, top or 1.0, dict(marker="o", label=f"batch {batch}, {n} tokens"))
    _residency_axes(ax, ("tokens/s relative to all resident" if normalised else "tokens/s") +
                    "\n(bars: slowest to fastest repeat)", "small")


def spread_bars(rows: list[dict], scale: float = 1.0) -> list[list[float]]:
    """matplotlib's yerr ([below, above]) of decode rows' tokens/s over `scale`: from the slowest to the
    fastest repeat; 0 where a row did not record one (a version 1 document)."""
    below, above = [], []
    for r in rows:
        tps, lo, hi = r["tokens_per_second"], r.get("tokens_per_second_min"), r.get("tokens_per_second_max")
        below.append(0.0 if lo is None else (tps - lo) / scale)
        above.append(0.0 if hi is None else (hi - tps) / scale)
    return [below, above]


def _spread_line(ax, rows: list[dict], scale: float, style: dict) -> None:
    ax.errorbar([100 * r["resident_fraction"] for r in rows], [r["tokens_per_second"] / scale for r in rows],
                yerr=spread_bars(rows, scale), capsize=3, **style)


def _preemption_panel(ax, doc: dict) -> None:
    rows = [r for r in doc["preemption"] if r["system"] == "tidal" and not r["pipelined"]]
    ax.set_title("preempt + resume round trip (full resume)")
    if not rows:
        return _empty(ax, "preemption")
    labels = [f"{r['weights']}/{r['kv']}\n{r['context']} tok" for r in rows]
    xs = range(len(rows))
    bottom = [0.0] * len(rows)
    parts = (("weight_seconds", "weights"), ("kv_seconds", "KV"), ("recompute_seconds", "recompute"))
    for key, name in parts:
        ms = [1e3 * r[key] for r in rows]
        ax.bar(xs, ms, bottom=bottom, label=name)
        bottom = [b + m for b, m in zip(bottom, ms)]
    ax.scatter(xs, [1e3 * r["total_seconds"] for r in rows], marker="_", s=300, color="black",
               label="total (wall)", zorder=3)
    ax.set_xticks(list(xs), labels, fontsize="x-small")
    ax.set_ylabel("milliseconds")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")


def compare_figure(doc: dict, path, notes=()) -> Path:
    """Write the two-panel PNG of compare document `doc` (tidal's rows and a baseline's) to `path`; returns
    the path. Left: decode tokens/s against the resident fraction, tidal (solid) and the baseline (dashed) on
    the same axes, one colour per batch and output length. Right: the preempt + resume round trip (kv swap,
    full resume) split into weights, KV and the rest, tidal's host and disk tiers against the transformers
    user's protocol, per context. `notes` (what the baseline measures differently on this device) go under
    the panels."""
    import textwrap

    plt = _pyplot()
    lines = [line for n in notes
             for line in textwrap.wrap(n, 190, initial_indent="* ", subsequent_indent="  ")]
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.5 + 0.16 * len(lines)))
    try:
        _compare_decode_panel(left, doc)
        _compare_preemption_panel(right, doc)
        fig.suptitle(_title(doc, ": tidal against baselines"))
        if lines:
            fig.text(0.01, 0.01, "\n".join(lines), fontsize="x-small", va="bottom", ha="left")
        return _save(fig, path, rect=(0, 0.02 + 0.16 * len(lines) / (5.5 + 0.16 * len(lines)), 1, 1))
    finally:
        plt.close(fig)


def _compare_decode_panel(ax, doc: dict) -> None:
    ax.set_title("decode throughput against residency")
    if not doc["decode"]:
        return _empty(ax, "decode")
    series: dict[tuple[int, int], dict[str, list[dict]]] = {}
    for r in doc["decode"]:
        series.setdefault((r["batch"], r["output_tokens"]), {}).setdefault(r["system"], []).append(r)
    for i, ((batch, n), systems) in enumerate(sorted(series.items())):
        for system, points in sorted(systems.items(), key=lambda kv: kv[0] != "tidal"):
            points.sort(key=lambda r: r["resident_fraction"])
            tidal = system == "tidal"
            _spread_line(ax, points, 1.0, dict(color=f"C{i % 10}", linestyle="-" if tidal else "--",
                                               marker="o" if tidal else "s",
                                               label=f"{system}, batch {batch}, {n} tokens"))
    _residency_axes(ax, "decode tokens/s\n(bars: slowest to fastest repeat)", "x-small")


def _compare_preemption_panel(ax, doc: dict) -> None:
    ax.set_title("preempt + resume round trip (kv swap, full resume)")
    rows = [r for r in doc["preemption"] if r["kv"] == "swap" and not r["pipelined"]]
    if not rows:
        return _empty(ax, "preemption")
    order = {"tidal": 0}
    rows.sort(key=lambda r: (r["context"], order.get(r["system"], 1), r["weights"] != "host"))
    xs = list(range(len(rows)))
    hatches = ["" if r["system"] == "tidal" else "//" for r in rows]
    bottom = [0.0] * len(rows)
    parts = (("weights", lambda r: r["weight_seconds"]), ("KV", lambda r: r["kv_seconds"]),
             ("rest (first step, bookkeeping)",
              lambda r: max(0.0, r["total_seconds"] - r["weight_seconds"] - r["kv_seconds"])))
    for i, (name, seconds) in enumerate(parts):
        ms = [1e3 * seconds(r) for r in rows]
        ax.bar(xs, ms, bottom=bottom, color=f"C{i}", hatch=hatches, edgecolor="black", linewidth=0.4,
               label=name)
        bottom = [b + m for b, m in zip(bottom, ms)]
    ax.bar([0], [0], color="white", hatch="//", edgecolor="black", label="transformers user's protocol")
    labels = [f"{r['system']}\n{r['weights']}\n{r['context']} tok" for r in rows]
    ax.set_xticks(xs, labels, fontsize="x-small")
    ax.set_ylabel("milliseconds")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")


def degradation_figure(docs: list[dict], path, baseline: str | None = None) -> Path:
    """Write the study's offloading figure to `path`: for each model (one colour), decode tokens/s over its
    all-resident tokens/s against the resident fraction, batch 1 and the longest output measured (the
    published study's one-request protocol); tidal solid, `baseline` dashed on the same normalisation."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    try:
        links = [f"\n{d['model']['spec']}: emulated link {link_text(d['link'])}" for d in docs
                 if d.get("link") is not None]
        ax.set_title("decode throughput against residency, normalised to all resident" + "".join(links),
                     **({"fontsize": "small"} if links else {}))
        drawn = False
        for i, doc in enumerate(docs):
            for system, style in (("tidal", "-"), (baseline, "--")):
                curves = normalised_curves(doc, system) if system else {}
                if not curves:
                    continue
                batch = min(b for b, _ in curves)
                n = max(k for b, k in curves if b == batch)
                points = curves[(batch, n)]
                ax.plot([100 * f for f, _, _ in points], [norm for _, _, norm in points], color=f"C{i % 10}",
                        linestyle=style, marker="o" if system == "tidal" else "s",
                        label=f"{doc['model']['spec']}, {system} (batch {batch}, {n} tokens)")
                drawn = True
        if not drawn:
            _empty(ax, "decode")
        else:
            _residency_axes(ax, "tokens/s relative to tidal all resident", "small")
        return _save(fig, path)
    finally:
        plt.close(fig)
