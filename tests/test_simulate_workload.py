import json
import math

import numpy as np
import pytest
from tidal.errors import ConfigError
from tidal.simulate.workload import (
    TraceRequest,
    WorkloadSpec,
    generate,
    load,
    read_azure_csv,
    read_jsonl,
    summary,
    write_jsonl,
)

MODELS = ["m0", "m1", "m2"]


def _zipf(n, s):
    # computed here independently of the module: p_i proportional to 1/(i+1)^s
    w = [1.0 / (i + 1) ** s for i in range(n)]
    return [x / sum(w) for x in w]


@pytest.fixture(scope="module")
def long_poisson():
    spec = WorkloadSpec(rate=50.0, cv=1.0, zipf=1.1, duration=2000.0, seed=7, output_max=1_000_000)
    return spec, generate(spec, MODELS)


# ------------------------------------------------------------------------------------------------ spec


def test_parse_reads_the_command_line_form_with_defaults():
    spec = WorkloadSpec.parse("rate=10,cv=1,zipf=1.1,duration=3600,seed=0")
    assert spec == WorkloadSpec(rate=10.0, cv=1.0, zipf=1.1, duration=3600.0, seed=0)
    defaults = WorkloadSpec(rate=2.0, duration=5.0, cv=1.0, zipf=1.0, seed=0)
    assert WorkloadSpec.parse("rate=2,duration=5") == defaults
    other = WorkloadSpec.parse("rate=3, duration=9,prompt_mean=256,output_sigma=0.5,prompt_max=100,lengths=a")
    got = (other.prompt_mean, other.output_sigma, other.prompt_max, other.lengths)
    assert got == (256.0, 0.5, 100, "a")


def test_parse_round_trips_format():
    spec = WorkloadSpec(rate=0.1 + 0.2, cv=2.5, zipf=0.0, duration=12.25, seed=3, prompt_mean=100.5,
                        prompt_sigma=0.0, output_mean=7.0, output_sigma=0.3, prompt_max=9, output_max=11,
                        lengths="x/y.jsonl")
    assert WorkloadSpec.parse(spec.format()) == spec
    plain = WorkloadSpec(rate=1.0, duration=2.0)
    assert WorkloadSpec.parse(plain.format()) == plain


@pytest.mark.parametrize(
    "text, names",
    [
        ("rate=1,duration=2,burst=3", "burst"),
        ("cv=1,duration=2", "rate"),
        ("rate=1", "duration"),
        ("rate=1,duration=2,cv=-1", "cv"),
        ("rate=1,duration=2,cv=0", "cv"),
        ("rate=abc,duration=2", "rate"),
        ("rate=1,duration=2,seed=1.5", "seed"),
        ("rate=1,duration=2,zipf=-0.5", "zipf"),
        ("rate=1,duration=2,rate=3", "rate"),
        ("rate=1,duration=2,lengths=", "lengths"),
    ],
)
def test_parse_errors_name_the_key(text, names):
    with pytest.raises(ConfigError, match=names):
        WorkloadSpec.parse(text)


def test_fields_are_validated():
    with pytest.raises(ConfigError, match="rate"):
        WorkloadSpec(rate=0.0, duration=1.0)
    with pytest.raises(ConfigError, match="prompt_max"):
        WorkloadSpec(rate=1.0, duration=1.0, prompt_max=0)
    with pytest.raises(ConfigError, match="time_s"):
        TraceRequest(-1.0, "m", 1, 1)
    with pytest.raises(ConfigError, match="model"):
        TraceRequest(0.0, "", 1, 1)
    with pytest.raises(ConfigError, match="output_tokens"):
        TraceRequest(0.0, "m", 1, 0)


# -------------------------------------------------------------------------------------------- generate


def test_generate_is_deterministic_per_seed_and_sorted():
    spec = WorkloadSpec(rate=20.0, duration=30.0, cv=2.0, seed=1)
    a, b = generate(spec, MODELS), generate(spec, MODELS)
    assert a == b and len(a) > 100
    c = generate(WorkloadSpec(rate=20.0, duration=30.0, cv=2.0, seed=2), MODELS)
    assert c != a
    times = [r.time_s for r in a]
    assert times == sorted(times) and times[0] == 0.0 and times[-1] < 30.0


def test_generate_rate_cv_zipf_and_lengths(long_poisson):
    spec, reqs = long_poisson
    times = np.array([r.time_s for r in reqs])
    assert abs(len(reqs) / spec.duration - spec.rate) / spec.rate < 0.05
    gaps = np.diff(times)
    assert abs(gaps.mean() - 1 / spec.rate) * spec.rate < 0.05
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.10
    counts = {m: 0 for m in MODELS}
    for r in reqs:
        counts[r.model] += 1
    for m, p in zip(MODELS, _zipf(3, 1.1)):
        assert abs(counts[m] / len(reqs) - p) / p < 0.02, (m, counts[m] / len(reqs), p)
    outputs = np.array([r.output_tokens for r in reqs])
    assert abs(outputs.mean() - spec.output_mean) / spec.output_mean < 0.05
    # the median of a lognormal is exp(mu) = mean * exp(-sigma^2 / 2)
    assert abs(np.median(outputs) / (spec.output_mean * math.exp(-0.5)) - 1) < 0.05


def test_generate_bursty_cv():
    spec = WorkloadSpec(rate=50.0, cv=3.0, duration=2000.0, seed=11)
    gaps = np.diff([r.time_s for r in generate(spec, ["only"])])
    assert abs(gaps.std() / gaps.mean() - 3.0) / 3.0 < 0.10
    assert abs(len(gaps) + 1 - spec.rate * spec.duration) / (spec.rate * spec.duration) < 0.10


def test_lengths_are_clipped_to_their_bounds():
    spec = WorkloadSpec(rate=200.0, duration=50.0, prompt_mean=300, prompt_sigma=2.0, prompt_max=400,
                        output_mean=2.0, output_sigma=2.0, output_max=50)
    reqs = generate(spec, MODELS)
    prompts = [r.prompt_tokens for r in reqs]
    outputs = [r.output_tokens for r in reqs]
    assert min(prompts) >= 1 and max(prompts) == 400
    assert min(outputs) == 1 and max(outputs) == 50


def test_zipf_zero_is_uniform_and_models_must_be_given():
    reqs = generate(WorkloadSpec(rate=100.0, duration=300.0, zipf=0.0, seed=5), MODELS)
    for m in MODELS:
        assert abs(sum(r.model == m for r in reqs) / len(reqs) - 1 / 3) < 0.01
    with pytest.raises(ConfigError, match="models"):
        generate(WorkloadSpec(rate=1.0, duration=1.0), [])


def test_empirical_lengths_file(tmp_path):
    rows = [(10, 1), (200, 30), (3000, 7)]
    path = tmp_path / "lengths.csv"
    path.write_text("prompt_tokens,output_tokens\n" + "".join(f"{p},{o}\n" for p, o in rows))
    spec = WorkloadSpec(rate=50.0, duration=40.0, seed=4, lengths=str(path))
    reqs = generate(spec, MODELS)
    seen = {(r.prompt_tokens, r.output_tokens) for r in reqs}
    assert seen == set(rows)
    jpath = tmp_path / "lengths.jsonl"
    jpath.write_text("".join(json.dumps({"prompt_tokens": p, "output_tokens": o}) + "\n" for p, o in rows))
    again = generate(WorkloadSpec(rate=50.0, duration=40.0, seed=4, lengths=str(jpath)), MODELS)
    assert again == reqs


# ----------------------------------------------------------------------------------------------- files


def test_jsonl_round_trip_is_exact(tmp_path):
    reqs = generate(WorkloadSpec(rate=30.0, duration=20.0, cv=1.5, seed=9), MODELS)
    path = tmp_path / "trace.jsonl"
    write_jsonl(path, reqs)
    assert read_jsonl(path) == reqs
    assert load(str(path), MODELS) == reqs


def test_read_jsonl_makes_times_relative_and_sorts(tmp_path):
    path = tmp_path / "t.jsonl"
    lines = [
        {"timestamp": 1000.5, "model": "a", "prompt_tokens": 5, "output_tokens": 2},
        {"timestamp": 1000.25, "model": "b", "prompt_tokens": 6, "output_tokens": 0},
        {"timestamp": 1001.0, "model": "a", "prompt_tokens": 7, "output_tokens": 3},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    assert read_jsonl(path) == [
        TraceRequest(0.0, "b", 6, 1),
        TraceRequest(0.25, "a", 5, 2),
        TraceRequest(0.75, "a", 7, 3),
    ]


@pytest.mark.parametrize(
    "bad, needle",
    [
        ("{not json", "line 3"),
        ('{"timestamp": 1, "model": "a", "prompt_tokens": 3}', "output_tokens"),
        ('{"timestamp": 1, "model": "a", "prompt_tokens": -3, "output_tokens": 1}', "prompt_tokens"),
        ('{"timestamp": "x", "model": "a", "prompt_tokens": 3, "output_tokens": 1}', "timestamp"),
        ("[1, 2]", "line 3"),
    ],
)
def test_read_jsonl_bad_line_is_named(tmp_path, bad, needle):
    good = json.dumps({"timestamp": 0.0, "model": "a", "prompt_tokens": 1, "output_tokens": 1})
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n{good}\n{bad}\n{good}\n")
    with pytest.raises(ConfigError, match="line 3") as e:
        read_jsonl(path)
    assert needle in str(e.value)


AZURE_ROWS = [
    ("2023-11-16 18:15:46.6805900", 4808, 10),
    ("2023-11-16 18:15:46.9910000", 3180, 8),
    ("2023-11-16 18:15:47.0123456", 110, 0),
    ("2023-11-16 18:15:47.5", 7433, 259),
    ("2023-11-16 18:15:59.9999999", 34, 27),
    ("2023-11-16 18:16:00.0000001", 1024, 1),
    ("2023-11-16 18:16:03", 2, 5),
]
# seconds after the first row, worked out by hand
AZURE_RELATIVE = [0.0, 0.3104100, 0.3317556, 0.8194100, 13.3194099, 13.3194101, 16.3194100]


def _azure_csv(tmp_path, rows=AZURE_ROWS):
    path = tmp_path / "azure.csv"
    body = "".join(f"{t},{c},{g}\n" for t, c, g in rows)
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + body)
    return path


def _independent_models(seed, zipf, n):
    # the rule in read_azure_csv's docstring, written out with plain Python
    u = np.random.default_rng(seed).random(n)
    cdf = np.cumsum(_zipf(len(MODELS), zipf)).tolist()
    return [MODELS[next((i for i, c in enumerate(cdf) if x < c), len(MODELS) - 1)] for x in u]


def test_azure_csv_times_tokens_and_models(tmp_path):
    path = _azure_csv(tmp_path)
    reqs = read_azure_csv(path, MODELS, zipf=1.1, seed=3)
    assert len(reqs) == len(AZURE_ROWS)
    for r, want in zip(reqs, AZURE_RELATIVE):
        assert abs(r.time_s - want) < 1e-6
    assert [(r.prompt_tokens, r.output_tokens) for r in reqs] == [(c, max(g, 1)) for _, c, g in AZURE_ROWS]
    assert [r.model for r in reqs] == _independent_models(3, 1.1, len(AZURE_ROWS))
    assert read_azure_csv(path, MODELS, zipf=1.1, seed=3) == reqs
    assignments = {tuple(r.model for r in read_azure_csv(path, MODELS, zipf=1.1, seed=s)) for s in range(6)}
    assert len(assignments) > 1
    assert load(path, MODELS, zipf=1.1, seed=3) == reqs


def test_azure_csv_float_seconds_and_errors(tmp_path):
    path = _azure_csv(tmp_path, [("100.25", 3, 4), ("101.5", 5, 6)])
    reqs = read_azure_csv(path, ["solo"])
    assert reqs == [TraceRequest(0.0, "solo", 3, 4), TraceRequest(1.25, "solo", 5, 6)]
    bad = _azure_csv(tmp_path, [("2023-11-16 18:15:46.1", 3, 4), ("yesterday", 5, 6)])
    with pytest.raises(ConfigError, match="line 3.*TIMESTAMP"):
        read_azure_csv(bad, MODELS)
    with pytest.raises(ConfigError, match="models"):
        read_azure_csv(path, [])


def test_load_dispatches_and_refuses_other_files(tmp_path):
    spec = WorkloadSpec(rate=5.0, duration=10.0, seed=2)
    assert load(spec, MODELS) == generate(spec, MODELS)
    assert load("rate=5,duration=10,seed=2", MODELS) == generate(spec, MODELS)
    with pytest.raises(ConfigError, match="trace.txt"):
        load(tmp_path / "trace.txt", MODELS)
    with pytest.raises(ConfigError, match="missing.jsonl"):
        load(tmp_path / "missing.jsonl", MODELS)


def test_summary():
    reqs = [
        TraceRequest(0.0, "a", 10, 1),
        TraceRequest(1.0, "b", 20, 3),
        TraceRequest(4.0, "a", 30, 5),
    ]
    s = summary(reqs)
    assert s == {"count": 3, "duration_s": 4.0, "rate": 0.75, "models": {"a": 2, "b": 1},
                 "mean_prompt_tokens": 20.0, "mean_output_tokens": 3.0}
    assert summary([])["count"] == 0
