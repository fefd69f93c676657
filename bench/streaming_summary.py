"""Turns the streaming benchmarks' medians into the figures docs/BENCHMARKS.md records."""


def summarize(medians: dict[str, float], notes: dict[str, dict]) -> list[str]:
    lines = []
    a = notes.get("a")
    if a:
        lines.append(f"(a) plain step {a['plain_step_ms']:.2f} ms; host overhead per streamed layer "
                     f"({a['streamed_layers']} layers): tidal {a['tidal_us_per_layer']:.1f} us, accelerate "
                     f"{a['accelerate_us_per_layer']:.1f} us; tidal / accelerate = {a['ratio']:.3f} (target <= 0.2)")
    base = medians.get("b/plain")
    for name in ("b/tidal-depth2", "b/tidal-depth0", "b/accelerate"):
        if name in medians:
            extra = f", {medians[name] / base:.2f}x the all-resident step" if base else ""
            lines.append(f"(b) {name[2:]:<15} step {medians[name] * 1e3:8.2f} ms{extra}")
    if "b/tidal-depth2" in medians and "b/accelerate" in medians:
        lines.append(f"(b) accelerate / tidal-depth2 = {medians['b/accelerate'] / medians['b/tidal-depth2']:.2f}x; "
                     f"tidal depth0 / depth2 = {medians['b/tidal-depth0'] / medians['b/tidal-depth2']:.2f}x")
    return lines
