"""`tidal serve` as a command: a subprocess configured by a TOML file and flags, serving a random model with
SmolLM2's tokenizer. SIGTERM while a stream is in flight: the stream ends with a stated finish_reason and
[DONE], and the process exits 0 after logging what it loaded, the URL, and the shutdown."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx

from serve_util import random_model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_finishes_in_flight_requests_and_exits_0(tmp_path):
    path = random_model(tmp_path / "rand")
    config = tmp_path / "serve.toml"
    config.write_text(f'policy = "lru"\nshutdown_grace_s = 0.5\n\n[models.rand]\npath = "{path}"\n'
                      'dtype = "float32"\nkv_cache_bytes = "1MiB"\nkernels = "reference"\n')
    port = _free_port()
    command = [sys.executable, "-m", "tidal", "serve", "--config", str(config), "--port", str(port),
               "--device", "cpu"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log = []
    reader = threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, "".join(log)
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "".join(log)
            time.sleep(0.1)
        events = []
        body = dict(model="rand", prompt="Go on and on.", max_tokens=1000, temperature=0, stream=True)
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=30) as r:
            for line in r.iter_lines():
                if not line:
                    continue
                data = line.removeprefix("data: ")
                events.append(data if data == "[DONE]" else json.loads(data))
                if len(events) == 2:
                    proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, "".join(log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(5)
    out = "".join(log)
    assert events[-1] == "[DONE]"
    last = events[-2]["choices"][0]
    assert last["finish_reason"] == "abort"  # 1000 tokens outlast the half-second grace
    assert "tidal serve: model rand" in out and f"at http://127.0.0.1:{port}/v1" in out, out
    assert "shutting down" in out and "aborting 1 requests" in out, out
