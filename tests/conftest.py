import os

import pytest
import torch


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
