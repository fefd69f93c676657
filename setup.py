"""Builds the optional host-side extension `tidal._C`; all metadata lives in pyproject.toml.

pybind11's headers come from the pybind11 package, or from the copy torch ships, so a bare CUDA image with
torch can build it offline. Without either, tidal installs without the extension and says so at import.
"""
import os
import sys

from setuptools import Extension, setup


def _pybind11_include():
    try:
        import pybind11

        return pybind11.get_include()
    except ImportError:
        pass
    try:
        from torch.utils.cpp_extension import include_paths

        for path in include_paths():
            if os.path.isdir(os.path.join(path, "pybind11")):
                return path
    except Exception:  # torch absent or its layout changed: fall through to building without _C
        pass
    return None


include = _pybind11_include()
ext_modules = []
if include is not None:
    ext_modules.append(
        Extension(
            "tidal._C",
            sources=["csrc/tidal_native.cpp", "csrc/loader.cpp", "csrc/bounce.cpp"],
            depends=["csrc/loader.h", "csrc/bounce.h"],
            include_dirs=[include],
            language="c++",
            extra_compile_args=["-O3", "-std=c++17", "-fvisibility=hidden", "-pthread"],
            extra_link_args=["-pthread"],
        )
    )
elif os.environ.get("TIDAL_REQUIRE_NATIVE") == "1":
    sys.exit("tidal: TIDAL_REQUIRE_NATIVE=1 but no pybind11 headers were found")
else:
    print("tidal: pybind11 headers not found; installing without tidal._C", file=sys.stderr)

setup(ext_modules=ext_modules)
