import ast
import json
import random
import statistics
import sys
from collections import Counter
from pathlib import Path

import pytest

from tidal import costmodel
from tidal.costmodel import (CostModel, DecodeSample, Evaluation, LinkFit, RecomputeFit, StepFit,
                             TransferSample, holdout_split)
from tidal.errors import ConfigError

# A made-up model and machine: 32 layers of 20 MB, 25 GB/s streaming, 100 us per streamed layer.
L, W = 32, 20_000_000
A0, A1, A2, BW, O = 2e-3, 1e-5, 2e-8, 25e9, 1e-4
LINKS = {"weights_host_out": (1e-3, 20e9), "weights_host_in": (5e-4, 24e9), "weights_disk_in": (2e-2, 3e9),
         "kv_swap_out": (2e-4, 18e9), "kv_swap_in": (1.5e-4, 22e9)}
R0, R1, R2 = 5e-3, 2e-5, 1e-9
RESIDENT = (32, 31, 30, 28, 24, 16, 8, 0)
BATCHES = (1, 4, 16, 64)
CONTEXTS = (128, 512, 2048)


def true_t0(b, c):
    return A0 + A1 * b + A2 * b * c


def true_step(r, b, c):
    s = L - r
    return true_t0(b, c) if s == 0 else max(true_t0(b, c), s * W / BW) + s * O


def true_transfer(kind, nbytes, tokens=0):
    if kind == "kv_recompute":
        return R0 + R1 * tokens + R2 * tokens ** 2
    latency, bw = LINKS[kind]
    return latency + nbytes / bw


def decode_grid(noise=0.0, seed=0, resident=RESIDENT, batches=BATCHES, contexts=CONTEXTS):
    rng = random.Random(seed)
    return [DecodeSample(L, r, W, b, c, true_step(r, b, c) * (1 + rng.gauss(0, noise)))
            for r in resident for b in batches for c in contexts]


def transfer_grid(noise=0.0, seed=0):
    rng = random.Random(seed)
    out = [TransferSample(kind, n, true_transfer(kind, n) * (1 + rng.gauss(0, noise)))
           for kind in LINKS for n in (1 << 20, 16 << 20, 128 << 20, 1 << 30, 4 << 30)]
    out += [TransferSample("kv_recompute", 0, true_transfer("kv_recompute", 0, t) * (1 + rng.gauss(0, noise)),
                           t) for t in (64, 256, 1024, 4096, 16384)]
    return out


def rel(a, b):
    return abs(a - b) / abs(b)


def test_module_is_pure_python():
    # the package's modules import the stdlib, each other, and from tidal only errors and modes
    files = sorted(Path(costmodel.__file__).parent.glob("*.py"))
    trees = [ast.parse(f.read_text()) for f in files]
    nodes = [n for tree in trees for n in ast.walk(tree)]
    imported = {a.name.split(".")[0] for n in nodes if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in nodes
                 if isinstance(n, ast.ImportFrom) and n.module and n.level == 0}
    from_package = {n.module for n in nodes if isinstance(n, ast.ImportFrom) and n.level == 2}
    siblings = {n.module for n in nodes if isinstance(n, ast.ImportFrom) and n.level == 1}
    assert imported <= set(sys.stdlib_module_names), imported
    assert from_package == {"errors", "modes"}
    assert siblings <= {f.stem for f in files}, siblings


def test_noise_free_profile_is_recovered_exactly():
    m = CostModel.fit(decode_grid(), transfer_grid())
    s = m.step
    for got, want in ((s.a0, A0), (s.a1, A1), (s.a2, A2), (s.stream_bandwidth, BW), (s.stream_overhead, O)):
        assert rel(got, want) < 1e-6
    for link in m.links:
        latency, bw = LINKS[link.kind]
        assert rel(link.latency, latency) < 1e-6 and rel(link.bandwidth, bw) < 1e-6
    assert all(rel(got, want) < 1e-6 for got, want in ((m.recompute.r0, R0), (m.recompute.r1, R1),
                                                       (m.recompute.r2, R2)))
    assert m.kinds == costmodel.TRANSFER_KINDS
    assert not [n for n in m.fit_notes if "identifiable" in n or "held at 0" in n], m.fit_notes


def test_noisy_profile_is_recovered_and_predicts_held_out_points():
    noise = 0.01
    fit, held = holdout_split(decode_grid(noise, seed=1) + transfer_grid(noise, seed=2), 0.25, seed=0)
    m = CostModel.fit([x for x in fit if isinstance(x, DecodeSample)],
                      [x for x in fit if isinstance(x, TransferSample)])
    # Bounds that hold for 99% of seeds (checked over 200): the terms that weigh little in the times they are
    # fitted from (a1, o, a2 at short contexts) carry more of the noise.
    s = m.step
    assert rel(s.a0, A0) < 0.02 and rel(s.stream_bandwidth, BW) < 0.04
    assert rel(s.a2, A2) < 0.1 and rel(s.a1, A1) < 0.15 and rel(s.stream_overhead, O) < 0.3
    for link in m.links:
        assert rel(link.bandwidth, LINKS[link.kind][1]) < 0.025
    decode = [x for x in held if isinstance(x, DecodeSample)]
    ev = m.evaluate(decode, [x for x in held if isinstance(x, TransferSample)])
    assert ev.n == len(held) > 20
    assert ev.median_relative_error < 1.5 * noise
    assert ev.to_dict()["decode"]["max_relative_error"] < 5 * noise
    # against the noise-free truth the fit is typically closer than the noise
    truth = [rel(m.predict_step(x.resident_layers, x.batch, x.context),
                 true_step(x.resident_layers, x.batch, x.context)) for x in decode]
    assert statistics.median(truth) < noise and max(truth) < 5 * noise


def test_link_bound_and_compute_bound_regimes_are_both_in_the_data_and_predicted():
    samples = decode_grid()
    streamed = [x for x in samples if x.streamed_layers]
    link = [x for x in streamed if x.streamed_layers * W / BW > true_t0(x.batch, x.context)]
    assert link and len(link) < len(streamed)
    m = CostModel.fit(samples, [])
    assert any("58 link-bound and 26 compute-bound" in n for n in m.fit_notes), m.fit_notes
    # points off the grid, one of each regime
    for r, b, c in ((30, 48, 1500), (29, 2, 100), (12, 8, 300), (20, 64, 4000)):
        assert rel(m.predict_step(r, b, c), true_step(r, b, c)) < 1e-9
    assert (L - 30) * W / BW < true_t0(48, 1500)  # compute-bound: the copy hides, o remains
    assert (L - 12) * W / BW > true_t0(8, 300)  # link-bound


def test_one_context_drops_a2_and_one_batch_drops_a1():
    m = CostModel.fit(decode_grid(resident=(32, 24), contexts=(512,)), [])
    assert m.step.a2 is None and m.step.a1 is not None
    assert any("a2" in n and "not identifiable" in n for n in m.fit_notes)
    assert rel(m.predict_step(32, 8, 512), true_t0(8, 512)) < 1e-9  # a1 absorbs a2 at the context measured
    m = CostModel.fit(decode_grid(resident=(32,), batches=(4,)), [])
    assert m.step.a1 is None and m.step.a2 is not None
    assert any("a1" in n and "not identifiable" in n for n in m.fit_notes)
    assert rel(m.predict_step(32, 4, 100), true_t0(4, 100)) < 1e-9
    with pytest.raises(ConfigError, match="streamed"):  # no streamed samples: nothing known about streaming
        m.predict_step(31, 4, 100)


def test_no_all_resident_samples_is_noted_and_predicting_raises():
    m = CostModel.fit(decode_grid(resident=(16, 8)), [])
    assert m.step.a0 is None and m.step.stream_bandwidth is None
    assert any("no all-resident" in n for n in m.fit_notes)
    with pytest.raises(ConfigError, match="all-resident"):
        m.predict_step(16, 1, 128)


def test_only_link_bound_streaming_fixes_o_at_zero():
    m = CostModel.fit(decode_grid(resident=(32, 8, 0)), [])
    assert m.step.stream_overhead == 0.0
    assert any("o fixed at 0" in n for n in m.fit_notes)
    per_layer = W / BW + O  # what the samples do identify
    assert rel(W / m.step.stream_bandwidth, per_layer) < 1e-9
    assert rel(m.predict_step(4, 16, 512), true_step(4, 16, 512)) < 1e-9


def test_only_compute_bound_streaming_bounds_the_bandwidth():
    samples = decode_grid(resident=(32, 31), batches=(16, 64), contexts=(2048,))
    m = CostModel.fit(samples, [])
    assert any("only bounded below" in n for n in m.fit_notes)
    assert rel(m.step.stream_overhead, O) < 1e-6
    assert m.step.stream_bandwidth <= BW  # the pessimistic end of what the samples allow
    for x in samples:
        assert rel(m.predict_step(x.resident_layers, x.batch, x.context), x.step_seconds) < 1e-9


def test_a_single_streamed_configuration_is_noted_as_ambiguous():
    samples = decode_grid(resident=(32,)) + decode_grid(resident=(24,), batches=(4,), contexts=(512,))
    m = CostModel.fit(samples, [])
    assert any("cannot tell a link-bound step from a compute-bound one" in n for n in m.fit_notes)
    assert rel(m.predict_step(24, 4, 512), true_step(24, 4, 512)) < 1e-9


def test_unidentifiable_transfer_terms_are_noted():
    one_size = [TransferSample("kv_swap_in", 1 << 20, 1e-3), TransferSample("kv_swap_in", 1 << 20, 1.2e-3)]
    two_counts = [TransferSample("kv_recompute", 0, 0.01, 100), TransferSample("kv_recompute", 0, 0.03, 300)]
    empty = [TransferSample("kv_swap_out", 0, 1e-5)]
    m = CostModel.fit([], one_size + two_counts + empty)
    swap_in, swap_out = (next(l for l in m.links if l.kind == k) for k in ("kv_swap_in", "kv_swap_out"))
    assert swap_in.latency == 0  # through the origin, least squares on relative residuals:
    inv = [(1 << 20) / x.seconds for x in one_size]
    assert rel(swap_in.bandwidth, sum(v * v for v in inv) / sum(inv)) < 1e-9
    assert m.recompute.r2 is None and rel(m.predict_transfer("kv_recompute", tokens=200), 0.02) < 1e-9
    assert swap_out.bandwidth is None and rel(swap_out.latency, 1e-5) < 1e-9
    with pytest.raises(ConfigError, match="only empty"):
        m.predict_transfer("kv_swap_out", 1000)
    for what in ("kv_swap_in: latency", "kv_recompute: r2", "kv_swap_out: per_byte"):
        assert any(n.startswith(what) and "not identifiable" in n for n in m.fit_notes), (what, m.fit_notes)


def test_negative_coefficients_are_held_at_zero():
    # seconds falling with size: no non-negative line fits; the per-byte term stays, the latency goes
    falling = [TransferSample("kv_swap_in", 1000, 2e-3), TransferSample("kv_swap_in", 2000, 1e-3)]
    m = CostModel.fit([], falling)
    link = m.links[0]
    assert link.latency == 0 and link.bandwidth > 0
    assert any("latency" in n and "held at 0" in n for n in m.fit_notes)


def test_samples_of_different_models_raise():
    other = DecodeSample(L, L, W * 2, 1, 128, 0.01)
    with pytest.raises(ConfigError, match="more than one model"):
        CostModel.fit(decode_grid() + [other], [])
    with pytest.raises(ConfigError, match="more than one model"):
        CostModel.fit(decode_grid() + [DecodeSample(L + 1, 0, W, 1, 128, 0.01)], [])


def test_a_kind_never_measured_raises_naming_it():
    measured = [x for x in transfer_grid() if x.kind not in ("kv_swap_in", "kv_recompute")]
    m = CostModel.fit(decode_grid(), measured)
    with pytest.raises(ConfigError, match="kv_swap_in"):
        m.predict_transfer("kv_swap_in", 100)
    with pytest.raises(ConfigError, match="kv_swap_in"):
        m.predict_resume(1 << 30, 1 << 20)
    with pytest.raises(ConfigError, match="kv_recompute"):
        m.predict_resume(1 << 30, 0, kv="recompute", recompute_tokens=100)
    with pytest.raises(ConfigError, match="kind"):
        m.predict_transfer("weights_tape_in", 100)
    assert m.predict_resume(1 << 30, 0)["kv"] == 0.0  # no bytes: no transfer to predict


def test_preempt_and_resume_predictions():
    m = CostModel.fit(decode_grid(), transfer_grid())
    wb, kb = 3 << 30, 1 << 30
    p = m.predict_preempt(wb, kb, "host", "swap")
    assert rel(p["weights"], true_transfer("weights_host_out", wb)) < 1e-9
    assert rel(p["total"], p["weights"] + true_transfer("kv_swap_out", kb)) < 1e-9
    assert m.predict_preempt(wb, kb, "disk", "recompute") == {"weights": 0.0, "kv": 0.0, "total": 0.0}

    step = true_step(24, 8, 1024)
    r = m.predict_resume(wb, kb, "host", "swap", resident_layers=24, batch=8, context=1024)
    w_in, kv_in = true_transfer("weights_host_in", wb), true_transfer("kv_swap_in", kb)
    assert rel(r["total"], w_in + kv_in) < 1e-9 and r["recompute"] == 0.0
    assert rel(r["first_token"], w_in + kv_in + step) < 1e-9
    p = m.predict_resume(wb, kb, "host", "swap", pipelined=True, resident_layers=24, batch=8, context=1024)
    first = true_transfer("weights_host_in", W)
    assert rel(p["first_token"], kv_in + first + max(step, w_in - first)) < 1e-9
    assert p["first_token"] < r["first_token"] and p["total"] == r["total"]

    d = m.predict_resume(wb, 0, "disk", "recompute", recompute_tokens=1000, pipelined=True)
    rec = true_transfer("kv_recompute", 0, 1000)
    assert rel(d["first_token"], true_transfer("weights_disk_in", wb) + rec) < 1e-9  # disk: not pipelined
    assert m.predict_resume(wb, kb, "keep", "swap", batch=0)["first_token"] is None
    with pytest.raises(ConfigError, match="weights"):
        m.predict_resume(wb, kb, "tape")


def test_round_trip_through_json():
    m = CostModel.fit(decode_grid(0.01), transfer_grid(0.01)[:-2] + [TransferSample("kv_swap_in", 5, 1e-4)])
    back = CostModel.from_dict(json.loads(json.dumps(m.to_dict(), allow_nan=False)))
    assert back == m and back.to_dict()["version"] == costmodel.VERSION
    partial = CostModel.fit(decode_grid(resident=(16,)), [])
    assert CostModel.from_dict(json.loads(json.dumps(partial.to_dict()))) == partial
    for s in decode_grid()[:3] + transfer_grid()[-2:]:
        assert type(s).from_dict(json.loads(json.dumps(s.to_dict()))) == s
    bad = m.to_dict() | {"version": 99}
    with pytest.raises(ConfigError, match="version"):
        CostModel.from_dict(bad)
    with pytest.raises(ConfigError, match="unknown keys"):
        CostModel.from_dict(m.to_dict() | {"extra": 1})
    with pytest.raises(ConfigError, match="bandwidth"):
        CostModel.from_dict(m.to_dict() | {"links": [{"kind": "kv_swap_in", "latency": 0, "bandwidth": -1,
                                                      "samples": 1}]})


def test_evaluate_statistics_by_hand():
    step = StepFit(4, 100, 1.0, None, None, None, None, 3)  # 1 s whatever the batch and context
    m = CostModel(step, (LinkFit("kv_swap_in", 0.0, 100.0, 2),), None)  # 1 s per 100 bytes
    decode = [DecodeSample(4, 4, 100, 1, 0, t) for t in (0.8, 1.25, 2.0)]  # predicted 1.0 each
    transfers = [TransferSample("kv_swap_in", 100, 0.5)]  # predicted 1.0
    ev = m.evaluate(decode, transfers)
    assert ev.decode_errors == pytest.approx((0.25, -0.2, -0.5))
    assert ev.transfer_errors == pytest.approx((1.0,))
    assert ev.n == 4
    assert ev.median_relative_error == pytest.approx(0.375)  # |errors| 0.2, 0.25, 0.5, 1.0
    assert ev.max_relative_error == pytest.approx(1.0)
    d = json.loads(json.dumps(ev.to_dict()))
    assert d["decode"] == {"n": 3, "median_relative_error": pytest.approx(0.25), "max_relative_error": 0.5}
    with pytest.raises(ConfigError):
        m.evaluate([], [])
    with pytest.raises(ConfigError):
        Evaluation((), ()).median_relative_error


def test_holdout_split_is_deterministic_disjoint_and_covering():
    samples = decode_grid() + transfer_grid()
    fit, held = holdout_split(samples, 0.25, seed=3)
    assert (fit, held) == holdout_split(samples, 0.25, seed=3)
    assert holdout_split(samples, 0.25, seed=4) != (fit, held)
    assert Counter(fit) + Counter(held) == Counter(samples) and not set(fit) & set(held)
    assert abs(len(held) - 0.25 * len(samples)) <= 7  # one rounding per stratum
    assert [s for s in samples if s in set(fit)] == list(fit)  # input order kept
    assert holdout_split(samples, 0.0) == (tuple(samples), ())


def test_holdout_split_keeps_what_the_fit_needs():
    # 3 all-resident points identify a0, a1, a2 only together; two sizes per link, two points in a stratum
    samples = ([DecodeSample(L, L, W, b, c, true_step(L, b, c)) for b, c in ((1, 128), (4, 128), (4, 512))]
               + [DecodeSample(L, 0, W, 1, 128, true_step(0, 1, 128)), DecodeSample(L, 0, W, 4, 128, 1.0)]
               + [TransferSample("kv_swap_in", n, true_transfer("kv_swap_in", n))
                  for n in (1000, 2000, 2000)])
    for seed in range(20):
        fit, held = holdout_split(samples, 0.5, seed=seed)
        assert all(s in fit for s in samples[:5])
        assert {s.nbytes for s in fit if isinstance(s, TransferSample)} == {1000, 2000}
        assert len(held) == 1
    with pytest.raises(ConfigError, match="fraction"):
        holdout_split(samples, 1.0)
    with pytest.raises(ConfigError, match="neither"):
        holdout_split([1, 2])


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_layers=0), "num_layers"), (dict(resident_layers=33), "resident_layers"),
    (dict(layer_bytes=1.5), "layer_bytes"), (dict(batch=0), "batch"), (dict(context=-1), "context"),
    (dict(step_seconds=0.0), "step_seconds"), (dict(step_seconds=float("nan")), "step_seconds"),
    (dict(batch=True), "batch"),
])
def test_decode_sample_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        DecodeSample(**(dict(num_layers=L, resident_layers=L, layer_bytes=W, batch=1, context=1,
                             step_seconds=0.01) | kwargs))


def test_transfer_sample_and_fit_validation():
    with pytest.raises(ConfigError, match="kind"):
        TransferSample("weights_tape_in", 1, 1.0)
    with pytest.raises(ConfigError, match="tokens"):
        TransferSample("kv_swap_in", 1, 1.0, tokens=5)
    with pytest.raises(ConfigError, match="seconds"):
        TransferSample("kv_swap_in", 1, -1.0)
    with pytest.raises(ConfigError, match="no samples"):
        CostModel.fit([], [])
    with pytest.raises(ConfigError, match="TransferSample"):
        CostModel.fit([], [("kv_swap_in", 1, 1.0)])
    m = CostModel.fit(decode_grid(), [])
    with pytest.raises(ConfigError, match="resident_layers"):
        m.predict_step(L + 1, 1, 1)
    with pytest.raises(ConfigError, match="batch"):
        m.predict_step(L, 0, 1)
    with pytest.raises(ConfigError, match="r0"):
        RecomputeFit(-1.0, None, None, 1)


def test_seconds_all_is_seconds_at_every_residency():
    """`StepFit.seconds_all` (one validation for a model's every residency, which the cost policy asks for)
    equals `seconds` at each, with None where `seconds` raises for want of a streaming fit; and the cost
    policy's `Pricing.steps` equals `Pricing.step` at each."""
    from tidal.policy import ModelState, ModelView
    from tidal.scheduler.pricing import Pricing
    from tidal.scheduler.state import ModelSnapshot

    rng = random.Random(3)
    for _ in range(50):
        layers = rng.randint(1, 40)
        fit = StepFit(layers, rng.randint(1, 10 ** 7), rng.random() * 0.01, rng.random() * 1e-3,
                      rng.choice([None, rng.random() * 1e-6]), rng.uniform(1e8, 1e11), rng.random() * 1e-4, 5)
        batch, context = rng.randint(1, 64), rng.randint(0, 4096)
        assert fit.seconds_all(batch, context) == [fit.seconds(r, batch, context) for r in range(layers + 1)]
        cm = CostModel(fit, (), None)
        view = ModelView("m", ModelState.ACTIVE, 0, 0, 0, 0)
        m = ModelSnapshot(view, 1.0, rng.randint(0, 5), rng.randint(0, 5), context=context, num_layers=layers,
                          layer_bytes=fit.layer_bytes)
        pricing = Pricing()
        pricing.correction.observe("m", "step_streamed", 1.0, 1.5)  # a correction for streamed steps only
        assert pricing.steps(cm, m) == [pricing.step(cm, m, r) for r in range(layers + 1)]
    resident_only = StepFit(3, 100, 0.01, None, None, None, None, 2)
    assert resident_only.seconds_all(1, 0) == [None, None, None, 0.01]
    with pytest.raises(ConfigError, match="streamed layers"):
        resident_only.seconds(2, 1, 0)
    with pytest.raises(ConfigError, match="all-resident"):
        StepFit(3, 100, None, None, None, 1e9, 0.0, 2).seconds_all(1, 0)


def test_a_prefill_streams_the_layers_that_are_not_resident():
    """`predict_prefill`: the recompute fit (a prefill measured all-resident) in place of T0 in the step's
    streaming formula, checked by hand on random fits; a decode step of one sequence without a recompute fit."""
    rng = random.Random(7)
    for _ in range(50):
        layers, layer_bytes = rng.randint(1, 40), rng.randint(1, 10 ** 7)
        bandwidth, overhead = rng.uniform(1e8, 1e11), rng.random() * 1e-4
        fit = StepFit(layers, layer_bytes, rng.random() * 0.01, rng.random() * 1e-3, None, bandwidth, overhead, 5)
        recompute = RecomputeFit(rng.random() * 1e-3, rng.random() * 1e-4, rng.choice([None, 1e-8]), 4)
        cm = CostModel(fit, (), recompute)
        tokens, resident = rng.randint(1, 3000), rng.randint(0, layers)
        p, s = recompute.seconds(tokens), layers - resident
        expected = p if s == 0 else max(p, s * layer_bytes / bandwidth) + s * overhead
        assert cm.predict_prefill(resident, tokens) == pytest.approx(expected, rel=1e-12)
        assert cm.predict_prefill(layers, tokens) == pytest.approx(cm.predict_transfer("kv_recompute", tokens=tokens))
        assert CostModel(fit, (), None).predict_prefill(resident, tokens) == fit.seconds(resident, 1, tokens)
    with pytest.raises(ConfigError, match="resident_layers"):
        cm.predict_prefill(layers + 1, 10)
    with pytest.raises(ConfigError, match="streamed layers"):  # no streaming fit: a streamed prefill is unknown
        CostModel(StepFit(3, 100, 0.01, None, None, None, None, 2), (), recompute).predict_prefill(1, 10)
