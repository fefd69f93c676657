"""A request inside one engine, its states, and what one step hands back for it (torch-free)."""
from __future__ import annotations

import dataclasses
import enum
import operator
from typing import TYPE_CHECKING

from ..errors import PromptError

if TYPE_CHECKING:
    from ..sampling import SamplingParams


class RequestState(enum.Enum):
    """Where a request is. SUSPENDED: its KV went to the host pool to make room for others in this engine;
    PARKED: its KV went to the host pool because the whole model was preempted (`Engine.preempt`)."""

    WAITING = enum.auto()  # queued for a prefill (new, or suspended with suspend="recompute")
    RUNNING = enum.auto()  # in the decode batch
    SWAPPING_IN = enum.auto()  # its swap-in is in flight; it rejoins the batch once the copy is done
    SUSPENDED = enum.auto()
    PARKED = enum.auto()
    FINISHED = enum.auto()


@dataclasses.dataclass(eq=False)  # compared by identity: the queues remove a request by `is`, never by value
class Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    generator: object  # a torch.Generator, or None for greedy
    output: list[int] = dataclasses.field(default_factory=list)
    state: RequestState = RequestState.WAITING
    swap: object = None  # the SwapHandle of a swap-in in flight
    swap_timed: bool = True  # its seconds go to the suspend swap counters (resume's batched swap-in reports its own)
    finish_reason: str | None = None
    suspensions: int = 0

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def is_waiting(self) -> bool:
        return self.state is RequestState.WAITING

    @property
    def is_running(self) -> bool:
        return self.state is RequestState.RUNNING

    @property
    def is_swapping_in(self) -> bool:
        return self.state is RequestState.SWAPPING_IN

    @property
    def is_finished(self) -> bool:
        return self.state is RequestState.FINISHED

    @property
    def holds_blocks(self) -> bool:
        """Its KV is in the cache (device or host pool), so finishing it must free that."""
        return self.state in (RequestState.RUNNING, RequestState.SUSPENDED, RequestState.PARKED)


@dataclasses.dataclass(frozen=True)
class StepOutput:
    """What one `step()` produced for one request: its new tokens (none, or one), and whether it is done.
    `finish_reason`: "stop" (a stop token, included in the output), "length" (max_new_tokens), "max_model_len"
    (the model's positions are used up), "cache_full" (alone on the device, the KV cache cannot grow) or
    "aborted"."""

    request_id: int
    token_ids: tuple[int, ...]
    finished: bool
    finish_reason: str | None = None


def token_list(prompt) -> list[int]:
    """A prompt (a sequence of ints, or a 1-D integer tensor) as a list of ints; PromptError otherwise."""
    if hasattr(prompt, "dim") and hasattr(prompt, "tolist"):  # a tensor, checked without importing torch
        if prompt.dim() != 1 or prompt.dtype.is_floating_point:
            raise PromptError(f"prompt tensor must be 1-D integer ids, got {tuple(prompt.shape)} {prompt.dtype}")
        return prompt.tolist()
    if isinstance(prompt, (str, bytes)) or not hasattr(prompt, "__iter__"):
        raise PromptError(f"prompt must be a list of token ids, got {type(prompt).__name__}")
    tokens = list(prompt)
    for t in tokens:
        if isinstance(t, bool) or not hasattr(t, "__index__"):
            raise PromptError(f"prompt must hold integer token ids, got {t!r}")
    return [operator.index(t) for t in tokens]
