"""The OpenAI API's request shapes, parsed and validated at the edge (`parse_completion`, `parse_chat`), and
its error body. A request that fails validation raises `InvalidRequest`, which carries the HTTP status and the
`param` it names; `error_body` turns any error into `{"error": {"message", "type", "param", "code"}}`.

Fields this server does not implement are refused with a 400 when they would change the answer (`n` other
than 1, `logprobs`, `echo`, penalties, ...), never ignored."""
from __future__ import annotations

import dataclasses
import json
import math

from ..errors import TidalError

MAX_STOP_STRINGS = 16


class InvalidRequest(TidalError, ValueError):
    """A request the API refuses: `status` (400, 404, 503, ...), the `param` it names, an OpenAI `code`."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.type = message, param, status, code, type


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclasses.dataclass(frozen=True)
class Sampling:
    """What a request asks of generation. `max_tokens` None: as many as the model's context leaves."""

    max_tokens: int | None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class CompletionRequest:
    model: str
    prompt: str | tuple[int, ...]  # text, or token ids as given
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False


@dataclasses.dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: tuple[dict, ...]  # {"role": str, "content": str}, content parts joined
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequest(f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest(f"the body must be a JSON object, not {type(body).__name__}")
    return body


def parse_completion(body: dict) -> CompletionRequest:
    """POST /v1/completions. `prompt`: a string, a list of token ids, or a list holding one of either."""
    _refuse_unsupported(body, ("echo", "suffix", "best_of"))
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequest("prompt is empty", "prompt")
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        prompt = tuple(prompt)
    elif isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise InvalidRequest(f"a batch of {len(prompt)} prompts: this server takes one prompt per request",
                             "prompt")
    else:
        raise InvalidRequest("prompt must be a non-empty string or a non-empty list of token ids", "prompt")
    return CompletionRequest(_model(body), prompt, _sampling(body, default_max_tokens=16), *_stream(body))


def parse_chat(body: dict) -> ChatRequest:
    """POST /v1/chat/completions. `messages`: a list of {"role", "content"}, content: text or text parts."""
    _refuse_unsupported(body, ("tools", "tool_choice", "functions", "function_call", "response_format",
                               "top_logprobs"))
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list of {role, content} objects", "messages")
    parsed = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise InvalidRequest(f"{where} must be an object with role and content", where)
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise InvalidRequest(f"{where}.role={role!r}: must be system, developer, user or assistant",
                                 f"{where}.role")
        parsed.append({"role": role, "content": _content(m.get("content"), f"{where}.content")})
    sampling = _sampling(body, default_max_tokens=None,
                         max_tokens_keys=("max_completion_tokens", "max_tokens"))
    return ChatRequest(_model(body), tuple(parsed), sampling, *_stream(body))


# -- fields ------------------------------------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _model(body: dict) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model must be a non-empty string (GET /v1/models lists them)", "model")
    return model


def _stream(body: dict) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise InvalidRequest(f"stream={stream!r} must be true or false", "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise InvalidRequest("stream_options must be an object with include_usage true or false",
                             "stream_options")
    if not stream:
        raise InvalidRequest("stream_options is only allowed with stream=true", "stream_options")
    return stream, options.get("include_usage", False)


def _content(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise InvalidRequest(f"{where}[{j}]: only text parts ({{\"type\": \"text\", \"text\": ...}}) "
                                     "are supported", f"{where}[{j}]")
            texts.append(part["text"])
        return "".join(texts)
    raise InvalidRequest(f"{where} must be a string or a list of text parts", where)


def _sampling(body: dict, default_max_tokens: int | None, max_tokens_keys=("max_tokens",)) -> Sampling:
    max_tokens = default_max_tokens
    for key in max_tokens_keys:  # the first given wins (max_completion_tokens replaces max_tokens in chat)
        v = body.get(key)
        if v is None:
            continue
        if not _is_int(v):
            raise InvalidRequest(f"{key}={v!r} must be an integer", key)
        if v <= 0:
            raise InvalidRequest(f"{key}={v} must be at least 1", key)
        max_tokens = v
        break
    temperature = _optional_number(body, "temperature", 1.0)
    if temperature < 0:
        raise InvalidRequest(f"temperature={temperature} must be >= 0", "temperature")
    top_p = _optional_number(body, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise InvalidRequest(f"top_p={top_p} must be in (0, 1]", "top_p")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise InvalidRequest(f"seed={seed!r} must be an integer", "seed")
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stop = tuple(stop)
    else:
        raise InvalidRequest("stop must be a string or a list of strings", "stop")
    if any(not s for s in stop) or len(stop) > MAX_STOP_STRINGS:
        raise InvalidRequest(f"stop takes 1 to {MAX_STOP_STRINGS} non-empty strings", "stop")
    ids = body.get("stop_token_ids")
    if ids is None:
        ids = ()
    elif not isinstance(ids, list) or not all(_is_int(t) and t >= 0 for t in ids):
        raise InvalidRequest("stop_token_ids must be a list of token ids (integers >= 0)", "stop_token_ids")
    return Sampling(max_tokens, float(temperature), float(top_p), seed, stop, tuple(ids))


def _optional_number(body: dict, key: str, default: float) -> float:
    v = body.get(key)
    if v is None:
        return default
    if not _is_number(v):
        raise InvalidRequest(f"{key}={v!r} must be a number", key)
    return v


# fields not implemented -> the values that leave the answer as this server gives it
_NEUTRAL = {"n": (None, 1), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
            "logprobs": (None, False), "logit_bias": (None, {}), "echo": (None, False), "suffix": (None, ""),
            "best_of": (None, 1), "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
            "function_call": (None, "none"), "response_format": (None, {"type": "text"}),
            "top_logprobs": (None, 0)}


def _refuse_unsupported(body: dict, keys) -> None:
    """400 for a field that would change the answer and is not implemented: a request is served as asked, or
    refused, never silently served otherwise."""
    for key in ("n", "presence_penalty", "frequency_penalty", "logprobs", "logit_bias", *keys):
        v = body.get(key)
        if not any(v is ok or v == ok and isinstance(v, bool) == isinstance(ok, bool)
                   for ok in _NEUTRAL[key]):
            what = "this server returns one choice per request (n=1)" if key == "n" else "is not supported"
            raise InvalidRequest(f"{key}={v!r}: {what}", key)
