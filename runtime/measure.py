"""Measurements of the machine tidal runs on, shared by the benchmarks, gpu_check and the CLI."""
from __future__ import annotations

import statistics

from .backends import Backend, make_backend


def copy_bandwidth(device=None, nbytes: int = 1 << 30, reps: int = 5, link=None) -> dict[str, float]:
    """Host-to-device and device-to-host GB/s for one copy of `nbytes` between the backend's host buffer
    (page-locked on CUDA) and a device buffer, on its copy queue; median of `reps` after a warm-up. `link`:
    through an emulated link (CPU backend, see `tidal.backends.LinkEmulation`)."""
    be: Backend = make_backend(device, link=link)
    host, dev = be.host_buffer(nbytes), be.empty(nbytes)
    try:
        host.fill_(1)
        res = {}
        for name, dst, src in (("h2d_gbps", dev, host), ("d2h_gbps", host, dev)):
            be.copy([dst], [src], after=[be.record()]).wait()  # the device buffer is fresh: see Backend.empty
            times = [be.copy([dst], [src]).seconds() for _ in range(reps)]
            res[name] = nbytes / statistics.median(times) / 1e9
        return res
    finally:
        be.release_host_buffer(host)
        be.close()
