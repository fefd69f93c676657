"""Text in and out of a model: the checkpoint's own tokenizer (transformers' AutoTokenizer), its chat
template, streaming detokenization, stop strings, and the model's EOS ids.

transformers is imported only when a tokenizer is built, so that tidal imports without it; `eos_token_ids`
reads JSON alone. docs/TEXT.md states the rules.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import CheckpointError, ConfigError

_INSTALL = "pip install 'tidal[serve]'"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_PROMPT_CONTEXT = 4  # prompt tokens decoded before the first output token (see IncrementalDetokenizer)
_REPLACEMENT = "\ufffd"  # what a decoder gives for bytes that do not (yet) form a character


def eos_token_ids(checkpoint_dir: str | os.PathLike) -> tuple[int, ...]:
    """The model's end-of-sequence ids: generation_config.json's `eos_token_id` (an int or a list), else
    config.json's; () if neither file gives one. CheckpointError for a file that is not valid JSON or an id
    that is not a non-negative int."""
    root = Path(checkpoint_dir)
    for name in ("generation_config.json", "config.json"):
        file = root / name
        if not file.is_file():
            continue
        try:
            eos = json.loads(file.read_text()).get("eos_token_id")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
            raise CheckpointError(f"{file}: not a valid JSON object ({exc})") from None
        if eos is None:
            continue
        ids = eos if isinstance(eos, list) else [eos]
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise CheckpointError(f"{file}: eos_token_id={eos!r} must be a token id or a list of them")
        return tuple(dict.fromkeys(ids))  # in order, once each
    return ()


class Tokenizer:
    """A checkpoint's tokenizer, as transformers loads it. Build with `from_checkpoint`."""

    def __init__(self, hf_tokenizer, eos_token_ids: tuple[int, ...] = ()):
        self.hf = hf_tokenizer
        self.eos_token_ids = tuple(eos_token_ids)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike) -> Tokenizer:
        """The tokenizer of the checkpoint directory `path` (AutoTokenizer), with the model's EOS ids.
        ConfigError if the checkpoint has no tokenizer, transformers cannot load it, or transformers is not
        installed."""
        path = Path(path)
        if not any((path / f).is_file() for f in _TOKENIZER_FILES):
            raise ConfigError(f"{path}: no tokenizer in the checkpoint (none of "
                              f"{', '.join(_TOKENIZER_FILES)})")
        try:
            from transformers import AutoTokenizer
        except ImportError as exc:
            raise ConfigError(f"tokenizers need transformers ({exc}): {_INSTALL}") from None
        try:
            hf = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"{path}: transformers cannot load its tokenizer ({exc})") from None
        return cls(hf, eos_token_ids(path))

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        """The ids of a completion prompt, as transformers builds them (the tokenizer's own special tokens,
        such as a BOS, included)."""
        if not isinstance(text, str):
            raise ConfigError(f"text to encode must be a str, got {type(text).__name__}")
        return list(self.hf(text)["input_ids"])

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """The prompt ids of a chat: the checkpoint's chat template applied to `messages` (dicts with "role"
        and "content"), ending with the assistant's turn opened. ConfigError without a template, for
        malformed messages, or when the template refuses them."""
        if not self.has_chat_template:
            raise ConfigError(f"{self.hf.name_or_path}: the tokenizer has no chat template")
        if (not isinstance(messages, list) or not messages
                or not all(isinstance(m, dict) and "role" in m for m in messages)):
            raise ConfigError("messages must be a non-empty list of dicts with a 'role' each")
        from jinja2 import TemplateError

        try:
            ids = self.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                              return_dict=False)
        except TemplateError as exc:  # the template's own raise_exception, or a message it cannot render
            raise ConfigError(f"the chat template refused the messages: {exc}") from None
        return [int(i) for i in ids]

    def decode(self, ids) -> str:
        """The text of `ids`, special tokens left out."""
        return self.hf.decode(list(ids), skip_special_tokens=True)

    def detokenizer(self, prompt_ids=()) -> IncrementalDetokenizer:
        """A streaming decoder of one request's output tokens; `prompt_ids`, the request's prompt, is the
        context the first output tokens are decoded in."""
        return IncrementalDetokenizer(self, prompt_ids)


class IncrementalDetokenizer:
    """Turns a request's output tokens, as they come, into text that never has to be taken back.

    Each push decodes a short window of tokens: some already emitted (the prefix, so that merges and leading
    spaces come out as they would in the whole text) and the new ones; the text beyond the prefix's is new.
    Text ending in U+FFFD is held: it is an incomplete UTF-8 character, which the next tokens may complete.
    With no `prompt_ids` the concatenation of every `push` and the `flush` equals `tokenizer.decode(output)`
    exactly. With them, the last few prompt tokens are the first window's prefix: for byte-level BPE
    tokenizers (SmolLM2, Llama 3, Qwen) that changes nothing; for SentencePiece ones the first word keeps the
    space before it that decoding the output alone strips, as the text continues the prompt. A prompt whose
    text ends inside a character is not used as context (the output's own bytes then start the text)."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids=()):
        self.tokenizer = tokenizer
        self.ids = [int(i) for i in prompt_ids][-_PROMPT_CONTEXT:]
        if self.ids and self._decode(self.ids).endswith(_REPLACEMENT):
            self.ids = []
        self.prefix = 0  # ids[prefix:read] is the context decoded before the new tokens
        self.read = len(self.ids)  # ids[read:] are not emitted yet
        self.text = ""

    def _decode(self, ids) -> str:
        return self.tokenizer.hf.decode(ids, skip_special_tokens=True)

    def push(self, token_ids) -> str:
        """Add output tokens; returns the text that became final with them (maybe "")."""
        self.ids.extend(int(t) for t in token_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """The text still held at the end of the output (an incomplete character decodes as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self.read == len(self.ids):
            return ""
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if not final and (len(after) <= len(before) or after.endswith(_REPLACEMENT)):
            return ""  # nothing yet, or a character still incomplete
        if not after.startswith(before):
            # The window's decoding does not extend its prefix's: emitting a slice of it would not be the
            # whole text's. Never seen with the tokenizers tidal serves; refuse rather than emit wrong text.
            raise ConfigError(f"incremental decoding of {self.ids[self.prefix:]} does not extend the text of "
                              f"its first {self.read - self.prefix} tokens ({before!r} -> {after!r})")
        delta = after[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        self.text += delta
        return delta


class StopMatcher:
    """Cuts generated text at the first stop string to complete, across pushes, never emitting any part of
    one.

    `push` returns the text that can be emitted now: a tail that could be the start of a stop string is held
    until the next push shows whether it is. Once a stop string completes, `push` returns the text before it
    and True, and the request is over. The result does not depend on how the text is split into pushes: it is
    the text before the stop string that a character-by-character scan completes first (the longest of those
    completing at the same character)."""

    def __init__(self, stops: list[str]):
        if isinstance(stops, str) or not all(isinstance(s, str) for s in stops):
            raise ConfigError(f"stop strings must be a list of str, got {stops!r}")
        if any(s == "" for s in stops):
            raise ConfigError("a stop string is empty (it would stop before the first character)")
        self.stops = tuple(dict.fromkeys(stops))
        self._hold = max((len(s) for s in self.stops), default=1) - 1  # the most text a partial match spans
        self.pending = ""
        self.stopped = False

    def push(self, delta: str) -> tuple[str, bool]:
        """Add new text; returns (text safe to emit now, whether a stop string completed)."""
        if self.stopped:
            raise ConfigError("StopMatcher.push after a stop string completed")
        text = self.pending + delta
        # The first stop string to complete ends the output, as if the text had come one character at a
        # time; of those completing at the same character, the longest, so that no part of one is emitted
        found = [(i + len(s), -len(s)) for s, i in ((s, text.find(s)) for s in self.stops) if i >= 0]
        if found:
            end, minus_len = min(found)
            self.pending, self.stopped = "", True
            return text[:end + minus_len], True
        keep = self._partial(text)
        self.pending = text[len(text) - keep:]
        return text[:len(text) - keep], False

    def _partial(self, text: str) -> int:
        """The length of the longest tail of `text` that is a proper prefix of some stop string."""
        for n in range(min(self._hold, len(text)), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def flush(self) -> str:
        """The held text, when the output ended without a stop string."""
        out, self.pending = self.pending, ""
        return out
