"""What each gpu_check section runs, and how long each part should take: the cost model behind its budget.

Pure Python with no torch, so that `gpu_check.py --plan` prints the plan without touching the GPU. The
sections read their grids from here and ask the same cost functions, before each part, whether it still fits
in their time; the plan's total for a section is the sum of those parts.

The cost model: a part's time is bytes over a rate, or decode steps times a step time, plus fixed costs.
`Rates()` holds assumptions for one H100/H200 (16 cores, local disk); the "checkpoints" section measures the
disk and the pinned link, and gpu_check re-plans the remaining sections with those measured rates.

    decode step, all resident   = weight bytes / HBM rate + layers x host work per layer
    tidal step at fraction f    = max(that, streamed bytes / pinned H2D)   (copies overlap compute)
    accelerate step             = resident step + streamed bytes / pageable H2D   (copied in the forward)
    engine load                 = weight bytes / O_DIRECT disk read + host bytes / host pinning + device copy
    checkpoint                  = bytes / GPU draw (+ copy to host) + bytes / disk write (synced)
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

GB = 1e9
GIB = 1 << 30
DEFAULT_BUDGET_S = 480.0  # 8 minutes: a 15-minute lease less the machine's start, the install and a rerun
MANIFEST = "gpu-check-manifest.json"  # in the cache dir: preset name -> checkpoint directory


@dataclasses.dataclass(frozen=True)
class Rates:
    """Rates the estimates use (GB/s, seconds). The defaults are assumptions, not measurements."""

    start_s: float = 6.0  # a section's process: interpreter, torch, tidal, transformers, the CUDA context
    draw_gbps: float = 8.0  # random bf16 drawn on the GPU, copied to host memory chunk by chunk
    disk_write_gbps: float = 1.5  # safetensors shards written and synced
    disk_read_gbps: float = 2.0  # tidal's loader, O_DIRECT (the page cache does not help it)
    page_cache_gbps: float = 3.0  # transformers' from_pretrained of files still in the page cache
    pinned_h2d_gbps: float = 50.0  # PCIe Gen5 x16 (H100 PCIe) / H200 SXM host link, pinned memory
    pageable_h2d_gbps: float = 10.0  # accelerate's hooks copy from pageable memory
    host_alloc_gbps: float = 10.0  # fresh host memory touched and registered (cudaHostRegister)
    hbm_gbps: float = 2500.0  # weight bytes a decode step reads from device memory, effective
    layer_step_s: float = 0.6e-3  # host work per decoder layer per decode step (Python, launches)
    compile_s: float = 1.5  # one Triton kernel specialisation compiled
    copy_call_s: float = 8e-6  # one small cudaMemcpyAsync enqueued (the per-block KV loop)
    measured: tuple = ()  # names of the fields that were measured in this run

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Rates":
        d = json.loads(text)
        d["measured"] = tuple(d.get("measured", ()))
        return cls(**d)


# The --quick smoke run on a CPU: tiny shapes, so most parts cost their fixed overheads.
CPU_RATES = Rates(start_s=5.0, draw_gbps=0.3, disk_write_gbps=0.5, disk_read_gbps=0.5, page_cache_gbps=1.0,
                  pinned_h2d_gbps=3.0, pageable_h2d_gbps=3.0, host_alloc_gbps=2.0, hbm_gbps=5.0,
                  layer_step_s=2e-3, compile_s=0.0, copy_call_s=20e-6)


@dataclasses.dataclass(frozen=True)
class Shape:
    """A Llama-family shape, as tidal.presets holds it (tests/test_gpu_check.py checks the two agree)."""

    label: str  # the name tables give it
    preset: str  # tidal.presets name
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    positions: int  # max_position_embeddings of the checkpoint gpu_check writes: room for 16k contexts

    @property
    def layer_params(self) -> int:
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h = self.hidden
        return h * (q + 2 * kv) + q * h + 3 * h * self.intermediate + 2 * h

    @property
    def params(self) -> int:
        embed = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * self.layer_params + embed + self.hidden

    @property
    def weight_bytes(self) -> int:  # bf16
        return 2 * self.params

    @property
    def layer_bytes(self) -> int:
        return 2 * self.layer_params

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * 2

    def streamed_bytes(self, fraction: float) -> int:
        """Bytes of the decoder layers a plan at `fraction` streams (tidal.ResidencyPlan.from_fraction)."""
        return (self.layers - round(fraction * self.layers)) * self.layer_bytes


LLAMA_1B = Shape("Llama-3.2-1B", "llama-3.2-1b", 2048, 8192, 16, 32, 8, 64, 128256, True, 131072)
LLAMA_8B = Shape("Llama-3-8B", "llama-3-8b", 4096, 14336, 32, 32, 8, 128, 128256, False, 32768)
MICRO = Shape("micro", "micro", 128, 256, 4, 4, 2, 32, 512, False, 32768)
SHAPES = {s.preset: s for s in (LLAMA_1B, LLAMA_8B, MICRO)}

# -- what each section runs ----------------------------------------------------------------------------------
# Orders are orders of interest: a part that does not fit in a section's time is listed as not run, so the
# targets' rows come first.
STREAMING = {  # tidal.offload of a transformers model beside accelerate offloading the same layers
    "gpu": [(LLAMA_1B, dict(tidal=(1.0, 0.0, 0.5, 0.75, 0.25), accelerate=(0.0, 0.5), steps=20)),
            (LLAMA_8B, dict(tidal=(1.0, 0.0, 0.5), accelerate=(), steps=8))],
    "quick": [(MICRO, dict(tidal=(1.0, 0.0), accelerate=(0.0,), steps=3))],
}
# the 8B model's accelerate rows are the engine section's: at ~1 s a step they cannot run in two sections
ENGINE = {  # (fraction, kind, batches) per model; kind "hf" is transformers, with accelerate below 1.0
    "gpu": [(LLAMA_1B, dict(runs=[(1.0, "tidal", (1, 8)), (1.0, "hf", (1, 8)), (0.0, "tidal", (1, 8)),
                                  (0.0, "hf", (1,)), (0.5, "tidal", (1,))],
                            new_tokens=16, rounds=2)),
            (LLAMA_8B, dict(runs=[(1.0, "tidal", (1, 8)), (1.0, "hf", (1, 8)), (0.0, "tidal", (1, 8)),
                                  (0.0, "hf", (1,))], new_tokens=5, rounds=1))],
    "quick": [(MICRO, dict(runs=[(1.0, "tidal", (1,)), (1.0, "hf", (1,)), (0.0, "tidal", (1,)),
                                 (0.0, "hf", (1,))], new_tokens=4, rounds=2))],
}
PREEMPTION = {  # TTFT fractions (resident 0 first: the target) and synthetic breakdown cells (batch, context)
    "gpu": [(LLAMA_1B, dict(ttft=(0.0, 1.0), ttft_reps=5, reps=3,
                            cells=((8, 16384), (1, 1024), (8, 4096), (1, 16384)))),
            (LLAMA_8B, dict(ttft=(0.0,), ttft_reps=3, reps=1, cells=((8, 16384), (1, 1024))))],
    "quick": [(MICRO, dict(ttft=(0.0, 0.5), ttft_reps=1, reps=1,
                           cells=((1, 64), (2, 64), (1, 256), (2, 256))))],
}
SWITCH = {  # the model switched to (A) and the one switched away from (B), as on a Ray replica (issue 17)
    "gpu": [(LLAMA_8B, dict(other=LLAMA_1B, rounds=2, rebuild_rounds=1, arms=("tidal", "rebuild-hf")))],
    "quick": [(MICRO, dict(other=MICRO, rounds=2, rebuild_rounds=2, arms=("tidal", "rebuild-hf", "rebuild-tidal")))],
}
KV = {"gpu": dict(layers=32, tokens=(1024, 8192, 32768), reps=3),
      "quick": dict(layers=2, tokens=(1024, 8192), reps=1)}
KERNEL_CASES = {"gpu": [(b, c) for b in (1, 16, 64) for c in (512, 4096, 32768)], "quick": [(1, 64)]}
STUDY = {  # tidal study on the 1B preset; the grid is small enough for its share
    "gpu": dict(model=LLAMA_1B, fractions=(1.0, 0.0), batches=(1,), output_lengths=(16,), prompt_tokens=16,
                contexts=(1024,), preemption_batch=2, repeats=1),
    "quick": dict(model=MICRO, fractions=(1.0, 0.0), batches=(1,), output_lengths=(4,), prompt_tokens=8,
                  contexts=(32,), preemption_batch=1, repeats=1),
}
# An assumption until a GPU run has timed the suite, which takes 5 minutes on the 2-core CPU VM: on a GPU it
# runs what its share allows (gpu_tests.py), and 88 s is what is left of 8 minutes once issue 17's switch is in.
TESTS_S = {"gpu": 88.0, "quick": 4.0}
CHECKPOINTS = {"gpu": [LLAMA_1B, LLAMA_8B], "quick": [MICRO]}


def baseline(kind: str, fraction: float) -> str:
    """What an ENGINE run of `kind` is called: tidal, or transformers' baseline at that fraction."""
    return kind if kind == "tidal" else "transformers" if fraction == 1.0 else "accelerate"


def grid(table: dict, quick: bool):
    return table["quick" if quick else "gpu"]


# -- cost functions (seconds) --------------------------------------------------------------------------------
def resident_step_s(m: Shape, r: Rates) -> float:
    return m.weight_bytes / (r.hbm_gbps * GB) + m.layers * r.layer_step_s


def tidal_step_s(m: Shape, fraction: float, r: Rates) -> float:
    return max(resident_step_s(m, r), m.streamed_bytes(fraction) / (r.pinned_h2d_gbps * GB))


def accelerate_step_s(m: Shape, fraction: float, r: Rates) -> float:
    return resident_step_s(m, r) + m.streamed_bytes(fraction) / (r.pageable_h2d_gbps * GB)


def engine_load_s(m: Shape, fraction: float, r: Rates, host_kv_bytes: int = 0) -> float:
    streamed = m.streamed_bytes(fraction)
    return (1.0 + m.weight_bytes / (r.disk_read_gbps * GB)
            + (streamed + host_kv_bytes) / (r.host_alloc_gbps * GB)
            + (m.weight_bytes - streamed) / (r.pinned_h2d_gbps * GB))


def hf_load_s(m: Shape, r: Rates) -> float:
    """transformers' from_pretrained from the page cache, then the resident part moved to the device."""
    return 1.0 + m.weight_bytes / (r.page_cache_gbps * GB) + m.weight_bytes / (r.pageable_h2d_gbps * GB)


def checkpoint_s(m: Shape, r: Rates) -> float:
    return m.weight_bytes / (r.draw_gbps * GB) + m.weight_bytes / (r.disk_write_gbps * GB)


def streaming_variant_s(m: Shape, kind: str, fraction: float, steps: int, r: Rates) -> float:
    if kind == "tidal":  # pack the streamed layers into pinned memory; restore copies them back
        setup = m.streamed_bytes(fraction) * (1 / (r.host_alloc_gbps * GB) + 1 / (r.pinned_h2d_gbps * GB))
        return 0.5 + setup + (steps + 3) * tidal_step_s(m, fraction, r)
    return hf_load_s(m, r) + (steps + 3) * accelerate_step_s(m, fraction, r)


def engine_variant_s(m: Shape, kind: str, fraction: float, batches, new_tokens: int, rounds: int,
                     r: Rates) -> float:
    steps = len(batches) * (2 + rounds * (1 + new_tokens))  # warm-up of 2 tokens, then 1 and n per round
    if kind == "tidal":
        return engine_load_s(m, fraction, r) + steps * tidal_step_s(m, fraction, r)
    return hf_load_s(m, r) + steps * 1.5 * accelerate_step_s(m, fraction, r)  # generate()'s own host work


def round_trip_s(m: Shape, fraction: float, kv_bytes: int, r: Rates) -> float:
    """preempt(weights="host", kv="swap") + resume + the first step: resident weights out (into freshly
    pinned memory) and back, KV both ways."""
    resident = m.weight_bytes - m.streamed_bytes(fraction)
    moved = 2 * (resident + kv_bytes) / (r.pinned_h2d_gbps * GB)
    return 0.2 + moved + resident / (r.host_alloc_gbps * GB) + tidal_step_s(m, fraction, r)


def switch_arm_s(a: Shape, b: Shape, arm: str, rounds: int, r: Rates) -> float:
    """One arm of the switch section: `rounds` switches to each of A and B (tidal's loading each once first),
    then two requests without one."""
    if arm == "tidal":
        return (engine_load_s(a, 1.0, r) + engine_load_s(b, 1.0, r)
                + rounds * (round_trip_s(a, 1.0, 0, r) + round_trip_s(b, 1.0, 0, r)))
    load = hf_load_s if arm == "rebuild-hf" else (lambda m, r: engine_load_s(m, 1.0, r))
    return rounds * (load(a, r) + load(b, r)) + 3 * resident_step_s(a, r)


def ttft_s(m: Shape, fraction: float, reps: int, r: Rates) -> float:
    return engine_load_s(m, fraction, r) + 2 * (reps + 1) * round_trip_s(m, fraction, 0, r)


def kv_pool_bytes(m: Shape, cells) -> int:
    """Bytes of the largest cell's KV pool, 2 blocks of slack per sequence (preemption_runs.kv_pool_bytes)."""
    block = 16 * m.kv_bytes_per_token
    return max(block * b * (-(-c // 16) + 2) for b, c in cells)


def breakdown_cell_s(m: Shape, batch: int, context: int, reps: int, r: Rates) -> float:
    kv = batch * context * m.kv_bytes_per_token
    return (reps + 1) * (round_trip_s(m, 1.0, kv, r) + kv / (r.hbm_gbps * GB))


def breakdown_load_s(m: Shape, cells, r: Rates) -> float:
    return engine_load_s(m, 1.0, r, host_kv_bytes=kv_pool_bytes(m, cells))


def kv_tokens_s(layers: int, tokens: int, reps: int, r: Rates) -> float:
    nbytes = 2 * layers * 8 * 128 * 2 * tokens
    setup = 1.0 + nbytes / (r.host_alloc_gbps * GB) + 3 * nbytes / (r.hbm_gbps * GB)
    calls = 2 * layers * (-(-tokens // 16))
    per_swap = 2 * nbytes / (r.pinned_h2d_gbps * GB) + calls * r.copy_call_s
    return setup + 2 * (reps + 1) * per_swap


def kernel_case_s(batch: int, context: int, r: Rates) -> float:
    kv = 2 * batch * context * 8 * 128 * 2
    return 2 * r.compile_s / 3 + 0.5 + 200 * kv / (r.hbm_gbps * GB)  # ~2/3 of cases need a new split count


# -- section estimates ---------------------------------------------------------------------------------------
def _checkpoints(q, r, cache_dir):
    parts = []
    for m in grid(CHECKPOINTS, q):
        cached = built_checkpoint(cache_dir, m.preset) is not None
        parts.append((f"{m.label} {m.weight_bytes / GB:.1f} GB" + (" (cached)" if cached else ""),
                      0.5 if cached else checkpoint_s(m, r)))
    read = 3 * min(GIB, LLAMA_1B.weight_bytes) / (r.disk_read_gbps * GB)  # 2 cold reads of up to 1 GiB
    return parts + [("disk read + pinned link", read + 1)]


def _kernels(q, r, cache_dir):
    return [("correctness (compiles)", 12 * r.compile_s + 1)] + [
        (f"{b}x{c}", kernel_case_s(b, c, r)) for b, c in grid(KERNEL_CASES, q)]


def _kv(q, r, cache_dir):
    g = grid(KV, q)
    return [("pinned link", 2.0)] + [(f"{t} tokens", kv_tokens_s(g["layers"], t, g["reps"], r))
                                     for t in g["tokens"]]


def _streaming(q, r, cache_dir):
    parts = [("pinned link", 2.0)]
    for m, g in grid(STREAMING, q):
        parts.append((f"{m.label} load", hf_load_s(m, r)))
        parts += [(f"{m.label} tidal {f}", streaming_variant_s(m, "tidal", f, g["steps"], r))
                  for f in g["tidal"]]
        parts += [(f"{m.label} accelerate {f}", streaming_variant_s(m, "accelerate", f, g["steps"], r))
                  for f in g["accelerate"]]
    return parts


def _engine(q, r, cache_dir):
    parts = [("pinned link", 2.0)]
    for m, g in grid(ENGINE, q):
        parts += [(f"{m.label} {baseline(kind, f)} {f}",
                   engine_variant_s(m, kind, f, b, g["new_tokens"], g["rounds"], r))
                  for f, kind, b in g["runs"]]
    return parts


def _preemption(q, r, cache_dir):
    parts = [("pinned link", 2.0)]
    for m, g in grid(PREEMPTION, q):
        parts.append((f"{m.label} TTFT {g['ttft'][0]}", ttft_s(m, g["ttft"][0], g["ttft_reps"], r)))
        parts.append((f"{m.label} breakdown load", breakdown_load_s(m, g["cells"], r)))
        parts += [(f"{m.label} {b}x{c}", breakdown_cell_s(m, b, c, g["reps"], r)) for b, c in g["cells"]]
        parts += [(f"{m.label} TTFT {f}", ttft_s(m, f, g["ttft_reps"], r)) for f in g["ttft"][1:]]
    return parts


def _switch(q, r, cache_dir):
    return [(f"{m.label} / {g['other'].label} {arm}", switch_arm_s(m, g["other"], arm, switch_rounds(g, arm), r))
            for m, g in grid(SWITCH, q) for arm in g["arms"]]


def switch_rounds(g: dict, arm: str) -> int:
    """Switches an arm of the switch section measures: a rebuild costs seconds each on the GPU, tidal's not."""
    return g["rounds"] if arm == "tidal" else g["rebuild_rounds"]


def _study(q, r, cache_dir):
    g = grid(STUDY, q)
    m = g["model"]
    n = len(g["fractions"]) * len(g["batches"])
    decode = n * (engine_load_s(m, 0.5, r) + hf_load_s(m, r)) + n * 40 * accelerate_step_s(m, 0.0, r)
    # profile's preemption cases (tiers host and disk, full and pipelined) and the transformers protocol
    preempt = engine_load_s(m, 1.0, r) + 8 * round_trip_s(m, 1.0, 0, r) + 4 * hf_load_s(m, r)
    return [("links", 3.0), ("decode sweep, both systems", decode), ("preemption and protocol", preempt)]


def _tests(q, r, cache_dir):
    return [("pytest", TESTS_S["quick" if q else "gpu"])]


ESTIMATORS = {"checkpoints": _checkpoints, "kernels": _kernels, "kv": _kv, "streaming": _streaming,
              "engine": _engine, "preemption": _preemption, "switch": _switch, "study": _study, "tests": _tests}
SECTIONS = list(ESTIMATORS)  # the order they run in: measurements first, the test suite takes what is left
NEEDS_CHECKPOINTS = {"streaming", "engine", "preemption", "switch", "study"}


def parts(section: str, quick: bool, rates: Rates, cache_dir=None) -> list[tuple[str, float]]:
    """(part, estimated seconds) of a section, its process start first."""
    return [("start", rates.start_s)] + ESTIMATORS[section](quick, rates, cache_dir)


def estimate(section: str, quick: bool, rates: Rates, cache_dir=None) -> float:
    return sum(s for _, s in parts(section, quick, rates, cache_dir))


def shares(estimates: list[float], seconds_left: float) -> list[float]:
    """The budget left, divided in proportion to the estimates: a section that is estimated to overrun is
    squeezed as much as the others, and time saved early flows to the sections after it."""
    total = sum(estimates)
    return [seconds_left * e / total if total > 0 else 0.0 for e in estimates]


def built_checkpoint(cache_dir, preset: str):
    """The directory the checkpoints section built for `preset` in `cache_dir`, or None."""
    if cache_dir is None:
        return None
    try:
        path = json.loads((Path(cache_dir) / MANIFEST).read_text()).get(preset)
    except (OSError, ValueError):
        return None
    return Path(path) if path and (Path(path) / "config.json").is_file() else None


def format_plan(sections: list[str], quick: bool, rates: Rates, budget_s: float, cache_dir=None) -> str:
    est = [estimate(s, quick, rates, cache_dir) for s in sections]
    share = shares(est, budget_s)
    src = ", ".join(rates.measured) or "none"
    lines = [f"gpu_check plan ({'quick CPU smoke run' if quick else 'GPU'}): budget {budget_s:.0f} s; "
             f"rates measured so far: {src}",
             f"rates: pinned H2D {rates.pinned_h2d_gbps:.1f} GB/s, pageable {rates.pageable_h2d_gbps:.1f} "
             f"GB/s, disk write {rates.disk_write_gbps:.2f} GB/s, O_DIRECT read {rates.disk_read_gbps:.2f} "
             f"GB/s, HBM {rates.hbm_gbps:.0f} GB/s, {rates.layer_step_s * 1e3:.1f} ms host work per layer "
             f"per step, section start {rates.start_s:.0f} s", "",
             f"{'section':<12} {'est s':>7} {'share s':>8}  parts (s)"]
    for s, e, sh in zip(sections, est, share):
        detail = "; ".join(f"{name} {sec:.1f}" for name, sec in parts(s, quick, rates, cache_dir))
        lines.append(f"{s:<12} {e:>7.0f} {sh:>8.0f}  {detail}")
    over = "  (over budget: every section is squeezed in proportion)" if sum(est) > budget_s else ""
    lines.append(f"{'total':<12} {sum(est):>7.0f} {sum(share):>8.0f}{over}")
    return "\n".join(lines)
