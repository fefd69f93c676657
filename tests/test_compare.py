"""`tidal compare` (tidal.study.compare): the CLI end to end on preset `tiny` for both baselines, the layers
accelerate offloads, the transformers protocol's accounting and token check, an interrupted run, bad
arguments."""
import copy
import itertools

import pytest
import torch

from cli_util import run_cli
from tidal.errors import TransferError
from tidal.study import baseline_decode, compare, emulation, notes, profile, protocol, schema

# A grid smaller than --quick's: both baselines end to end in well under a minute here.
GRID = ["--quick", "--fractions", "1", "0.5", "--batches", "1", "2", "--output-lengths", "4",
        "--contexts", "16", "24", "--repeats", "1"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One preset cache for the module (so that `tiny` is written once), and one torch thread: on a machine
    whose cores other work shares, a multi-threaded small matmul waits on descheduled threads, and a
    transformers decode step of `tiny` then takes a second instead of milliseconds."""
    path = tmp_path_factory.mktemp("cache")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIDAL_CACHE_DIR", str(path))
        yield path
    torch.set_num_threads(threads)


def _compare(tmp_path_factory, baseline):
    out = tmp_path_factory.mktemp(f"compare-{baseline}")
    rc, stdout, stderr = run_cli(["compare", "tiny", "--baseline", baseline, "--device", "cpu", "--out",
                               str(out), "--no-progress"] + GRID)
    return rc, out, stdout, stderr


@pytest.fixture(scope="module")
def accelerate_run(cache, tmp_path_factory):
    return _compare(tmp_path_factory, "accelerate")


@pytest.fixture(scope="module")
def transformers_run(cache, tmp_path_factory):
    return _compare(tmp_path_factory, "transformers")


def _settings(doc) -> dict:
    return doc["settings"]


def _check_document(run, baseline):
    rc, out, stdout, stderr = run
    assert rc == 0, stderr
    path, png = out / compare.COMPARE_FILE, out / compare.FIGURE_FILE
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(path) in stdout and str(png) in stdout
    assert f"tidal against {baseline}" in stdout and "tidal speedup" in stdout and "emulated" in stdout
    doc = schema.load(path)
    assert doc["complete"] is True and doc["interrupted_at"] is None
    s = _settings(doc)
    grid = set(itertools.product(s["fractions"], s["batches"], s["output_lengths"]))
    decode = {sys: {(r["resident_fraction"], r["batch"], r["output_tokens"]): r for r in doc["decode"]
                    if r["system"] == sys} for sys in ("tidal", baseline)}
    assert set(decode["tidal"]) == grid
    assert {r["system"] for r in doc["decode"]} == {"tidal", baseline}
    assert doc["link"] is None and "emulated link" not in stdout
    for r in decode[baseline].values():
        assert r["tokens_per_second"] > 0 and r["bytes_streamed_per_step"] is None
        assert r["repeats"] == s["repeats"] == 1  # one round has no spread to repeat for
        assert r["decode_seconds_min"] == r["decode_seconds"] == r["decode_seconds_max"]
        assert r["stall_seconds_per_step"] is None and r["prompt_tokens"] == s["prompt_tokens"]
    # the transformers protocol at every context, both tiers, beside tidal's rows of the same case
    cases = {(r["weights"], r["batch"], r["context"]) for r in doc["preemption"]
             if r["system"] == "transformers"}
    assert cases == {(w, s["preemption_batch"], c) for w in ("host", "disk") for c in s["contexts"]}
    ours = {(r["weights"], r["batch"], r["context"]) for r in doc["preemption"]
            if r["system"] == "tidal" and r["kv"] == "swap" and not r["pipelined"]}
    assert cases <= ours
    return doc, decode


def test_accelerate_end_to_end(accelerate_run):
    doc, decode = _check_document(accelerate_run, "accelerate")
    # the same grid points for both systems, with the same layers on the device
    assert set(decode["accelerate"]) == set(decode["tidal"])
    for key, r in decode["accelerate"].items():
        assert r["resident_layers"] == decode["tidal"][key]["resident_layers"]
    assert "accelerate on the CPU backend" in accelerate_run[2]


def test_transformers_end_to_end(transformers_run):
    doc, decode = _check_document(transformers_run, "transformers")
    # plain transformers: every layer resident, at fraction 1.0 only
    s = _settings(doc)
    assert set(decode["transformers"]) == set(itertools.product([1.0], s["batches"], s["output_lengths"]))
    assert all(r["resident_layers"] == doc["model"]["num_layers"] for r in decode["transformers"].values())


@pytest.mark.parametrize("fraction", [0.5, 0.25, 0.0])
def test_accelerate_offloads_the_layers_tidal_streams(cache, fraction):
    from tidal import presets
    from tidal.engine import Engine

    path = presets.resolve("tiny", dtype=torch.float32)
    with Engine.from_pretrained(path, device="cpu", dtype=torch.float32, resident_fraction=fraction,
                                kv_cache_bytes=1 << 20) as engine:
        streamed = engine.stats().streamed_layers
    assert streamed and baseline_decode.streamed_layers(path, fraction, "cpu", torch.float32) == streamed
    model, resident = baseline_decode.load_baseline(path, "accelerate", fraction, "cpu", torch.float32)
    layers = model.model.layers
    assert resident == len(layers) - len(streamed)
    for i, layer in enumerate(layers):
        hooks = [m._hf_hook for m in layer.modules() if getattr(m, "_hf_hook", None) is not None]
        offloaded = [h for h in hooks if h.offload]
        if i in streamed:  # every weight held by accelerate's weights map, fetched at each forward
            assert offloaded and all(p.device.type == "meta" for p in layer.parameters())
        else:
            assert not offloaded and all(p.device.type == "cpu" for p in layer.parameters())


def test_protocol_accounting(accelerate_run):
    from transformers import AutoModelForCausalLM

    doc = schema.load(accelerate_run[1] / compare.COMPARE_FILE)
    m = doc["model"]
    hf = AutoModelForCausalLM.from_pretrained(m["path"], dtype=torch.float32)
    c = hf.config
    params = sum(p.numel() * p.element_size() for p in hf.parameters())
    head_dim = c.hidden_size // c.num_attention_heads
    tidal_host = {r["context"]: r for r in doc["preemption"]
                  if r["system"] == "tidal" and r["weights"] == "host" and r["kv"] == "swap"}
    for r in (r for r in doc["preemption"] if r["system"] == "transformers"):
        assert r["weight_bytes"] == params == tidal_host[r["context"]]["weight_bytes"]
        assert r["kv_bytes"] == (2 * c.num_hidden_layers * r["batch"] * r["context"] * c.num_key_value_heads *
                                 head_dim * 4)
        assert r["synthetic_context"] is False and r["kv"] == "swap" and r["resident_fraction"] == 1.0
        assert r["weight_seconds"] == pytest.approx(r["weight_out_seconds"] + r["disk_seconds"] +
                                                    r["weight_in_seconds"])
        assert r["kv_out_seconds"] > 0 and r["kv_in_seconds"] > 0 and r["weight_in_seconds"] > 0
        # each field is a median over trips of one interval each; the first token ends the resume, and the
        # disk read and the copies back are parts of it in every trip, so in the medians too (not their sum)
        assert r["first_token_seconds"] == r["resume_seconds"]
        assert max(r["disk_seconds"], r["weight_in_seconds"], r["kv_in_seconds"]) <= r["first_token_seconds"]
        if r["weights"] == "host":
            assert r["disk_bytes"] == 0 and r["disk_seconds"] == 0 and r["weight_out_seconds"] > 0
        else:
            assert r["disk_bytes"] == params and r["disk_seconds"] > 0 and r["weight_out_seconds"] == 0


def test_protocol_checks_the_tokens_after_resume(cache):
    from tidal import presets
    from tidal.study import runs

    path = presets.resolve("tiny", dtype=torch.float32)
    proto = protocol.Protocol(path, torch.device("cpu"), torch.float32)
    try:
        assert proto.emulated
        proto.start(runs.same_length_prompts(2, 16, proto.model.config.vocab_size))
        before = {id(p): p.data_ptr() for p in proto.model.parameters()}
        trip = proto.round_trip("host")
        assert trip["same_tokens"] is True
        # emulated moves are copies: fresh memory behind every weight and KV tensor
        assert all(p.data_ptr() != before[id(p)] for p in proto.model.parameters())
        assert proto.round_trip("disk")["same_tokens"] is True
        assert proto.cache.get_seq_length() == 16  # rewound after each first step
        real = proto.move_kv

        def corrupting(dst):  # a move that garbles the values
            n = real(dst)
            for layer in proto.cache.layers:
                layer.values.normal_(0, 10, generator=torch.Generator().manual_seed(0))
            return n

        proto.move_kv = corrupting
        with pytest.raises(TransferError, match="differ from the uninterrupted run"):
            proto.round_trip("host")
    finally:
        proto.close()


def test_interrupted_baseline_leaves_a_valid_partial_comparison(accelerate_run, tmp_path, monkeypatch):
    tidal_doc = schema.load(accelerate_run[1] / profile.PROFILE_FILE)

    def profiled(*args, **kwargs):  # tidal's sweep as measured already: only the baseline runs
        return copy.deepcopy(tidal_doc)

    measured = []
    real = baseline_decode.decode_row

    def interrupt_after_one(*args, **kwargs):
        if measured:
            raise KeyboardInterrupt
        measured.append(real(*args, **kwargs))
        return measured[-1]

    monkeypatch.setattr(profile, "run_profile", profiled)
    monkeypatch.setattr(baseline_decode, "decode_row", interrupt_after_one)
    rc, stdout, stderr = run_cli(["compare", "tiny", "--baseline", "accelerate", "--device", "cpu", "--out",
                               str(tmp_path), "--no-progress"] + GRID)
    assert rc == 130
    assert "interrupted at accelerate decode" in stderr and "incomplete" in stdout
    doc = schema.load(tmp_path / compare.COMPARE_FILE)
    assert doc["complete"] is False and doc["interrupted_at"].startswith("accelerate decode: resident 1")
    note = "; ".join(notes.decode_notes("accelerate", "cpu"))
    assert [r for r in doc["decode"] if r["system"] == "accelerate"] == [{**m, "note": note} for m in measured]
    assert len([r for r in doc["decode"] if r["system"] == "tidal"]) == len(tidal_doc["decode"])
    assert not [r for r in doc["preemption"] if r["system"] == "transformers"]
    assert (tmp_path / compare.FIGURE_FILE).stat().st_size > 0


def test_baseline_rows_say_the_emulated_link_is_tidals_alone(accelerate_run, tmp_path, monkeypatch):
    from tidal.backends import LinkEmulation

    tidal_doc = schema.load(accelerate_run[1] / profile.PROFILE_FILE)
    tidal_doc["link"] = emulation.describe_link(LinkEmulation(1.5))
    seen = []

    def profiled(*args, link=None, **kwargs):  # tidal's sweep as measured already, through the link asked for
        seen.append(link)
        return copy.deepcopy(tidal_doc)

    monkeypatch.setattr(profile, "run_profile", profiled)
    monkeypatch.setattr(baseline_decode, "decode_fractions", lambda settings, baseline: (1.0,))
    monkeypatch.setattr(protocol, "PROTOCOL_TIERS", ("host",))
    rc, stdout, stderr = run_cli(["compare", "tiny", "--baseline", "accelerate", "--link", "1.5", "--out",
                                  str(tmp_path), "--device", "cpu", "--no-progress"] + GRID)
    assert rc == 0, stderr
    assert seen == [1.5]
    doc = schema.load(tmp_path / compare.COMPARE_FILE)
    says = ("emulated link (1.5 GB/s): it paces tidal's copies only; the baselines' moves do not go through it, "
            "so their rows are not slowed by it")
    baseline_rows = [r for r in doc["decode"] + doc["preemption"] if r["system"] != "tidal"]
    assert baseline_rows and all(says in r["note"] for r in baseline_rows)
    assert says in stdout and doc["link"] == tidal_doc["link"]


@pytest.mark.parametrize("argv, message", [
    (["compare", "tiny", "--baseline", "vllm"], "argument --baseline: invalid choice: 'vllm'"),
    (["compare", "tiny"], "the following arguments are required: --baseline"),
    (["compare", "tiny", "--baseline", "accelerate", "--fractions", "1.5"],
     "--fractions: 1.5 is outside [0, 1]"),
    (["compare", "tiny", "--baseline", "accelerate", "--dtype", "int8"], "argument --dtype: invalid choice"),
])
def test_bad_arguments_exit_2_with_one_line(cache, argv, message):
    rc, stdout, stderr = run_cli(argv + ["--device", "cpu", "--no-progress"])
    assert rc == 2 and not stdout
    assert stderr.count("\n") == 1 and stderr.startswith("tidal") and message in stderr, stderr


def test_unknown_baseline_in_the_api(tmp_path):
    with pytest.raises(ValueError, match="baseline 'vllm' is not one of accelerate, transformers"):
        compare.run_compare("tiny", baseline="vllm", out_dir=tmp_path)


def test_interrupted_tidal_sweep_measures_no_baseline(cache, tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(profile, "decode_row", interrupt)
    monkeypatch.setattr(baseline_decode, "decode_row", lambda *a, **k: pytest.fail("the baseline ran"))
    rc, stdout, stderr = run_cli(["compare", "tiny", "--baseline", "accelerate", "--device", "cpu", "--out",
                               str(tmp_path), "--no-progress"] + GRID)
    assert rc == 130 and "tidal's rows only" in stderr
    doc = schema.load(tmp_path / compare.COMPARE_FILE)
    assert doc["complete"] is False and doc["interrupted_at"].startswith("decode")
    assert not doc["decode"] and not doc["preemption"] and doc["links"] is not None
