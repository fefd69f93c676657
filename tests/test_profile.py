"""`tidal profile` (tidal.study): the CLI end to end on preset `tiny` with --quick, an interrupted run, bad
arguments, and the profile.json schema."""
import copy
import itertools
import json
import math

import pytest

from cli_util import run_cli
from tidal.errors import ConfigError
from tidal.study import profile, schema


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One preset cache for the module, so that `tiny` is written once."""
    path = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIDAL_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="module")
def quick(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("profile")
    rc, stdout, stderr = run_cli(["profile", "tiny", "--quick", "--device", "cpu", "--out", str(out),
                               "--no-progress"])
    return rc, out, stdout, stderr


def test_quick_profile_end_to_end(quick, tmp_path):
    rc, out, stdout, stderr = quick
    assert rc == 0, stderr
    path, png = out / profile.PROFILE_FILE, out / profile.FIGURE_FILE
    assert png.stat().st_size > 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(path) in stdout and str(png) in stdout and "decode tok/s" in stdout
    doc = schema.load(path)
    assert doc["complete"] is True and doc["interrupted_at"] is None
    # round trip
    schema.save(doc, tmp_path / "again.json")
    assert schema.load(tmp_path / "again.json") == doc == json.loads(path.read_text())

    s = profile.ProfileSettings.quick()
    assert doc["settings"] == s.to_dict() and doc["settings"]["quick"] is True
    cells = {(r["resident_fraction"], r["batch"], r["output_tokens"]) for r in doc["decode"]}
    assert cells == set(itertools.product(s.fractions, s.batches, s.output_lengths))
    assert len(doc["decode"]) == len(cells)
    cases = {(r["weights"], r["kv"], r["pipelined"], r["context"]) for r in doc["preemption"]}
    assert cases == {c + (ctx,) for c in profile.PREEMPTION_CASES for ctx in s.contexts}

    m = doc["model"]
    for r in doc["decode"]:
        assert r["system"] == "tidal"
        for k in ("decode_seconds", "tokens_per_second", "step_seconds"):
            assert math.isfinite(r[k]) and r[k] > 0, (k, r)
        # the engine's streaming counters: every streamed layer is copied once per decode step
        assert r["bytes_streamed_per_step"] == (m["num_layers"] - r["resident_layers"]) * m["layer_bytes"]
        assert r["resident_layers"] == round(r["resident_fraction"] * m["num_layers"])
    links = doc["links"]
    assert all(links[k] > 0 for k in ("h2d_gbps", "d2h_gbps", "disk_read_gbps")) and links["disk_path"]
    assert doc["costmodel"]["fitted"] is not None, doc["costmodel"]["reason"]
    holdout = doc["costmodel"]["holdout"]
    assert holdout["n"] >= 1 and math.isfinite(holdout["median_relative_error"])


def test_preemption_rows_match_the_engines_accounting(quick):
    from tidal.engine import Engine
    from tidal.study.runs import add_synthetic_context, clear

    doc = schema.load(quick[1] / profile.PROFILE_FILE)
    s, m = doc["settings"], doc["model"]
    context = s["contexts"][-1]
    with Engine.from_pretrained(m["path"], device="cpu", resident_fraction=s["preemption_fraction"],
                                kv_cache_bytes=64 << 20, host_kv_bytes=64 << 20) as engine:
        ids = add_synthetic_context(engine, s["preemption_batch"], context)
        pre = engine.preempt(weights="host", kv="swap")
        engine.resume(pipelined=False)
        clear(engine, ids)
    for r in doc["preemption"]:
        assert r["weight_bytes"] == pre.weight_bytes > 0
        assert r["synthetic_context"] is True and r["batch"] == s["preemption_batch"]
        assert r["total_seconds"] > 0 and r["resume_seconds"] > 0 and r["first_token_seconds"] > 0
        assert r["weight_seconds"] == pytest.approx(r["weight_out_seconds"] + r["disk_seconds"] +
                                                    r["weight_in_seconds"])
        if r["kv"] == "swap":
            assert r["recompute_tokens"] == 0 and r["kv_seconds"] > 0
            if r["context"] == context:
                assert r["kv_bytes"] == pre.kv_bytes > 0
        else:  # dropped: nothing swapped, the whole context prefilled again at resume
            assert r["kv_bytes"] == 0 and r["recompute_seconds"] > 0
            assert r["recompute_tokens"] >= r["batch"] * r["context"]
        if r["weights"] == "disk":
            assert r["disk_bytes"] >= r["weight_bytes"] and r["weight_out_seconds"] == 0
        else:
            assert r["disk_bytes"] == 0 and r["weight_out_seconds"] > 0


def test_interrupted_run_leaves_a_valid_partial_profile(cache, tmp_path, monkeypatch):
    measured = []
    real = profile.decode_row

    def interrupt_after_two(*args, **kwargs):
        if len(measured) == 2:
            raise KeyboardInterrupt
        measured.append(real(*args, **kwargs))
        return measured[-1]

    monkeypatch.setattr(profile, "decode_row", interrupt_after_two)
    rc, stdout, stderr = run_cli(["profile", "tiny", "--quick", "--device", "cpu", "--out", str(tmp_path),
                               "--no-progress"])
    assert rc == 130
    assert "interrupted at decode" in stderr
    doc = schema.load(tmp_path / profile.PROFILE_FILE)
    assert doc["complete"] is False and doc["interrupted_at"].startswith("decode: ")
    assert doc["decode"] == measured and doc["preemption"] == [] and doc["links"] is not None
    assert doc["costmodel"]["fitted"] is None and "interrupted" in doc["costmodel"]["reason"]
    assert (tmp_path / profile.FIGURE_FILE).stat().st_size > 0
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind


@pytest.mark.parametrize("argv, says", [
    (["profile", "no-such-preset", "--quick"], "no-such-preset"),
    (["profile", "tiny", "--quick", "--fractions", "1.5"], "--fractions: 1.5 is outside [0, 1]"),
    (["profile", "tiny", "--quick", "--batches", "two"], "--batches: 'two' is not an integer"),
    (["profile", "tiny", "--quick", "--repeats", "0"], "--repeats"),
    (["profile", "tiny", "--quick", "--bogus"], "--bogus"),
])
def test_bad_arguments_exit_nonzero_with_one_line(argv, says, cache, tmp_path):
    rc, stdout, stderr = run_cli(argv + ["--out", str(tmp_path)])
    assert rc != 0
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tidal: error: ") and says in lines[0], stderr
    assert not (tmp_path / profile.PROFILE_FILE).exists()


def test_unwritable_out_dir(cache, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    rc, _, stderr = run_cli(["profile", "tiny", "--quick", "--out", str(blocker / "out")])
    assert rc == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tidal: error: --out ")
    assert "not a writable directory" in lines[0]


def test_settings_are_validated():
    full = profile.ProfileSettings.full()
    assert {0.0, 0.5, 0.92, 0.98, 1.0} <= set(full.fractions) and len(full.fractions) == 15
    for bad, says in [(dict(fractions=()), "fractions is empty"), (dict(fractions=(-0.1,)), "outside [0, 1]"),
                      (dict(batches=(0,)), "batches"), (dict(output_lengths=(1,)), "output_lengths"),
                      (dict(repeats=True), "repeats"), (dict(contexts=(8, 8)), "repeats a value")]:
        with pytest.raises(ConfigError, match=None) as info:
            full.replace(**bad)
        assert says in str(info.value)
    with pytest.raises(ConfigError, match="positions"):
        full.check_model(max_positions=1024)


def _document() -> dict:
    s = profile.ProfileSettings.quick()
    machine = dict(device="cpu", device_name="a CPU", cpu_count=2, torch_version="2", torch_threads=1,
                   native="native")
    model = dict(spec="tiny", path="/x", model_type="llama", num_layers=8, layer_bytes=100, top_bytes=10,
                 dtype="float32", kv_bytes_per_token=64, max_positions=2048)
    doc = profile.new_document(s, machine, model)
    doc["decode"].append(dict(system="accelerate", resident_fraction=0.5, resident_layers=4, batch=1,
                              prompt_tokens=8, output_tokens=16, decode_seconds=0.1, tokens_per_second=150.0,
                              step_seconds=0.00667, mean_context=16.0, bytes_streamed_per_step=None,
                              stall_seconds_per_step=None))
    return doc


def test_schema_accepts_a_baseline_row_and_rejects_bad_documents(tmp_path):
    doc = _document()
    schema.validate(doc)
    missing = copy.deepcopy(doc)
    del missing["model"]["dtype"]
    with pytest.raises(ConfigError, match="at model: 'dtype' is a required property"):
        schema.validate(missing)
    wrong = copy.deepcopy(doc)
    wrong["decode"][0]["batch"] = "1"
    with pytest.raises(ConfigError, match="at decode/0/batch: '1' is not of type 'integer'"):
        schema.validate(wrong)
    system = copy.deepcopy(doc)
    system["decode"][0]["system"] = "vllm"
    with pytest.raises(ConfigError, match="decode/0/system"):
        schema.validate(system)
    nan = copy.deepcopy(doc)
    nan["decode"][0]["step_seconds"] = float("nan")
    with pytest.raises(ConfigError, match="decode/0/step_seconds: nan is not finite"):
        schema.validate(nan)
    # an invalid document is never written; the valid one already there stays
    path = schema.save(doc, tmp_path / "p.json")
    with pytest.raises(ConfigError):
        schema.save(wrong, path)
    assert schema.load(path) == doc and not list(tmp_path.glob(".*.tmp"))
    (tmp_path / "future.json").write_text(json.dumps(dict(doc, version=2)))
    with pytest.raises(ConfigError, match="version 2"):
        schema.load(tmp_path / "future.json")


def test_every_schema_field_is_described():
    def walk(node, where):
        if isinstance(node, dict):
            for name, sub in node.get("properties", {}).items():
                assert "description" in sub or "$ref" in sub, f"{where}/{name} has no description"
            for key, sub in node.items():
                walk(sub, f"{where}/{key}")
        elif isinstance(node, list):
            for i, sub in enumerate(node):
                walk(sub, f"{where}/{i}")
    walk(schema.schema(), "")
