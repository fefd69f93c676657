"""`tidal profile`: measure, on this machine, what tidal's cost model needs for one model, and write it to
profile.json (schema: profile.schema.json) with a figure (figures.py).

Sections, in order, the document rewritten (atomically) after each cell group so that a killed run still
leaves a valid, incomplete profile:

1. links: host-to-device and device-to-host copy bandwidth (`tidal.measure.copy_bandwidth`), and the cold read
   bandwidth of the checkpoint files through tidal's loader (`runs.disk_read`).
2. decode: for each resident fraction one engine, and for each batch and output length a timed decode
   (`runs.decode_rounds`: tokens/s from the difference of an n-token and a 1-token run), with the engine's own
   counters for the bytes streamed and the stalls per step.
3. preemption: one engine at `preemption_fraction`, and for each case of PREEMPTION_CASES and each context a
   few round trips (`runs.round_trips`) on synthetic context. The context is injected without a forward pass;
   with kv="drop" the resume really recomputes it (a prefill), so recompute_seconds is measured, not
   synthetic. Pipelined resume is measured for kv="swap" only: with "drop" the first step is the recompute,
   which the report should show whole rather than overlapped with the weight copies.
4. costmodel: `tidal.costmodel` fitted to the rows less a held-out part, and its error on that part.

Ctrl-C (KeyboardInterrupt) stops the run where it is: the engines are closed, the document is written with
`complete` false and `interrupted_at` naming the cell, and `run_profile` returns it.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

from ..backends.link import LinkEmulation, LinkTarget, coerce as coerce_link, layer_seconds_of_step
from ..backends.link import TARGETS, parse as parse_link, target as link_target
from ..errors import ConfigError
from . import runs, schema

PROFILE_FILE = "profile.json"
FIGURE_FILE = "profile.png"

FULL_FRACTIONS = (1.0, 0.98, 0.96, 0.94, 0.92, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0)
# (weights, kv, pipelined) of the preemption round trips
PREEMPTION_CASES = (("host", "swap", False), ("host", "swap", True), ("host", "drop", False),
                    ("disk", "swap", False), ("disk", "swap", True), ("disk", "drop", False))
COPY_BYTES = 64 << 20  # link bandwidth copies: large enough to amortise the launch, small enough to be quick
DISK_BYTES = 1 << 30  # at most this much of the checkpoint is read for the disk bandwidth
LINK_REPS = 5
DISK_REPS = 3
HOLDOUT_FRACTION = 0.25
HOLDOUT_SEED = 0
# an emulated link's bandwidth copies: about this long each, so that a slow link does not stall the run
EMULATED_COPY_SECONDS = 0.05


def _ints(name, values, minimum) -> tuple[int, ...]:
    values = _tuple(name, values)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise ConfigError(f"{name}: {v!r} must be an int >= {minimum}")
    return values


def _tuple(name, values) -> tuple:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ConfigError(f"{name}={values!r} must be a list")
    values = tuple(values)
    if not values:
        raise ConfigError(f"{name} is empty; give at least one value")
    if len(set(values)) != len(values):
        raise ConfigError(f"{name}={list(values)} repeats a value")
    return values


def _int(name, value, minimum) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}={value!r} must be an int >= {minimum}")


def _fraction(name, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name}: {value!r} is outside [0, 1]")


def _nonnegative(name, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value != value:
        raise ConfigError(f"{name}={value!r} must be a number >= 0")
    return float(value)


@dataclasses.dataclass(frozen=True)
class ProfileSettings:
    """The grid `run_profile` measures. `fractions`: resident fractions of the decode sweep, each in [0, 1];
    `batches` and `output_lengths` (>= 2 new tokens) of the timed decodes, with prompts of `prompt_tokens`;
    `contexts`: tokens per sequence at preemption, with `preemption_batch` sequences, on an engine at
    `preemption_fraction`; `repeats`: timed repetitions per cell (rows hold medians); `prefetch_depth` of the
    engines; `quick_grid` marks the --quick grid. A decode cell repeats past `repeats`, up to `max_repeats`,
    while its relative spread ((max - min) / median) is above `max_spread`, for at most `extra_seconds` more
    (`runs.decode_rounds`). `full()` and `quick()` are the two presets."""

    fractions: tuple[float, ...]
    batches: tuple[int, ...]
    output_lengths: tuple[int, ...]
    prompt_tokens: int
    contexts: tuple[int, ...]
    preemption_batch: int
    repeats: int
    preemption_fraction: float = 1.0
    prefetch_depth: int = 2
    quick_grid: bool = False  # "quick" in the document; the name `quick` is the preset's
    max_repeats: int = 10
    max_spread: float = 0.1
    extra_seconds: float = 60.0

    def __post_init__(self):
        fractions = _tuple("fractions", self.fractions)
        for f in fractions:
            _fraction("fractions", f)
        object.__setattr__(self, "fractions", tuple(float(f) for f in fractions))
        object.__setattr__(self, "batches", _ints("batches", self.batches, 1))
        object.__setattr__(self, "output_lengths", _ints("output_lengths", self.output_lengths, 2))
        object.__setattr__(self, "contexts", _ints("contexts", self.contexts, 1))
        _int("prompt_tokens", self.prompt_tokens, 1)
        _int("preemption_batch", self.preemption_batch, 1)
        _int("repeats", self.repeats, 1)
        _int("max_repeats", self.max_repeats, 1)
        if self.max_repeats < self.repeats:
            raise ConfigError(f"max_repeats={self.max_repeats} is below repeats={self.repeats}")
        object.__setattr__(self, "max_spread", _nonnegative("max_spread", self.max_spread))
        object.__setattr__(self, "extra_seconds", _nonnegative("extra_seconds", self.extra_seconds))
        _int("prefetch_depth", self.prefetch_depth, 1)
        _fraction("preemption_fraction", self.preemption_fraction)
        object.__setattr__(self, "preemption_fraction", float(self.preemption_fraction))
        if not isinstance(self.quick_grid, bool):
            raise ConfigError(f"quick_grid={self.quick_grid!r} must be a bool")

    @classmethod
    def full(cls) -> "ProfileSettings":
        """The whole grid: resident fractions 0-100% in 10% steps plus 92-98%, batches 1 and 8, 32 and 128
        new tokens, preemption at 512, 1024 and 2048 tokens of context (every preset holds them), 3
        repeats (decode: up to 10 while the spread is above 10%, for at most a minute more per cell)."""
        return cls(fractions=FULL_FRACTIONS, batches=(1, 8), output_lengths=(32, 128), prompt_tokens=32,
                   contexts=(512, 1024, 2048), preemption_batch=4, repeats=3)

    @classmethod
    def quick(cls) -> "ProfileSettings":
        """A grid small enough for a minute on a CPU: 3 fractions, batches 1 and 4, 16 new tokens, contexts of
        32 and 128 tokens, 3 repeats (decode: up to 5 while the spread is above 10%, for at most 2 s more per
        cell)."""
        return cls(fractions=(1.0, 0.5, 0.0), batches=(1, 4), output_lengths=(16,), prompt_tokens=8,
                   contexts=(32, 128), preemption_batch=2, repeats=3, quick_grid=True, max_repeats=5,
                   extra_seconds=2.0)

    def rounds(self) -> dict:
        """`runs.decode_rounds`' keyword arguments for one decode cell of this grid."""
        return dict(rounds=self.repeats, max_rounds=self.max_repeats, max_spread=self.max_spread,
                    extra_seconds=self.extra_seconds)

    def replace(self, **changes) -> "ProfileSettings":
        """A copy with `changes` (validated again)."""
        return dataclasses.replace(self, **changes)

    def check_model(self, max_positions: int) -> None:
        """ConfigError unless every prompt plus output, and every context plus the tokens decoded after a
        resume, fits the model's `max_positions`."""
        longest = self.prompt_tokens + max(self.output_lengths)
        if longest > max_positions:
            raise ConfigError(f"prompt_tokens {self.prompt_tokens} + output length "
                              f"{max(self.output_lengths)} exceeds the model's {max_positions} positions")
        if max(self.contexts) + 2 > max_positions:  # the synthetic output token and the one decoded at resume
            raise ConfigError(f"context {max(self.contexts)} (+2 decoded tokens) exceeds the model's "
                              f"{max_positions} positions; give --contexts below {max_positions - 1}")

    def to_dict(self) -> dict:
        """The document's settings section."""
        d = {f.name: (list(v) if isinstance(v, tuple) else v)
             for f in dataclasses.fields(self) for v in [getattr(self, f.name)]}
        d["quick"] = d.pop("quick_grid")
        return d


# -- the document --------------------------------------------------------------------------------------------
def writable_dir(out_dir) -> Path:
    """`out_dir`, created if needed; ConfigError naming it when it cannot be created or written into."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".tidal-write-check."):
            pass
    except OSError as exc:
        raise ConfigError(f"--out {out}: not a writable directory ({exc.strerror or exc})") from None
    return out


def default_dtype(device):
    """float32 on the CPU backend (its bfloat16 matmuls are slow and not what serving there would use),
    bfloat16 on CUDA."""
    import torch

    return torch.float32 if device.type == "cpu" else torch.bfloat16


def machine_info(device) -> dict:
    import torch

    from .. import native

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_name()
    return dict(device=str(device), device_name=name, cpu_count=os.cpu_count() or 1,
                torch_version=torch.__version__, torch_threads=torch.get_num_threads(), native=native.describe())


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass  # not Linux: platform's answer below
    return platform.processor() or platform.machine() or "unknown CPU"


def model_info(spec: str, path: Path, placement) -> dict:
    from .. import weights as W

    c, dtype = placement.model, placement.dtype
    kv = placement.kv
    return dict(spec=str(spec), path=str(path), model_type=c.model_type, num_layers=c.num_layers,
                layer_bytes=W.layer_bytes(c, dtype), top_bytes=W.top_bytes(c, dtype),
                dtype=str(dtype).removeprefix("torch."), kv_bytes_per_token=kv.block_bytes // kv.block_size,
                max_positions=c.max_position_embeddings)


def new_document(settings: ProfileSettings, machine: dict, model: dict, link: dict | None = None) -> dict:
    from .. import __version__

    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return {"schema": schema.SCHEMA_NAME, "version": schema.VERSION, "complete": False,
            "interrupted_at": None, "created": created, "tidal_version": __version__, "machine": machine,
            "model": model, "settings": settings.to_dict(), "link": link, "links": None, "decode": [],
            "preemption": [], "costmodel": {"fitted": None, "holdout": None,
                          "reason": "not fitted yet: the run has not finished"}}


# -- the run -------------------------------------------------------------------------------------------------
class Progress:
    """Where a run is (an interrupted run's `interrupted_at`) and its progress bar on stderr (only on a
    terminal, and only with `progress`)."""

    def __init__(self, total: int, progress: bool):
        from tqdm import tqdm

        self.where = "start"
        self.bar = tqdm(total=total, file=sys.stderr, unit="cell", dynamic_ncols=True, leave=False,
                        disable=not (progress and sys.stderr.isatty()))

    def at(self, where: str) -> None:
        self.where = where
        self.bar.set_description(where)  # shown while the cell runs

    def done(self, n: int = 1) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


class _Run(Progress):
    """The document being measured, saved after each section, and the run's Progress."""

    def __init__(self, doc: dict, path: Path, total: int, progress: bool):
        super().__init__(total, progress)
        self.doc, self.path = doc, path

    def save(self) -> None:
        schema.save(self.doc, self.path)


def run_profile(spec, settings: ProfileSettings | None = None, out_dir=".", device=None, dtype=None,
                progress: bool = True, link=None) -> dict:
    """Profile model `spec` (a preset name or a checkpoint directory, `tidal.presets.resolve`) on `device`
    (default: CUDA when available) in `dtype` (default: `default_dtype`) over the grid `settings` (default:
    `ProfileSettings.full()`). `link` (CPU backend only) emulates a host<->device link for every engine and
    copy measured: a `tidal.backends.LinkEmulation`, a bandwidth in GB/s, or a target (a name of
    `tidal.backends.link.TARGETS` or a LinkTarget), calibrated first on this model (`calibrate_link`). Writes
    `out_dir`/profile.json and `out_dir`/profile.png and returns the document. On Ctrl-C it stops, writes
    what was measured (complete false, interrupted_at set), says where it stopped on stderr and returns that
    document. ConfigError, before anything is measured, for an unknown model, an unwritable `out_dir`, a grid
    the model cannot hold or a bad `link`."""
    from .. import presets
    from ..backends import resolve_device
    from ..engine import Engine
    from .figures import profile_figure

    settings = settings or ProfileSettings.full()
    dev = resolve_device(device)
    link = _link_request(link, dev)
    out = writable_dir(out_dir)
    dtype = dtype or default_dtype(dev)
    path = Path(presets.resolve(spec, dtype=dtype, log=lambda msg: print(msg, file=sys.stderr), device=dev.type))
    placement = Engine.placement(path, device=dev, dtype=dtype, prefetch_depth=settings.prefetch_depth)
    model = model_info(spec, path, placement)
    settings.check_model(model["max_positions"])
    target = isinstance(link, LinkTarget)
    given = None if target or link is None else describe_link(link)
    doc = new_document(settings, machine_info(dev), model, given)
    cells = (2 + target + len(settings.fractions) * len(settings.batches) * len(settings.output_lengths) +
             len(PREEMPTION_CASES) * len(settings.contexts))
    run = _Run(doc, out / PROFILE_FILE, cells, progress)
    try:
        run.save()
        if target:
            link, method = _calibrate(link, placement, settings, run.at)
            doc["link"] = describe_link(link, method)
            run.done()
        _links(run, dev, placement, link)
        run.save()
        _decode(run, settings, placement, link)
        _preemption(run, settings, placement, link)
        run.at("costmodel")
        doc["costmodel"] = fit_costmodel(doc)
        doc["complete"] = True
        run.save()
    except KeyboardInterrupt:
        _stop(run, run.where, f"interrupted at {run.where}")
    except Exception as exc:  # keep what was measured, say where it failed, and let the error through
        _stop(run, f"{run.where} (failed: {exc})", f"failed at {run.where}")
        raise
    finally:
        run.close()
    if doc["interrupted_at"]:  # after the bar is gone, so that the line stays whole
        print(f"tidal: interrupted at {run.where}; the partial profile is in {run.path}", file=sys.stderr)
    profile_figure(doc, out / FIGURE_FILE)
    return doc


def _stop(run: _Run, where: str, why: str) -> None:
    run.doc["interrupted_at"] = where
    run.doc["costmodel"] = {"fitted": None, "holdout": None, "reason": f"not fitted: the run {why}"}
    run.save()


# -- an emulated link ----------------------------------------------------------------------------------------
LINK_SCOPE = ("tidal's copy queue: weight streaming, KV swap, preemption and resume copies, and the links "
              "section's copies; loading a checkpoint and any baseline's moves do not go through it")


def _link_request(link, device):
    """`link` checked before anything runs: None, a LinkEmulation, or a LinkTarget to calibrate."""
    if link is None:
        return None
    if device.type != "cpu":
        raise ConfigError(f"link={str(link)!r}: emulation is for the CPU backend; {device} has a real link")
    if isinstance(link, (str, LinkTarget)):
        return link_target(link)
    return coerce_link(link)


def describe_link(link, method: str | None = None) -> dict:
    """The document's `link` section of an emulated link (schema: link)."""
    d = link.describe()
    return {"emulated": True, "gbps": d["gbps"], "label": link.label, "target": d.get("target") or None,
            "ratio": d.get("ratio"), "layer_bytes": d.get("layer_bytes"),
            "layer_seconds": d.get("layer_seconds"), "method": method, "scope": LINK_SCOPE}


def link_text(link: dict) -> str:
    """A document's `link` section in a line: its bandwidth, and what it stands for if that was said."""
    return f"{link['gbps']:.4g} GB/s" + (f", {link['label']}" if link["label"] else "")


def head_bytes(placement) -> int:
    """Bytes of the LM head, which every decode step reads beside its layers."""
    c = placement.model
    return c.vocab_size * c.hidden_size * placement.dtype.itemsize


def calibrate_link(placement, target, settings: ProfileSettings | None = None):
    """A LinkEmulation on which a decoder layer of the model of `placement` (`Engine.placement`) copies in
    target's ratio times its decode time here: the all-resident decode step at batch 1, measured as
    `tidal profile` measures a cell, shared among the weights it reads by bytes
    (`link.layer_seconds_of_step`). `target`: a name of `tidal.backends.link.TARGETS` or a LinkTarget."""
    return _calibrate(link_target(target), placement, settings or ProfileSettings.quick(), lambda _: None)[0]


def _calibrate(target, placement, s: ProfileSettings, at) -> tuple:
    from ..engine import Engine

    n = min(s.output_lengths)
    at(f"link: calibrating {target.name} on the all-resident decode, batch 1, {n} tokens")
    kv_bytes = _kv_bytes(s.prompt_tokens + n, 1, placement.kv)
    with Engine.from_pretrained(placement.checkpoint.path, device=placement.device, dtype=placement.dtype,
                                resident_fraction=1.0, kv_cache_bytes=kv_bytes, host_kv_bytes=0,
                                max_batch_size=1) as engine:
        prompts = runs.same_length_prompts(1, s.prompt_tokens, placement.model.vocab_size)
        res = runs.decode_rounds({"tidal": runs.tidal_generator(engine)}, prompts, n, warmup_tokens=n,
                                 **s.rounds())["tidal"]
    if not res["step_s"] > 0:
        raise ConfigError(f"link calibration: {n} new tokens took no longer than 1; give longer "
                          f"--output-lengths")
    c, layer = placement.model, model_layer_bytes(placement)
    seconds = layer_seconds_of_step(res["step_s"], c.num_layers, layer, head_bytes(placement))
    method = (f"all-resident decode step at batch 1 ({n} new tokens after {s.prompt_tokens}-token prompts, "
              f"median of {res['rounds']} rounds after a warm-up: {res['step_s'] * 1e3:.3g} ms), shared by "
              f"bytes read: layer_seconds = step * layer_bytes / (num_layers * layer_bytes + LM head bytes); "
              f"gbps = layer_bytes / (ratio * layer_seconds); ratio = the target's device memory GB/s over "
              f"its link GB/s (tidal.backends.link)")
    return LinkEmulation.like(target, layer, seconds), method


def model_layer_bytes(placement) -> int:
    from .. import weights as W

    return W.layer_bytes(placement.model, placement.dtype)


def _links(run: _Run, device, placement, link=None) -> None:
    from ..measure import copy_bandwidth

    run.at("links: host <-> device copies")
    nbytes = COPY_BYTES
    if link is not None:  # sized to take about EMULATED_COPY_SECONDS each on the emulated link
        nbytes = max(1 << 20, min(COPY_BYTES, int(link.gbps * 1e9 * EMULATED_COPY_SECONDS)))
    bw = copy_bandwidth(device, nbytes=nbytes, reps=LINK_REPS, link=link)
    run.done()
    run.at("links: disk reads")
    gbps, disk_bytes, how = runs.disk_read(_checkpoint_files(placement), max_bytes=DISK_BYTES, reps=DISK_REPS)
    run.done()
    kind = "page-locked" if device.type == "cuda" else "plain (CPU backend)"
    copier = "tidal.measure.copy_bandwidth" if link is None else f"through the emulated link ({link})"
    run.doc["links"] = dict(
        h2d_gbps=bw["h2d_gbps"], d2h_gbps=bw["d2h_gbps"], copy_bytes=nbytes,
        copy_method=f"{copier}: one {nbytes / (1 << 20):.4g} MiB copy between a {kind} host buffer and a device "
                    f"buffer on the backend's copy queue, median of {LINK_REPS} after a warm-up",
        disk_read_gbps=gbps, disk_bytes=disk_bytes, disk_path=how,
        disk_method=f"tidal.native.read_spans of the first {disk_bytes} bytes of the checkpoint files into "
                    f"4096-congruent host memory, each read after posix_fadvise(DONTNEED) of the files, "
                    f"median of {DISK_REPS}")


def _checkpoint_files(placement) -> list[str]:
    return sorted({str(t.file) for t in placement.checkpoint.tensors.values()})


def _kv_bytes(engine_tokens: int, batch: int, placement_kv) -> int:
    """Bytes of a KV pool for `batch` sequences of up to `engine_tokens` tokens, two blocks to spare each."""
    blocks = batch * (-(-engine_tokens // placement_kv.block_size) + 2)
    return blocks * placement_kv.block_bytes


def _decode(run: _Run, s: ProfileSettings, placement, link=None) -> None:
    from ..engine import Engine

    kv_bytes = _kv_bytes(s.prompt_tokens + max(s.output_lengths), max(s.batches), placement.kv)
    vocab = placement.model.vocab_size
    for fraction in s.fractions:
        run.at(f"decode: loading the engine at resident {fraction:g}")
        with Engine.from_pretrained(placement.checkpoint.path, device=placement.device, dtype=placement.dtype,
                                    resident_fraction=fraction, prefetch_depth=s.prefetch_depth,
                                    kv_cache_bytes=kv_bytes, host_kv_bytes=0,
                                    max_batch_size=max(s.batches), link=link) as engine:
            for batch in s.batches:
                for n in s.output_lengths:
                    run.at(f"decode: resident {fraction:g}, batch {batch}, {n} tokens")
                    row = decode_row(engine, fraction, batch, s.prompt_tokens, n, s.rounds(), vocab)
                    run.doc["decode"].append(row)
                    run.done()
        run.save()


def decode_row(engine, fraction: float, batch: int, prompt_tokens: int, n: int, rounds: dict,
               vocab: int) -> dict:
    """One decode row (schema: decode_row): runs.decode_rounds (`rounds`: its round arguments,
    `ProfileSettings.rounds()`) of `batch` random prompts of `prompt_tokens` tokens, `n` new tokens each,
    after one unrecorded run of the same length (first calls pay one-time costs: kernel selection,
    allocation); the time's median, min and max over the rounds. The streamed bytes and stalls per step come
    from the engine's counters, by the same difference as the time: (counter over the n-token run - over the
    1-token run) / (n - 1)."""
    counters = {1: [], n: []}  # (bytes streamed, stall seconds) of each gen(prompts, k) call, by k

    def gen(prompts, k):
        before = engine.stats().streaming
        out = engine.generate(prompts, max_new_tokens=k)
        after = engine.stats().streaming
        counters[k].append((after.bytes_streamed - before.bytes_streamed,
                            after.stall_seconds - before.stall_seconds))
        return out

    prompts = runs.same_length_prompts(batch, prompt_tokens, vocab)
    res = runs.decode_rounds({"tidal": gen}, prompts, n, warmup_tokens=n, **rounds)["tidal"]
    timed = counters[n][-len(counters[1]):]  # the warm-up's n-token run came first
    per_step = [((bn - b1) / (n - 1), (sn - s1) / (n - 1)) for (b1, s1), (bn, sn) in zip(counters[1], timed)]
    decode_s = statistics.median(res["decode_s"])
    if not decode_s > 0:
        raise ConfigError(f"decode at resident {fraction:g}, batch {batch}: {n} new tokens took no longer than "
                          f"1 ({decode_s:.3g} s difference), too few to time here; give longer "
                          f"--output-lengths")
    return dict(system="tidal", resident_fraction=fraction, resident_layers=len(engine.plan.resident_layers),
                batch=batch, prompt_tokens=prompt_tokens, output_tokens=n, decode_seconds=decode_s,
                tokens_per_second=res["tok_s"], step_seconds=res["step_s"],
                mean_context=prompt_tokens + n / 2, **spread_fields(res, batch, n),
                bytes_streamed_per_step=round(statistics.median(b for b, _ in per_step)),
                # a difference of two noisy sums: below zero means no stall measurable at this size
                stall_seconds_per_step=max(0.0, statistics.median(st for _, st in per_step)))


def spread_fields(res: dict, batch: int, n: int) -> dict:
    """A decode row's repeats and the min and max of its time and tokens/s (`runs.decode_rounds`' result)."""
    lo, hi = res["min_decode_s"], res["max_decode_s"]
    steps = batch * (n - 1)
    return dict(repeats=res["rounds"], decode_seconds_min=lo, decode_seconds_max=hi,
                # a difference of two noisy times: the fastest round's may not be positive on a short decode
                tokens_per_second_min=steps / hi, tokens_per_second_max=steps / lo if lo > 0 else None)


def _preemption(run: _Run, s: ProfileSettings, placement, link=None) -> None:
    from ..engine import Engine

    tokens = max(max(s.contexts), 64) + 2  # room for the warm-up's 64-token sequence too
    kv_bytes = _kv_bytes(tokens, s.preemption_batch, placement.kv)
    files = _checkpoint_files(placement)
    run.at(f"preemption: loading the engine at resident {s.preemption_fraction:g}")
    with Engine.from_pretrained(placement.checkpoint.path, device=placement.device, dtype=placement.dtype,
                                resident_fraction=s.preemption_fraction, prefetch_depth=s.prefetch_depth,
                                kv_cache_bytes=kv_bytes, host_kv_bytes=kv_bytes, link=link,
                                # kv="drop": resume's first step prefills every dropped context at once
                                max_prefill_tokens=max(4096, s.preemption_batch * tokens)) as engine:
        run.at("preemption: warm-up")
        runs.warm_up(engine)
        for weights, kv_mode, pipelined in PREEMPTION_CASES:
            # weights="disk": drop the checkpoint's pages first, so that resume reads from the disk
            before = (lambda: [runs.drop_from_cache(f) for f in files]) if weights == "disk" else None
            for context in s.contexts:
                mode = "pipelined" if pipelined else "full"
                run.at(f"preemption: weights {weights}, kv {kv_mode}, {mode}, context {context}")
                got = runs.round_trips(engine, s.preemption_batch, context, s.repeats, warmup=1,
                                       pipelined=pipelined, weights=weights, kv=kv_mode, before=before)
                run.doc["preemption"].append(preemption_row(got, s.preemption_fraction, s.preemption_batch,
                                                            context, pipelined))
                run.done()
            run.save()


def preemption_row(got: list[tuple], fraction: float, batch: int, context: int, pipelined: bool) -> dict:
    """One preemption row (schema: preemption_row) from recorded (PreemptionReport, ResumeReport) pairs:
    bytes from the first pair (every pair moves the same), each time the median over the pairs."""
    pre, res = got[0]

    def med(f):
        return statistics.median(f(p, r) for p, r in got)

    row = dict(system="tidal", weights=pre.weights, kv=pre.kv, pipelined=pipelined,
               resident_fraction=fraction, batch=batch, context=context, synthetic_context=True,
               weight_bytes=pre.weight_bytes,
               weight_out_seconds=med(lambda p, r: p.weight_seconds),
               weight_in_seconds=med(lambda p, r: r.weight_seconds), disk_bytes=res.disk_bytes,
               disk_seconds=med(lambda p, r: r.disk_seconds), kv_bytes=pre.kv_bytes,
               kv_out_seconds=med(lambda p, r: p.kv_seconds), kv_in_seconds=med(lambda p, r: r.kv_seconds),
               recompute_tokens=res.recompute_tokens, recompute_seconds=med(lambda p, r: r.recompute_seconds),
               preempt_seconds=med(lambda p, r: p.total_seconds),
               resume_seconds=med(lambda p, r: r.total_seconds),
               first_token_seconds=med(lambda p, r: r.time_to_first_token),
               total_seconds=med(lambda p, r: p.total_seconds + r.total_seconds), repeats=len(got))
    row["weight_seconds"] = row["weight_out_seconds"] + row["disk_seconds"] + row["weight_in_seconds"]
    row["kv_seconds"] = row["kv_out_seconds"] + row["kv_in_seconds"]
    return row


# -- the cost model ------------------------------------------------------------------------------------------
def decode_samples(doc: dict) -> list:
    """tidal.costmodel DecodeSamples of the document's tidal decode rows (context: the row's mean context)."""
    from ..costmodel import DecodeSample

    m = doc["model"]
    return [DecodeSample(m["num_layers"], r["resident_layers"], m["layer_bytes"], r["batch"],
                         round(r["mean_context"]), r["step_seconds"])
            for r in doc["decode"] if r["system"] == "tidal"]


def transfer_samples(doc: dict) -> list:
    """tidal.costmodel TransferSamples of the document's tidal preemption rows: per row, each transfer that
    moved something. weights_disk_in is the checkpoint read plus the copy to the device (what a disk resume
    pays for its weights), over the bytes read (`disk_bytes`: the device regions and any streamed layers)."""
    from ..costmodel import TransferSample

    out = []
    for r in doc["preemption"]:
        if r["system"] != "tidal":
            continue
        if r["weights"] == "host":
            out.append(TransferSample("weights_host_out", r["weight_bytes"], r["weight_out_seconds"]))
            out.append(TransferSample("weights_host_in", r["weight_bytes"], r["weight_in_seconds"]))
        else:
            seconds = r["disk_seconds"] + r["weight_in_seconds"]
            out.append(TransferSample("weights_disk_in", r["disk_bytes"], seconds))
        if r["kv"] == "swap":
            out.append(TransferSample("kv_swap_out", r["kv_bytes"], r["kv_out_seconds"]))
            out.append(TransferSample("kv_swap_in", r["kv_bytes"], r["kv_in_seconds"]))
        elif r["recompute_tokens"]:
            out.append(TransferSample("kv_recompute", 0, r["recompute_seconds"],
                                      tokens=r["recompute_tokens"]))
    return out


def fit_costmodel(doc: dict) -> dict:
    """The document's costmodel section: tidal.costmodel fitted to the samples of the decode and preemption
    rows less a held-out part (`costmodel.holdout_split`, HOLDOUT_FRACTION, HOLDOUT_SEED), and the relative
    error of its predictions on that part. `fitted` is that model (fitted without the held-out samples, so the
    error is an honest estimate for it). A part that cannot be done is null, with the reason."""
    from .. import costmodel

    try:
        samples = decode_samples(doc) + transfer_samples(doc)
        if not samples:
            return {"fitted": None, "holdout": None, "reason": "no rows to fit"}
        fit, held = costmodel.holdout_split(samples, HOLDOUT_FRACTION, HOLDOUT_SEED)
        split = lambda group, cls: [x for x in group if isinstance(x, cls)]  # noqa: E731
        model = costmodel.CostModel.fit(split(fit, costmodel.DecodeSample),
                                        split(fit, costmodel.TransferSample))
    except ConfigError as exc:
        return {"fitted": None, "holdout": None, "reason": f"the fit failed: {exc}"}
    section = {"fitted": model.to_dict(), "holdout": None, "reason": None}
    if not held:
        section["reason"] = ("no sample could be held out without leaving part of the fit undetermined; "
                             "measure more of the grid")
        return section
    try:
        ev = model.evaluate(split(held, costmodel.DecodeSample), split(held, costmodel.TransferSample))
    except ConfigError as exc:
        section["reason"] = f"the held-out samples could not be predicted: {exc}"
        return section
    section["holdout"] = {"n": ev.n, "median_relative_error": ev.median_relative_error,
                          "max_relative_error": ev.max_relative_error, "fraction": HOLDOUT_FRACTION,
                          "seed": HOLDOUT_SEED}
    return section


def summary(doc: dict) -> str:
    """The tables the CLI prints: links, decode tokens/s per cell, preemption round trips, the cost model's
    held-out error."""
    from ..report import format_table

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


# -- command line --------------------------------------------------------------------------------------------
DTYPES = ("float32", "float16", "bfloat16")


def add_run_arguments(p, out_help: str, out_default: str) -> None:
    """The options `tidal profile`, `tidal compare` and `tidal study` share: device, dtype, output directory,
    the grid (ProfileSettings, `settings_from_args`), torch threads and the progress bar."""
    p.add_argument("--device", default=None, help="cpu or cuda[:n] (default: cuda when available)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="weights and KV dtype (default: float32 on the CPU, bfloat16 on CUDA)")
    p.add_argument("--out", metavar="DIR", default=out_default, help=f"{out_help} (default: {out_default})")
    p.add_argument("--quick", action="store_true", help="a small grid: seconds on a small model")
    p.add_argument("--fractions", nargs="+", metavar="F", help="resident fractions in [0, 1]")
    p.add_argument("--batches", nargs="+", metavar="B", help="decode batch sizes")
    p.add_argument("--output-lengths", nargs="+", metavar="N", help="new tokens per timed decode (>= 2)")
    p.add_argument("--contexts", nargs="+", metavar="T", help="tokens per sequence at preemption")
    p.add_argument("--repeats", metavar="N", help="timed repetitions per cell (decode: at least)")
    p.add_argument("--max-repeats", metavar="N", help="decode: repetitions at most, while the spread is above "
                   "--max-spread (default 10, --quick 5)")
    p.add_argument("--max-spread", metavar="F", help="decode: repeat while (max - min) / median of a cell's "
                   "times is above F (default 0.1)")
    p.add_argument("--link", metavar="GBPS|TARGET", help="CPU backend: emulate a host<->device link of GBPS "
                   "(e.g. 2.5), or one that makes a layer's copy as slow against its decode as on TARGET: "
                   f"{', '.join(TARGETS)}")
    p.add_argument("--threads", metavar="N", help="torch CPU threads (default: torch's own); on a machine "
                   "shared with other work, 1 gives steadier numbers (a busy core stalls OpenMP's others)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_options(args):
    """(ProfileSettings, dtype or None) of the shared options; sets torch's CPU threads when --threads is
    given (the document records the threads used)."""
    import torch

    if args.threads is not None:
        threads = _numbers("--threads", [args.threads], int)[0]
        if threads < 1:
            raise ConfigError(f"--threads={threads}: need at least 1")
        torch.set_num_threads(threads)
    return settings_from_args(args), (getattr(torch, args.dtype) if args.dtype else None)


def add_parser(subparsers) -> None:
    """Add `tidal profile` to the `tidal` command's subparsers."""
    p = subparsers.add_parser("profile", help="measure decode, links and preemption on this machine; write "
                              "profile.json and a figure",
                              description="Measure, on this machine, decode tokens/s against the resident "
                              "fraction, link bandwidths and preemption cost for MODEL; write "
                              "DIR/profile.json and DIR/profile.png and print a summary. Ctrl-C stops and "
                              "keeps what was measured.")
    p.add_argument("model", metavar="MODEL", help="a preset name or a Hugging Face checkpoint directory")
    add_run_arguments(p, "where profile.json and profile.png go", ".")
    p.set_defaults(func=command)


def _numbers(option: str, values, kind):
    """Values of a list option, space- or comma-separated; ConfigError naming the option for a bad one."""
    out = []
    for v in (x for value in values for x in value.split(",") if x):
        try:
            out.append(kind(v))
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise ConfigError(f"{option}: {v!r} is not {what}") from None
    return tuple(out)


def settings_from_args(args) -> ProfileSettings:
    """ProfileSettings of `tidal profile`'s arguments: full() or quick(), the options given replacing it."""
    settings = ProfileSettings.quick() if args.quick else ProfileSettings.full()
    changes = {}
    for option, field, kind in (("--fractions", "fractions", float), ("--batches", "batches", int),
                                ("--output-lengths", "output_lengths", int), ("--contexts", "contexts", int)):
        values = getattr(args, field)
        if values is not None:
            changes[field] = _numbers(option, values, kind)
    if args.repeats is not None:
        changes["repeats"] = _numbers("--repeats", [args.repeats], int)[0]
    if args.max_repeats is not None:
        changes["max_repeats"] = _numbers("--max-repeats", [args.max_repeats], int)[0]
    elif changes.get("repeats", 0) > settings.max_repeats:  # --repeats alone raises the cap with it
        changes["max_repeats"] = changes["repeats"]
    if args.max_spread is not None:
        changes["max_spread"] = _numbers("--max-spread", [args.max_spread], float)[0]
    try:
        return settings.replace(**changes)
    except ConfigError as exc:  # name the option, not the field
        msg = str(exc)
        field = msg.split(":")[0].split("=")[0]
        if field in changes:
            msg = "--" + field.replace("_", "-") + msg[len(field):]
        raise ConfigError(msg) from None


def link_option(args):
    """--link as `run_profile` takes it: None, a bandwidth in GB/s or a LinkTarget (ConfigError naming
    --link otherwise)."""
    return None if args.link is None else parse_link(args.link, "--link")


def command(args) -> int:
    """Run `tidal profile`; 0 when complete, 130 when interrupted."""
    settings, dtype = run_options(args)
    doc = run_profile(args.model, settings, args.out, device=args.device, dtype=dtype,
                      progress=not args.no_progress, link=link_option(args))
    out = Path(args.out)
    print(summary(doc))
    print(f"profile: {out / PROFILE_FILE}\nfigure: {out / FIGURE_FILE}")
    if not doc["complete"]:
        print(f"incomplete: interrupted at {doc['interrupted_at']}")
        return 130
    return 0
