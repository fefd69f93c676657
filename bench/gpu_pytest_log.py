"""A pytest plugin for gpu_check's tests section (`-p gpu_pytest_log`): one JSON line per test outcome in the
file $GPU_CHECK_TEST_LOG, appended as each test finishes, so that a run stopped part-way still says what
passed and what failed."""
import json
import os

_config = None


def pytest_configure(config):
    global _config
    _config = config


def pytest_runtest_logreport(report):
    path = os.environ.get("GPU_CHECK_TEST_LOG")
    if not path or hasattr(_config, "workerinput"):  # under xdist the controller writes, once per test
        return
    # a test's outcome: its call, or the setup that failed or skipped it, or a failing teardown
    if not (report.when == "call" or (report.when == "setup" and not report.passed)
            or (report.when == "teardown" and report.failed)):
        return
    outcome = "error" if report.failed and report.when != "call" else report.outcome
    line = {"nodeid": report.nodeid, "outcome": outcome, "when": report.when,
            "seconds": round(report.duration, 3)}
    if report.failed:
        line["message"] = str(report.longrepr)[-1500:]
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")
