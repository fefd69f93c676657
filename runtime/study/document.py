"""A new profile document (schema: profile.schema.json): the machine, the model and the grid it measures."""
from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

from . import schema
from .settings import ProfileSettings


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
