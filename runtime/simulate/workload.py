"""Workloads for the trace-driven simulator: synthetic request streams and recorded traces.

A workload is a list of `TraceRequest`s sorted by arrival time, with times in seconds relative to the first
request (which arrives at 0). It comes from one of:

- `generate(spec, models)`: a synthetic stream described by a `WorkloadSpec` (Gamma-distributed inter-arrival
  gaps of a given rate and coefficient of variation, Zipf model popularity, lognormal or empirical lengths);
  `WorkloadSpec.parse("rate=10,cv=1,zipf=1.1,duration=3600,seed=0")` reads the command-line form.
- `read_jsonl(path)` / `write_jsonl(path, requests)`: one JSON object per line with the keys `timestamp`,
  `model`, `prompt_tokens` and `output_tokens`.
- `read_azure_csv(path, models)`: the Azure LLM inference trace (AzurePublicDataset), which has no model
  column; its docstring states how models are assigned.

`load(path_or_spec, models)` picks one of these; `summary(requests)` describes a workload.
Pure Python and numpy: no torch.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime
import decimal
import json
import math
import numbers
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Union

import numpy as np

from ..errors import ConfigError

__all__ = [
    "TraceRequest",
    "WorkloadSpec",
    "generate",
    "load",
    "read_azure_csv",
    "read_jsonl",
    "summary",
    "write_jsonl",
    "zipf_probabilities",
]

PathLike = Union[str, "os.PathLike[str]"]


# ----------------------------------------------------------------------------------------------- validation


def _is_real(x: object) -> bool:
    # bool is an Integral, but True as a rate or a time is always a mistake
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_real(name: str, value: object, *, low: float, strict: bool) -> None:
    if not _is_real(value) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if (value <= low) if strict else (value < low):
        raise ConfigError(f"{name} must be {'>' if strict else '>='} {low}, got {value!r}")


def _check_int(name: str, value: object, *, low: int) -> None:
    if not _is_int(value):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if value < low:
        raise ConfigError(f"{name} must be >= {low}, got {value!r}")


# ---------------------------------------------------------------------------------------------- data types


@dataclasses.dataclass(frozen=True)
class TraceRequest:
    """One request of a workload: its arrival time (seconds from the first request), the model it asks for and
    its prompt and output lengths in tokens."""

    time_s: float
    model: str
    prompt_tokens: int
    output_tokens: int

    def __post_init__(self):
        _check_real("time_s", self.time_s, low=0.0, strict=False)
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError(f"model must be a non-empty string, got {self.model!r}")
        _check_int("prompt_tokens", self.prompt_tokens, low=1)
        _check_int("output_tokens", self.output_tokens, low=1)


_REQUIRED_KEYS = ("rate", "duration")
_FLOAT_KEYS = ("rate", "cv", "zipf", "duration", "prompt_mean", "prompt_sigma", "output_mean", "output_sigma")
_INT_KEYS = ("seed", "prompt_max", "output_max")
_STR_KEYS = ("lengths",)


@dataclasses.dataclass(frozen=True)
class WorkloadSpec:
    """A synthetic workload for `generate`.

    rate: mean arrival rate in requests/s (> 0). cv: coefficient of variation of the inter-arrival gaps (> 0;
    1 is a Poisson process, larger is burstier). zipf: the Zipf exponent s >= 0 of model popularity, the i-th
    model given (0-based) having probability proportional to 1/(i+1)^s. duration: seconds (> 0). seed: the
    seed of the one `numpy.random.default_rng` everything is drawn from.

    Lengths are lognormal with the given mean and sigma (so mu = ln(mean) - sigma^2/2), rounded and clipped to
    [1, max]; or, with `lengths` set to a JSONL or CSV file with columns prompt_tokens,output_tokens, each
    request takes a row drawn uniformly from that file (its values used as they are, 0 read as 1).
    """

    rate: float
    duration: float
    cv: float = 1.0
    zipf: float = 1.0
    seed: int = 0
    prompt_mean: float = 512.0
    prompt_sigma: float = 1.0
    output_mean: float = 128.0
    output_sigma: float = 1.0
    prompt_max: int = 4096
    output_max: int = 1024
    lengths: str | None = None

    def __post_init__(self):
        _check_real("rate", self.rate, low=0.0, strict=True)
        _check_real("duration", self.duration, low=0.0, strict=True)
        _check_real("cv", self.cv, low=0.0, strict=True)
        _check_real("zipf", self.zipf, low=0.0, strict=False)
        _check_int("seed", self.seed, low=0)  # default_rng refuses negative seeds
        _check_real("prompt_mean", self.prompt_mean, low=0.0, strict=True)
        _check_real("output_mean", self.output_mean, low=0.0, strict=True)
        _check_real("prompt_sigma", self.prompt_sigma, low=0.0, strict=False)
        _check_real("output_sigma", self.output_sigma, low=0.0, strict=False)
        _check_int("prompt_max", self.prompt_max, low=1)
        _check_int("output_max", self.output_max, low=1)
        if self.lengths is not None and not (isinstance(self.lengths, str) and self.lengths):
            raise ConfigError(f"lengths must be a non-empty path string or None, got {self.lengths!r}")

    @classmethod
    def parse(cls, text: str) -> WorkloadSpec:
        """Read the command-line form `rate=10,cv=1,zipf=1.1,duration=3600,seed=0` (any field may be given;
        rate and duration are required). Raises ConfigError naming an unknown, repeated or missing key or a
        value that is not a number."""
        if not isinstance(text, str):
            raise ConfigError(f"workload spec must be a string, got {text!r}")
        values: dict[str, object] = {}
        for item in text.split(","):
            item = item.strip()
            if not item:
                continue
            key, sep, raw = item.partition("=")
            key, raw = key.strip(), raw.strip()
            if not sep:
                raise ConfigError(f"workload spec item {item!r} is not key=value")
            if key in values:
                raise ConfigError(f"workload spec key {key!r} given twice")
            values[key] = _parse_value(key, raw)
        missing = [k for k in _REQUIRED_KEYS if k not in values]
        if missing:
            raise ConfigError(f"workload spec {text!r} lacks required key(s) {', '.join(missing)}")
        return cls(**values)

    def format(self) -> str:
        """The command-line form of this spec; `WorkloadSpec.parse(spec.format()) == spec`."""
        parts = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None:
                text = repr(value) if field.name in _FLOAT_KEYS else str(value)  # repr: floats round-trip
                parts.append(f"{field.name}={text}")
        return ",".join(parts)


def _parse_value(key: str, raw: str) -> object:
    if key in _FLOAT_KEYS:
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"workload spec key {key!r}: {raw!r} is not a number") from None
    if key in _INT_KEYS:
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"workload spec key {key!r}: {raw!r} is not an integer") from None
    if key in _STR_KEYS:
        if not raw:
            raise ConfigError(f"workload spec key {key!r} has an empty value")
        return raw
    known = ", ".join(f.name for f in dataclasses.fields(WorkloadSpec))
    raise ConfigError(f"unknown workload spec key {key!r} (known: {known})")


# ---------------------------------------------------------------------------------------------- generation


def zipf_probabilities(n: int, s: float) -> np.ndarray:
    """The Zipf popularity of `n` models with exponent `s`: p_i = (i+1)^-s / sum_j (j+1)^-s, i = 0..n-1."""
    _check_int("number of models", n, low=1)
    _check_real("zipf", s, low=0.0, strict=False)
    weights = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** s
    return weights / weights.sum()


def _check_models(models: object) -> list[str]:
    if isinstance(models, str) or not isinstance(models, Iterable):
        raise ConfigError(f"models must be a list of model names, got {models!r}")
    models = list(models)
    if not models:
        raise ConfigError("models must name at least one model")
    for m in models:
        if not isinstance(m, str) or not m:
            raise ConfigError(f"models: {m!r} is not a non-empty model name")
    return models


def _pick_models(rng: np.random.Generator, models: list[str], s: float, n: int) -> list[str]:
    # Inverse CDF on one uniform per request, so the rule is simple to state and to reproduce elsewhere.
    cdf = np.cumsum(zipf_probabilities(len(models), s))
    cdf[-1] = 1.0  # rounding must not leave a sliver above the last model
    idx = np.searchsorted(cdf, rng.random(n), side="right")
    return [models[i] for i in np.minimum(idx, len(models) - 1).tolist()]


def _arrival_times(rng: np.random.Generator, spec: WorkloadSpec) -> np.ndarray:
    # Gamma(k, theta) with k = 1/cv^2, theta = 1/(rate k) has mean 1/rate and coefficient of variation cv.
    shape = 1.0 / spec.cv**2
    scale = 1.0 / (spec.rate * shape)
    # The chunk size depends only on the spec, so the draws (and the result) depend only on the seed.
    chunk = int(min(max(1024, math.ceil(spec.rate * spec.duration * 1.05) + 64), 1 << 20))
    pieces, last = [np.zeros(1)], 0.0  # the first request arrives at 0, as in traces read from files
    while last < spec.duration:
        times = last + np.cumsum(rng.gamma(shape, scale, size=chunk))
        pieces.append(times)
        last = float(times[-1])
    times = np.concatenate(pieces)
    return times[times < spec.duration]


def _lognormal_lengths(rng: np.random.Generator, mean: float, sigma: float, high: int, n: int) -> np.ndarray:
    mu = math.log(mean) - sigma**2 / 2.0  # so that E[X] = exp(mu + sigma^2/2) = mean
    return np.clip(np.rint(rng.lognormal(mu, sigma, size=n)), 1, high).astype(np.int64)


def generate(spec: WorkloadSpec, models: list[str]) -> list[TraceRequest]:
    """The requests of `spec` over `models`, sorted by time, the first at 0 and all before `spec.duration`.

    Everything comes from one `numpy.random.default_rng(spec.seed)`, drawn in this order: the inter-arrival
    gaps (Gamma, shape 1/cv^2, scale 1/(rate*shape)), one uniform per request picking its model by inverse CDF
    of the Zipf popularity (`zipf_probabilities`), then the prompt lengths and the output lengths (or the row
    indices into the `lengths` file). The same spec and models give the same requests.
    """
    if not isinstance(spec, WorkloadSpec):
        raise ConfigError(f"spec must be a WorkloadSpec, got {spec!r}")
    models = _check_models(models)
    rng = np.random.default_rng(spec.seed)
    times = _arrival_times(rng, spec)
    n = len(times)
    names = _pick_models(rng, models, spec.zipf, n)
    if spec.lengths is None:
        prompts = _lognormal_lengths(rng, spec.prompt_mean, spec.prompt_sigma, spec.prompt_max, n)
        outputs = _lognormal_lengths(rng, spec.output_mean, spec.output_sigma, spec.output_max, n)
    else:
        table = _read_lengths(spec.lengths)
        rows = table[rng.integers(0, len(table), size=n)]
        prompts, outputs = rows[:, 0], rows[:, 1]
    return [
        TraceRequest(t, m, p, o)
        for t, m, p, o in zip(times.tolist(), names, prompts.tolist(), outputs.tolist())
    ]


# --------------------------------------------------------------------------------------------------- files


def _open(path: PathLike, mode: str = "r"):
    try:
        return open(path, mode, newline="" if _suffix(path) == ".csv" else None, encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot open workload file {os.fspath(path)!r}: {e.strerror or e}") from None


def _suffix(path: PathLike) -> str:
    return Path(os.fspath(path)).suffix.lower()


def _tokens(value: object, where: str, key: str) -> int:
    # A token count read from a file: an integer >= 0, also as an integral float or a string. 0 is read as 1
    # because a trace row with no generated tokens still occupies a request (a prefill and one step).
    if isinstance(value, str):
        try:
            value = float(value.strip()) if any(c in value for c in ".eE") else int(value.strip())
        except ValueError:
            raise ConfigError(f"{where}: {key} {value!r} is not an integer") from None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not _is_int(value) or value < 0:
        raise ConfigError(f"{where}: {key} must be an integer >= 0, got {value!r}")
    return max(1, int(value))


def _read_lengths(path: str) -> np.ndarray:
    # Azure's column names are accepted too, so a trace can serve as an empirical length distribution.
    aliases = {
        "prompt_tokens": ("prompt_tokens", "ContextTokens"),
        "output_tokens": ("output_tokens", "GeneratedTokens"),
    }
    rows = []
    for where, record in _records(path):
        pair = []
        for key, names in aliases.items():
            name = next((k for k in names if k in record), None)
            if name is None:
                raise ConfigError(f"{where}: lengths file lacks {key}")
            pair.append(_tokens(record[name], where, name))
        rows.append(pair)
    if not rows:
        raise ConfigError(f"lengths file {path!r} has no rows")
    return np.asarray(rows, dtype=np.int64)


def _records(path: PathLike):
    # (location, dict) for each row of a JSONL or CSV file; the location "path:line N" goes into errors.
    suffix, name = _suffix(path), os.fspath(path)
    if suffix not in (".jsonl", ".csv"):
        raise ConfigError(f"{name!r}: expected a .jsonl or .csv file")
    with _open(path) as f:
        if suffix == ".jsonl":
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield f"{name}:line {lineno}", _json_object(line, f"{name}:line {lineno}")
        else:
            reader = csv.DictReader(f)
            for row in reader:
                yield f"{name}:line {reader.line_num}", row


def _json_object(line: str, where: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def read_jsonl(path: PathLike) -> list[TraceRequest]:
    """Read a JSONL trace: one object per line with `timestamp` (seconds), `model`, `prompt_tokens` and
    `output_tokens`; blank lines are skipped. Times are made relative to the earliest request and the requests
    sorted by time (ties keep file order). A bad line raises ConfigError naming its line number."""
    if _suffix(path) != ".jsonl":
        raise ConfigError(f"{os.fspath(path)!r}: read_jsonl expects a .jsonl file")
    stamps, rest = [], []
    for where, record in _records(path):
        for key in ("timestamp", "model", "prompt_tokens", "output_tokens"):
            if key not in record:
                raise ConfigError(f"{where}: missing key {key!r}")
        stamp, model = record["timestamp"], record["model"]
        if not _is_real(stamp) or not math.isfinite(stamp):
            raise ConfigError(f"{where}: timestamp must be a finite number of seconds, got {stamp!r}")
        if not isinstance(model, str) or not model:
            raise ConfigError(f"{where}: model must be a non-empty string, got {model!r}")
        stamps.append(float(stamp))
        rest.append((model, _tokens(record["prompt_tokens"], where, "prompt_tokens"),
                     _tokens(record["output_tokens"], where, "output_tokens")))
    return _relative(stamps, rest)


def _relative(stamps: list, rest: list[tuple[str, int, int]]) -> list[TraceRequest]:
    if not stamps:
        return []
    first = min(stamps)
    order = sorted(range(len(stamps)), key=stamps.__getitem__)  # stable: ties keep file order
    return [TraceRequest(float(stamps[i] - first), *rest[i]) for i in order]


def write_jsonl(path: PathLike, requests: Iterable[TraceRequest]) -> None:
    """Write `requests` as a JSONL trace that `read_jsonl` reads back exactly (floats are written in full)."""
    requests = list(requests)
    for r in requests:
        if not isinstance(r, TraceRequest):
            raise ConfigError(f"write_jsonl takes TraceRequests, got {r!r}")
    with _open(path, "w") as f:
        for r in requests:
            record = {"timestamp": r.time_s, "model": r.model, "prompt_tokens": r.prompt_tokens,
                      "output_tokens": r.output_tokens}
            f.write(json.dumps(record) + "\n")


_EPOCH = datetime.datetime(1970, 1, 1)


def _azure_time(text: str, where: str) -> decimal.Decimal:
    # Decimal keeps 100 ns resolution exact: a float of seconds since 1970 only resolves ~0.2 us.
    text = text.strip()
    try:
        return decimal.Decimal(text) if _looks_numeric(text) else _datetime_seconds(text)
    except (ValueError, decimal.InvalidOperation):
        raise ConfigError(f"{where}: TIMESTAMP {text!r} is neither a date-time nor seconds") from None


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return math.isfinite(float(text))


def _datetime_seconds(text: str) -> decimal.Decimal:
    whole, _, frac = text.replace("T", " ").partition(".")
    frac = frac.rstrip("Z")
    if frac and not frac.isdigit():
        raise ValueError(text)
    stamp = datetime.datetime.strptime(whole, "%Y-%m-%d %H:%M:%S")
    seconds = (stamp - _EPOCH) // datetime.timedelta(seconds=1)
    return decimal.Decimal(seconds) + (decimal.Decimal("0." + frac) if frac else 0)


def read_azure_csv(path: PathLike, models: list[str], zipf: float = 1.0, seed: int = 0) -> list[TraceRequest]:
    """Read an Azure LLM inference trace (AzurePublicDataset CSV: `TIMESTAMP,ContextTokens,GeneratedTokens`).

    TIMESTAMP is a date-time such as `2023-11-16 18:15:46.6805900` (up to 7 fractional digits, read exactly)
    or plain seconds. Times are made relative to the earliest row (the first, in the published traces) and the
    requests sorted by time. A row with 0 context or generated tokens gets 1.

    The trace has no model column, so models are assigned by this rule: with `rng =
    numpy.random.default_rng(seed)` and `u = rng.random(number_of_rows)`, the row at position j in file order
    gets `models[i]` for the smallest i with u[j] < cdf[i], where cdf is the cumulative sum of the Zipf(zipf)
    popularity p_i proportional to 1/(i+1)^zipf over `models` in the order given (`zipf_probabilities`).
    """
    models = _check_models(models)
    _check_real("zipf", zipf, low=0.0, strict=False)
    _check_int("seed", seed, low=0)
    if _suffix(path) != ".csv":
        raise ConfigError(f"{os.fspath(path)!r}: read_azure_csv expects a .csv file")
    stamps, lengths = [], []
    for where, row in _records(path):
        for key in ("TIMESTAMP", "ContextTokens", "GeneratedTokens"):
            if row.get(key) is None:
                raise ConfigError(f"{where}: missing column {key!r}")
        stamps.append(_azure_time(row["TIMESTAMP"], where))
        lengths.append((_tokens(row["ContextTokens"], where, "ContextTokens"),
                        _tokens(row["GeneratedTokens"], where, "GeneratedTokens")))
    names = _pick_models(np.random.default_rng(seed), models, zipf, len(stamps))
    return _relative(stamps, [(m, p, o) for m, (p, o) in zip(names, lengths)])


def load(path_or_spec: PathLike | WorkloadSpec, models: list[str], zipf: float = 1.0,
         seed: int = 0) -> list[TraceRequest]:
    """A workload from a `.jsonl` trace (`read_jsonl`), an Azure `.csv` trace (`read_azure_csv`, with `zipf`
    and `seed` assigning models), or a `WorkloadSpec` or its `key=value,...` text (`generate`; the spec's own
    zipf and seed apply). Anything else raises ConfigError."""
    if isinstance(path_or_spec, WorkloadSpec):
        return generate(path_or_spec, models)
    if not isinstance(path_or_spec, (str, os.PathLike)):
        raise ConfigError(f"workload must be a trace path or a workload spec, got {path_or_spec!r}")
    suffix = _suffix(path_or_spec)
    if suffix == ".jsonl":
        return read_jsonl(path_or_spec)
    if suffix == ".csv":
        return read_azure_csv(path_or_spec, models, zipf=zipf, seed=seed)
    if isinstance(path_or_spec, str) and "=" in path_or_spec:
        return generate(WorkloadSpec.parse(path_or_spec), models)
    raise ConfigError(
        f"workload {os.fspath(path_or_spec)!r}: expected a .jsonl or .csv trace or a key=value spec"
    )


def summary(requests: Iterable[TraceRequest]) -> dict:
    """count, duration_s (last arrival minus first), rate (count / duration_s; 0 when duration_s is 0),
    models (requests per model, in order of first appearance) and mean prompt and output tokens."""
    requests = list(requests)
    if not requests:
        return {"count": 0, "duration_s": 0.0, "rate": 0.0, "models": {}, "mean_prompt_tokens": 0.0,
                "mean_output_tokens": 0.0}
    times = [r.time_s for r in requests]
    duration = float(max(times) - min(times))
    per_model: dict[str, int] = {}
    for r in requests:
        per_model[r.model] = per_model.get(r.model, 0) + 1
    n = len(requests)
    return {
        "count": n,
        "duration_s": duration,
        "rate": n / duration if duration > 0 else 0.0,
        "models": per_model,
        "mean_prompt_tokens": sum(r.prompt_tokens for r in requests) / n,
        "mean_output_tokens": sum(r.output_tokens for r in requests) / n,
    }
