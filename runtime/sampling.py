"""Per-request sampling parameters and the sampler. Greedy rows are decided on the device in one argmax;
sampled rows draw from the request's own generator, so a seeded request's tokens do not depend on which
other requests share its batch."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .errors import ConfigError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """`temperature` 0 is greedy. `top_p` < 1 keeps the smallest set of most likely tokens whose probability
    reaches it. `seed` makes a sampled request reproducible. A token in `stop_token_ids` ends the request (it
    is returned as its last token)."""

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"max_new_tokens={n!r} must be an int >= 1")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t >= 0.0:
            raise ConfigError(f"temperature={t!r} must be a number >= 0")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
            raise ConfigError(f"top_p={p!r} must be a number in (0, 1]")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ConfigError(f"seed={self.seed!r} must be an int or None")
        try:
            stops = tuple(int(s) for s in (self.stop_token_ids or ()))
        except (TypeError, ValueError):
            raise ConfigError(f"stop_token_ids={self.stop_token_ids!r} must be a list of token ids") from None
        object.__setattr__(self, "stop_token_ids", stops)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generator(self) -> torch.Generator | None:
        if self.greedy:
            return None
        g = torch.Generator()
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed)
        return g


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list) -> list[int]:
    """One token per row of `logits` `[batch, vocab]` (fp32)."""
    tokens = logits.argmax(-1).tolist()
    for row, (p, g) in enumerate(zip(params, generators)):
        if not p.greedy:
            tokens[row] = _draw(logits[row].cpu(), p, g)
    return tokens


def _draw(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator) -> int:
    probs = torch.softmax(logits.double() / p.temperature, -1)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the tokens ranked above each one
        keep = before < p.top_p  # the first token is always kept
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))
