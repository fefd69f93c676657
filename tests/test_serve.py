"""`tidal serve` end to end: a real server (uvicorn, in a thread, on a free local port) serving the real
SmolLM2-135M-Instruct and a random model with SmolLM2's tokenizer, under a device budget that fits one of
them, talked to over HTTP with the official `openai` client and httpx.

Checked: /v1/models; a greedy chat answer equals transformers' own `generate` on the same checkpoint and chat
template; streamed text equals non-streamed text exactly; the SSE chunk format (one id and created, the role
first, finish_reason on the last chunk, the usage chunk, [DONE]); stop strings and stop token ids; every
refused request's status and OpenAI error body, with the server serving on; a client that disconnects
mid-stream aborts its request and frees its KV blocks; both models answer as when alone while concurrent
clients interleave them; /health, /metrics, /v1/tidal/status."""
import json
import threading
import time

import httpx
import openai
import pytest
import torch

import tidal
from serve_util import random_model, smollm2
from tidal.serve.server import Background
from tidal.serve.config import ServeConfig, ModelConfig
from tidal.serve.metrics import ServeMetrics

SMOL_KV = 16 << 20  # 352 tokens of SmolLM2's fp32 KV (30 layers x 3 heads x 64 x 2 x 4 B = 45 KiB a token)
RAND_KV = 1 << 20  # 2048 tokens of the random model's
CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


class Recording(ServeMetrics):
    """ServeMetrics that also keeps every finished request, to check what the scheduler did with it."""

    def __init__(self):
        super().__init__()
        self.finished = []  # (ScheduledRequest, finish_reason)

    def observe_finished(self, req, finish_reason, prompt_tokens, completion_tokens):
        super().observe_finished(req, finish_reason, prompt_tokens, completion_tokens)
        self.finished.append((req, finish_reason))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    smol, rand = smollm2(), random_model(tmp_path_factory.mktemp("serve") / "rand")
    models = (ModelConfig("smol", smol, dtype="float32", kv_cache_bytes=SMOL_KV, kernels="reference"),
              ModelConfig("rand", rand, dtype="float32", kv_cache_bytes=RAND_KV, kernels="reference"))
    sizes = [tidal.Engine.placement(m.path, device="cpu", **m.engine_kwargs()).footprint.device
             for m in models]
    budget = max(sizes) + 1  # either fits alone, never both
    assert budget < sum(sizes)
    config = ServeConfig(models, device="cpu", device_budget=budget, policy="lru")
    running = Background(config, metrics=Recording())
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)


def test_models(client):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"smol", "rand"}
    assert models["smol"].owned_by == "tidal" and models["smol"].max_model_len == 8192


@pytest.fixture(scope="module")
def transformers_answer():
    """SmolLM2's greedy answer to CHAT by transformers' own generate, on the same checkpoint and template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=24, do_sample=False)
    new = out[0, ids["input_ids"].shape[1]:].tolist()
    return tok.decode(new, skip_special_tokens=True), len(new)


def test_greedy_chat_matches_transformers(client, transformers_answer):
    want, n = transformers_answer
    got = client.chat.completions.create(model="smol", messages=CHAT, max_tokens=24, temperature=0)
    assert got.choices[0].message.content == want
    assert got.choices[0].message.role == "assistant"
    assert got.usage.completion_tokens == n
    assert got.choices[0].finish_reason == ("length" if n == 24 else "stop")
    stream = client.chat.completions.create(model="smol", messages=CHAT, max_tokens=24, temperature=0,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == want


def _sse(response) -> list:
    """The events of a streamed response: parsed JSON, or the string "[DONE]"."""
    events = []
    for line in response.iter_lines():
        if line:
            assert line.startswith("data: "), line
            data = line.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_completion_stream_equals_non_stream_with_usage(server, client):
    kw = dict(model="rand", prompt="Once upon a time, in a land far away,", max_tokens=40, temperature=0)
    whole = client.completions.create(**kw)
    with httpx.stream("POST", f"{server.url}/completions", timeout=60,
                      json={**kw, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _sse(r)
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert {c["id"] for c in events[:-1]} == {chunks[0]["id"]} and chunks[0]["id"].startswith("cmpl-")
    assert len({c["created"] for c in events[:-1]}) == 1
    assert all(c["object"] == "text_completion" for c in events[:-1])
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole.choices[0].text
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert all(c["choices"][0]["text"] for c in chunks)  # the finish_reason rides on the last text
    assert usage["choices"] == [] and usage["usage"] == whole.usage.model_dump(exclude_none=True)
    assert whole.usage.completion_tokens == 40


def test_chat_stream_format(server):
    body = dict(model="rand", messages=CHAT, max_tokens=12, temperature=0, stream=True)
    with httpx.stream("POST", f"{server.url}/chat/completions", json=body, timeout=60) as r:
        events = _sse(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]  # no usage chunk unless asked
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])
    last = chunks[-1]["choices"][0]
    assert last["finish_reason"] == "length" and last["delta"]["content"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    whole = httpx.post(f"{server.url}/chat/completions", json={**body, "stream": False}, timeout=60).json()
    assert whole["object"] == "chat.completion"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == \
        whole["choices"][0]["message"]["content"]


def test_stop_strings_never_leak(client):
    kw = dict(model="rand", prompt="The weather today is", max_tokens=48, temperature=0)
    full = client.completions.create(**kw).choices[0].text
    assert len(full) > 40
    for stop in ([full[20:26]], [full[31:33], "\x00never"], full[12:15]):  # a list, or one string
        first = min(full.find(s) for s in ([stop] if isinstance(stop, str) else stop) if s in full)
        want = full[:first]
        got = client.completions.create(**kw, stop=stop)
        assert got.choices[0].text == want and got.choices[0].finish_reason == "stop"
        assert got.usage.completion_tokens < 48
        streamed = list(client.completions.create(**kw, stop=stop, stream=True))
        assert "".join(c.choices[0].text for c in streamed) == want
        assert streamed[-1].choices[0].finish_reason == "stop"


def test_stop_token_ids(server, client):
    kw = dict(model="rand", prompt="A list of fruits:", max_tokens=30, temperature=0)
    client.completions.create(**kw)
    req, _ = server.service.metrics.finished[-1]
    ids = req.output_ids
    k = 7
    stop_id = ids[k]
    first = ids.index(stop_id)
    got = client.completions.create(**kw, extra_body={"stop_token_ids": [stop_id]})
    assert got.choices[0].finish_reason == "stop"
    assert got.usage.completion_tokens == first + 1
    assert got.choices[0].text == server.service.models["rand"].tokenizer.decode(ids[:first])


LONG = "word " * 1100  # > rand's 1024 positions; > smol's KV cache of 352 tokens, < its 8192 positions


@pytest.mark.parametrize("path,body,status,param,words", [
    ("completions", b"{not json", 400, None, ["JSON"]),
    ("completions", b"[1, 2]", 400, None, ["object"]),
    ("completions", {"prompt": "hi"}, 400, "model", ["model"]),
    ("completions", {"model": 3, "prompt": "hi"}, 400, "model", ["model"]),
    ("completions", {"model": "rand"}, 400, "prompt", ["prompt"]),
    ("completions", {"model": "rand", "prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens", ["integer"]),
    ("chat/completions", {"model": "rand"}, 400, "messages", ["messages"]),
    ("chat/completions", {"model": "rand", "messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages[0].role", ["role"]),
    ("chat/completions", {"model": "rand", "messages": CHAT, "stream": "yes"}, 400, "stream", ["stream"]),
    ("completions", {"model": "gpt-4", "prompt": "hi"}, 404, "model", ["gpt-4", "does not exist"]),
    ("chat/completions", {"model": "nope", "messages": CHAT}, 404, "model", ["nope"]),
    ("completions", {"model": "rand", "prompt": LONG}, 400, "prompt", ["{n} tokens", "1024 positions"]),
    ("completions", {"model": "smol", "prompt": LONG}, 400, "prompt", ["{n} tokens", "352 tokens"]),
    ("completions", {"model": "rand", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens", ["max_tokens"]),
    ("chat/completions", {"model": "rand", "messages": CHAT, "max_completion_tokens": -3}, 400,
     "max_completion_tokens", ["-3"]),
    ("completions", {"model": "rand", "prompt": "hi", "temperature": -0.5}, 400, "temperature", ["-0.5"]),
    ("completions", {"model": "rand", "prompt": "hi", "top_p": 0}, 400, "top_p", ["(0, 1]"]),
    ("completions", {"model": "rand", "prompt": "hi", "top_p": 1.5}, 400, "top_p", ["1.5"]),
    ("chat/completions", {"model": "rand", "messages": CHAT, "n": 2}, 400, "n", ["n=2"]),
    ("completions", {"model": "rand", "prompt": "hi", "stop": [1]}, 400, "stop", ["stop"]),
    ("completions", {"model": "rand", "prompt": [5, 49152]}, 400, "prompt", ["49152"]),
])
def test_errors_are_openai_shaped_and_the_server_serves_on(server, path, body, status, param, words):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{server.url}/{path}", timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and err["type"] == "invalid_request_error"
    if isinstance(body, dict) and body.get("prompt") == LONG:
        n = len(server.service.models[body["model"]].tokenizer.encode(LONG))
        words = [w.format(n=n) for w in words]
    for w in words:
        assert w in err["message"]
    if status == 404:
        assert err["code"] == "model_not_found"
    ok = httpx.post(f"{server.url}/completions", json={"model": "rand", "prompt": "hi", "max_tokens": 2},
                    timeout=30)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_errors_through_the_openai_client(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="missing", prompt="hi")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="rand", messages=CHAT, temperature=-1)
    assert e.value.body["param"] == "temperature"
    assert httpx.get(str(client.base_url.join("nowhere"))).json()["error"]["type"] == "invalid_request_error"


def _engine_idle(service, name: str) -> bool:
    engine = service.scheduler.runtime.models[name]
    stats = engine.stats()
    return engine.num_unfinished == 0 and stats.kv_free_device_blocks == stats.kv_device_blocks


def test_disconnect_mid_stream_aborts_and_frees_kv(server):
    finished = server.service.metrics.finished
    before = len(finished)
    body = dict(model="rand", prompt="Tell me everything.", max_tokens=1000, temperature=0, stream=True)
    with httpx.stream("POST", f"{server.url}/completions", json=body, timeout=60) as r:
        got = []
        for line in r.iter_lines():
            if line:
                got.append(line)
            if len(got) == 3:
                break
    # the connection is closed: the request is aborted at the scheduler's next tick
    deadline = time.monotonic() + 20
    while len(finished) == before and time.monotonic() < deadline:
        time.sleep(0.02)
    req, reason = finished[-1]
    assert reason == "abort" and req.finish_reason == "aborted" and len(req.output_ids) < 1000
    deadline = time.monotonic() + 10
    while not _engine_idle(server.service, "rand") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _engine_idle(server.service, "rand")


def test_disconnect_while_waiting_for_a_whole_answer_aborts(server):
    finished = server.service.metrics.finished
    before = len(finished)
    body = dict(model="rand", prompt="Tell me everything, slowly.", max_tokens=1000, temperature=0)
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(f"{server.url}/completions", json=body, timeout=0.3)
    deadline = time.monotonic() + 20
    while len(finished) == before and time.monotonic() < deadline:
        time.sleep(0.02)
    req, reason = finished[-1]
    assert reason == "abort" and len(req.output_ids) < 1000
    deadline = time.monotonic() + 10
    while not _engine_idle(server.service, "rand") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _engine_idle(server.service, "rand")


def test_two_models_interleave_under_a_budget_that_fits_one(server, client, transformers_answer):
    smol_prompts = [CHAT, [{"role": "user", "content": "Name three colors."}]]
    rand_prompts = ["alpha beta", "gamma delta epsilon", "zeta"]

    def ask(model, prompt):
        if model == "smol":
            return client.chat.completions.create(model="smol", messages=prompt, max_tokens=16,
                                                  temperature=0).choices[0].message.content
        out = client.completions.create(model="rand", prompt=prompt, max_tokens=16, temperature=0)
        return out.choices[0].text

    jobs = [("smol", p) for p in smol_prompts] + [("rand", p) for p in rand_prompts]
    alone = [ask(m, p) for m, p in jobs]  # one at a time
    assert alone[0] == transformers_answer[0][:len(alone[0])]
    def switches():
        return sum(e["action"] in ("Preempt", "Resume", "Load") for e in server.service.scheduler.trace)

    before = switches()
    results = [None] * len(jobs)

    def run(i):
        results[i] = ask(*jobs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == alone
    assert switches() > before


def test_health_status_metrics(server, client):
    assert httpx.get(f"{server.base}/health").json() == {"status": "ok"}
    client.completions.create(model="rand", prompt="hi", max_tokens=3, temperature=0)
    doc = httpx.get(f"{server.url}/tidal/status").json()
    assert set(doc["models"]) == {"smol", "rand"}
    rand = doc["models"]["rand"]
    assert rand["tier"] in ("device", "host", "disk") and rand["kv_capacity_tokens"] == 2048
    assert rand["footprint"]["active_device_bytes"] > 0 and doc["budgets"]["device_bytes"] > 0
    assert doc["recent_decisions"] and any(e["action"] == "Preempt" for e in doc["recent_switches"])
    text = httpx.get(f"{server.base}/metrics").text
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds", "num_requests_running", "num_requests_waiting",
                 "kv_cache_usage_perc", "prompt_tokens_total", "generation_tokens_total",
                 "request_success_total"):
        assert f'{name}' in text and 'model_name="rand"' in text
