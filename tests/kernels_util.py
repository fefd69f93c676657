"""Shared set-up for the kernel tests. Without a GPU the Triton kernels run on CPU tensors through Triton's
interpreter, switched on only for the kernel tests' modules (other tests keep the reference path)."""
import pytest
import torch

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.fixture(scope="module", autouse=True)
def triton_interpreter():
    # Set before the first kernel call, which is when tidal.kernels imports (and Triton defines) the kernels.
    with pytest.MonkeyPatch.context() as mp:
        if not torch.cuda.is_available():
            mp.setenv("TRITON_INTERPRET", "1")
        yield


def kernel_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()
