"""`tidal compare MODEL --baseline accelerate|transformers`: tidal's profile sweep (`profile.run_profile`)
and a baseline's measurements of the same grid, in one run. Writes compare.json (the profile schema, with
rows of both systems), compare.png (`figures.compare_figure`) and prints a side-by-side table; the tidal
sweep also leaves its own profile.json and profile.png.

Decode (`baseline_decode`): for each resident fraction, transformers loads the checkpoint (`from_pretrained`)
in the same dtype, and

- "accelerate": accelerate offloads exactly the decoder layers tidal's engine streams at that fraction (the
  engine's own plan, `Engine.placement(...).plan`), set up as accelerate users set it up (`tidal.baselines`);
- "transformers": plain transformers cannot offload layers, so its decode is measured with every layer
  resident, at fraction 1.0 only (whatever fractions the grid holds).

Each cell is timed as tidal's is (`runs.decode_rounds` over `runs.hf_generator`): the same prompts, batches,
output lengths and repeats, greedy. The baselines report no streamed bytes or stalls: those fields are null.

Preemption (`baseline_preemption`, system "transformers", with either baseline): the transformers user's
protocol on a fully resident model, with a real KV cache (a DynamicCache filled by a prefill of `context`
tokens for each of `preemption_batch` sequences). Preempt: `model.to("cpu")` (weights "host") or `del
model` (weights "disk"), then every KV tensor `.to("cpu")`, one by one. Resume: `model.to(device)`
("host"), or, after the checkpoint's pages are dropped from the page cache, `from_pretrained` again and
`.to(device)` ("disk"); then the KV tensors back one by one, then one decode step (first_token_seconds
counts from the start of the resume). That step's tokens must equal those of the same step without
preemption (TransferError otherwise). Each case: one unrecorded round trip, then `repeats` recorded ones;
rows hold medians, like tidal's.

On the CPU backend the "device" is host memory, so `.to("cpu")` and `.to(device)` return the tensors
themselves and move nothing; there each move is emulated by a copy into fresh tensors (`clone`: the
allocation and memcpy that a device move costs). `notes()` says so, with everything else that differs on
the device; the CLI prints the notes and the figure shows them. An emulated link (`--link`) paces tidal's
copies only: the baselines make their own moves, outside it, and their notes say that too.
"""
from __future__ import annotations

import contextlib
import gc
import inspect
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

from ..errors import ConfigError, TransferError
from . import runs, schema
from .profile import Progress

BASELINES = ("accelerate", "transformers")
COMPARE_FILE = "compare.json"
FIGURE_FILE = "compare.png"
PROTOCOL_TIERS = ("host", "disk")  # where the transformers protocol's weights go; its KV is always moved
PROTOCOL_SYSTEM = "transformers"


def check_baseline(baseline) -> str:
    """`baseline`, or ConfigError naming the baselines."""
    if baseline not in BASELINES:
        raise ConfigError(f"baseline {baseline!r} is not one of {', '.join(BASELINES)}")
    return baseline


def notes(baseline: str, device, link: dict | None = None) -> list[str]:
    """What the baseline's rows measure differently from tidal's on `device` (with tidal's copies through the
    emulated `link`, a document's `link` section, if any), one sentence each."""
    return decode_notes(baseline, device, link) + preemption_notes(device, link)


def link_note(link: dict | None) -> list[str]:
    """The note of every baseline row measured beside tidal's emulated `link` (none without one)."""
    if link is None:
        return []
    from .profile import link_text

    return [f"emulated link ({link_text(link)}): it paces tidal's copies only; the "
            f"baselines' moves do not go through it, so their rows are not slowed by it and compare with "
            f"tidal's only on what does not cross the link"]


def decode_notes(baseline: str, device, link: dict | None = None) -> list[str]:
    """`notes` of the baseline's decode rows (each row carries them, joined, in its `note`)."""
    import torch

    out = []
    if check_baseline(baseline) == "transformers":
        out.append("transformers decode: plain transformers cannot offload layers, so it is measured with "
                   "every layer resident, at resident fraction 1.0 only")
    elif torch.device(device).type == "cpu":
        out.append("accelerate on the CPU backend: its offload hooks run for every offloaded layer at every "
                   "forward but move no bytes (.to('cpu') of a CPU tensor is the tensor itself), so only its "
                   "host overhead compares here; compare transfer cost on a GPU")
    out.append(f"{baseline} decode rows: bytes_streamed_per_step and stall_seconds_per_step are null "
               f"({baseline} does not report them)")
    return out + link_note(link)


def preemption_notes(device, link: dict | None = None) -> list[str]:
    """`notes` of the transformers protocol's preemption rows (each row carries them in its `note`)."""
    import torch

    out = ["transformers preemption: a fully resident model with a real context (prefilled), its KV "
           "moved tensor by tensor; the first token after resume is checked against the uninterrupted run"]
    if torch.device(device).type == "cpu":
        out.append("transformers preemption on the CPU backend: model.to and the KV tensors' .to between "
                   "host and device would move nothing (both are host memory); every such move is emulated "
                   "by a copy into fresh tensors (clone), the memcpy a device move costs")
    out.append("transformers disk resume: disk_seconds is from_pretrained's; reads it defers (a "
               "memory-mapped checkpoint) land in the move to the device and the first token")
    return out + link_note(link)


def _require_hf() -> None:
    try:
        import accelerate  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"tidal compare needs transformers and accelerate (pip install 'tidal[hf]'): "
                          f"{exc}") from None


@contextlib.contextmanager
def _quiet_loads():
    """transformers' per-load progress bar off for the duration (a run loads the model many times)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _resolve(device, dtype):
    from ..backends import resolve_device
    from .profile import default_dtype

    dev = resolve_device(device)
    return dev, dtype or default_dtype(dev)


# -- decode --------------------------------------------------------------------------------------------------
def streamed_layers(path, fraction: float, device, dtype, prefetch_depth: int = 2) -> tuple[int, ...]:
    """The decoder layers tidal's engine streams at resident `fraction`: its own plan (`Engine.placement`)."""
    from ..engine import Engine

    return Engine.placement(path, device=device, dtype=dtype, resident_fraction=fraction,
                            prefetch_depth=prefetch_depth).plan.streamed_layers


def load_baseline(path, baseline: str, fraction: float, device, dtype, prefetch_depth: int = 2):
    """transformers' model of checkpoint `path` in `dtype`, as `baseline` serves it at resident `fraction`:
    accelerate offloading the layers tidal streams at that fraction, or plain transformers on `device`
    (fraction 1.0 only). Returns (model, number of decoder layers on the device)."""
    from transformers import AutoModelForCausalLM

    from ..baselines import accelerate_offload
    from ..offload import find_decoder_layers

    if check_baseline(baseline) == "transformers" and fraction != 1.0:
        raise ConfigError(f"plain transformers keeps every layer resident; resident fraction {fraction:g} "
                          f"needs --baseline accelerate")
    device, dtype = _resolve(device, dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    layers = len(find_decoder_layers(model))
    if baseline == "transformers":
        return model.to(device), layers
    streamed = streamed_layers(path, fraction, device, dtype, prefetch_depth)
    return accelerate_offload(model, streamed, device), layers - len(streamed)


def decode_row(gen, system: str, fraction: float, resident_layers: int, batch: int, prompt_tokens: int,
               n: int, rounds: dict, vocab: int) -> dict:
    """One baseline decode row (schema: decode_row), timed as tidal's `profile.decode_row` times its own:
    `runs.decode_rounds` with the same round arguments (`rounds`) on the same prompts."""
    from .profile import spread_fields

    prompts = runs.same_length_prompts(batch, prompt_tokens, vocab)
    res = runs.decode_rounds({system: gen}, prompts, n, warmup_tokens=n, **rounds)[system]  # as tidal's rows
    return dict(system=system, resident_fraction=fraction, resident_layers=resident_layers, batch=batch,
                prompt_tokens=prompt_tokens, output_tokens=n,
                decode_seconds=statistics.median(res["decode_s"]), tokens_per_second=res["tok_s"],
                step_seconds=res["step_s"], mean_context=prompt_tokens + n / 2, **spread_fields(res, batch, n),
                bytes_streamed_per_step=None, stall_seconds_per_step=None)


def _decode_fractions(settings, baseline: str) -> tuple[float, ...]:
    return (1.0,) if baseline == "transformers" else settings.fractions


def _decode_rows(path, settings, baseline: str, device, dtype, at: Callable[[str], None]) -> Iterator[dict]:
    for fraction in _decode_fractions(settings, baseline):
        at(f"{baseline} decode: loading at resident {fraction:g}")
        model, resident = load_baseline(path, baseline, fraction, device, dtype, settings.prefetch_depth)
        gen = runs.hf_generator(model, device)
        try:
            for batch in settings.batches:
                for n in settings.output_lengths:
                    at(f"{baseline} decode: resident {fraction:g}, batch {batch}, {n} tokens")
                    yield decode_row(gen, baseline, fraction, resident, batch, settings.prompt_tokens, n,
                                     settings.rounds(), model.config.vocab_size)
        finally:
            model = gen = None  # the generator holds the model too; both go before the next one loads
            _free(device)


def baseline_decode(path, settings, baseline: str, device=None, dtype=None,
                    progress: bool = True) -> list[dict]:
    """Decode rows (schema: decode_row, system `baseline`) of checkpoint `path` over the grid `settings`
    (profile.ProfileSettings): accelerate offloading the layers tidal streams at each resident fraction, or
    plain transformers at fraction 1.0 only."""
    _require_hf()
    device, dtype = _resolve(device, dtype)
    cells = Progress(len(_decode_fractions(settings, check_baseline(baseline))) * len(settings.batches) *
                   len(settings.output_lengths), progress)
    rows = []
    try:
        with _quiet_loads():
            for row in _decode_rows(path, settings, baseline, device, dtype, cells.at):
                rows.append(row)
                cells.done()
    finally:
        cells.close()
    return rows


# -- the transformers user's preemption protocol -------------------------------------------------------------
def weight_bytes(model) -> int:
    """Bytes of `model`'s parameters, tied ones once: the weights `model.to` moves. (It moves the buffers too,
    rotary tables of a few hundred bytes that are not weights; their time is in the weights' time.)"""
    return sum(p.nbytes for p in model.parameters())


class Protocol:
    """A transformers model and its KV cache, preempted and resumed the way transformers users do it (see the
    module's docstring). `emulated`: on the CPU backend, where the moves are copies into fresh tensors."""

    def __init__(self, path, device, dtype):
        from transformers import AutoModelForCausalLM

        from ..checkpoint import Checkpoint

        self.path, self.device, self.dtype = Path(path), device, dtype
        tensors = Checkpoint(path).tensors.values()
        # what from_pretrained reads back: the stored tensors (as tidal's disk_bytes counts them)
        self.files = sorted({t.file for t in tensors})
        self.disk_bytes = sum(t.nbytes for t in tensors)
        self.emulated = device.type == "cpu"
        self._load = lambda: AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype).eval()
        self.model = self._load().to(device)
        params = inspect.signature(self.model.forward).parameters
        # transformers 5 names the cache argument `cache`; older versions `past_key_values`
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._last_logits = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.cache = self.next_ids = self.expected = None
        self.context = 0

    # moves
    def _move(self, t, dst):
        return t.clone() if self.emulated else t.to(dst)

    def move_model(self, dst) -> int:
        """`model.to(dst)` (emulated: every parameter and buffer copied); returns the weight bytes moved."""
        import torch

        nbytes = weight_bytes(self.model)
        if not self.emulated:
            self.model.to(dst)
            return nbytes
        with torch.no_grad():
            for p in self.model.parameters():
                p.data = p.data.clone()
            for module in self.model.modules():
                for name, b in list(module.named_buffers(recurse=False)):
                    setattr(module, name, b.clone())
        return nbytes

    def move_kv(self, dst) -> int:
        """Every KV tensor of the cache to `dst`, one by one; returns the bytes moved."""
        nbytes = 0
        for layer in self.cache.layers:
            layer.keys = self._move(layer.keys, dst)
            layer.values = self._move(layer.values, dst)
            nbytes += layer.keys.nbytes + layer.values.nbytes
        return nbytes

    # decoding
    def _forward(self, ids):
        import torch

        with torch.no_grad():
            out = self.model(input_ids=ids, use_cache=True, **{self._cache_arg: self.cache},
                             **self._last_logits)
        return out.logits[:, -1].argmax(-1, keepdim=True)

    def start(self, prompts: list[list[int]]) -> None:
        """Prefill `prompts` (all of one length) into a fresh cache, then decode one step for the tokens a
        resumed run must give, and rewind the cache to the prompts."""
        import torch
        from transformers import DynamicCache

        self.cache = None
        _free(self.device)
        self.cache = DynamicCache(config=self.model.config)
        if not hasattr(self.cache, "layers"):
            raise ConfigError("tidal compare's preemption protocol needs transformers >= 5 "
                              "(DynamicCache.layers)")
        self.context = len(prompts[0])
        self.next_ids = self._forward(torch.tensor(prompts, device=self.device))
        self.expected = self._forward(self.next_ids).tolist()
        self.rewind()

    def rewind(self) -> None:
        """Drop the tokens decoded after the prompts. Contiguous again, as a cache grown by decoding is (a
        sliced tensor would make the next moves strided copies)."""
        extra = self.cache.get_seq_length() - self.context
        if extra:
            self.cache.crop(-extra)
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys.contiguous(), layer.values.contiguous()

    def round_trip(self, weights: str) -> dict:
        """One preempt + resume with weights `weights` ("host" or "disk") and the KV moved, then the first
        decode step, checked against the uninterrupted one; rewinds the cache. Returns the row's fields."""
        import torch

        host, dev = torch.device("cpu"), self.device
        t0 = time.perf_counter()
        if weights == "host":
            released = self.move_model(host)
        else:
            released = weight_bytes(self.model)
            self.model = None  # a user's `del model`: nothing is kept, resume reads the checkpoint again
            if dev.type == "cuda":  # and, to give the memory back to the device, gc and empty_cache
                _free(dev)
        _sync(dev)
        t1 = time.perf_counter()
        kv_bytes = self.move_kv(host)
        _sync(dev)
        t2 = time.perf_counter()
        if weights == "disk":
            for f in self.files:
                runs.drop_from_cache(f)  # so that from_pretrained reads from the disk
        r0 = r_disk = time.perf_counter()
        if weights == "disk":
            self.model = self._load()
            r_disk = time.perf_counter()
        self.move_model(dev)
        _sync(dev)
        r1 = time.perf_counter()
        self.move_kv(dev)
        _sync(dev)
        r2 = time.perf_counter()
        got = self._forward(self.next_ids).tolist()  # .tolist() waits for the device
        r3 = time.perf_counter()
        self.rewind()
        if got != self.expected:
            raise TransferError(f"transformers protocol, weights={weights}, context {self.context}: the "
                                f"tokens after resume {got} differ from the uninterrupted run's "
                                f"{self.expected}")
        return dict(weight_bytes=released, kv_bytes=kv_bytes,
                    disk_bytes=self.disk_bytes if weights == "disk" else 0,
                    weight_out_seconds=t1 - t0 if weights == "host" else 0.0, kv_out_seconds=t2 - t1,
                    disk_seconds=r_disk - r0, weight_in_seconds=r1 - r_disk, kv_in_seconds=r2 - r1,
                    preempt_seconds=t2 - t0, resume_seconds=r3 - r0, first_token_seconds=r3 - r0,
                    total_seconds=(t2 - t0) + (r3 - r0), same_tokens=True)

    def close(self) -> None:
        self.model = self.cache = None
        _free(self.device)


def protocol_row(trips: list[dict], weights: str, batch: int, context: int) -> dict:
    """One preemption row (schema: preemption_row, system "transformers") from recorded round trips (dicts of
    `Protocol.round_trip`): bytes from the first (every trip moves the same), each time the median, and the
    weight and KV seconds the sums of their parts' medians, as tidal's rows are built."""
    def med(key):
        return statistics.median(t[key] for t in trips)

    row = dict(system=PROTOCOL_SYSTEM, weights=weights, kv="swap", pipelined=False, resident_fraction=1.0,
               batch=batch, context=context, synthetic_context=False, weight_bytes=trips[0]["weight_bytes"],
               kv_bytes=trips[0]["kv_bytes"], disk_bytes=trips[0]["disk_bytes"], recompute_tokens=0,
               recompute_seconds=0.0, repeats=len(trips))
    for key in ("weight_out_seconds", "disk_seconds", "weight_in_seconds", "kv_out_seconds", "kv_in_seconds",
                "preempt_seconds", "resume_seconds", "first_token_seconds", "total_seconds"):
        row[key] = med(key)
    row["weight_seconds"] = row["weight_out_seconds"] + row["disk_seconds"] + row["weight_in_seconds"]
    row["kv_seconds"] = row["kv_out_seconds"] + row["kv_in_seconds"]
    return row


def _preemption_rows(path, settings, device, dtype, at: Callable[[str], None]) -> Iterator[dict]:
    at("transformers preemption: loading")
    proto = Protocol(path, device, dtype)
    try:
        settings.check_model(proto.model.config.max_position_embeddings)
        vocab, batch = proto.model.config.vocab_size, settings.preemption_batch
        for context in settings.contexts:
            at(f"transformers preemption: prefill of {batch} x {context} tokens")
            proto.start(runs.same_length_prompts(batch, context, vocab))
            for weights in PROTOCOL_TIERS:
                at(f"transformers preemption: weights {weights}, kv swap, context {context}")
                trips = [proto.round_trip(weights) for _ in range(1 + settings.repeats)][1:]  # first: warm-up
                yield protocol_row(trips, weights, batch, context)
    finally:
        proto.close()


def baseline_preemption(path, settings, device=None, dtype=None, progress: bool = True) -> list[dict]:
    """Preemption rows (schema: preemption_row, system "transformers") of the transformers user's protocol on
    checkpoint `path`: for each context of `settings` and each weight tier ("host", "disk"), with
    `settings.preemption_batch` sequences. TransferError if a resumed run's tokens differ from the
    uninterrupted run's."""
    _require_hf()
    device, dtype = _resolve(device, dtype)
    cells = Progress(len(settings.contexts) * len(PROTOCOL_TIERS), progress)
    rows = []
    try:
        with _quiet_loads():
            for row in _preemption_rows(path, settings, device, dtype, cells.at):
                rows.append(row)
                cells.done()
    finally:
        cells.close()
    return rows


# -- the run -------------------------------------------------------------------------------------------------
def run_compare(spec, settings=None, baseline: str = "accelerate", out_dir=".", device=None, dtype=None,
                progress: bool = True, link=None) -> dict:
    """Profile model `spec` with tidal (`profile.run_profile`: same arguments and defaults, `link` included:
    it paces tidal's copies, never the baseline's, and the notes say so) and measure
    `baseline` ("accelerate" or "transformers") over the same grid in the same run; write
    `out_dir`/compare.json (the profile schema, rows of both systems) and `out_dir`/compare.png, and return
    the document. On Ctrl-C it stops, writes what was measured (complete false, interrupted_at set), says
    where on stderr and returns that document. ConfigError, before anything is measured, for an unknown
    baseline or model, an unwritable `out_dir`, a grid the model cannot hold, or transformers or accelerate
    missing."""
    from .figures import compare_figure
    from .profile import ProfileSettings, run_profile, writable_dir

    check_baseline(baseline)
    _require_hf()
    settings = settings or ProfileSettings.full()
    out = writable_dir(out_dir)
    device, dtype = _resolve(device, dtype)
    doc = run_profile(spec, settings, out, device=device, dtype=dtype, progress=progress, link=link)
    path, figure = out / COMPARE_FILE, out / FIGURE_FILE
    if doc["interrupted_at"] is not None:  # tidal's sweep stopped (and said so): no baseline rows
        schema.save(doc, path)
        compare_figure(doc, figure, notes(baseline, device, doc["link"]))
        print(f"tidal: the partial comparison (tidal's rows only) is in {path}", file=sys.stderr)
        return doc
    doc["complete"] = False
    checkpoint = doc["model"]["path"]
    cells = Progress(len(_decode_fractions(settings, baseline)) * len(settings.batches) *
                   len(settings.output_lengths) + len(settings.contexts) * len(PROTOCOL_TIERS), progress)
    try:
        schema.save(doc, path)
        with _quiet_loads():
            sections = (("decode", _decode_rows(checkpoint, settings, baseline, device, dtype, cells.at)),
                        ("preemption", _preemption_rows(checkpoint, settings, device, dtype, cells.at)))
            for section, rows in sections:
                note = "; ".join(decode_notes(baseline, device, doc["link"]) if section == "decode"
                                 else preemption_notes(device, doc["link"]))
                for row in rows:
                    doc[section].append({**row, "note": note})
                    cells.done()
                    schema.save(doc, path)
        doc["complete"] = True
        schema.save(doc, path)
    except KeyboardInterrupt:
        doc["interrupted_at"] = cells.where
        schema.save(doc, path)
        print(f"tidal: interrupted at {cells.where}; the partial comparison is in {path}", file=sys.stderr)
    except Exception as exc:  # keep what was measured, say where it failed, and let the error through
        doc["interrupted_at"] = f"{cells.where} (failed: {exc})"
        schema.save(doc, path)
        raise
    finally:
        cells.close()
    compare_figure(doc, figure, notes(baseline, device, doc["link"]))
    return doc


def baseline_of(doc: dict) -> str | None:
    """The baseline whose decode rows a compare document holds (None before any was measured)."""
    return next((r["system"] for r in doc["decode"] if r["system"] != "tidal"), None)


def side_by_side(doc: dict) -> str:
    """The CLI's comparison tables: decode tokens/s per cell and preemption round trips per tier and context,
    tidal's beside the baseline's, with tidal's speedup (baseline seconds over tidal's)."""
    from ..report import format_table

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


# -- command line --------------------------------------------------------------------------------------------
def add_parser(subparsers) -> None:
    """Add `tidal compare` to the `tidal` command's subparsers."""
    from .profile import add_run_arguments

    p = subparsers.add_parser("compare", help="tidal's profile and a baseline's, same grid, same run; write "
                              "compare.json and a figure",
                              description="Measure MODEL as `tidal profile` does and, in the same run, a "
                              "baseline over the same grid: accelerate offloading the layers tidal streams "
                              "(or plain transformers, all resident), and the transformers user's preemption "
                              "protocol. Write DIR/compare.json and DIR/compare.png (and the tidal sweep's "
                              "profile.json and profile.png) and print the two side by side. Ctrl-C stops "
                              "and keeps what was measured.")
    p.add_argument("model", metavar="MODEL", help="a preset name or a Hugging Face checkpoint directory")
    p.add_argument("--baseline", required=True, choices=BASELINES,
                   help="accelerate (offloading the layers tidal streams) or transformers (all resident)")
    add_run_arguments(p, "where the documents and figures go", ".")
    p.set_defaults(func=command)


def command(args) -> int:
    """Run `tidal compare`; 0 when complete, 130 when interrupted."""
    from .profile import link_option, run_options, summary

    settings, dtype = run_options(args)
    doc = run_compare(args.model, settings, args.baseline, args.out, device=args.device, dtype=dtype,
                      progress=not args.no_progress, link=link_option(args))
    out = Path(args.out)
    print(summary(doc))
    print()
    print(side_by_side(doc))
    said = notes(args.baseline, doc["machine"]["device"], doc["link"])
    print("\nnotes:\n" + "\n".join(f"- {n}" for n in said))
    print(f"comparison: {out / COMPARE_FILE}\nfigure: {out / FIGURE_FILE}")
    if not doc["complete"]:
        print(f"incomplete: interrupted at {doc['interrupted_at']}")
        return 130
    return 0
