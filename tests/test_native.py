import os

import pytest
import torch

import tidal
from tidal import native
from tidal.errors import ShapeError


def test_installed_package_loaded_the_extension():
    # make test builds with TIDAL_REQUIRE_NATIVE=1, so the extension must be there; gpu_check may opt out.
    if os.environ.get("TIDAL_ALLOW_NO_NATIVE") == "1" and not native.available():
        pytest.skip("TIDAL_ALLOW_NO_NATIVE=1 and tidal._C absent")
    assert native.available(), native.describe()
    assert native.path() == "native"
    assert native._C.__file__.startswith(os.path.dirname(tidal.__file__))


@pytest.mark.parametrize("sizes", [[1], [7, 0, 13], [5 << 20, 3 << 20 + 5, 17]])
def test_copy_spans_is_byte_exact(sizes):
    g = torch.Generator().manual_seed(sum(sizes))
    src = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g) for n in sizes]
    dst = [torch.zeros(n, dtype=torch.uint8) for n in sizes]
    assert native.copy_spans(dst, src) == sum(sizes)
    for d, s in zip(dst, src):
        assert torch.equal(d, s)


def test_copy_spans_typed_views():
    src = torch.randn(3, 5, dtype=torch.float32)
    dst = torch.empty(15, dtype=torch.float32)
    native.copy_spans([dst], [src])
    assert torch.equal(dst.view(3, 5), src)


def test_copy_spans_rejects_mismatch():
    with pytest.raises(ShapeError, match="pair 0"):
        native.copy_spans([torch.empty(4, dtype=torch.uint8)], [torch.empty(5, dtype=torch.uint8)])
    with pytest.raises(ShapeError, match="not contiguous"):
        native.copy_spans([torch.empty(4, 4).t()], [torch.empty(4, 4)])
