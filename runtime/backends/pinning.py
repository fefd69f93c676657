"""Page-locked host memory for the CUDA backend, registered whole pages at a time and unregistered when the
memory itself dies.

Registering a plain `torch.empty` allocation fails for small buffers: they share pages with other
allocations, and registering a page twice is an error (and, through the runtime API, leaves a "last error"
that surfaces at an unrelated later kernel launch). Here every buffer is its own anonymous mapping, so its
pages are its alone, and it is registered through the driver API (`cuMemHostRegister`), whose failures do
not touch the runtime's error state. The registration lives exactly as long as the mapping: the tensor
holds the mapping, and a finalizer on the mapping unregisters (after the copy queue has drained) when the
last view of the buffer is gone, whether or not anyone called `release`.

When registering fails the buffer stays usable, as pageable memory (copies from it are staged by the
driver: correct, slower); that is logged once per failure and counted in `PinnedHostAllocator.report()`.
"""
from __future__ import annotations

import ctypes
import logging
import mmap
import threading
import weakref
from typing import Callable, Protocol

import torch

log = logging.getLogger("tidal")

PAGE = mmap.PAGESIZE
CU_MEMHOSTREGISTER_PORTABLE = 0x01  # pinned for every CUDA context, not only the current one


class Registrar(Protocol):
    def register(self, ptr: int, nbytes: int) -> str | None:
        """Page-lock [ptr, ptr + nbytes); None on success, else the error's text."""

    def unregister(self, ptr: int) -> str | None: ...


class DriverRegistrar:
    """cuMemHostRegister/cuMemHostUnregister from libcuda (the driver every CUDA process has loaded)."""

    def __init__(self, lib: str = "libcuda.so.1"):
        self._cuda = ctypes.CDLL(lib)
        self._cuda.cuMemHostRegister_v2.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
        self._cuda.cuMemHostUnregister.argtypes = [ctypes.c_void_p]
        self._cuda.cuGetErrorString.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]

    def _error(self, status: int) -> str | None:
        if status == 0:
            return None
        text = ctypes.c_char_p()
        self._cuda.cuGetErrorString(status, ctypes.byref(text))
        return f"CUresult {status} ({(text.value or b'?').decode()})"

    def register(self, ptr: int, nbytes: int) -> str | None:
        return self._error(self._cuda.cuMemHostRegister_v2(ptr, nbytes, CU_MEMHOSTREGISTER_PORTABLE))

    def unregister(self, ptr: int) -> str | None:
        return self._error(self._cuda.cuMemHostUnregister(ptr))


class PinnedHostAllocator:
    """Whole-page host buffers, page-locked through `registrar`. `drain` is called before a registration is
    dropped, so that no queued copy still reads the pages (the copy stream's synchronize)."""

    def __init__(self, registrar: Registrar | None, drain: Callable[[], None] = lambda: None):
        self.registrar, self._drain = registrar, drain
        self._lock = threading.Lock()
        self._live: dict[int, tuple[int, weakref.finalize]] = {}  # registered base address -> (bytes, finalizer)
        self.pinned_bytes = 0  # registered now
        self.pageable_bytes = 0  # handed out unregistered (failures), still alive or not
        self.failures: list[str] = []

    def allocate(self, nbytes: int) -> torch.Tensor:
        """`nbytes` uint8 (the mapping is rounded up to whole pages; the tensor is exactly `nbytes`)."""
        size = max(PAGE, -(-nbytes // PAGE) * PAGE)
        mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        buf = torch.frombuffer(mapping, dtype=torch.uint8)  # holds the mapping: unmapped when the storage dies
        ptr = buf.data_ptr()
        error = "no CUDA driver library" if self.registrar is None else self.registrar.register(ptr, size)
        if error is not None:
            with self._lock:
                self.pageable_bytes += size
                self.failures.append(error)
            log.warning("tidal: page-locking %d host bytes failed (%s); that buffer is pageable: copies from it "
                        "are slower and synchronous", size, error)
            return buf[:nbytes]
        with self._lock:
            self.pinned_bytes += size
            self._live[ptr] = (size, weakref.finalize(mapping, self._unregister, ptr, "its memory was freed"))
        del mapping
        return buf[:nbytes]

    def is_pinned(self, buf: torch.Tensor) -> bool:
        ptr = buf.data_ptr()
        with self._lock:
            return any(base <= ptr < base + size for base, (size, _) in self._live.items())

    def release(self, buf: torch.Tensor) -> None:
        """Unregister now (the memory itself is freed once the last view of it is dropped)."""
        ptr = buf.untyped_storage().data_ptr()
        with self._lock:
            entry = self._live.get(ptr)
        if entry is not None and entry[1].detach() is not None:
            self._unregister(ptr, "released")

    def _unregister(self, ptr: int, why: str) -> None:
        with self._lock:
            entry = self._live.pop(ptr, None)
            if entry is None:
                return
            self.pinned_bytes -= entry[0]
        try:
            self._drain()
            error = self.registrar.unregister(ptr)
        except Exception as exc:  # at interpreter exit the driver may be gone already
            error = repr(exc)
        if error is not None:
            log.warning("tidal: unregistering pinned host memory at %#x (%s) failed: %s", ptr, why, error)

    @property
    def live(self) -> int:
        """Registrations alive now."""
        with self._lock:
            return len(self._live)

    def report(self) -> str:
        """"pinned", or "pageable (N bytes: why)" when some buffer could not be page-locked."""
        with self._lock:
            if not self.failures:
                return "pinned"
            return f"pageable ({self.pageable_bytes} bytes in {len(self.failures)} buffers: {self.failures[-1]})"
