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
