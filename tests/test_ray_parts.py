"""tidal.ray's parts without a cluster: one request through an ASGI app in process (`asgi.call`), as a replica
runs `tidal serve`'s app; the replicas' metrics merged and labelled by replica (`metrics.merge`); the builder
`serve run`/`serve deploy` import (`app.build`), its arguments checked."""
import asyncio

import pytest

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client.parser import text_string_to_metric_families

from tidal.errors import ConfigError
from tidal.ray.app import build
from tidal.ray.asgi import call
from tidal.ray.metrics import merge
from tidal.ray.router import _reason
from tidal.serve.metrics import ServeMetrics


def _app(events: list):
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request):
        body = await request.json()
        return JSONResponse({"got": body, "query": request.url.query, "h": request.headers.get("x-a")},
                            status_code=201, headers={"x-b": "2"})

    @app.get("/count")
    async def count():
        async def numbers():
            try:
                for i in range(1000):
                    yield f"{i}\n"
                    await asyncio.sleep(0.001)
            finally:
                events.append("stream closed")
        return StreamingResponse(numbers(), media_type="text/plain")

    return app


async def _collect(gen, limit=None):
    out = []
    async for item in gen:
        out.append(item)
        if limit is not None and len(out) == limit:
            break
    await gen.aclose()
    return out


def test_a_request_through_an_app_in_process():
    events = []
    app = _app(events)
    out = asyncio.run(_collect(call(app, "POST", "/echo", b"k=v", [(b"X-A", b"1")], b'{"n": 3}')))
    start, body = out[0], b"".join(out[1:])
    assert start["status"] == 201 and ("x-b", "2") in start["headers"]
    assert body == b'{"got":{"n":3},"query":"k=v","h":"1"}'
    # a stream read to its end, then one left after three chunks: the app's generator is closed either way
    full = asyncio.run(_collect(call(app, "GET", "/count", b"", [], b"")))
    assert b"".join(full[1:]) == b"".join(f"{i}\n".encode() for i in range(1000))
    events.clear()
    part = asyncio.run(_collect(call(app, "GET", "/count", b"", [], b""), limit=4))
    assert part[1:] == [b"0\n", b"1\n", b"2\n"] and events == ["stream closed"]


def test_replicas_metrics_are_merged_with_a_replica_label():
    texts = {}
    for replica, n in (("r1", 2), ("r2", 5)):
        metrics = ServeMetrics()
        metrics._success.labels("m", "length").inc(n)
        metrics._waiting.labels("m").set(n + 1)
        texts[replica] = metrics.render()[0].decode()
    merged = merge(texts).decode()
    assert merged.count("# HELP request_success_total ") == 1
    families = {f.name: f for f in text_string_to_metric_families(merged)}
    values = {(s.name, s.labels.get("replica")): s.value for f in families.values() for s in f.samples
              if s.labels.get("model_name") == "m" and s.name in ("request_success_total", "num_requests_waiting")}
    assert values == {("request_success_total", "r1"): 2.0, ("request_success_total", "r2"): 5.0,
                      ("num_requests_waiting", "r1"): 3.0, ("num_requests_waiting", "r2"): 6.0}
    assert merge({}) == b""


def test_the_builder_takes_the_config_file_and_checks_its_arguments(tmp_path):
    from ray import serve

    config = tmp_path / "serve.toml"
    config.write_text('device = "cpu"\n[ray]\nreplicas = 3\n[models.a]\npath = "tiny"\n')
    assert isinstance(build({"config": str(config)}), serve.Application)
    assert isinstance(build({"config": str(config), "replicas": "2", "max_models_per_replica": 1}),
                      serve.Application)
    for args, match in (({}, r"config=FILE.*got \[\]"), ({"config": str(config), "replica": "2"}, "'replica'"),
                        ({"config": str(config), "replicas": "two"}, "replicas='two' is not an integer"),
                        ({"config": str(config), "replicas": "0"}, "replicas=0"),
                        ({"config": str(tmp_path / "none.toml")}, "none.toml")):
        with pytest.raises(ConfigError, match=match):
            build(args)


def test_a_replicas_failure_is_told_in_its_first_sentence_when_long():
    class ActorDiedError(Exception):
        pass

    essay = ("The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR. Some common "
             "causes include: " + "(n) a cause, " * 40)
    assert _reason(ActorDiedError("traceback line\n" + essay)) == \
        "ActorDiedError: The actor is dead because its worker process has died."
    assert _reason(ValueError("line one\nno model at /a/b.toml. Check the path")) == \
        "ValueError: no model at /a/b.toml. Check the path"  # short: whole
    assert _reason(RuntimeError("x" * 1000)) == "RuntimeError: " + "x" * 286  # no sentence: cut at the limit
    assert _reason(RuntimeError()) == "RuntimeError: "
