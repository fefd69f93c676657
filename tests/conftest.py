import os

import torch  # does not import triton

# Without a GPU the kernel tests run the Triton kernels through Triton's interpreter. Triton reads
# TRITON_INTERPRET when it defines a kernel (its own library included, which transformers' imports of
# torch._inductor pull in early), so it is set here, before any test module imports anything.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def _test_device() -> str:
    # gpu_check.py runs the streaming tests with TIDAL_TEST_DEVICE=cuda; the suite defaults to the CPU backend.
    return os.environ.get("TIDAL_TEST_DEVICE", "cpu")


@pytest.fixture
def device() -> str:
    dev = _test_device()
    if dev.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("TIDAL_TEST_DEVICE asks for CUDA, which is not available")
    return dev


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
