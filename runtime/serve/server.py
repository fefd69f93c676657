"""The uvicorn server of `tidal serve`: tells the Service when a signal asks it to stop."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading

import uvicorn

log = logging.getLogger("tidal.serve")


class Server(uvicorn.Server):
    """uvicorn's Server, with the Service told when a signal asks it to stop, and without uvicorn's re-raising
    of that signal once it has stopped (which would end the process by the signal, not with status 0)."""

    def __init__(self, config, service):
        super().__init__(config)
        self.service = service
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets=None):
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)
        if self.started:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            host = f"[{host}]" if ":" in host else host
            log.info("tidal serve: serving %s at http://%s:%d/v1", ", ".join(self.service.models), host, port)

    def handle_exit(self, sig, frame):
        super().handle_exit(sig, frame)
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.service.begin_shutdown)

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class Background:
    """`tidal serve` in this process, for the demo and the tests: the Service built from `config` (`metrics`: a
    ServeMetrics, default a new one) with its scheduler's thread started (warmed up as `config.warmup` says),
    and `Server` in a daemon thread on 127.0.0.1 and a free port (the config's host and port are not used).
    `url`: the /v1 base; `stop()` stops uvicorn, then the scheduler, and releases the models."""

    START_TIMEOUT_S = 60.0

    def __init__(self, config, metrics=None, thread_name: str = "tidal-serve"):
        import socket
        import time

        from .app import create_app
        from .loading import build_service

        self.service = build_service(config, metrics=metrics)
        try:
            self.service.start(warmup=config.warmup)
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
            self.url = f"http://127.0.0.1:{self.port}/v1"
            uv = uvicorn.Config(create_app(self.service), log_level="warning",
                                timeout_graceful_shutdown=config.shutdown_grace_s + 5.0)
            self.server = Server(uv, self.service)
            self.thread = threading.Thread(target=asyncio.run, args=(self.server.serve(sockets=[sock]),),
                                           daemon=True, name=thread_name)
            self.thread.start()
            deadline = time.monotonic() + self.START_TIMEOUT_S
            while not self.server.started:
                if time.monotonic() > deadline or not self.thread.is_alive():
                    raise RuntimeError("the server did not start")
                time.sleep(0.02)
        except BaseException:
            self.service.close()
            raise

    @property
    def base(self) -> str:
        return self.url.removesuffix("/v1")

    def stop(self) -> None:
        if self.thread.is_alive():
            self.server.should_exit = True
            self.thread.join(timeout=30)
        self.service.close()
