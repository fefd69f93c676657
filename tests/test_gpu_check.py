import sys

from gpu_check_util import ROOT, run_section


def test_gpu_check_streaming_section_runs_on_the_cpu(tmp_path):
    """A smoke run of gpu_check's streaming section on the CPU backend (--quick), so the GPU script cannot rot
    unseen between GPU sessions."""
    res, stdout = run_section(tmp_path, "streaming")
    kinds = {(r["kind"], r["resident_fraction"]) for r in res["decode"]}
    assert ("tidal", 0.0) in kinds and ("accelerate", 0.0) in kinds
    zero = next(r for r in res["decode"] if r["kind"] == "tidal" and r["resident_fraction"] == 0.0)
    assert zero["mb_per_token"] > 0 and res["bandwidth"]["h2d_gbps"] > 0
    assert "resident" in stdout  # the table was printed


def test_gpu_check_engine_section_runs_on_the_cpu(tmp_path):
    """A smoke run of gpu_check's engine section on the CPU (--quick: one tiny checkpoint written tensor by
    tensor, resident fractions 1.0 and 0, tidal's engine and accelerate)."""
    res, stdout = run_section(tmp_path, "engine")
    rows = {(r["kind"], r["resident_fraction"]): r for r in res["decode"]}
    assert set(rows) == {("tidal", 1.0), ("tidal", 0.0), ("accelerate", 1.0), ("accelerate", 0.0)}
    assert all(r["tok_s"] > 0 for r in rows.values()), rows
    assert rows[("tidal", 1.0)]["bytes_per_step"] == 0 and rows[("tidal", 0.0)]["bytes_per_step"] > 0
    assert rows[("tidal", 0.0)]["bound_ms"] >= rows[("tidal", 0.0)]["link_ms"] > 0
    assert "of bound" in stdout  # the table was printed


def test_shaped_checkpoint_loads_alike_in_transformers_and_tidal(tmp_path):
    """bench/shaped_checkpoint.py writes tensors by hand; transformers and tidal must read them as one model
    (Llama untied, Qwen2 tied with q/k/v bias, several shards): the same greedy tokens in fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    import tidal
    sys.path.insert(0, str(ROOT / "bench"))
    from tidal.study.runs import hf_generator, same_length_prompts
    from shaped_checkpoint import TINY, write_checkpoint

    qwen = dict(TINY, model_type="qwen2", tie_word_embeddings=True, hidden_size=192, num_attention_heads=6)
    for i, shape in enumerate((TINY, qwen)):
        path = write_checkpoint(tmp_path / str(i), shape, torch.float32, layers_per_shard=3, std=0.3)
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        prompts = same_length_prompts(3, 7, shape["vocab_size"])
        with tidal.Engine.from_pretrained(path, device="cpu") as engine:
            ours = engine.generate(prompts, max_new_tokens=10)
        assert ours == hf_generator(hf, "cpu")(prompts, 10)
        assert len({t for row in ours for t in row}) > 5  # not a degenerate repetition


def test_gpu_check_preemption_section_runs_on_the_cpu(tmp_path):
    """A smoke run of gpu_check's preemption section on the CPU (--quick: a tiny checkpoint, synthetic
    contexts of 64 and 256 tokens at batch 1 and 2, pipelined against full resume at resident 0 and 0.5)."""
    res, stdout = run_section(tmp_path, "preemption")
    cells = {(r["batch"], r["context"]): r for r in res["breakdown"]}
    assert set(cells) == {(1, 64), (2, 64), (1, 256), (2, 256)}
    assert all(r["weight_bytes"] > 0 and r["reload_gbps"] > 0 and r["kv_in_gbps"] > 0
               for r in cells.values()), cells
    assert cells[(2, 256)]["kv_bytes"] == 2 * cells[(1, 256)]["kv_bytes"] == 8 * cells[(1, 64)]["kv_bytes"]
    ttft = {r["resident_fraction"]: r for r in res["ttft"]}
    assert set(ttft) == {0.0, 0.5} and all(r["ratio"] > 0 for r in ttft.values()), ttft
    assert set(res["targets"]["tiny"]) >= {"reload_target_met", "ttft_target_met"}
    assert res["bandwidth"]["h2d_gbps"] > 0 and "reload of pinned" in stdout  # the table was printed


def test_gpu_check_study_section_runs_on_the_cpu(tmp_path):
    """A smoke run of gpu_check's study section on the CPU (--quick: `tidal study tiny` on a two-fraction,
    one-batch grid): a complete report with the three findings, and the compare document it was made from."""
    res, stdout = run_section(tmp_path, "study")
    assert res["complete"] and res["models"] == ["tiny"], res
    report = (tmp_path / "study" / "REPORT.md").read_text()
    for heading in ("## 1. Offloading", "## 2. Preemption", "## 3. Context length"):
        assert heading in report and heading in stdout
    assert (tmp_path / "study" / "tiny" / "compare.json").is_file()
    assert (tmp_path / "study" / "degradation.png").stat().st_size > 0
