"""`tidal serve`'s configuration: a TOML file (read with `tomllib`) and command-line flags, merged into
frozen, validated dataclasses (`ServeConfig`, one `ModelConfig` per model). Flags win over the file.

```toml
host = "127.0.0.1"          # the file's top level: the server
port = 8000
device = "cuda"
device_budget = "40GiB"     # sizes: bytes, or a number with a unit (B, KB, MB, GB, KiB, MiB, GiB, TiB)
host_budget = "64GiB"
policy = "cost"             # cost | lru | exclusive
shutdown_grace_s = 10.0

[models.chat]               # one table per model, named as clients name it
path = "smollm2-135m"       # a preset name or a checkpoint directory
dtype = "bfloat16"
residency = 1.0             # resident fraction of the decoder layers
kv_cache_bytes = "512MiB"
keep_host_copy = true
slo_ttft_s = 0.5
slo_tpot_s = 0.05
profile = "out/profile/profile.json"   # the cost policy's cost model is fitted from it
```
"""
from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from pathlib import Path

from ..errors import ConfigError

POLICIES = ("cost", "lru", "exclusive")
DTYPES = ("float32", "float16", "bfloat16")
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(value, what: str = "size") -> int:
    """Bytes from an int or a string like "40GiB", "512MiB", "1.5GB", "4096". ConfigError names `what`."""
    if isinstance(value, bool):
        raise ConfigError(f"{what}={value!r} is not a size")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{what}={value!r} must be >= 0 bytes")
        return value
    m = _SIZE.match(value) if isinstance(value, str) else None
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ConfigError(f"{what}={value!r} is not a size: write bytes as an int, or a number with a unit "
                          f"({', '.join(u for u in ('KB', 'MB', 'GB', 'TB', 'KiB', 'MiB', 'GiB', 'TiB'))})")
    n = float(m.group(1)) * _UNITS[unit]
    if not math.isfinite(n) or n != int(n) and unit in ("", "b"):
        raise ConfigError(f"{what}={value!r} is not a whole number of bytes")
    return int(n)


def _number(what: str, value, low: float | None = None, high: float | None = None, open_low=False):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{what}={value!r} must be a number")
    if low is not None and (value <= low if open_low else value < low) or high is not None and value > high:
        bounds = f"{'(' if open_low else '['}{low}, {high if high is not None else 'inf'}]"
        raise ConfigError(f"{what}={value!r} must be in {bounds}")
    return value


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """One served model. `path`: a preset name or a checkpoint directory. `residency`: the resident fraction
    of its decoder layers (the rest are streamed). Sizes in bytes. `profile`: a profile.json the cost policy
    fits this model's cost model from."""

    name: str
    path: str
    dtype: str | None = None  # None: the checkpoint's
    residency: float = 1.0
    kv_cache_bytes: int | None = None
    host_kv_bytes: int | None = None
    keep_host_copy: bool = False
    block_size: int = 16
    max_batch_size: int | None = None
    kernels: str = "auto"
    slo_ttft_s: float | None = None
    slo_tpot_s: float | None = None
    profile: str | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:/-]*", self.name):
            raise ConfigError(f"model name {self.name!r}: use letters, digits and . _ : / -")
        if not isinstance(self.path, str) or not self.path:
            raise ConfigError(f"model {self.name!r}: path={self.path!r} must be a preset name or a directory")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(f"model {self.name!r}: dtype={self.dtype!r} must be one of {', '.join(DTYPES)}")
        _number(f"model {self.name!r}: residency", self.residency, 0.0, 1.0)
        for f in ("kv_cache_bytes", "host_kv_bytes"):
            v = getattr(self, f)
            if v is not None:
                object.__setattr__(self, f, parse_size(v, f"model {self.name!r}: {f}"))
        if not isinstance(self.keep_host_copy, bool):
            raise ConfigError(f"model {self.name!r}: keep_host_copy={self.keep_host_copy!r} must be a bool")
        for f in ("block_size", "max_batch_size"):
            v = getattr(self, f)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"model {self.name!r}: {f}={v!r} must be an int >= 1")
        for f in ("slo_ttft_s", "slo_tpot_s"):
            _number(f"model {self.name!r}: {f}", getattr(self, f), 0.0, open_low=True)
        if self.profile is not None and not Path(self.profile).is_file():
            raise ConfigError(f"model {self.name!r}: profile={self.profile!r} is not a file")

    def engine_kwargs(self) -> dict:
        """The `Scheduler.add_model` engine arguments (dtype as a torch.dtype)."""
        import torch

        out = dict(resident_fraction=float(self.residency), kv_cache_bytes=self.kv_cache_bytes,
                   host_kv_bytes=self.host_kv_bytes, keep_host_copy=self.keep_host_copy,
                   block_size=self.block_size, max_batch_size=self.max_batch_size, kernels=self.kernels)
        if self.dtype is not None:
            out["dtype"] = getattr(torch, self.dtype)
        return out


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """The server: where it listens, the device and its budgets (bytes; None: no limit), the scheduling
    policy, and the models. `shutdown_grace_s`: how long in-flight requests may run on after SIGTERM before
    they are aborted (finish_reason "abort"). `warmup`: run one token through every model at start-up, so
    that a checkpoint that cannot load fails there, not on a client's request."""

    models: tuple[ModelConfig, ...]
    host: str = "127.0.0.1"
    port: int = 8000
    device: str | None = None
    device_budget: int | None = None
    host_budget: int | None = None
    policy: str = "lru"
    shutdown_grace_s: float = 10.0
    warmup: bool = True
    log_level: str = "info"

    def __post_init__(self):
        if not self.models:
            raise ConfigError("no models: give --model NAME=PATH or a [models.NAME] table in the config file")
        names = [m.name for m in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"model {dup[0]!r} is given twice")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ConfigError(f"port={self.port!r} must be an int in [0, 65535]")
        if not isinstance(self.host, str) or not self.host:
            raise ConfigError(f"host={self.host!r} must be an address")
        for f in ("device_budget", "host_budget"):
            v = getattr(self, f)
            if v is not None:
                object.__setattr__(self, f, parse_size(v, f))
        if self.policy not in POLICIES:
            raise ConfigError(f"policy={self.policy!r} must be one of {', '.join(POLICIES)}")
        if self.policy == "cost":
            missing = [m.name for m in self.models if m.profile is None]
            if missing:
                raise ConfigError(f"policy 'cost' needs a profile.json per model; model {missing[0]!r} has "
                                  "none (set profile = \"...\" in its [models.NAME] table)")
        _number("shutdown_grace_s", self.shutdown_grace_s, 0.0)
        if self.log_level not in ("critical", "error", "warning", "info", "debug"):
            raise ConfigError(f"log_level={self.log_level!r} must be critical, error, warning, info or debug")

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"


_SERVER_KEYS = {f.name for f in dataclasses.fields(ServeConfig)} - {"models"}
_MODEL_KEYS = {f.name for f in dataclasses.fields(ModelConfig)} - {"name"}


def read_toml(path) -> dict:
    """The config file as a dict, its keys checked (ConfigError naming an unknown key or a TOML error)."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    unknown = sorted(set(doc) - _SERVER_KEYS - {"models", "ray"})
    if unknown:
        known = ", ".join(sorted(_SERVER_KEYS))
        raise ConfigError(f"config file {path}: unknown key {unknown[0]!r} (known: {known}, [models.NAME], [ray])")
    if not isinstance(doc.get("ray", {}), dict):
        raise ConfigError(f"config file {path}: ray must be a table, [ray] (tidal serve --ray's settings)")
    models = doc.get("models", {})
    if not isinstance(models, dict) or not all(isinstance(t, dict) for t in models.values()):
        raise ConfigError(f"config file {path}: models must be tables, [models.NAME]")
    for name, table in models.items():
        bad = sorted(set(table) - _MODEL_KEYS)
        if bad:
            raise ConfigError(f"config file {path}: [models.{name}]: unknown key {bad[0]!r} "
                              f"(known: {', '.join(sorted(_MODEL_KEYS))})")
    return doc


def parse_model_flag(value: str) -> tuple[str, str]:
    """`--model NAME=PATH` -> (name, path)."""
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise ConfigError(f"--model {value!r}: write NAME=PATH (PATH: a preset name or a checkpoint dir)")
    return name, path


def build(config_path=None, model_flags=(), **server_flags) -> ServeConfig:
    """The ServeConfig from the file at `config_path` (optional), `--model NAME=PATH` flags (a model of the
    file gets its path from the flag, or is added with defaults) and the server flags given (None: not given;
    `kv_cache_bytes` is the default of every model that sets none)."""
    doc = read_toml(config_path) if config_path is not None else {}
    tables = {name: dict(t) for name, t in doc.get("models", {}).items()}
    for flag in model_flags:
        name, path = parse_model_flag(flag)
        tables.setdefault(name, {})["path"] = path
    kv_default = server_flags.pop("kv_cache_bytes", None)
    models = []
    for name, table in tables.items():
        if "path" not in table:
            raise ConfigError(f"model {name!r} has no path: set it in [models.{name}] or pass "
                              f"--model {name}=PATH")
        if kv_default is not None:
            table.setdefault("kv_cache_bytes", kv_default)
        models.append(ModelConfig(name=name, **table))
    server = {k: v for k, v in doc.items() if k not in ("models", "ray")}  # [ray]: tidal.ray.config's
    server.update({k: v for k, v in server_flags.items() if v is not None})
    return ServeConfig(models=tuple(models), **server)
