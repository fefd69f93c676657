"""The board (`Board`, a one-replica Serve deployment): where each tidal replica posts its status and metrics,
for the router's aggregated `GET /v1/tidal/status` and `GET /metrics`. Ray Serve routes a handle call to any
replica of a deployment, never to a chosen one, so the replicas report instead of being asked."""
from __future__ import annotations

import time

STALE_S = 5.0  # a replica that has not posted for this long is gone (dead, or being restarted by Ray)
POST_INTERVAL_S = 1.0  # how often a replica posts (and after each change of the models it owns)


class Board:
    def __init__(self):
        self._posts: dict[str, tuple[float, dict]] = {}

    def post(self, replica: str, doc: dict) -> None:
        self._posts[replica] = (time.monotonic(), doc)

    def read(self, max_age_s: float = STALE_S) -> dict[str, dict]:
        """The latest post of every replica heard from in the last `max_age_s` seconds, by replica id."""
        now = time.monotonic()
        return {r: doc for r, (t, doc) in sorted(self._posts.items()) if now - t <= max_age_s}
