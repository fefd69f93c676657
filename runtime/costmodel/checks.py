"""Validation shared by the cost model's dataclasses: every number checked where it enters, with a ConfigError
naming the field."""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from ..errors import ConfigError


def check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}={value!r} must be an int >= {minimum}")
    return value


def check_seconds(name: str, value: Any, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
            value < 0 or (positive and value == 0):
        raise ConfigError(f"{name}={value!r} must be a finite number {'> 0' if positive else '>= 0'}")
    return float(value)


def check_optional(name: str, value: Any, positive: bool = False) -> float | None:
    return None if value is None else check_seconds(name, value, positive)


def from_dict(cls, d: Any, convert=None):
    if not isinstance(d, dict):
        raise ConfigError(f"{cls.__name__}.from_dict: expected a dict, got {type(d).__name__}")
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields]
    missing = [f.name for f in fields if f.name not in d and f.default is dataclasses.MISSING]
    unknown = sorted(set(d) - set(names))
    if missing or unknown:
        raise ConfigError(f"{cls.__name__}.from_dict: missing keys {missing}, unknown keys {unknown}")
    kwargs = {k: d[k] for k in names if k in d}
    return cls(**(convert(kwargs) if convert else kwargs))
