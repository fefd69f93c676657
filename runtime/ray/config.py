"""`tidal serve --ray`'s settings (`RayConfig`): the `[ray]` table of the same TOML file as `tidal serve`, and
its flags. Plain Python (no ray, no torch)."""
from __future__ import annotations

import dataclasses
import math

from ..errors import ConfigError
from ..serve.config import read_toml


def _int(what: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"ray: {what}={value!r} must be an int >= {low}")
    return value


def _float(what: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"ray: {what}={value!r} must be a number >= 0")
    return float(value)


@dataclasses.dataclass(frozen=True)
class RayConfig:
    """The Ray Serve deployment: `replicas` of tidal (each its own device, budgets and scheduler: the server
    settings of the file apply per replica), each owning at most `max_models_per_replica` models at a time
    (Ray's multiplexing), with `num_cpus`/`num_gpus` Ray resources each (num_gpus None: 1 on a CUDA device,
    else 0) and up to `max_ongoing_requests` requests at once. `address`: the Ray cluster to join (None: the one
    running on this machine, else a new local one). `app_name`: the Serve application's name."""

    replicas: int = 1
    max_models_per_replica: int = 2
    num_cpus: float = 1.0
    num_gpus: float | None = None
    max_ongoing_requests: int = 64
    address: str | None = None
    app_name: str = "tidal"

    def __post_init__(self):
        _int("replicas", self.replicas, 1)
        _int("max_models_per_replica", self.max_models_per_replica, 1)
        _int("max_ongoing_requests", self.max_ongoing_requests, 1)
        object.__setattr__(self, "num_cpus", _float("num_cpus", self.num_cpus))
        if self.num_gpus is not None:
            object.__setattr__(self, "num_gpus", _float("num_gpus", self.num_gpus))
        if self.address is not None and (not isinstance(self.address, str) or not self.address):
            raise ConfigError(f"ray: address={self.address!r} must be a Ray address, e.g. ray://host:10001 or auto")
        if not isinstance(self.app_name, str) or not self.app_name:
            raise ConfigError(f"ray: app_name={self.app_name!r} must be a non-empty string")

    def gpus(self, device: str | None) -> float:
        """Ray GPUs a replica asks for on `device` (the server's)."""
        if self.num_gpus is not None:
            return self.num_gpus
        return 1.0 if device is not None and device.startswith("cuda") else 0.0


_KEYS = {f.name for f in dataclasses.fields(RayConfig)}


def build(config_path=None, **flags) -> RayConfig:
    """The RayConfig from the `[ray]` table of the file at `config_path` (optional) and the flags given
    (None: not given). ConfigError naming an unknown key or a bad value."""
    table = dict(read_toml(config_path).get("ray", {})) if config_path is not None else {}
    unknown = sorted(set(table) - _KEYS)
    if unknown:
        raise ConfigError(f"config file {config_path}: [ray]: unknown key {unknown[0]!r} "
                          f"(known: {', '.join(sorted(_KEYS))})")
    table.update({k: v for k, v in flags.items() if v is not None})
    return RayConfig(**table)
