"""One tidal replica on Ray Serve (`Replica`): its own Runtime and Scheduler over its own device (the server
settings of the config, budgets included, apply per replica), serving `tidal serve`'s app in this process
(`serve.app.create_app`, run per request by `asgi.call`) for the models Ray's multiplexing routes to it.

Two levels: Ray decides which replica owns which models (`serve.multiplexed`: a request carries its model's id,
Ray routes it to a replica that owns the model, and a replica owning `max_models_per_replica` models gives up
its least recently used one to take a new one); tidal's policy decides, inside the replica, which of the models
it owns are on the device, offloaded or preempted. A model the replica owns stays registered with its
scheduler (preempted to the host, when the policy says so) and resumes when a request comes; one it gives up
is removed (`Service.remove_model`: its requests finish, its engine closes, its device and host bytes are
freed), and loads anew if Ray gives it back."""
from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
import time

from ..errors import ConfigError
from .asgi import call
from .board import POST_INTERVAL_S

log = logging.getLogger("tidal.ray")
REPLICA_HEADER = "x-tidal-replica"  # on every answer: the replica that served it


class Ownership:
    """A model this replica owns: what Ray's multiplexing caches for it. Ray calls `__del__` (in a worker
    thread) when its LRU takes the model away; the model is then removed from the replica's scheduler."""

    def __init__(self, replica: Replica, name: str):
        self.replica, self.name, self._released = replica, name, False

    def __del__(self):
        if self._released:  # Ray calls it at eviction; the garbage collector may call it again
            return
        self._released = True
        try:
            self.replica.release(self.name)
        except Exception:  # at interpreter exit nothing is left to release
            log.exception("tidal ray: releasing %s failed", self.name)


class Replica:
    """A Serve deployment class (see the module docstring). `config`: the `serve.config.ServeConfig`,
    `ray_config`: the `config.RayConfig`, `board`: a handle to the `board.Board` deployment."""

    def __init__(self, config, ray_config, board):
        import ray
        from ray import serve

        from ..serve.app import create_app
        from ..serve.loading import build_service

        logging.getLogger("tidal").setLevel(config.log_level.upper())
        self.configs = {m.name: m for m in config.models}
        self.board = board
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        runtime = ray.get_runtime_context()
        self.actor = {"name": runtime.get_actor_name(), "namespace": runtime.namespace, "pid": os.getpid()}
        self.service = build_service(config, register=False)
        self.service.start(warmup=False)
        self.app = create_app(self.service)
        self._changes = threading.Lock()  # registrations and removals, one at a time
        self._owned: set[str] = set()
        self._using = collections.Counter()  # model -> requests past `own` and not yet answered (event loop's)
        self.mirror = None
        try:
            from .export import RayMetricsMirror

            self.mirror = RayMetricsMirror(self.replica_id)
        except ImportError as exc:  # ray.util.metrics needs ray's metrics agent dependencies
            log.warning("tidal ray: replica %s does not export its metrics through Ray (%s)", self.replica_id, exc)

        async def own(model_id: str) -> Ownership:  # what Ray's multiplexing calls to give this replica a model
            await asyncio.to_thread(self.take, model_id)
            return Ownership(self, model_id)

        self.own = serve.multiplexed(max_num_models_per_replica=ray_config.max_models_per_replica)(own)
        self._stop = threading.Event()
        self._poster = threading.Thread(target=self._post_loop, name="tidal-ray-board", daemon=True)
        self._poster.start()
        log.info("tidal ray: replica %s serving up to %d of %s", self.replica_id,
                 ray_config.max_models_per_replica, sorted(self.configs))

    # -- ownership ---------------------------------------------------------------------------------------------
    def take(self, name: str) -> None:
        """Register `name` with this replica's scheduler (Ray gave it to this replica)."""
        from ..serve.loading import register_model

        mc = self.configs.get(name)
        if mc is None:
            raise ConfigError(f"model {name!r} is not in the config (served: {sorted(self.configs)})")
        with self._changes:
            t = time.monotonic()
            if name not in self.service.models:
                register_model(self.service, mc)
            self._owned.add(name)
        log.info("tidal ray: replica %s owns %s (registered in %.2f s)", self.replica_id, name, time.monotonic() - t)
        self.post()

    def release(self, name: str) -> None:
        """Remove `name` from this replica's scheduler (Ray's LRU took it away): the requests that got past
        `own` before, and its requests in the scheduler, finish first (up to the grace period each)."""
        with self._changes:
            self._owned.discard(name)
            t = time.monotonic()
            deadline = t + self.service.shutdown_grace_s
            while self._using[name] > 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            self.service.remove_model(name)
        log.info("tidal ray: replica %s released %s (%.2f s)", self.replica_id, name, time.monotonic() - t)
        self.post()

    # -- requests ----------------------------------------------------------------------------------------------
    async def handle(self, method: str, path: str, query: bytes, headers: list, body: bytes):
        """One HTTP request through tidal serve's app, for the model Ray routed it by (its multiplexed model
        id): yields {"status", "headers"} (with REPLICA_HEADER), then the body's chunks."""
        from ray import serve

        model = serve.get_multiplexed_model_id()
        if model:
            await self.own(model)
            self._using[model] += 1  # no await since `own` returned: the model is still this replica's
        try:
            first = True
            async for item in call(self.app, method, path, query, headers, body):
                if first:
                    item = {"status": item["status"],
                            "headers": item["headers"] + [(REPLICA_HEADER, self.replica_id)]}
                    first = False
                yield item
        finally:
            if model:
                self._using[model] -= 1

    async def answer(self, method: str, path: str, query: bytes, headers: list, body: bytes) -> dict:
        """`handle`'s answer whole, {"status", "headers", "body"}: one return through Ray for a request that
        does not stream, instead of a streamed item per chunk."""
        start, chunks = None, []
        async for item in self.handle(method, path, query, headers, body):
            if start is None:
                start = item
            else:
                chunks.append(item)
        return {**start, "body": b"".join(chunks)}

    def owned(self) -> list[str]:
        return sorted(self._owned)

    # -- reporting ---------------------------------------------------------------------------------------------
    def report(self) -> dict:
        """What this replica posts to the board: the models it owns, its status document, its metrics."""
        from ..serve.status import status_doc

        service = self.service
        service.metrics.update(service.scheduler)
        body, _ = service.metrics.render()
        if self.mirror is not None:
            self.mirror.update(service.metrics.registry)
        return {"replica": self.replica_id, "actor": self.actor, "owned": self.owned(),
                "status": status_doc(service, recent=5),
                "metrics": body.decode(), "posted_at": time.time()}

    def post(self) -> None:
        try:
            self.board.post.remote(self.replica_id, self.report())
        except Exception:  # the board is being restarted: the next post tells it
            log.exception("tidal ray: replica %s could not post to the board", self.replica_id)

    def _post_loop(self) -> None:
        while not self._stop.wait(POST_INTERVAL_S):
            self.post()

    def __del__(self):
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
            self.service.close()
