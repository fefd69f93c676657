"""One HTTP request through an ASGI app in this process, its response yielded as it comes: how a Ray replica
runs `tidal serve`'s own app (`serve.app.create_app`) for a request the router forwards."""
from __future__ import annotations

import asyncio


async def call(app, method: str, path: str, query: bytes, headers: list, body: bytes):
    """Run one request through `app`; yields {"status", "headers"} first, then each body chunk (bytes). When
    the consumer stops early (its client went away), the app sees the client disconnect, as under a server."""
    queue: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        await queue.put(message)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query,
             "root_path": "", "headers": [(k.lower(), v) for k, v in headers], "client": ("127.0.0.1", 0),
             "server": ("tidal-replica", 0)}
    task = asyncio.ensure_future(app(scope, receive, send))
    task.add_done_callback(lambda _: queue.put_nowait(None))
    try:
        while True:
            message = await queue.get()
            if message is None:  # the app returned: a response it never finished is its error
                task.result()
                return
            if message["type"] == "http.response.start":
                yield {"status": message["status"], "headers": [(k.decode("latin-1"), v.decode("latin-1"))
                                                                for k, v in message.get("headers", [])]}
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield bytes(message["body"])
                if not message.get("more_body", False):
                    return
    finally:
        gone.set()
        if not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout=5.0)
            except (asyncio.TimeoutError, Exception):
                task.cancel()
