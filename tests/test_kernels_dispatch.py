import os

import torch


def test_other_tests_keep_the_reference_path_on_the_cpu():
    """The kernel tests switch the interpreter on for their own modules only."""
    import tidal.kernels as K

    if os.environ.get("TIDAL_TEST_DEVICE", "cpu") == "cpu" and not os.environ.get("TRITON_INTERPRET"):
        assert K.path_for(torch.empty(1)) == "reference"
