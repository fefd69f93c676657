"""The ingress (`Router`, a Serve deployment): OpenAI's API for every model of the config, on Ray's HTTP proxy.
A completion or chat completion goes to a tidal replica by its model (`multiplexed_model_id`: Ray routes it to
a replica that owns the model, or gives the model to one), which answers it with `tidal serve`'s own app; the
router streams the answer back as it comes, with the replica's status and headers. `/v1/models` lists the
config's models; `/v1/tidal/status` and `/metrics` aggregate the replicas' posts to the board."""
from __future__ import annotations

import asyncio
import logging

from ..serve.protocol import InvalidRequest, error_body, parse_json
from ..serve.responses import DONE, sse

log = logging.getLogger("tidal.ray")
FORWARDED = ("/v1/completions", "/v1/chat/completions")
READ_TIMEOUT_S = 10.0  # the board's answer


class Router:
    def __init__(self, config, ray_config, replicas, board):
        import time

        self.models = {m.name: m for m in config.models}
        self.created = int(time.time())
        self.ray_config = ray_config
        self.replicas, self.board = replicas, board

    async def __call__(self, request):
        from starlette.responses import JSONResponse, Response

        path, method = request.url.path, request.method
        root = request.scope.get("root_path", "")  # the application's route prefix
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        try:
            if path in FORWARDED:
                if method != "POST":
                    raise InvalidRequest(f"{path} takes POST", status=405)
                return await self._forward(request, path)
            if method != "GET":
                raise InvalidRequest(f"{method} {path}: not found", status=404)
            if path == "/health":
                return JSONResponse({"status": "ok"})
            if path == "/v1/models":
                return JSONResponse({"object": "list", "data": [
                    {"id": name, "object": "model", "created": self.created, "owned_by": "tidal", "root": m.path}
                    for name, m in self.models.items()]})
            if path == "/v1/tidal/status":
                return JSONResponse(await self._status())
            if path == "/metrics":
                from prometheus_client import CONTENT_TYPE_LATEST

                return Response(await self._metrics(), media_type=CONTENT_TYPE_LATEST)
            raise InvalidRequest(f"GET {path}: not found", status=404)
        except InvalidRequest as exc:
            return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status)

    async def _forward(self, request, path: str):
        from starlette.responses import JSONResponse, Response, StreamingResponse

        body = await request.body()
        doc = parse_json(body)
        model = doc.get("model") if isinstance(doc, dict) else None
        if not isinstance(model, str) or model not in self.models:
            if not isinstance(model, str):
                raise InvalidRequest("model must be the name of a served model", "model")
            raise InvalidRequest(f"the model {model!r} does not exist (served: {', '.join(sorted(self.models))})",
                                 "model", status=404, code="model_not_found")
        stream = bool(doc.get("stream"))
        args = (request.method, path, request.url.query.encode(), list(request.headers.raw), body)
        replica = self.replicas.options(multiplexed_model_id=model, stream=stream)
        try:
            if not stream:  # one answer, one return through Ray
                whole = await replica.answer.remote(*args)
                return Response(whole["body"], status_code=whole["status"], headers=_headers(whole["headers"]))
            answer = replica.handle.remote(*args)
            start = await answer.__anext__()
        except Exception as exc:  # the replica died, or could not take the model
            log.error("tidal ray: %s for %s failed before answering: %r", path, model, exc)
            return JSONResponse(error_body(f"the replica serving {model!r} failed before answering: "
                                           f"{_reason(exc)}", "server_error"), status_code=503)

        async def rest():
            try:
                async for chunk in answer:
                    yield chunk
            except Exception as exc:  # the status line has gone out: say so in the stream, as OpenAI's do
                log.error("tidal ray: %s for %s failed mid-answer: %r", path, model, exc)
                yield sse(error_body(f"the replica serving {model!r} failed: {_reason(exc)}", "server_error"))
                yield DONE
            finally:
                answer.cancel()  # a client that went away: the replica's app sees it disconnect

        return StreamingResponse(rest(), status_code=start["status"], headers=_headers(start["headers"]))

    async def _posts(self) -> dict:
        return await asyncio.wait_for(self.board.read.remote(), READ_TIMEOUT_S)

    async def _status(self) -> dict:
        posts = await self._posts()
        owners: dict[str, list[str]] = {name: [] for name in self.models}
        for replica, doc in posts.items():
            for name in doc["owned"]:
                owners.setdefault(name, []).append(replica)
        return {"replicas_expected": self.ray_config.replicas, "replicas_reporting": len(posts),
                "max_models_per_replica": self.ray_config.max_models_per_replica, "owners": owners,
                "replicas": {r: {"owned": d["owned"], "actor": d["actor"], "posted_at": d["posted_at"], **d["status"]}
                             for r, d in posts.items()}}

    async def _metrics(self) -> bytes:
        from .metrics import merge

        return merge({r: d["metrics"] for r, d in (await self._posts()).items()})


def _headers(pairs) -> dict:
    """The replica's headers for the router's response (which sets its own content-length)."""
    return {k: v for k, v in pairs if k.lower() != "content-length"}


def _reason(exc: BaseException, limit: int = 300) -> str:
    """What the client is told of a replica's failure: the exception's type and the last line of its text, cut
    to its first sentence when longer than `limit` (Ray's errors end in a paragraph of possible causes)."""
    lines = str(exc).strip().splitlines()
    last = lines[-1].strip() if lines else ""
    if len(last) > limit and ". " in last:
        last = last[:last.index(". ") + 1]
    return f"{type(exc).__name__}: {last}"[:limit]
