"""gpu_check section "checkpoints": the random-weight bf16 checkpoints the other sections share, written once
into the cache dir, and the rates the plan's estimates need, measured.

Llama-3.2-1B- and Llama-3-8B-shaped (--quick: micro), with room for 32k positions, written tensor by tensor
from tensors drawn on the checked device (`tidal.presets.build`: safetensors straight from memory, no
transformers model), then synced, so that the O_DIRECT reads of the sections after this one do not pay for
the write-back. A checkpoint already in the cache is reused. Measured: the disk's write rate (this build), its
cold O_DIRECT read rate (`tidal.study.runs.disk_read`, up to 1 GiB) and the pinned copy bandwidth; gpu_check
re-plans the remaining sections with them.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import gpu_plan


def _record(ctx, preset: str, path) -> None:
    manifest = ctx.cache_dir / gpu_plan.MANIFEST
    try:
        entries = json.loads(manifest.read_text())
    except (OSError, ValueError):
        entries = {}
    entries[preset] = str(path)
    tmp = manifest.with_name(manifest.name + ".tmp")
    tmp.write_text(json.dumps(entries, indent=1))
    os.replace(tmp, manifest)


def run(ctx) -> dict:
    import torch

    from tidal import presets
    from tidal.measure import copy_bandwidth
    from tidal.tables import format_table
    from tidal.study.runs import disk_read

    rows, written, write_s = [], 0, 0.0
    result = {"checkpoints": rows, "rates": {}}
    for m in gpu_plan.grid(gpu_plan.CHECKPOINTS, ctx.quick):
        before = ctx.checkpoint(m.preset)
        est = 0.5 if before else gpu_plan.checkpoint_s(m, ctx.rates)
        if not ctx.fits(est):
            rows.append(dict(model=m.label, skipped=f"needs ~{est:.0f} s, {ctx.seconds_left():.0f} s left"))
            continue
        base = presets.get(m.preset)
        positions = max(m.positions, base.max_position_embeddings)
        preset = dataclasses.replace(base, max_position_embeddings=positions)
        t0 = time.monotonic()
        try:
            path = presets.build(preset, torch.bfloat16, cache_dir=ctx.cache_dir, device=ctx.device,
                                 log=ctx.log)
        except Exception as exc:  # no room on the disk, say: the sections that need it say "no checkpoint"
            rows.append(dict(model=m.label, skipped=f"{type(exc).__name__}: {exc}"))
            ctx.log(f"{m.label}: not built: {exc}")
            continue
        built = before is None or before.resolve() != path.resolve()
        if built:
            os.sync()  # the write-back belongs to the write: an O_DIRECT read of dirty pages waits for it
        seconds = time.monotonic() - t0
        nbytes = presets.checkpoint_bytes(path)
        if built:
            written, write_s = written + nbytes, write_s + seconds
        _record(ctx, m.preset, path)
        rows.append(dict(model=m.label, path=str(path), bytes=nbytes, seconds=seconds, built=built,
                         gbps=nbytes / seconds / 1e9 if built else None))
        ctx.log(f"{m.label}: {'written' if built else 'cached'} in {seconds:.1f} s ({nbytes / 1e9:.2f} GB) "
                f"at {path}")
        ctx.progress(result)
    if written:
        # drawing is counted in: the rate is what writing another checkpoint of this kind would take
        result["rates"]["disk_write_gbps"] = written / write_s / 1e9
    done = [r for r in rows if "path" in r]
    if done:
        largest = max(done, key=lambda r: r["bytes"])
        files = sorted(Path(largest["path"]).glob("*.safetensors"))
        gbps, nbytes, how = disk_read(files, max_bytes=gpu_plan.GIB, reps=2)
        result["rates"]["disk_read_gbps"] = gbps
        result["disk_read"] = dict(gbps=gbps, bytes=nbytes, path=how)
        ctx.progress(result)
    bw = copy_bandwidth(ctx.device, nbytes=(64 << 20) if ctx.quick else gpu_plan.GIB)
    result["bandwidth"] = bw
    result["rates"]["pinned_h2d_gbps"] = bw["h2d_gbps"]
    table = format_table(["model", "GB", "seconds", "GB/s", "how"],
                         [[r["model"], r.get("bytes", 0) / 1e9, r.get("seconds", ""), r.get("gbps") or "",
                           "written" if r.get("built") else r.get("skipped", "cached")] for r in rows])
    disk = result.get("disk_read")
    table += (f"\ncold read (tidal loader, {disk['path']}): {disk['gbps']:.2f} GB/s over "
              f"{disk['bytes'] / 1e9:.2f} GB"
              if disk else "\ncold read: not measured (no checkpoint)")
    table += f"\npinned copy: {bw['h2d_gbps']:.1f} GB/s H2D, {bw['d2h_gbps']:.1f} GB/s D2H"
    result["table"] = table
    return result
