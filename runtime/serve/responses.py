"""The OpenAI API's response shapes: a whole response, its streamed chunks, and the usage. One `Shape` per
response holds its `id` and `created`, which every chunk of it repeats."""
from __future__ import annotations

import json
import time
import uuid


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(doc) -> str:
    """One server-sent event: `data: <json>` (or the literal `[DONE]`)."""
    return f"data: {doc if isinstance(doc, str) else json.dumps(doc, ensure_ascii=False)}\n\n"


DONE = sse("[DONE]")


class CompletionShape:
    """`text_completion` responses of POST /v1/completions."""

    prefix, object = "cmpl", "text_completion"

    def __init__(self, model: str):
        self.model = model
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def first_chunk(self) -> dict | None:
        """A chunk sent before any text (None: none)."""
        return None

    def chunk(self, text: str, finish_reason: str | None) -> dict:
        return {**self._head(self.object),
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}

    def usage_chunk(self, counts: dict) -> dict:
        return {**self._head(self.object), "choices": [], "usage": counts}

    def full(self, text: str, finish_reason: str, counts: dict) -> dict:
        return {**self._head(self.object),
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
                "usage": counts}


class ChatShape(CompletionShape):
    """`chat.completion` responses of POST /v1/chat/completions, streamed as `chat.completion.chunk`s: the
    first chunk's delta carries the role, the last one's the finish_reason."""

    prefix, object = "chatcmpl", "chat.completion.chunk"

    def first_chunk(self) -> dict:
        delta = {"role": "assistant", "content": ""}
        return {**self._head(self.object),
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]}

    def chunk(self, text: str, finish_reason: str | None) -> dict:
        delta = {"content": text} if text else {}
        return {**self._head(self.object),
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

    def full(self, text: str, finish_reason: str, counts: dict) -> dict:
        return {**self._head("chat.completion"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": finish_reason}],
                "usage": counts}
