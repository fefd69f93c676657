"""The HTTP app (FastAPI), built per server by `create_app(service)`: OpenAI's /v1/models, /v1/completions and
/v1/chat/completions (streamed as server-sent events when asked), /health, /metrics (Prometheus) and
/v1/tidal/status. Handlers parse and validate (protocol.py), tokenize, submit to the Service, and format
(responses.py); the scheduler's thread does the model work. Every error leaves as OpenAI's error body."""
from __future__ import annotations

import asyncio
import json
import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ConfigError, PromptError, TidalError
from .protocol import InvalidRequest, error_body, parse_chat, parse_completion, parse_json
from .responses import DONE, ChatShape, CompletionShape, sse, usage
from .status import status_doc

log = logging.getLogger("tidal.serve")


def create_app(service) -> FastAPI:
    """The app serving `service` (a `service.Service`, with its `metrics`). No state outside the two."""
    if service.metrics is None:
        raise ConfigError("the service has no metrics (build it with loading.build_service)")
    app = FastAPI(title="tidal serve", version="0.1.0")
    app.state.service = service

    @app.exception_handler(InvalidRequest)
    async def invalid(_, exc: InvalidRequest):
        return _error(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(TidalError)
    async def tidal_error(_, exc: TidalError):
        if isinstance(exc, (ConfigError, PromptError)):  # what the request asked cannot be done
            return _error(400, str(exc))
        log.error("tidal serve: %r", exc)
        return _error(500, str(exc), "server_error")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), "invalid_request_error" if exc.status_code < 500
                      else "server_error")

    @app.exception_handler(Exception)
    async def internal(_, exc: Exception):
        log.exception("tidal serve: internal error")
        return _error(500, f"internal error: {exc!r}", "server_error")

    @app.get("/health")
    async def health():
        problem = service.health()
        if problem is not None:
            return _error(503, problem, "server_error")
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": m.name, "object": "model", "created": m.created, "owned_by": "tidal", "root": m.path,
             "max_model_len": m.max_len} for m in service.models.values()]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse_completion(parse_json(await request.body()))
        m = service.model(req.model)
        gen = service.submit(m, service.completion_prompt(m, req.prompt), req.sampling)
        return await _answer(request, gen, CompletionShape(m.name), req.stream, req.include_usage)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = parse_chat(parse_json(await request.body()))
        m = service.model(req.model)
        gen = service.submit(m, service.chat_prompt(m, req.messages), req.sampling)
        return await _answer(request, gen, ChatShape(m.name), req.stream, req.include_usage)

    @app.get("/metrics")
    async def metrics():
        # the snapshot reads the engines' books: off the event loop, like all work that is not I/O
        await asyncio.to_thread(service.metrics.update, service.scheduler)
        body, content_type = service.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/tidal/status")
    async def tidal_status():
        doc = await asyncio.to_thread(status_doc, service)
        return Response(json.dumps(doc, default=str), media_type="application/json")

    return app


def _error(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status)


async def _answer(request: Request, gen, shape, stream: bool, include_usage: bool):
    if stream:
        return _Stream(gen, _events(gen, shape, include_usage), media_type="text/event-stream",
                       headers={"Cache-Control": "no-cache"})
    consume = asyncio.ensure_future(_collect(gen))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({consume, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not consume.done():  # the client went away (or the handler was cancelled): nobody wants it
            consume.cancel()
            gen.abort()
    if not consume.done():
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it
    text = consume.result()
    counts = usage(gen.prompt_tokens, gen.completion_tokens)
    return shape.full(text, gen.finish_reason, counts)


async def _collect(gen) -> str:
    return "".join([d.text async for d in gen.deltas()])


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _events(gen, shape, include_usage: bool):
    first = shape.first_chunk()
    if first is not None:
        yield sse(first)
    try:
        async for d in gen.deltas():
            yield sse(shape.chunk(d.text, d.finish_reason))
    except TidalError as exc:  # the status line has gone out: the error goes in the stream, as OpenAI's do
        log.error("tidal serve: %s failed mid-stream: %r", shape.id, exc)
        yield sse(error_body(str(exc), "server_error"))
        yield DONE
        return
    if include_usage:
        yield sse(shape.usage_chunk(usage(gen.prompt_tokens, gen.completion_tokens)))
    yield DONE


class _Stream(StreamingResponse):
    """A streamed answer that aborts its request however the response ends: finished, or cut short by a
    client that went away (Starlette then cancels the stream wherever it is waiting, which may be outside the
    generator, so the generator's own cleanup cannot be relied on)."""

    def __init__(self, gen, content, **kwargs):
        super().__init__(content, **kwargs)
        self.generation = gen

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.abort()
