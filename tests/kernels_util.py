"""Shared set-up for the kernel tests (tests/conftest.py switches Triton's interpreter on without a GPU)."""
import os

import pytest
import torch

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def fresh_seed():
    """Fresh random inputs on every run: runs after conftest's fixed seed and replaces it. A failure's
    captured output shows the seed; TIDAL_KERNEL_SEED=<seed> replays it."""
    seed = int(os.environ.get("TIDAL_KERNEL_SEED") or int.from_bytes(os.urandom(4), "little"))
    torch.manual_seed(seed)
    print(f"TIDAL_KERNEL_SEED={seed}")
    return seed


def kernel_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()
