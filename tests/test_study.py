"""`tidal study`: the report restates the three findings from compare documents. The numbers in it are checked
against hand-computed values from synthetic documents; the CLI is checked end to end with `run_compare`
replaced by those documents (the real sweep runs in test_compare.py and in gpu_check's study smoke test)."""
import copy

import pytest

from cli_util import run_cli
from tidal import costmodel
from tidal.cli import main
from tidal.backends import LinkEmulation
from tidal.errors import ConfigError
from tidal.study import compare, emulation, report, schema
from tidal.study.document import new_document
from tidal.study.settings import ProfileSettings

LAYERS, LAYER_BYTES, TOP_BYTES = 8, 1_000_000, 200_000


def _decode(system, fraction, tps, batch=1, n=16):
    return dict(system=system, resident_fraction=fraction, resident_layers=round(fraction * LAYERS), batch=batch,
                prompt_tokens=8, output_tokens=n, decode_seconds=batch * (n - 1) / tps, tokens_per_second=tps,
                step_seconds=batch / tps, mean_context=8 + n / 2, bytes_streamed_per_step=None,
                stall_seconds_per_step=None, repeats=3, decode_seconds_min=0.9 * batch * (n - 1) / tps,
                decode_seconds_max=1.2 * batch * (n - 1) / tps, tokens_per_second_min=tps / 1.2,
                tokens_per_second_max=tps / 0.9)


def _preemption(system, weights, pipelined, context, weight_s, kv_s, total, first_token, note=None):
    row = dict(system=system, weights=weights, kv="swap", pipelined=pipelined, resident_fraction=1.0, batch=2,
               context=context, synthetic_context=system == "tidal", weight_bytes=LAYERS * LAYER_BYTES,
               weight_out_seconds=weight_s / 2, weight_in_seconds=weight_s / 2, disk_bytes=0, disk_seconds=0.0,
               kv_bytes=context * 1000, kv_out_seconds=kv_s / 2, kv_in_seconds=kv_s / 2, recompute_tokens=0,
               recompute_seconds=0.0, preempt_seconds=total / 2, resume_seconds=total / 2,
               first_token_seconds=first_token, total_seconds=total, weight_seconds=weight_s, kv_seconds=kv_s,
               repeats=2)
    if note:
        row["note"] = note
    return row


def document(spec="m1", half=0.5, step=0.01):
    """A compare document: tidal at 1.0 / 0.5 / 0 resident, accelerate slower, four preemption rows, and a
    cost model whose all-resident step is `step` seconds (a0 only)."""
    machine = dict(device="cpu", device_name="a CPU", cpu_count=2, torch_version="2", torch_threads=1,
                   native="native")
    model = dict(spec=spec, path="/x", model_type="llama", num_layers=LAYERS, layer_bytes=LAYER_BYTES,
                 top_bytes=TOP_BYTES, dtype="float32", kv_bytes_per_token=1000, max_positions=2048)
    doc = new_document(ProfileSettings.quick(), machine, model)
    doc["decode"] = [_decode("tidal", 1.0, 100.0), _decode("tidal", 0.5, 100.0 * half),
                     _decode("tidal", 0.0, 20.0), _decode("accelerate", 1.0, 100.0),
                     _decode("accelerate", 0.5, 25.0), _decode("accelerate", 0.0, 10.0)]
    doc["preemption"] = [
        _preemption("tidal", "host", False, 128, weight_s=0.9, kv_s=0.05, total=1.0, first_token=0.6),
        _preemption("tidal", "host", True, 128, weight_s=0.9, kv_s=0.05, total=0.8, first_token=0.3),
        _preemption("transformers", "host", False, 128, weight_s=1.8, kv_s=0.2, total=2.5, first_token=2.0,
                    note="moves emulated by copies"),
    ]
    fitted = costmodel.CostModel(costmodel.StepFit(LAYERS, LAYER_BYTES, step, None, None, 1e9, 0.0, 3), (), None)
    doc["costmodel"] = {"fitted": fitted.to_dict(), "holdout": {"n": 4, "median_relative_error": 0.1,
                                                                "max_relative_error": 0.3, "fraction": 0.25,
                                                                "seed": 0}, "reason": None}
    doc["links"] = dict(h2d_gbps=5.0, d2h_gbps=4.0, copy_bytes=1, copy_method="m", disk_read_gbps=1.0,
                        disk_bytes=1, disk_path="native (O_DIRECT, 2 threads)", disk_method="m")
    doc["complete"] = True
    schema.validate(doc)
    return doc


def test_report_numbers_are_the_documents():
    text = report.render([document("m1", half=0.5), document("m2", half=0.8)], {"fig": "fig.png"},
                         "tidal study m1 m2", "accelerate")
    # finding 1: normalised to tidal's all-resident run; accelerate at 25 tok/s is 0.25; sensitivity ordering
    assert "| 1 | 16 | 1.00 | 0.50 | 0.20 |" in text and "| 1 | 16 | 1.00 | 0.25 | 0.10 |" in text
    assert "keeps 0.50 of its resident speed (m1), the least 0.80 (m2)" in text
    assert "resident 0.5: 2.00x" in text  # 50 against 25 tok/s
    # finding 2: shares of the round trip, and the uninterrupted run: 128 tokens x 0.01 s = 1.28 s
    assert "| m1 | tidal | weights=host, kv=swap | 2 | 128 | 1.00 s | 90.0% | 5.0% | 78.1% |" in text
    assert "| m1 | transformers | weights=host, kv=swap | 2 | 128 | 2.50 s | 72.0% | 8.0% | - |" in text
    assert "300.0 ms pipelined against 600.0 ms reload-then-decode (0.50x)" in text
    assert "round trip 1.00 s against 2.50 s (2.50x faster)" in text
    assert "How the protocol was measured: moves emulated by copies." in text
    # finding 3 and the cost model
    assert "| m1 | 2 | 128 | 0.1 | 8.0 | 50.0 ms | 5.3% |" in text
    assert "PCIe Gen4 x16 (spec) | 31.5 | 0.3 ms |" in text  # 8.2 MB of weights at 31.5 GB/s
    assert "held-out error median 10.0%, max 30.0% over 4 samples" in text
    assert "Incomplete" not in text and "`tidal study m1 m2`" in text


def test_report_marks_incomplete_runs_and_refuses_nothing():
    doc = document()
    doc["complete"], doc["interrupted_at"] = False, "decode: resident 0.5"
    assert "**Incomplete runs:** m1 (stopped at decode: resident 0.5)" in report.render([doc], {}, "c", None)
    with pytest.raises(ConfigError, match="nothing to report"):
        report.render([], {}, "c", None)


def test_a_slower_tidal_is_called_slower():
    doc = document()
    doc["preemption"][0]["total_seconds"] = 5.0
    assert "(0.50x, slower)" in report.render([doc], {}, "c", None)


def _fake_compare(monkeypatch, interrupt_on=None):
    calls = []

    def fake(spec, settings, baseline, out_dir, device=None, dtype=None, progress=True, link=None):
        calls.append((spec, baseline))
        doc = document(spec)
        if link is not None:
            doc["link"] = emulation.describe_link(LinkEmulation(link))
        if spec == interrupt_on:
            doc = copy.deepcopy(doc)
            doc["complete"], doc["interrupted_at"], doc["preemption"] = False, "preemption: host", []
        out_dir.mkdir(parents=True, exist_ok=True)
        schema.save(doc, out_dir / compare.COMPARE_FILE)
        return doc

    monkeypatch.setattr(compare, "run_compare", fake)
    return calls


def test_study_cli_writes_the_report(tmp_path, monkeypatch, capsys):
    calls = _fake_compare(monkeypatch)
    assert main(["study", "m1", "m2", "--out", str(tmp_path), "--quick", "--no-progress"]) == 0
    assert calls == [("m1", "accelerate"), ("m2", "accelerate")]
    text = (tmp_path / report.REPORT_FILE).read_text()
    assert "`tidal study m1 m2 --out" in text and "![m1: tidal and accelerate](m1/compare.png)" in text
    assert (tmp_path / report.DEGRADATION_FIGURE).stat().st_size > 0
    assert f"report: {tmp_path / report.REPORT_FILE}" in capsys.readouterr().out


def test_an_interrupted_study_reports_what_it_measured(tmp_path, monkeypatch):
    calls = _fake_compare(monkeypatch, interrupt_on="m2")
    assert main(["study", "m1", "m2", "m3", "--out", str(tmp_path), "--no-progress"]) == 130
    assert [c[0] for c in calls] == ["m1", "m2"]  # m3 is not started
    text = (tmp_path / report.REPORT_FILE).read_text()
    assert "**Incomplete runs:** m2 (stopped at preemption: host)" in text and text.startswith("# tidal study: m1, m2\n")


@pytest.mark.parametrize("argv, message", [
    (["study"], "the following arguments are required: MODEL"),
    (["study", "m1", "--baseline", "vllm"], "invalid choice: 'vllm'"),
    (["study", "m1", "m1"], "models named twice"),
    (["study", "m1", "--threads", "0"], "--threads=0"),
])
def test_bad_arguments_exit_2_with_one_line(tmp_path, monkeypatch, argv, message):
    _fake_compare(monkeypatch)
    rc, _, err = run_cli(argv + ["--out", str(tmp_path)])
    err = err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1, err


def test_a_study_through_an_emulated_link_says_so(tmp_path, monkeypatch):
    from tidal.study import figures

    calls = _fake_compare(monkeypatch)
    titles = []
    real = figures._save

    def save(fig, path, **layout):
        titles.append([ax.get_title() for ax in fig.axes])
        return real(fig, path, **layout)

    monkeypatch.setattr(figures, "_save", save)
    assert main(["study", "m1", "m2", "--link", "2.5", "--out", str(tmp_path), "--no-progress"]) == 0
    assert [c[0] for c in calls] == ["m1", "m2"]
    text = (tmp_path / report.REPORT_FILE).read_text()
    assert "went through an emulated host<->device link (`--link`): m1: 2.5 GB/s; m2: 2.5 GB/s." in text
    assert "The baselines' moves did not" in text
    assert titles == [["decode throughput against residency, normalised to all resident\n"
                       "m1: emulated link 2.5 GB/s\nm2: emulated link 2.5 GB/s"]]
    # without one, the report says nothing of it
    _fake_compare(monkeypatch)
    assert main(["study", "m1", "--out", str(tmp_path / "plain"), "--no-progress"]) == 0
    assert "emulated host<->device link" not in (tmp_path / "plain" / report.REPORT_FILE).read_text()


def test_the_figures_show_each_cells_spread():
    from tidal.study import figures

    rows = [_decode("tidal", 1.0, 100.0), _decode("tidal", 0.5, 40.0)]
    below, above = figures.spread_bars(rows, scale=100.0)
    # tokens/s 100 between 100/1.2 and 100/0.9, over the scale 100
    assert below == pytest.approx([1 - 1 / 1.2, 0.4 - 0.4 / 1.2])
    assert above == pytest.approx([1 / 0.9 - 1, 0.4 / 0.9 - 0.4])
    old = dict(rows[0], tokens_per_second_min=None, tokens_per_second_max=None)  # a version 1 row
    assert figures.spread_bars([old]) == [[0.0], [0.0]]
