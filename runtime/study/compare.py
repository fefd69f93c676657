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

The baselines live beside it: baseline_decode.py, protocol.py (with hf.py, their transformers plumbing) and
notes.py; the side-by-side table is summary.py's, the command line commands.py's."""
from __future__ import annotations

import sys

from . import baseline_decode, profile, protocol, schema
from .baseline_decode import check_baseline
from .common import writable_dir
from .figures import compare_figure
from .hf import quiet_loads, require_hf, resolve
from .notes import decode_notes, notes, preemption_notes
from .progress import Progress
from .settings import ProfileSettings

COMPARE_FILE = "compare.json"
FIGURE_FILE = "compare.png"


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
    check_baseline(baseline)
    require_hf()
    settings = settings or ProfileSettings.full()
    out = writable_dir(out_dir)
    device, dtype = resolve(device, dtype)
    doc = profile.run_profile(spec, settings, out, device=device, dtype=dtype, progress=progress, link=link)
    path, figure = out / COMPARE_FILE, out / FIGURE_FILE
    if doc["interrupted_at"] is not None:  # tidal's sweep stopped (and said so): no baseline rows
        schema.save(doc, path)
        compare_figure(doc, figure, notes(baseline, device, doc["link"]))
        print(f"tidal: the partial comparison (tidal's rows only) is in {path}", file=sys.stderr)
        return doc
    doc["complete"] = False
    checkpoint = doc["model"]["path"]
    decode_cells = len(baseline_decode.decode_fractions(settings, baseline)) * len(settings.batches) * \
        len(settings.output_lengths)
    cells = Progress(decode_cells + len(settings.contexts) * len(protocol.PROTOCOL_TIERS), progress)
    try:
        schema.save(doc, path)
        with quiet_loads():
            decode = baseline_decode.decode_rows(checkpoint, settings, baseline, device, dtype, cells.at)
            preemption = protocol.preemption_rows(checkpoint, settings, device, dtype, cells.at)
            sections = (("decode", decode), ("preemption", preemption))
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
