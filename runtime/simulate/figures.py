"""Figures of scheduling runs, live or simulated: the timeline of which model is where (`segments` from a
scheduler trace, `draw_timeline` on a matplotlib axis), `timeline_figure` of a `tidal simulate` document, and
`rates_figure`, SLO attainment against request rate. `segments` is plain Python; matplotlib is imported only
to draw. bench/scheduler_bench.py draws its live timelines with the same two functions."""
from __future__ import annotations

from pathlib import Path

COLORS = {"active": "tab:green", "host": "tab:orange", "disk": "tab:red"}
LEGEND = "green active (lighter: partly resident), orange preempted to host, red to disk"


def segments(events, models, end: float, loaded: dict | None = None, offset: float = 0.0) -> dict:
    """Per model, [(start, end, state, resident fraction)] from a scheduler trace's `events` (dicts with time,
    action, model, args, in time order; the live trace's and the simulator's alike): a Load makes a model active
    at its `loaded` fraction (default 1), a Resume at the fraction it left with, a SetResidency changes the
    fraction, a Preempt moves it to its weights' tier ("host", "disk"), an Unload ends its segment. Times
    minus `offset`; the last segment of each model runs to `end`."""
    loaded = loaded or {}
    out = {m: [] for m in models}
    cur: dict = {m: None for m in models}  # model -> (since, state, fraction)
    fraction = {m: loaded.get(m, 1.0) for m in models}
    for e in events:
        t, m, action, args = e["time"] - offset, e["model"], e["action"], e.get("args") or {}
        if m not in out:
            continue
        if action == "Load":
            fraction[m] = loaded.get(m, 1.0)
            state = ("active", fraction[m])
        elif action == "Resume":
            state = ("active", fraction[m])
        elif action == "SetResidency":
            fraction[m] = args.get("fraction", fraction[m])
            state = ("active", fraction[m])
        elif action == "Preempt":
            state = (args.get("weights", "host"), fraction[m])
        elif action == "Unload":
            state = None
        else:  # a Step or anything else leaves the model where it is
            continue
        if cur[m] is not None:
            out[m].append((cur[m][0], t, *cur[m][1:]))
        cur[m] = None if state is None else (t, *state)
    for m in models:
        if cur[m] is not None:
            out[m].append((cur[m][0], end, *cur[m][1:]))
    return out


def draw_timeline(ax, models, segs: dict, steps: dict | None = None, arrivals=None) -> None:
    """One row per model on `ax`: its `segments` as bars (colour: where it is; opacity: how much of it is
    resident), its step times as ticks (`steps`: model -> times) and `arrivals` ((time, model) pairs) as
    markers."""
    for j, m in enumerate(models):
        for a, b, state, frac in segs[m]:
            ax.broken_barh([(a, max(b - a, 1e-3))], (j - 0.4, 0.8), color=COLORS.get(state, "grey"),
                           alpha=0.35 + 0.55 * frac)
        if steps and steps.get(m):
            ax.plot(steps[m], [j] * len(steps[m]), "|", color="k", ms=6, alpha=0.3, rasterized=True)
    if arrivals:
        ax.plot([t for t, _ in arrivals], [models.index(m) + 0.45 for _, m in arrivals], "v", color="tab:blue", ms=3)
    ax.set_yticks(range(len(models)), models)
    ax.set_ylim(-0.6, len(models) - 0.4)


def timeline_figure(doc: dict, path: Path) -> None:
    """`tidal simulate`'s timeline.png: per policy of `doc` (simulate.json), which model is where over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m["name"] for m in doc["models"]]
    loaded = {m["name"]: m.get("resident_fraction", 1.0) for m in doc["models"]}
    policies = list(doc["policies"].items())
    fig, axes = plt.subplots(len(policies), 1, figsize=(14, 0.5 * len(models) * len(policies) + 1.2),
                             squeeze=False, sharex=True)
    for ax, (name, r) in zip(axes[:, 0], policies):
        end = r.get("end_s", max((e["time"] for e in r["timeline"]), default=0.0))
        draw_timeline(ax, models, segments(r["timeline"], models, end, loaded))
        ax.set_title(f"{name}: {LEGEND}; SLO attainment {r['slo_attainment']:.3f}", fontsize=8, loc="left")
    axes[-1, 0].set_xlabel("simulated seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def rates_figure(doc: dict, path: Path) -> None:
    """`tidal simulate --rates`'s rates.png: SLO attainment of each policy against request rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    rates = doc["rates"]["rates"]
    for p, ys in doc["rates"]["slo_attainment"].items():
        ax.plot(rates, ys, marker="o", label=p)
    ax.set(xlabel="requests / s", ylabel="SLO attainment", ylim=(0, 1.02), title="tidal simulate")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
