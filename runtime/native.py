"""The bridge to `tidal._C`, with a pure-torch fallback when the extension was not built.

Which path is taken is public: `native.path()` names it, the first use logs it, and reports carry it.
"""
from __future__ import annotations

import logging
import os

import torch

from .errors import ShapeError

log = logging.getLogger("tidal")

try:
    from . import _C
    _IMPORT_ERROR = None
except ImportError as exc:  # built without pybind11 headers, or a source checkout that was never built
    _C = None
    _IMPORT_ERROR = str(exc)

_announced = False


def available() -> bool:
    """True when the native extension `tidal._C` was built and imported."""
    return _C is not None


def path() -> str:
    """A short name of the host-copy path in use: "native" or "python-fallback"."""
    return "native" if _C is not None else "python-fallback"


def describe() -> str:
    if _C is not None:
        return f"native (tidal._C from {_C.__file__})"
    return f"python-fallback (tidal._C not importable: {_IMPORT_ERROR})"


def _announce() -> None:
    global _announced
    if not _announced:
        _announced = True
        (log.info if _C is not None else log.warning)("tidal host copies: %s", describe())


def _max_threads() -> int:
    return max(1, int(os.environ.get("TIDAL_COPY_THREADS", min(8, os.cpu_count() or 1))))


def copy_spans(dst: list[torch.Tensor], src: list[torch.Tensor]) -> int:
    """Copy each src tensor's bytes into the matching dst tensor (host memory only); returns bytes copied.

    Both lists hold contiguous CPU tensors of equal byte size pairwise. One call, GIL released, split over
    threads by the native path; a loop of `Tensor.copy_` in the fallback.
    """
    if len(dst) != len(src):
        raise ShapeError(f"copy_spans: {len(dst)} destinations but {len(src)} sources")
    sizes = []
    for i, (d, s) in enumerate(zip(dst, src)):
        if d.device.type != "cpu" or s.device.type != "cpu":
            raise ShapeError(f"copy_spans: pair {i} is on {d.device}/{s.device}; host tensors only")
        if not (d.is_contiguous() and s.is_contiguous()):
            raise ShapeError(f"copy_spans: pair {i} is not contiguous")
        nbytes = d.numel() * d.element_size()
        if nbytes != s.numel() * s.element_size():
            raise ShapeError(f"copy_spans: pair {i} has {nbytes} destination bytes, "
                             f"{s.numel() * s.element_size()} source bytes")
        sizes.append(nbytes)
    _announce()
    if _C is not None:
        return _C.copy_spans([d.data_ptr() for d in dst], [s.data_ptr() for s in src], sizes, _max_threads())
    for d, s in zip(dst, src):
        _as_bytes(d).copy_(_as_bytes(s))
    return sum(sizes)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)
