"""gpu_check section "study": `tidal study` (tidal.study.report.run_study) on the Llama-3.2-1B and Llama-3-8B
presets, bf16, on the GPU, against accelerate offloading the same layers and the transformers user's
preemption protocol; the report and every document go under OUT/study/.

The grid is cut to the section's time share: fractions 1, 0.5 and 0, batches 1 and 8, 32 new tokens, contexts
of 1024 and 4096 tokens, 2 repeats. The 8B model is studied only when at least 240 s remain after the 1B one;
otherwise the report covers the 1B model and the table says the 8B was skipped. At the deadline the run is
interrupted (SIGALRM raises KeyboardInterrupt, which `tidal study` turns into a partial, marked report).

    python bench/gpu_check.py --out out/ --sections study --budget-s 480
"""
from __future__ import annotations

import signal
import time
from pathlib import Path

MODELS = ("llama-3.2-1b", "llama-3-8b")
EIGHT_B_NEEDS_S = 240


def _settings(quick: bool):
    from tidal.study.profile import ProfileSettings

    if quick:  # the CPU smoke run of tests/test_gpu_check.py
        return ProfileSettings.quick().replace(fractions=(1.0, 0.0), batches=(1,), contexts=(32,), repeats=1)
    return ProfileSettings.quick().replace(batches=(1, 8), output_lengths=(32,), prompt_tokens=16,
                                           contexts=(1024, 4096), preemption_batch=2, repeats=2)


def run(ctx) -> dict:
    import torch

    from tidal.study import report

    models = ("tiny",) if ctx.quick else MODELS
    out = Path(ctx.out_dir) / "study"
    dtype = torch.float32 if ctx.device == "cpu" else torch.bfloat16
    notes, done = [], []

    def stop(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, stop)
    try:
        signal.alarm(max(1, int(ctx.seconds_left())))
        specs = list(models[:1])
        path, complete = report.run_study(specs, _settings(ctx.quick), out, "accelerate", device=ctx.device,
                                          dtype=dtype, progress=False, command="bench/gpu_study.py")
        done += specs
        if complete and len(models) > 1:
            if ctx.seconds_left() >= EIGHT_B_NEEDS_S:
                path, complete = report.run_study(list(models), _settings(ctx.quick), out, "accelerate",
                                                  device=ctx.device, dtype=dtype, progress=False,
                                                  command="bench/gpu_study.py")
                done = list(models)
            else:
                notes.append(f"{models[1]} skipped: {ctx.seconds_left():.0f} s left, it needs {EIGHT_B_NEEDS_S}")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    text = path.read_text()
    table = "\n".join([f"study of {', '.join(done)}: {'complete' if complete else 'INCOMPLETE'}; report {path}"]
                      + notes + ["", text])
    return {"report": str(path), "complete": complete, "models": done, "notes": notes, "table": table,
            "date": time.strftime("%Y-%m-%d")}
