"""Collects medians from the streaming benchmarks and prints the ratios measured in this same run."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # hf_models: local random checkpoints

_MEDIANS: dict[str, float] = {}
_NOTES: dict[str, dict] = {}


@pytest.fixture
def record_median():
    def record(name: str, benchmark, **notes):
        if benchmark.stats is not None:  # None under --benchmark-disable
            _MEDIANS[name] = benchmark.stats.stats.median
            _NOTES[name] = notes
    return record


@pytest.fixture
def record_interleaved():
    def record(name: str, info: dict):
        _NOTES[name] = info
    return record


def pytest_terminal_summary(terminalreporter):
    from streaming_summary import summarize

    lines = summarize(_MEDIANS, _NOTES)
    if lines:
        terminalreporter.section("tidal: ratios from this run")
        for line in lines:
            terminalreporter.write_line(line)
