"""The grid a profile measures (`ProfileSettings`) and its two presets."""
from __future__ import annotations

import dataclasses

from ..errors import ConfigError

FULL_FRACTIONS = (1.0, 0.98, 0.96, 0.94, 0.92, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0)


def _ints(name, values, minimum) -> tuple[int, ...]:
    values = _tuple(name, values)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise ConfigError(f"{name}: {v!r} must be an int >= {minimum}")
    return values


def _tuple(name, values) -> tuple:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ConfigError(f"{name}={values!r} must be a list")
    values = tuple(values)
    if not values:
        raise ConfigError(f"{name} is empty; give at least one value")
    if len(set(values)) != len(values):
        raise ConfigError(f"{name}={list(values)} repeats a value")
    return values


def _int(name, value, minimum) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}={value!r} must be an int >= {minimum}")


def _fraction(name, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name}: {value!r} is outside [0, 1]")


def _nonnegative(name, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value != value:
        raise ConfigError(f"{name}={value!r} must be a number >= 0")
    return float(value)


@dataclasses.dataclass(frozen=True)
class ProfileSettings:
    """The grid `run_profile` measures. `fractions`: resident fractions of the decode sweep, each in [0, 1];
    `batches` and `output_lengths` (>= 2 new tokens) of the timed decodes, with prompts of `prompt_tokens`;
    `contexts`: tokens per sequence at preemption, with `preemption_batch` sequences, on an engine at
    `preemption_fraction`; `repeats`: timed repetitions per cell (rows hold medians); `prefetch_depth` of the
    engines; `quick_grid` marks the --quick grid. A decode cell repeats past `repeats`, up to `max_repeats`,
    while its relative spread ((max - min) / median) is above `max_spread`, for at most `extra_seconds` more
    (`runs.decode_rounds`). `full()` and `quick()` are the two presets."""

    fractions: tuple[float, ...]
    batches: tuple[int, ...]
    output_lengths: tuple[int, ...]
    prompt_tokens: int
    contexts: tuple[int, ...]
    preemption_batch: int
    repeats: int
    preemption_fraction: float = 1.0
    prefetch_depth: int = 2
    quick_grid: bool = False  # "quick" in the document; the name `quick` is the preset's
    max_repeats: int = 10
    max_spread: float = 0.1
    extra_seconds: float = 60.0

    def __post_init__(self):
        fractions = _tuple("fractions", self.fractions)
        for f in fractions:
            _fraction("fractions", f)
        object.__setattr__(self, "fractions", tuple(float(f) for f in fractions))
        object.__setattr__(self, "batches", _ints("batches", self.batches, 1))
        object.__setattr__(self, "output_lengths", _ints("output_lengths", self.output_lengths, 2))
        object.__setattr__(self, "contexts", _ints("contexts", self.contexts, 1))
        _int("prompt_tokens", self.prompt_tokens, 1)
        _int("preemption_batch", self.preemption_batch, 1)
        _int("repeats", self.repeats, 1)
        _int("max_repeats", self.max_repeats, 1)
        if self.max_repeats < self.repeats:
            raise ConfigError(f"max_repeats={self.max_repeats} is below repeats={self.repeats}")
        object.__setattr__(self, "max_spread", _nonnegative("max_spread", self.max_spread))
        object.__setattr__(self, "extra_seconds", _nonnegative("extra_seconds", self.extra_seconds))
        _int("prefetch_depth", self.prefetch_depth, 1)
        _fraction("preemption_fraction", self.preemption_fraction)
        object.__setattr__(self, "preemption_fraction", float(self.preemption_fraction))
        if not isinstance(self.quick_grid, bool):
            raise ConfigError(f"quick_grid={self.quick_grid!r} must be a bool")

    @classmethod
    def full(cls) -> "ProfileSettings":
        """The whole grid: resident fractions 0-100% in 10% steps plus 92-98%, batches 1 and 8, 32 and 128
        new tokens, preemption at 512, 1024 and 2048 tokens of context (every preset holds them), 3
        repeats (decode: up to 10 while the spread is above 10%, for at most a minute more per cell)."""
        return cls(fractions=FULL_FRACTIONS, batches=(1, 8), output_lengths=(32, 128), prompt_tokens=32,
                   contexts=(512, 1024, 2048), preemption_batch=4, repeats=3)

    @classmethod
    def quick(cls) -> "ProfileSettings":
        """A grid small enough for a minute on a CPU: 3 fractions, batches 1 and 4, 16 new tokens, contexts of
        32 and 128 tokens, 3 repeats (decode: up to 5 while the spread is above 10%, for at most 2 s more per
        cell)."""
        return cls(fractions=(1.0, 0.5, 0.0), batches=(1, 4), output_lengths=(16,), prompt_tokens=8,
                   contexts=(32, 128), preemption_batch=2, repeats=3, quick_grid=True, max_repeats=5,
                   extra_seconds=2.0)

    def rounds(self) -> dict:
        """`runs.decode_rounds`' keyword arguments for one decode cell of this grid."""
        return dict(rounds=self.repeats, max_rounds=self.max_repeats, max_spread=self.max_spread,
                    extra_seconds=self.extra_seconds)

    def replace(self, **changes) -> "ProfileSettings":
        """A copy with `changes` (validated again)."""
        return dataclasses.replace(self, **changes)

    def check_model(self, max_positions: int) -> None:
        """ConfigError unless every prompt plus output, and every context plus the tokens decoded after a
        resume, fits the model's `max_positions`."""
        longest = self.prompt_tokens + max(self.output_lengths)
        if longest > max_positions:
            raise ConfigError(f"prompt_tokens {self.prompt_tokens} + output length "
                              f"{max(self.output_lengths)} exceeds the model's {max_positions} positions")
        if max(self.contexts) + 2 > max_positions:  # the synthetic output token and the one decoded at resume
            raise ConfigError(f"context {max(self.contexts)} (+2 decoded tokens) exceeds the model's "
                              f"{max_positions} positions; give --contexts below {max_positions - 1}")

    def to_dict(self) -> dict:
        """The document's settings section."""
        d = {f.name: (list(v) if isinstance(v, tuple) else v)
             for f in dataclasses.fields(self) for v in [getattr(self, f.name)]}
        d["quick"] = d.pop("quick_grid")
        return d
