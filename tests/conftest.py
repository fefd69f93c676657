import os

import torch  # does not import triton

# Without a GPU the kernel tests run the Triton kernels through Triton's interpreter. Triton reads
# TRITON_INTERPRET when it defines a kernel (its own library included, which transformers' imports of
# torch._inductor pull in early), so it is set here, before any test module imports anything.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def _test_device() -> str:
    # bench/gpu_check.py runs the whole suite with TIDAL_TEST_DEVICE=cuda; by default it is the CPU backend.
    return os.environ.get("TIDAL_TEST_DEVICE", "cpu")


def pytest_report_header(config):
    return f"tidal test device (TIDAL_TEST_DEVICE): {_test_device()}"


@pytest.fixture
def device() -> str:
    """The device tests run on: TIDAL_TEST_DEVICE, default "cpu". Tests of what only the CPU backend has
    (its copy thread, huge pages, a scripted or link-emulating backend, the unstaged KV path) name "cpu"."""
    dev = _test_device()
    if dev.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("TIDAL_TEST_DEVICE asks for CUDA, which is not available")
    return dev


@pytest.fixture(params=["plain", "ordering-checked"])
def ordering(request, monkeypatch):
    """Runs a test twice: as is, and with the stream-ordering check on (TIDAL_CHECK_ORDERING=1: every backend
    the test makes checks each copy and compute use, and delays copies at random). Modules opt in with
    `pytestmark = pytest.mark.usefixtures("ordering")`."""
    if request.param == "ordering-checked":
        monkeypatch.setenv("TIDAL_CHECK_ORDERING", "1")
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
