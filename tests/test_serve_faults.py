"""`tidal serve` when the scheduler's loop fails (an engine step raises): the stream in flight ends with an
OpenAI error event and [DONE], later requests get a 503 in OpenAI's shape, /health says why, and the
server itself stays up."""
import json

import httpx
import pytest

from serve_util import random_model
from tidal.serve.server import Background
from tidal.serve.config import ModelConfig, ServeConfig


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = random_model(tmp_path_factory.mktemp("faults") / "rand")
    running = Background(ServeConfig((ModelConfig("rand", path, dtype="float32", kv_cache_bytes="1MiB",
                                               kernels="reference"),), device="cpu"))
    yield running
    with pytest.raises(RuntimeError, match="boom"):  # stop() re-raises what failed the loop
        running.stop()


def test_a_failed_loop_is_reported_not_hidden(server):
    engine = server.service.scheduler.runtime.models["rand"]
    step, calls = engine.step, []

    def failing_step():
        calls.append(1)
        if len(calls) > 4:
            raise RuntimeError("boom")
        return step()

    engine.step = failing_step
    body = dict(model="rand", prompt="Count to a hundred.", max_tokens=100, temperature=0, stream=True)
    with httpx.stream("POST", f"{server.url}/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and "boom" in error["message"]
    assert all("choices" in json.loads(e) for e in events[:-2]) and len(events) > 2

    r = httpx.post(f"{server.url}/completions", json={**body, "stream": False}, timeout=30)
    assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
    assert "boom" in r.json()["error"]["message"]
    health = httpx.get(f"{server.base}/health")
    assert health.status_code == 503 and "boom" in health.json()["error"]["message"]
    assert httpx.get(f"{server.url}/models").status_code == 200  # the HTTP side serves on
