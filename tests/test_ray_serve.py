"""tidal on Ray Serve end to end (`tidal.ray`): a real local Ray cluster (2 CPUs), the application with 2
replicas over 3 models (the real SmolLM2-135M-Instruct and two random models with its tokenizer), each replica
under a device budget that fits one model at a time and owning at most 2, talked to over HTTP with the
official `openai` client and httpx through Ray's HTTP proxy.

Checked: /v1/models; greedy answers (completions, streamed or not, and a chat) equal a single `tidal.Engine`'s
for every model; a model's requests keep going to the replica that owns it (affinity); a replica that owns two
models preempts and resumes them inside (tidal's level) instead of loading anew; a model Ray's LRU takes from a
replica is removed from its scheduler and loads anew when it comes back (Ray's level, a second application);
/v1/tidal/status and /metrics aggregate both replicas, labelled by replica; killing a replica's process while
requests are answered (streamed or whole) ends each of them, completed or failed with a clear error, none
hanging, and Ray brings the replica back, as when the process is killed while the replica loads a model;
everything shuts down at the end; `tidal serve --ray`, and `serve run` with the Serve config file of
docs/SCALING.md, serve and stop."""
import concurrent.futures
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import ray
from ray import serve

import tidal
from serve_util import random_model, smollm2
from tidal.errors import ConfigError
from tidal.ray.app import build_app
from tidal.ray.config import RayConfig, build as build_ray_config
from tidal.serve.config import ModelConfig, ServeConfig
from tidal.text import Tokenizer

# the random models' KV pools make them as large as SmolLM2 on the device, so that a replica's budget fits any
# one model and never two (their weights alone are 26 MB, SmolLM2's 540 MB)
SMOL_KV, RAND_KV = 16 << 20, 320 << 20
PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
MAX_TOKENS = 12
HEADER = "x-tidal-replica"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _models(root):
    return (ModelConfig("smol", smollm2(), dtype="float32", kv_cache_bytes=SMOL_KV, kernels="reference"),
            ModelConfig("rand0", random_model(root / "r0", seed=0), dtype="float32", kv_cache_bytes=RAND_KV,
                        kernels="reference"),
            ModelConfig("rand1", random_model(root / "r1", seed=1), dtype="float32", kv_cache_bytes=RAND_KV,
                        kernels="reference"))


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    models = _models(tmp_path_factory.mktemp("ray"))
    sizes = [tidal.Engine.placement(m.path, device="cpu", **m.engine_kwargs()).footprint.device for m in models]
    budget = max(sizes) + 1  # per replica: any one model, never two
    assert budget < min(a + b for i, a in enumerate(sizes) for b in sizes[i + 1:])
    config = ServeConfig(models, device="cpu", device_budget=budget, policy="lru", warmup=False,
                         log_level="warning")
    rc = RayConfig(replicas=2, max_models_per_replica=2, num_cpus=1)
    port, metrics_port = _free_port(), _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="tidal-test",
             _metrics_export_port=metrics_port, _system_config={"metrics_report_interval_ms": 1000})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(config, rc), name=rc.app_name, route_prefix="/")
        yield {"config": config, "base": f"http://127.0.0.1:{port}", "models": {m.name: m for m in models},
               "ray_metrics": f"http://127.0.0.1:{metrics_port}/metrics"}
    finally:
        if ray.is_initialized():  # test_everything_shuts_down shut it down already
            serve.shutdown()
            ray.shutdown()


@pytest.fixture(scope="module")
def client(app):
    return openai.OpenAI(base_url=app["base"] + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(app):
    """Each model's greedy answer to PROMPT from a single tidal.Engine in this process, and SmolLM2's to CHAT
    (its chat template's prompt)."""
    out = {}
    for name, m in app["models"].items():
        tok = Tokenizer.from_checkpoint(m.path)
        with tidal.Engine.from_pretrained(m.path, device="cpu", **m.engine_kwargs()) as engine:
            ids = engine.generate([tok.encode(PROMPT)], max_new_tokens=MAX_TOKENS)[0]
            out[name] = tok.decode([t for t in ids if t not in tok.eos_token_ids])
            if name == "smol":  # the real model has a chat template
                ids = engine.generate([tok.chat_prompt(CHAT)], max_new_tokens=MAX_TOKENS)[0]
                out["smol-chat"] = tok.decode([t for t in ids if t not in tok.eos_token_ids])
    return out


def _complete(client, model: str):
    raw = client.completions.with_raw_response.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS,
                                                      temperature=0.0)
    return raw.parse().choices[0].text, raw.headers[HEADER]


def _status(app, until=lambda doc: doc["replicas_reporting"] == 2, timeout: float = 30.0) -> dict:
    """The router's aggregated status, once `until(doc)` holds (or at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        doc = httpx.get(app["base"] + "/v1/tidal/status", timeout=30).json()
        if until(doc) or time.monotonic() > deadline:
            return doc
        time.sleep(0.2)


def test_models_answers_and_affinity(app, client, reference):
    assert sorted(m.id for m in client.models.list().data) == ["rand0", "rand1", "smol"]
    owner = {}
    for name in ("smol", "rand0", "rand1"):
        text, replica = _complete(client, name)
        assert text == reference[name], name
        owner[name] = replica
    for _ in range(2):  # each model's requests keep going to the replica that owns it
        for name in ("smol", "rand0", "rand1"):
            text, replica = _complete(client, name)
            assert (text, replica) == (reference[name], owner[name]), name
    with client.completions.with_streaming_response.create(model="smol", prompt=PROMPT, max_tokens=MAX_TOKENS,
                                                           temperature=0.0, stream=True) as raw:
        streamed = "".join(chunk.choices[0].text for chunk in raw.parse() if chunk.choices)
        assert (streamed, raw.headers[HEADER]) == (reference["smol"], owner["smol"])
    raw = client.chat.completions.with_raw_response.create(model="smol", messages=CHAT, max_tokens=MAX_TOKENS,
                                                           temperature=0.0)
    assert (raw.parse().choices[0].message.content, raw.headers[HEADER]) == (reference["smol-chat"], owner["smol"])
    time.sleep(1.5)  # a post to the board
    doc = _status(app)
    assert doc["replicas_reporting"] == 2 and doc["replicas_expected"] == 2
    for name, replica in owner.items():
        assert doc["owners"][name] == [replica], name
        assert name in doc["replicas"][replica]["owned"]


def test_a_replica_preempts_and_resumes_the_models_it_owns(app, client, reference):
    doc = _status(app)
    shared = [r for r, d in doc["replicas"].items() if len(d["owned"]) == 2]
    assert shared, doc["owners"]  # 3 models over 2 replicas, 2 each at most
    replica = shared[0]
    a, b = doc["replicas"][replica]["owned"]
    for name in (a, b, a, b):  # the budget fits one: tidal switches them inside the replica
        text, served_by = _complete(client, name)
        assert (text, served_by) == (reference[name], replica)
    time.sleep(1.5)
    switches = _status(app)["replicas"][replica]["recent_switches"]
    actions = [(s["action"], s["model"]) for s in switches]
    assert ("Resume", a) in actions and ("Resume", b) in actions, actions
    assert actions.count(("Load", a)) <= 1 and actions.count(("Load", b)) <= 1, actions


def test_status_and_metrics_are_labelled_by_replica(app, client):
    text = httpx.get(app["base"] + "/metrics", timeout=30).text
    doc = _status(app)
    for replica, d in doc["replicas"].items():
        for name in d["owned"]:
            assert f'request_success_total{{finished_reason="length",model_name="{name}",replica="{replica}"}}' \
                in text, (replica, name)
    # and through Ray's own metrics export (the node's metrics agent), as gauges tagged with the replica
    deadline, exported = time.monotonic() + 30, ""
    while time.monotonic() < deadline:
        exported = httpx.get(app["ray_metrics"], timeout=10).text
        if all(f'replica="{r}"' in exported for r in doc["replicas"]):
            break
        time.sleep(0.5)
    lines = [line for line in exported.splitlines() if line.startswith("ray_request_success_total{")]
    assert {r for r in doc["replicas"] if any(f'replica="{r}"' in line for line in lines)} == set(doc["replicas"])
    r = httpx.post(app["base"] + "/v1/completions", json={"model": "nope", "prompt": "x"}, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert "smol" in r.json()["error"]["message"]
    r = httpx.post(app["base"] + "/v1/completions", content=b"{not json", timeout=30)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_a_model_ray_takes_away_is_removed_from_the_replica_and_loads_anew_when_it_comes_back(app, reference):
    """Ray's level alone: a second application on the same cluster, one replica owning one model at a time. A
    request for the other model makes Ray's LRU take the first away: the replica's scheduler drops it (its
    host and device bytes freed: the status lists only the new one), and it loads anew when asked again."""
    models = tuple(dataclasses.replace(app["models"][n], kv_cache_bytes=16 << 20, keep_host_copy=True)
                   for n in ("rand0", "rand1"))
    config = ServeConfig(models, device="cpu", policy="lru", warmup=False, log_level="warning")
    # no CPU: the first application's replicas hold the cluster's two
    serve.run(build_app(config, RayConfig(replicas=1, max_models_per_replica=1, num_cpus=0, app_name="evict")),
              name="evict", route_prefix="/evict")
    try:
        base = app["base"] + "/evict"
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
        host_used = {}
        for name in ("rand0", "rand1", "rand0"):
            assert _complete(client, name)[0] == reference[name], name
            answered = time.time()  # a post after the answer: the model loaded, the other one removed
            doc = _status({"base": base}, until=lambda d: d["replicas_reporting"] == 1 and
                          all(r["posted_at"] > answered for r in d["replicas"].values()))
            (replica,) = doc["replicas"].values()
            assert replica["owned"] == [name] and sorted(replica["models"]) == [name], (name, doc["owners"])
            host_used.setdefault(name, set()).add(replica["budgets"]["host_used_bytes"])
        assert all(len(v) == 1 and min(v) > 0 for v in host_used.values()), host_used  # each alone, each time
        loads = [s["model"] for s in replica["recent_switches"] if s["action"] == "Load"]
        assert loads == ["rand0", "rand1", "rand0"], replica["recent_switches"]
    finally:
        serve.delete("evict")


def _ask(base: str, model: str, stream: bool) -> str:
    """A completion, streamed or whole; 'ok', or the error the client saw (raised or in the stream)."""
    c = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)
    try:
        answer = c.completions.create(model=model, prompt=PROMPT, max_tokens=64, temperature=0.0, stream=stream)
        last = ([None] + list(answer))[-1] if stream else answer
    except openai.APIError as exc:
        return f"error: {exc}"
    return "ok" if last is not None and last.choices and last.choices[0].finish_reason else "cut"


def test_a_killed_replica_fails_or_finishes_every_request_and_comes_back(app, client, reference):
    doc = _status(app)
    owner = doc["owners"]["smol"][0]
    actor = doc["replicas"][owner]["actor"]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(_ask, app["base"], "smol", stream) for stream in (True, False, True, False)]
        time.sleep(0.5)  # the requests are in flight on the owner
        os.kill(actor["pid"], signal.SIGKILL)  # the replica's process dies, as in a crash
        outcomes = [f.result(timeout=90) for f in futures]  # none hangs
    assert any(o != "ok" for o in outcomes), outcomes  # the kill met requests in flight
    for o in outcomes:
        assert o == "ok" or o.startswith("error:") and "replica" in o.lower(), outcomes
    # Ray restarts the replica: both report again, and the model answers as before
    deadline = time.monotonic() + 60
    while True:
        try:
            text, _ = _complete(client, "smol")
            break
        except openai.APIError:
            assert time.monotonic() < deadline, "the model did not come back"
            time.sleep(0.5)
    assert text == reference["smol"]
    doc = _status(app, until=lambda d: d["replicas_reporting"] == 2 and owner not in d["replicas"], timeout=60)
    assert doc["replicas_reporting"] == 2 and owner not in doc["replicas"], sorted(doc["replicas"])


def test_a_replica_killed_while_it_loads_a_model_fails_or_finishes_every_request_and_comes_back(app, reference):
    """A second application, one replica: requests for SmolLM2 make Ray give it the model, and the replica's
    process is killed as soon as it reports owning the model, while the model loads (its first load reads
    540 MB and prefills; the status poll takes milliseconds)."""
    config = ServeConfig((app["models"]["smol"],), device="cpu", policy="lru", warmup=False, log_level="warning")
    serve.run(build_app(config, RayConfig(replicas=1, max_models_per_replica=1, num_cpus=0, app_name="load")),
              name="load", route_prefix="/load")
    base = app["base"] + "/load"
    try:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(_ask, base, "smol", stream) for stream in (True, False, False)]
            deadline = time.monotonic() + 60
            while True:  # the replica posts as soon as it owns the model, before the scheduler loads it
                doc = httpx.get(base + "/v1/tidal/status", timeout=30).json()
                if doc["owners"].get("smol"):
                    break
                assert time.monotonic() < deadline, doc
                time.sleep(0.02)
            (replica,) = doc["replicas"].values()
            os.kill(replica["actor"]["pid"], signal.SIGKILL)
            outcomes = [f.result(timeout=90) for f in futures]  # none hangs
        assert any(o != "ok" for o in outcomes), outcomes  # the kill met the load
        for o in outcomes:
            assert o == "ok" or o.startswith("error:") and "replica" in o.lower(), outcomes
        deadline = time.monotonic() + 60
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
        while True:  # Ray restarts the replica, which loads the model anew
            try:
                assert _complete(client, "smol")[0] == reference["smol"]
                break
            except openai.APIError:
                assert time.monotonic() < deadline, "the model did not come back"
                time.sleep(0.5)
    finally:
        serve.delete("load")


def test_ray_config_from_the_serve_file(tmp_path, capsys):
    path = tmp_path / "serve.toml"
    path.write_text('policy = "lru"\n[ray]\nreplicas = 3\nmax_models_per_replica = 1\nnum_cpus = 0.5\n'
                    '[models.a]\npath = "tiny"\n')
    rc = build_ray_config(path, replicas=4)
    assert (rc.replicas, rc.max_models_per_replica, rc.num_cpus, rc.gpus("cpu"), rc.gpus("cuda:0")) == \
        (4, 1, 0.5, 0.0, 1.0)
    path.write_text('[ray]\nreplica = 3\n')
    with pytest.raises(ConfigError, match="unknown key 'replica'"):
        build_ray_config(path)
    with pytest.raises(ConfigError, match="replicas=0"):
        RayConfig(replicas=0)
    from tidal.cli import main

    assert main(["serve", "--model", "a=tiny", "--replicas", "2"]) != 0
    assert "--replicas needs --ray" in capsys.readouterr().err


def test_everything_shuts_down(app):
    serve.shutdown()
    ray.shutdown()
    assert not ray.is_initialized()
    with pytest.raises(httpx.TransportError):
        httpx.get(app["base"] + "/health", timeout=5)


def _serves_then_stops(proc, base: str, reference: str, stop: int) -> None:
    """Wait for the server `proc` started to answer at `base`, check one greedy completion of rand0 against
    `reference`, send it `stop`, and check that it exits 0 and that nothing answers at `base` afterwards."""
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            try:
                if httpx.get(base + "/v1/models", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.5)
        r = httpx.post(base + "/v1/completions", json={"model": "rand0", "prompt": PROMPT, "max_tokens": MAX_TOKENS,
                                                       "temperature": 0.0}, timeout=60)
        assert r.json()["choices"][0]["text"] == reference
        proc.send_signal(stop)
        assert proc.wait(timeout=60) == 0, proc.stdout.read().decode()[-2000:]
        with pytest.raises(httpx.TransportError):
            httpx.get(base + "/health", timeout=5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_the_command_serves_and_exits_0_on_sigterm(app, reference):
    """`tidal serve --ray` as a user runs it: its own local cluster, one model, an answer, SIGTERM, exit 0."""
    port, m = _free_port(), app["models"]["rand0"]
    cmd = [sys.executable, "-m", "tidal", "serve", "--ray", "--replicas", "1", "--model", f"rand0={m.path}",
           "--kv-cache", str(RAND_KV), "--device", "cpu", "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    _serves_then_stops(proc, f"http://127.0.0.1:{port}", reference["rand0"], signal.SIGTERM)


def test_the_documented_serve_config_runs_with_serve_run(app, reference, tmp_path):
    """docs/SCALING.md's Serve config file, as `serve run` (and `serve deploy`) take it: it passes Ray's own
    schema, and, pointed at a tidal config file here (a local port; no runtime_env: tidal is installed), Ray's
    CLI serves the model with it and stops at Ctrl-C."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    text = (Path(__file__).parents[1] / "docs" / "SCALING.md").read_text()
    doc = yaml.safe_load(text.split("```yaml\n", 1)[1].split("```", 1)[0])
    ServeDeploySchema.model_validate(doc)
    (application,) = doc["applications"]
    assert application["import_path"] == "tidal.ray.app:build"
    m, port = app["models"]["rand0"], _free_port()
    config = tmp_path / "serve.toml"
    config.write_text(f'device = "cpu"\nlog_level = "warning"\n[ray]\nreplicas = 1\nnum_cpus = 1\n'
                      f'[models.rand0]\npath = "{m.path}"\ndtype = "float32"\nkv_cache_bytes = {RAND_KV}\n'
                      f'kernels = "reference"\n')
    doc["http_options"].update(host="127.0.0.1", port=port)
    application["args"]["config"] = str(config)
    del application["runtime_env"]
    (tmp_path / "tidal-serve.yaml").write_text(yaml.safe_dump(doc))
    serve_cli = Path(sys.executable).with_name("serve")
    proc = subprocess.Popen([str(serve_cli), "run", "tidal-serve.yaml"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    _serves_then_stops(proc, f"http://127.0.0.1:{port}", reference["rand0"], signal.SIGINT)
