"""`tidal profile` (tidal.study): the CLI end to end on preset `tiny` with --quick, an interrupted run, bad
arguments, and the profile.json schema."""
import copy
import itertools
import json
import math
import re
from pathlib import Path

import pytest
import torch

from cli_util import run_cli
from tidal.backends import link as L
from tidal.errors import ConfigError
from tidal.study import costfit, document, emulation, profile, rows, schema
from tidal.study.settings import ProfileSettings


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
    # at most 3 repeats (the least): the suite's time; repeating past them is tested with scripted times below
    rc, stdout, stderr = run_cli(["profile", "tiny", "--quick", "--max-repeats", "3", "--device", "cpu", "--out",
                                  str(out), "--no-progress"])
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

    s = ProfileSettings.quick().replace(max_repeats=3)
    assert doc["settings"] == s.to_dict() and doc["settings"]["quick"] is True
    cells = {(r["resident_fraction"], r["batch"], r["output_tokens"]) for r in doc["decode"]}
    assert cells == set(itertools.product(s.fractions, s.batches, s.output_lengths))
    assert len(doc["decode"]) == len(cells)
    cases = {(r["weights"], r["kv"], r["pipelined"], r["context"]) for r in doc["preemption"]}
    assert cases == {c + (ctx,) for c in profile.PREEMPTION_CASES for ctx in s.contexts}

    m = doc["model"]
    assert doc["link"] is None
    for r in doc["decode"]:
        assert r["system"] == "tidal"
        for k in ("decode_seconds", "tokens_per_second", "step_seconds"):
            assert math.isfinite(r[k]) and r[k] > 0, (k, r)
        # warmed up, repeated at least `repeats` times, the median between the fastest and the slowest round
        assert s.repeats <= r["repeats"] <= s.max_repeats
        assert r["decode_seconds_min"] <= r["decode_seconds"] <= r["decode_seconds_max"]
        assert r["tokens_per_second_min"] == r["batch"] * (r["output_tokens"] - 1) / r["decode_seconds_max"]
        assert r["tokens_per_second_max"] == r["batch"] * (r["output_tokens"] - 1) / r["decode_seconds_min"]
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
    rc, stdout, stderr = run_cli(["profile", "tiny", "--quick", "--max-repeats", "3", "--device", "cpu",
                                  "--out", str(tmp_path), "--no-progress"])
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
    (["profile", "tiny", "--quick", "--max-repeats", "2"], "--max-repeats=2 is below repeats=3"),
    (["profile", "tiny", "--quick", "--max-spread", "-1"], "--max-spread=-1.0 must be a number >= 0"),
    (["profile", "tiny", "--quick", "--link", "fast"], "--link 'fast': neither a bandwidth in GB/s nor a"),
    (["profile", "tiny", "--quick", "--link", "0"], "--link '0': a bandwidth must be"),
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
    full = ProfileSettings.full()
    assert {0.0, 0.5, 0.92, 0.98, 1.0} <= set(full.fractions) and len(full.fractions) == 15
    for bad, says in [(dict(fractions=()), "fractions is empty"), (dict(fractions=(-0.1,)), "outside [0, 1]"),
                      (dict(batches=(0,)), "batches"), (dict(output_lengths=(1,)), "output_lengths"),
                      (dict(repeats=True), "repeats"), (dict(contexts=(8, 8)), "repeats a value")]:
        with pytest.raises(ConfigError, match=None) as info:
            full.replace(**bad)
        assert says in str(info.value)
    for bad, says in [(dict(max_repeats=2), "max_repeats=2 is below repeats=3"),
                      (dict(max_spread=math.nan), "max_spread=nan"),
                      (dict(extra_seconds=-1), "extra_seconds=-1")]:
        with pytest.raises(ConfigError, match=re.escape(says)):
            full.replace(**bad)
    assert full.rounds() == dict(rounds=3, max_rounds=10, max_spread=0.1, extra_seconds=60.0)
    with pytest.raises(ConfigError, match="positions"):
        full.check_model(max_positions=1024)


def _document() -> dict:
    s = ProfileSettings.quick()
    machine = dict(device="cpu", device_name="a CPU", cpu_count=2, torch_version="2", torch_threads=1,
                   native="native")
    model = dict(spec="tiny", path="/x", model_type="llama", num_layers=8, layer_bytes=100, top_bytes=10,
                 dtype="float32", kv_bytes_per_token=64, max_positions=2048)
    doc = document.new_document(s, machine, model)
    doc["decode"].append(dict(system="accelerate", resident_fraction=0.5, resident_layers=4, batch=1,
                              prompt_tokens=8, output_tokens=16, decode_seconds=0.1, tokens_per_second=150.0,
                              step_seconds=0.00667, mean_context=16.0, bytes_streamed_per_step=None,
                              stall_seconds_per_step=None, repeats=3, decode_seconds_min=0.075,
                              decode_seconds_max=0.125, tokens_per_second_min=120.0, tokens_per_second_max=200.0))
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
    (tmp_path / "future.json").write_text(json.dumps(dict(doc, version=4)))
    with pytest.raises(ConfigError, match="version 4; this tidal reads versions 1 to 3"):
        schema.load(tmp_path / "future.json")
    spread = copy.deepcopy(doc)
    del spread["decode"][0]["tokens_per_second_max"]
    with pytest.raises(ConfigError, match="'tokens_per_second_max' is a required property"):
        schema.validate(spread)
    link = copy.deepcopy(doc)
    link["link"] = {"emulated": True, "gbps": 0, "label": "x"}
    with pytest.raises(ConfigError, match="at link"):
        schema.validate(link)


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


# -- repeats until the spread is known ------------------------------------------------------------------------
def _scripted(monkeypatch, decode_seconds: list[float]):
    """runs._timed replaced: gen(prompts, 1) takes 1 s, gen(prompts, n) 1 s + the next of `decode_seconds`."""
    from tidal.study import runs

    times = iter(decode_seconds)
    calls = []

    def timed(gen, prompts, n):
        calls.append(n)
        return (1.0 if n == 1 else 1.0 + next(times)), [[0] * n]

    monkeypatch.setattr(runs, "_timed", timed)
    return runs, calls


@pytest.mark.parametrize("decode_seconds, rule, rounds", [
    ([1.0, 1.05, 0.98, 9.0], dict(max_rounds=6, max_spread=0.1), 3),  # 7% spread after 3: enough
    ([1.0, 2.0, 1.5, 1.2, 1.3, 1.4, 9.0], dict(max_rounds=6, max_spread=0.1), 6),  # stays wide: up to the cap
    ([1.0, 1.5, 1.2, 1.1, 1.2, 9.0], dict(max_rounds=9, max_spread=0.5), 3),  # 50% allowed: enough at once
    ([1.0, 2.0, 1.5, 9.0], dict(max_rounds=6, max_spread=0.1, extra_seconds=0.0), 3),  # no time for more
    ([1.0, 2.0, 9.0], dict(), 2),  # no rule: exactly `rounds`
])
def test_decode_rounds_repeat_while_the_spread_is_wide(monkeypatch, decode_seconds, rule, rounds):
    runs, calls = _scripted(monkeypatch, decode_seconds)
    res = runs.decode_rounds({"x": lambda p, n: None}, [[1, 2]], 5, 3 if rule else 2, warmup=False, **rule)["x"]
    got = decode_seconds[:rounds]
    assert res["rounds"] == rounds and res["decode_s"] == pytest.approx(got, abs=1e-12)
    assert calls == [1, 5] * rounds
    ordered = sorted(got)
    median = ordered[rounds // 2] if rounds % 2 else (ordered[rounds // 2 - 1] + ordered[rounds // 2]) / 2
    assert res["min_decode_s"] == pytest.approx(ordered[0])
    assert res["max_decode_s"] == pytest.approx(ordered[-1])
    assert res["spread"] == pytest.approx((ordered[-1] - ordered[0]) / median)
    assert res["tok_s"] == pytest.approx(1 * 4 / median)


def test_a_row_records_the_spread_and_the_cost_model_takes_the_median():
    row = rows.spread_fields(dict(rounds=4, min_decode_s=0.5, max_decode_s=2.0), batch=2, n=11)
    assert row == dict(repeats=4, decode_seconds_min=0.5, decode_seconds_max=2.0, tokens_per_second_min=10.0,
                       tokens_per_second_max=40.0)
    assert rows.spread_fields(dict(rounds=3, min_decode_s=-0.01, max_decode_s=1.0), batch=1, n=3)[
        "tokens_per_second_max"] is None  # the fastest round's difference was not positive
    doc = _document()
    doc["decode"][0]["system"] = "tidal"
    (sample,) = costfit.decode_samples(doc)
    assert sample.step_seconds == doc["decode"][0]["step_seconds"]  # the median's, not the min's or max's


def test_a_version_1_document_is_read_upgraded():
    path = Path(__file__).parents[1] / "docs" / "study" / "tiny" / "profile.json"
    raw = json.loads(path.read_text())
    assert raw["version"] == 1 and "link" not in raw
    doc = schema.load(path)
    assert doc["version"] == schema.VERSION == 3 and doc["link"] is None
    assert doc["settings"]["max_repeats"] == raw["settings"]["repeats"]
    for old, new in zip(raw["decode"], doc["decode"]):
        assert new == {**old, "repeats": raw["settings"]["repeats"], "decode_seconds_min": None,
                       "decode_seconds_max": None, "tokens_per_second_min": None, "tokens_per_second_max": None}
    # the KV mode once called "drop" reads "recompute" (tidal.modes); nothing else in the rows changes
    assert {r["kv"] for r in raw["preemption"]} == {"swap", "drop"}
    for old, new in zip(raw["preemption"], doc["preemption"]):
        assert new == {**old, "kv": "recompute" if old["kv"] == "drop" else old["kv"]}
    before = copy.deepcopy(raw)
    assert schema.upgrade(raw)["version"] == 3 and raw == before  # a new document; the one given is kept


def test_a_version_2_document_is_read_upgraded(tmp_path):
    current = schema.load(Path(__file__).parents[1] / "docs" / "study" / "qwen2.5-0.5b" / "compare.json")
    old = copy.deepcopy(current)
    old["version"] = 2
    for r in old["preemption"]:
        r["kv"] = "drop" if r["kv"] == "recompute" else r["kv"]
    assert {r["kv"] for r in old["preemption"]} == {"swap", "drop"}
    (tmp_path / "v2.json").write_text(json.dumps(old))
    assert schema.load(tmp_path / "v2.json") == current


# -- an emulated link -----------------------------------------------------------------------------------------
LINK_GRID = ["--quick", "--fractions", "1", "0", "--batches", "1", "--output-lengths", "4", "--contexts", "16",
             "--repeats", "1", "--device", "cpu", "--no-progress"]


def test_profile_through_an_emulated_link(cache, tmp_path, monkeypatch):
    from tidal.study import figures, runs

    from matplotlib.container import ErrorbarContainer

    titles, bars = [], []
    real = figures._save

    def save(fig, path, **layout):
        titles.append(fig.get_suptitle())
        bars.append([c for c in fig.axes[0].containers if isinstance(c, ErrorbarContainer)])
        return real(fig, path, **layout)

    monkeypatch.setattr(figures, "_save", save)
    rc, stdout, stderr = run_cli(["profile", "tiny", "--link", "0.5", "--out", str(tmp_path)] + LINK_GRID)
    assert rc == 0, stderr
    doc = schema.load(tmp_path / profile.PROFILE_FILE)
    link = doc["link"]
    assert link["gbps"] == 0.5 and link["label"] == "" and link["target"] is None
    assert link["ratio"] is None and "baseline" in link["scope"]
    assert "emulated link: 0.5 GB/s" in stdout
    assert titles == [f"tiny (float32) on {doc['machine']['device_name']}\nemulated link: 0.5 GB/s"]
    assert len(bars) == 1 and len(bars[0]) == 1  # one decode series (batch 1, 4 tokens), with its spread
    # the links section's copies went through it: each took at least bytes / 0.5 GB/s
    links = doc["links"]
    assert links["h2d_gbps"] <= 0.5 and links["d2h_gbps"] <= 0.5 and "emulated" in links["copy_method"]
    files = sorted(Path(doc["model"]["path"]).glob("*.safetensors"))
    assert links["disk_path"] == runs.disk_read(files, reps=1)[2]  # the disk read does not cross the link
    # and so did the preemption's weights: the copy out is one transfer of weight_bytes
    for r in doc["preemption"]:
        if r["weights"] == "host":
            assert r["weight_out_seconds"] >= r["weight_bytes"] / 0.5e9


def test_a_target_reaches_the_profile_from_every_command(cache, tmp_path, monkeypatch):
    from tidal.study import report

    seen = []

    def fake(spec, settings=None, out_dir=".", device=None, dtype=None, progress=True, link=None):
        seen.append(link)
        doc = _document()
        doc["interrupted_at"] = "decode: stopped by the test"  # compare and study stop here too
        return doc

    monkeypatch.setattr(profile, "run_profile", fake)
    for argv in (["profile", "tiny"], ["compare", "tiny", "--baseline", "accelerate"], ["study", "tiny"]):
        rc, _, stderr = run_cli(argv + ["--link", "h100-pcie4", "--out", str(tmp_path / argv[0])] + LINK_GRID)
        assert rc == 130, stderr
    assert seen == [L.TARGETS["h100-pcie4"]] * 3
    assert (tmp_path / "study" / report.REPORT_FILE).exists()


def test_calibrate_link_shares_the_measured_step_by_bytes(cache, monkeypatch):
    from tidal import presets
    from tidal.engine import Engine
    from tidal.study import runs

    path = presets.resolve("tiny", dtype=torch.float32)
    placement = Engine.placement(path, device="cpu", dtype=torch.float32)
    settings = ProfileSettings.quick().replace(output_lengths=(4,), repeats=1)
    measured = emulation.calibrate_link(placement, "a6000-pcie4", settings)  # a real measurement
    d = measured.derivation
    assert d.target == "a6000-pcie4" and d.ratio == 768 / 25 and d.layer_seconds > 0
    assert measured.gbps == pytest.approx(d.layer_bytes / (d.ratio * d.layer_seconds) / 1e9, rel=1e-12)

    real = runs.decode_rounds
    monkeypatch.setattr(runs, "decode_rounds", lambda gens, prompts, n, **kw: {
        name: dict(real(gens, prompts, n, **kw)[name], step_s=0.08) for name in gens})
    link = emulation.calibrate_link(placement, "h100-pcie4", settings)
    config = json.loads((Path(path) / "config.json").read_text())
    layers, hidden, vocab = config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]
    layer_bytes = 4 * sum(math.prod(t.shape) for name, t in placement.checkpoint.tensors.items()
                          if name.startswith("model.layers.0."))  # float32
    head = vocab * hidden * 4  # the LM head
    assert link.derivation.layer_bytes == d.layer_bytes == layer_bytes
    want = 0.08 * layer_bytes / (layers * layer_bytes + head)
    assert link.derivation.layer_seconds == pytest.approx(want, rel=1e-12)
    assert link.gbps == pytest.approx(layer_bytes / (134 * want) / 1e9, rel=1e-12)
