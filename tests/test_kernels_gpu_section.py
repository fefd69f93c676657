import os

from gpu_check_util import section


def test_gpu_check_kernels_section_runs_on_the_cpu():
    """gpu_check's kernels section in the CPU smoke run, on CPU tensors (through the Triton interpreter when
    the suite runs without a GPU: the subprocess inherits TRITON_INTERPRET), so the GPU script cannot rot
    unseen."""
    res, stdout = section("kernels")
    assert res["path"] == ("triton-interpreter" if os.environ.get("TRITON_INTERPRET") == "1" else "reference")
    assert res["correctness"] and all(ok for *_, ok in res["correctness"]), res["correctness"]
    assert res["rows"][0]["rel_err"] < 2e-2 and res["rows"][0]["tidal_gbps"] > 0 and res["copy_gbps"] > 0
    assert "kernel check" in stdout  # the table was printed
