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
   with kv="recompute" the resume really recomputes it (a prefill), so recompute_seconds is measured, not
   synthetic. Pipelined resume is measured for kv="swap" only: with "recompute" the first step is the
   recompute, which the report should show whole rather than overlapped with the weight copies.
4. costmodel: `tidal.costmodel` fitted to the rows less a held-out part, and its error on that part.

Ctrl-C (KeyboardInterrupt) stops the run where it is: the engines are closed, the document is written with
`complete` false and `interrupted_at` naming the cell, and `run_profile` returns it.

The pieces live beside it: the grid (settings.py), the new document (document.py), an emulated link
(emulation.py), the rows (rows.py), the cost model's fit (costfit.py), the printed summary (summary.py); the
command line is commands.py."""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

from ..backends.link import LinkTarget
from ..errors import ConfigError
from . import runs, schema
from .common import default_dtype, kv_pool_bytes, writable_dir
from .costfit import fit_costmodel
from .document import machine_info, model_info, new_document
from .emulation import calibrate, describe_link, link_request
from .figures import profile_figure
from .progress import Progress
from .rows import preemption_row, spread_fields
from .settings import ProfileSettings

PROFILE_FILE = "profile.json"
FIGURE_FILE = "profile.png"

# (weights, kv, pipelined) of the preemption round trips
PREEMPTION_CASES = (("host", "swap", False), ("host", "swap", True), ("host", "recompute", False),
                    ("disk", "swap", False), ("disk", "swap", True), ("disk", "recompute", False))
COPY_BYTES = 64 << 20  # link bandwidth copies: large enough to amortise the launch, small enough to be quick
DISK_BYTES = 1 << 30  # at most this much of the checkpoint is read for the disk bandwidth
LINK_REPS = 5
DISK_REPS = 3
# an emulated link's bandwidth copies: about this long each, so that a slow link does not stall the run
EMULATED_COPY_SECONDS = 0.05


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

    settings = settings or ProfileSettings.full()
    dev = resolve_device(device)
    link = link_request(link, dev)
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
            link, method = calibrate(link, placement, settings, run.at)
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


def _decode(run: _Run, s: ProfileSettings, placement, link=None) -> None:
    from ..engine import Engine

    kv_bytes = kv_pool_bytes(s.prompt_tokens + max(s.output_lengths), max(s.batches), placement.kv)
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


def _preemption(run: _Run, s: ProfileSettings, placement, link=None) -> None:
    from ..engine import Engine

    tokens = max(max(s.contexts), 64) + 2  # room for the warm-up's 64-token sequence too
    kv_bytes = kv_pool_bytes(tokens, s.preemption_batch, placement.kv)
    files = _checkpoint_files(placement)
    run.at(f"preemption: loading the engine at resident {s.preemption_fraction:g}")
    with Engine.from_pretrained(placement.checkpoint.path, device=placement.device, dtype=placement.dtype,
                                resident_fraction=s.preemption_fraction, prefetch_depth=s.prefetch_depth,
                                kv_cache_bytes=kv_bytes, host_kv_bytes=kv_bytes, link=link,
                                # kv="recompute": resume's first step prefills every dropped context at once
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
