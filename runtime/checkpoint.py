"""Reading Hugging Face checkpoints: `config.json` plus `model.safetensors` or shards listed in
`model.safetensors.index.json`. Tensors are read straight from the file into their destination (a host arena
region, a staging buffer), never through an intermediate copy of the whole file, by tidal._C's threaded
loader (O_DIRECT where the file system allows) or its Python fallback; `read_many` says which.

Every file is validated when the checkpoint is opened (header, dtypes, shapes against byte ranges, ranges
against the file's size), so a truncated or corrupted file fails before anything is loaded.
"""
from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path

import torch

from . import native
from .errors import CheckpointError, ShapeError
from .native import LoadInfo

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
_MAX_HEADER = 100 << 20


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


class Checkpoint:
    """An opened, validated checkpoint directory."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a checkpoint directory")
        self.config = self._read_json(self.path / "config.json")
        self.tensors: dict[str, TensorInfo] = {}
        for file in self._files():
            for info in _read_header(file):
                if info.name in self.tensors:
                    raise CheckpointError(f"{file}: tensor {info.name} also in {self.tensors[info.name].file}")
                self.tensors[info.name] = info

    def _files(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            weight_map = self._read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index}: no weight_map")
            files = sorted({self.path / f for f in weight_map.values()})
            for f in files:
                if not f.exists():
                    missing = sorted(n for n, fn in weight_map.items() if self.path / fn == f)[:3]
                    raise CheckpointError(f"{f}: shard missing (holds {', '.join(missing)}, ...)")
            return files
        single = self.path / "model.safetensors"
        if not single.exists():
            raise CheckpointError(f"{self.path}: neither model.safetensors nor model.safetensors.index.json")
        return [single]

    @staticmethod
    def _read_json(file: Path) -> dict:
        try:
            return json.loads(file.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{file}: missing") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{file}: not valid JSON ({exc})") from None

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: tensor {name} not in the checkpoint") from None

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Read tensor `name` into the contiguous host tensor `out` (same number of bytes; its dtype and shape
        are the caller's view of them). Returns `out`."""
        self.read_many([(name, out)])
        return out

    def read_many(self, items: list[tuple[str, torch.Tensor]], *, threads: int | None = None,
                  direct: bool | None = None) -> LoadInfo:
        """Read each tensor `name` into its contiguous host tensor `out` (checked as in `read_into`; outputs
        must not overlap), all in one batched call of the native loader over every file involved (see
        `native.read_spans` for `threads` and `direct`). Returns a LoadInfo: bytes, seconds, `gbps` and the
        path taken. Raises CheckpointError naming the tensor or file; after a read error some outputs may be
        partly written. An output whose address is congruent to the tensor's file offset modulo 4096
        (`info(name).offset`) is filled by O_DIRECT in place, with no bounce copy."""
        spans = []
        for name, out in items:
            info = self.info(name)
            if (not isinstance(out, torch.Tensor) or out.device.type != "cpu" or not out.is_contiguous()
                    or out.numel() * out.element_size() != info.nbytes):
                what = (f"{tuple(out.shape)} {out.dtype} on {out.device}" if isinstance(out, torch.Tensor)
                        else type(out).__name__)
                raise CheckpointError(f"{info.file}: tensor {name} has {info.nbytes} bytes; "
                                      f"destination is {what}")
            spans.append((info.file, info.offset, out))
        try:
            return native.read_spans(spans, threads=threads, direct=direct)
        except ShapeError as exc:  # overlapping outputs
            raise CheckpointError(f"{self.path}: {exc}") from None

    def load(self, name: str, dtype: torch.dtype | None = None, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Tensor `name` as a new host tensor, checked against `shape` and converted to `dtype` if given."""
        info = self.info(name)
        if shape is not None and tuple(shape) != info.shape:
            raise CheckpointError(f"{info.file}: tensor {name} has shape {info.shape}, expected {tuple(shape)}")
        t = self.read_into(name, torch.empty(info.shape, dtype=info.dtype))
        return t if dtype is None or dtype == info.dtype else t.to(dtype)


def _read_header(file: Path) -> list[TensorInfo]:
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise CheckpointError(f"{file}: truncated before its header ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _MAX_HEADER):
            raise CheckpointError(f"{file}: corrupted header length {n} (file has {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{file}: corrupted header ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: corrupted header (not an object)")
    data_start, infos = 8 + n, []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[meta["dtype"]]
            shape = tuple(int(d) for d in meta["shape"])
            begin, end = (int(x) for x in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file}: tensor {name}: unsupported or malformed entry {meta!r}") from None
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * dtype.itemsize or begin < 0:
            raise CheckpointError(f"{file}: tensor {name}: {end - begin} bytes for shape {shape} {dtype}")
        if data_start + end > size:
            raise CheckpointError(f"{file}: truncated: tensor {name} needs bytes up to {data_start + end}, "
                                  f"file has {size}")
        infos.append(TensorInfo(name, file, dtype, shape, data_start + begin, end - begin))
    return infos
