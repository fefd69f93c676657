"""Host-to-host copy paths: tidal._C.copy_spans against torch's Tensor.copy_, one large span and many small.

    .venv/bin/python -m pytest bench/bench_host_copy.py --benchmark-only

This is the measurement behind the CPU backend copying with `Tensor.copy_` (docs/STREAMING.md).
"""
import pytest
import torch

from tidal import native

CASES = {"1 x 45 MiB": (45 << 20, 1), "2000 x 16 KiB": (16 << 10, 2000)}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("path", ["torch-copy_", "native-copy_spans"])
def bench_host_copy(benchmark, case, path):
    if path.startswith("native") and not native.available():
        pytest.skip("tidal._C not built")
    size, count = CASES[case]
    src = [torch.randint(0, 255, (size,), dtype=torch.uint8) for _ in range(count)]
    dst = [torch.empty(size, dtype=torch.uint8) for _ in range(count)]

    def torch_copy():
        for d, s in zip(dst, src):
            d.copy_(s)

    fn = torch_copy if path == "torch-copy_" else (lambda: native.copy_spans(dst, src))
    benchmark.group = f"host copy {case}"
    benchmark.pedantic(fn, rounds=20, warmup_rounds=2)
    benchmark.extra_info["GB/s"] = size * count / benchmark.stats.stats.median / 1e9
    assert all(torch.equal(d, s) for d, s in zip(dst[:3], src[:3]))
