"""The bridge to `tidal._C`, with a pure-Python fallback when the extension was not built.

Which path is taken is public: `native.path()` names it, the first use logs it, and reports carry it
(`read_spans` returns a `LoadInfo` whose `path` names how the bytes were read).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import stat
import time

import torch

from .errors import CheckpointError, ConfigError, ShapeError

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


@dataclasses.dataclass(frozen=True)
class LoadInfo:
    """What one batched file read did. `path` is e.g. "native (O_DIRECT, 8 threads)",
    "native (buffered: O_DIRECT refused by the file system: ...)" or "python (tidal._C absent)"."""

    bytes: int
    seconds: float
    path: str
    files: int
    spans: int
    direct_bytes: int = 0    # O_DIRECT straight into the destination
    bounce_bytes: int = 0    # O_DIRECT into a bounce buffer, then copied (destination misaligned to the file)
    buffered_bytes: int = 0  # through the page cache: unaligned heads and tails, small spans, fallbacks

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


BLOCK = 4096  # O_DIRECT alignment of file offsets, lengths and addresses
_announced_loads: set[str] = set()


def load_threads() -> int:
    """Reader threads: $TIDAL_LOAD_THREADS, else min(8, CPUs)."""
    value = os.environ.get("TIDAL_LOAD_THREADS", str(min(8, os.cpu_count() or 1)))
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"TIDAL_LOAD_THREADS={value!r}: need a positive integer")
    return int(value)


def read_spans(spans: list[tuple[str | os.PathLike, int, torch.Tensor]], *, threads: int | None = None,
               direct: bool | None = None, chunk_bytes: int = 8 << 20) -> LoadInfo:
    """Read `dst.nbytes` bytes at byte `offset` of `file` into `dst`, for every `(file, offset, dst)`.

    `dst` is a contiguous host tensor of any dtype and shape (its bytes are filled); destinations must not
    overlap. The native path reads all spans in one call, GIL released, on `threads` threads (default
    `load_threads()`), large spans cut into `chunk_bytes` pieces, with O_DIRECT unless `direct` is False
    or $TIDAL_LOAD_DIRECT=0 (falls back to buffered reads, and says so, where the file system refuses it).
    A destination whose address is congruent to its file offset modulo 4096 is read into with no copy.
    Raises CheckpointError naming the file on a missing, unreadable or truncated file; destinations may
    then be partly written.
    """
    threads = load_threads() if threads is None else threads
    direct = os.environ.get("TIDAL_LOAD_DIRECT", "1") != "0" if direct is None else direct
    if not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"read_spans: threads must be a positive int, got {threads!r}")
    if not isinstance(chunk_bytes, int) or chunk_bytes < BLOCK or chunk_bytes % BLOCK:
        raise ConfigError(f"read_spans: chunk_bytes must be a positive multiple of {BLOCK}, "
                          f"got {chunk_bytes!r}")
    files, index, work = [], {}, []
    for i, (file, offset, dst) in enumerate(spans):
        _check_destination(i, dst)
        if not isinstance(offset, int) or offset < 0:
            raise ConfigError(f"read_spans: span {i} has file offset {offset!r}; need an int >= 0")
        key = os.fspath(file)
        if key not in index:
            index[key] = len(files)
            files.append(key)
        work.append((index[key], offset, dst))
    _check_disjoint([dst for _, _, dst in work])
    start = time.perf_counter()
    if _C is None:
        nbytes = _read_python(files, work)
        info = LoadInfo(nbytes, time.perf_counter() - start, "python (tidal._C absent)", len(files),
                        len(work), buffered_bytes=nbytes)
    else:
        try:
            r = _C.read_spans(files, [(f, off, d.data_ptr(), _nbytes(d)) for f, off, d in work], threads,
                              chunk_bytes, direct)
        except _C.ReadError as exc:
            raise CheckpointError(str(exc)) from None
        info = LoadInfo(r["bytes"], time.perf_counter() - start, _native_name(direct, r), len(files),
                        len(work), r["direct_bytes"], r["bounce_bytes"], r["buffered_bytes"])
    _announce_load(info.path)
    return info


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _check_destination(i: int, dst) -> None:
    if not isinstance(dst, torch.Tensor):
        raise ShapeError(f"read_spans: span {i} destination is a {type(dst).__name__}, not a tensor")
    if dst.device.type != "cpu" or not dst.is_contiguous():
        raise ShapeError(f"read_spans: span {i} destination must be a contiguous host tensor "
                         f"({tuple(dst.shape)} {dst.dtype} on {dst.device})")


def _check_disjoint(dsts: list[torch.Tensor]) -> None:
    ranges = sorted((d.data_ptr(), d.data_ptr() + _nbytes(d)) for d in dsts if _nbytes(d))
    for (_, end), (begin, _) in zip(ranges, ranges[1:]):
        if begin < end:
            raise ShapeError("read_spans: two destinations overlap")


def _native_name(direct: bool, report: dict) -> str:
    threads = f"{report['threads']} thread{'s' if report['threads'] > 1 else ''}"
    if not direct:
        return f"native (buffered: O_DIRECT off, {threads})"
    if report["refused"]:
        return f"native (buffered: O_DIRECT refused by the file system: {report['refused'][0]}, {threads})"
    return f"native (O_DIRECT, {threads})"


def _announce_load(name: str) -> None:
    mode = name.split(",")[0]  # once per mode, whatever the thread count
    if mode not in _announced_loads:
        _announced_loads.add(mode)
        (log.info if mode == "native (O_DIRECT" else log.warning)("tidal file reads: %s", name)


def _read_python(files: list[str], work: list[tuple[int, int, torch.Tensor]]) -> int:
    """The fallback: one buffered `os.preadv` loop per span, in the calling thread."""
    fds: dict[int, int] = {}
    try:
        for f, offset, dst in work:
            if f not in fds:
                fds[f] = _open_regular(files[f])
            size, n = os.fstat(fds[f]).st_size, _nbytes(dst)
            if offset + n > size:
                raise CheckpointError(f"{files[f]}: truncated: {n} bytes at offset {offset} end past the "
                                      f"file's {size} bytes")
            _pread_exact(fds[f], files[f], offset, memoryview(_as_bytes(dst.detach()).numpy()))
    finally:
        for fd in fds.values():
            os.close(fd)
    return sum(_nbytes(dst) for _, _, dst in work)


def _open_regular(file: str) -> int:
    try:  # O_NONBLOCK: a FIFO must not wait for a writer
        fd = os.open(file, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise CheckpointError(f"{file}: cannot open: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(f"{file}: not a regular file")
    return fd


def _pread_exact(fd: int, file: str, offset: int, view: memoryview) -> None:
    done = 0
    while done < len(view):
        try:
            got = os.preadv(fd, [view[done:]], offset + done)
        except OSError as exc:
            raise CheckpointError(f"{file}: read at offset {offset + done} failed: {exc.strerror}") from None
        if got == 0:
            raise CheckpointError(f"{file}: unexpected end of file at offset {offset + done}")
        done += got
