"""`tidal serve`'s configuration (no server): sizes with units, the TOML file and the flags merged into frozen
dataclasses, and every refusal naming what is wrong; and the request parser's refusals."""
import dataclasses

import pytest

from tidal.errors import ConfigError
from tidal.serve import protocol
from tidal.serve.config import ModelConfig, ServeConfig, build, parse_size


@pytest.mark.parametrize("text,n", [("40GiB", 40 << 30), ("512MiB", 512 << 20), ("1.5GB", 1_500_000_000),
                                    ("4096", 4096), (4096, 4096), ("2 kib", 2048), ("1KB", 1000), ("0", 0),
                                    ("0.5MiB", 1 << 19)])
def test_sizes(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("bad", ["", "GiB", "12XB", "-1GiB", "1.5", -3, True, 2.5, "1e9", None])
def test_bad_sizes(bad):
    with pytest.raises(ConfigError):
        parse_size(bad, "device_budget")


def test_toml_and_flags(tmp_path):
    f = tmp_path / "serve.toml"
    f.write_text('host = "0.0.0.0"\nport = 9000\ndevice_budget = "2GiB"\npolicy = "exclusive"\n\n'
                 '[models.chat]\npath = "smollm2-135m"\ndtype = "bfloat16"\nresidency = 0.5\n'
                 'kv_cache_bytes = "64MiB"\nkeep_host_copy = true\nslo_ttft_s = 0.5\nslo_tpot_s = 0.05\n\n'
                 '[models.other]\npath = "tiny"\n')
    cfg = build(f, ["other=/ckpt/other", "third=micro"], port=9100, host=None, kv_cache_bytes="8MiB")
    assert (cfg.host, cfg.port, cfg.device_budget, cfg.policy) == ("0.0.0.0", 9100, 2 << 30, "exclusive")
    chat, other, third = cfg.models
    assert (chat.name, chat.path, chat.dtype, chat.residency, chat.kv_cache_bytes) == \
        ("chat", "smollm2-135m", "bfloat16", 0.5, 64 << 20)
    assert chat.keep_host_copy and (chat.slo_ttft_s, chat.slo_tpot_s) == (0.5, 0.05)
    assert (other.path, other.kv_cache_bytes, third.path, third.kv_cache_bytes) == \
        ("/ckpt/other", 8 << 20, "micro", 8 << 20)
    import torch
    kw = chat.engine_kwargs()
    assert kw["dtype"] is torch.bfloat16 and kw["resident_fraction"] == 0.5 and kw["keep_host_copy"]
    assert cfg.url == "http://0.0.0.0:9100/v1"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.port = 1


def test_defaults_bind_locally():
    cfg = build(None, ["a=tiny"])
    assert (cfg.host, cfg.port, cfg.policy, cfg.device_budget) == ("127.0.0.1", 8000, "lru", None)


@pytest.mark.parametrize("toml,flags,words", [
    ("", [], ["no models"]),
    ("", ["a"], ["NAME=PATH"]),
    ("", ["=x"], ["NAME=PATH"]),
    ("bogus = 1\n", ["a=tiny"], ["bogus"]),
    ("[models.a]\npath = 'tiny'\nresidancy = 1\n", [], ["residancy"]),
    ("[models.a]\ndtype = 'float32'\n", [], ["no path"]),
    ("[models.a]\npath = 'tiny'\ndtype = 'fp8'\n", [], ["dtype"]),
    ("[models.a]\npath = 'tiny'\nresidency = 1.5\n", [], ["residency"]),
    ("[models.a]\npath = 'tiny'\nkv_cache_bytes = 'lots'\n", [], ["kv_cache_bytes"]),
    ("[models.a]\npath = 'tiny'\nslo_ttft_s = 0\n", [], ["slo_ttft_s"]),
    ("[models.a]\npath = 'tiny'\nprofile = '/no/such/profile.json'\n", [], ["profile"]),
    ("policy = 'cost'\n[models.a]\npath = 'tiny'\n", [], ["cost", "profile"]),
    ("policy = 'fifo'\n", ["a=tiny"], ["fifo"]),
    ("port = 70000\n", ["a=tiny"], ["port"]),
    ("device_budget = '1.5'\n", ["a=tiny"], ["device_budget"]),
    ("not toml [\n", ["a=tiny"], ["serve.toml"]),
])
def test_refusals_name_the_problem(tmp_path, toml, flags, words):
    f = tmp_path / "serve.toml"
    f.write_text(toml)
    with pytest.raises(ConfigError) as e:
        build(f, flags)
    for w in words:
        assert w in str(e.value)


def test_a_model_given_twice():
    with pytest.raises(ConfigError, match="twice"):
        ServeConfig((ModelConfig("a", "tiny"), ModelConfig("a", "micro")))


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.toml"):
        build(tmp_path / "nope.toml", ["a=tiny"])


@pytest.mark.parametrize("body,param", [
    ({"model": "m", "prompt": ["a", "b"]}, "prompt"),
    ({"model": "m", "prompt": ""}, "prompt"),
    ({"model": "m", "prompt": "x", "echo": True}, "echo"),
    ({"model": "m", "prompt": "x", "best_of": 2}, "best_of"),
    ({"model": "m", "prompt": "x", "logprobs": 2}, "logprobs"),
    ({"model": "m", "prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
    ({"model": "m", "prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"model": "m", "prompt": "x", "stop": ""}, "stop"),
    ({"model": "m", "prompt": "x", "stop_token_ids": [-1]}, "stop_token_ids"),
    ({"model": "m", "prompt": "x", "seed": 1.5}, "seed"),
    ({"model": "m", "prompt": "x", "temperature": "hot"}, "temperature"),
    ({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content[0]"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
     "tools"),
])
def test_protocol_refusals(body, param):
    parse = protocol.parse_chat if "messages" in body else protocol.parse_completion
    with pytest.raises(protocol.InvalidRequest) as e:
        parse(body)
    assert e.value.status == 400 and e.value.param == param


def test_protocol_accepts_what_clients_send():
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    chat = protocol.parse_chat({"model": "m", "messages": [{"role": "system", "content": "be brief"},
                                                          {"role": "user", "content": parts}],
                                "max_tokens": 5, "max_completion_tokens": 7, "n": 1, "presence_penalty": 0.0,
                                "stop": ["x", "y"], "seed": 3, "stream": True,
                                "stream_options": {"include_usage": True}, "logprobs": False})
    assert chat.messages[1]["content"] == "ab" and chat.sampling.max_tokens == 7
    assert chat.sampling.stop == ("x", "y") and chat.stream and chat.include_usage
    assert chat.sampling.temperature == 1.0  # OpenAI's default
    comp = protocol.parse_completion({"model": "m", "prompt": [[1, 2, 3]], "stop_token_ids": [2]})
    assert comp.prompt == (1, 2, 3) and comp.sampling.max_tokens == 16
    assert comp.sampling.stop_token_ids == (2,)
