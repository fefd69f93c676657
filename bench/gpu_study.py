"""gpu_check section "study": `tidal study` (tidal.study.report.run_study) on the shared Llama-3.2-1B-shaped
bf16 checkpoint, on the GPU, against accelerate offloading the same layers and the transformers user's
preemption protocol; the report and every document go under WORK/study/ (gpu_check copies REPORT.md into
--out as STUDY-REPORT.md).

The grid is gpu_plan.STUDY: small enough for the section's share. No timer runs in this process: at the end of
the share gpu_check sends SIGINT, which `tidal study` turns into a partial report marked incomplete; a SIGINT
that lands outside the study's own handler is caught by gpu_check's section runner, which keeps what was
saved with `ctx.progress`.
"""
from __future__ import annotations

import importlib.util
import time

import gpu_plan


def run(ctx) -> dict:
    g = gpu_plan.grid(gpu_plan.STUDY, ctx.quick)
    missing = [m for m in ("jsonschema", "matplotlib", "transformers", "accelerate")
               if importlib.util.find_spec(m) is None]
    if missing:  # the study validates and plots its documents
        return {"skipped": f"not run: {', '.join(missing)} not installed", "complete": False,
                "table": f"study not run: {', '.join(missing)} not installed (carry them as wheels)"}
    import torch

    from tidal.study import report
    from tidal.study.settings import ProfileSettings

    spec, name = ctx.checkpoint(g["model"].preset), g["model"].label
    if spec is None:
        return {"skipped": "no checkpoint", "complete": False, "table": "study not run: no checkpoint"}
    settings = ProfileSettings.quick().replace(
        **{k: g[k] for k in ("fractions", "batches", "output_lengths", "prompt_tokens", "contexts",
                             "preemption_batch", "repeats")})
    out = ctx.work_dir / "study"
    ctx.progress({"models": [name], "report": str(out / report.REPORT_FILE), "complete": False})
    dtype = torch.float32 if ctx.device == "cpu" else torch.bfloat16
    path, complete = report.run_study([str(spec)], settings, out, "accelerate", device=ctx.device,
                                      dtype=dtype, progress=False,
                                      command="bench/gpu_check.py (section study)")
    text = path.read_text()
    head = f"study of {name} ({spec}): {'complete' if complete else 'INCOMPLETE'}; report {path}"
    table = "\n".join([head, "", text])
    return {"report": str(path), "complete": complete, "models": [name], "table": table,
            "date": time.strftime("%Y-%m-%d")}
