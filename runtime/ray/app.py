"""The Serve application (`build_app`): the router (ingress), the tidal replicas and the board; `build`, the
builder `serve run` / `serve deploy` import (`tidal.ray.app:build`, args `config=serve.toml`); and `run`, what
`tidal serve --ray` does (join or start a Ray cluster, run the application, wait for SIGTERM or SIGINT)."""
from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger("tidal.ray")


def build_app(config, ray_config):
    """The application for `config` (a `serve.config.ServeConfig`: its server settings apply per replica) and
    `ray_config` (a `config.RayConfig`)."""
    from ray import serve

    from .board import Board
    from .replica import Replica
    from .router import Router

    # at shutdown, the requests in flight get the server's grace period; the board, whose posts never stop
    # while replicas live (each a request), none
    grace = {"graceful_shutdown_wait_loop_s": 0.5, "graceful_shutdown_timeout_s": config.shutdown_grace_s + 5.0}
    # the board takes a post from each replica every POST_INTERVAL_S: no access-log line for each
    board = serve.deployment(Board, name="TidalBoard", num_replicas=1, ray_actor_options={"num_cpus": 0},
                             graceful_shutdown_wait_loop_s=0.1, graceful_shutdown_timeout_s=0.5,
                             logging_config={"enable_access_log": False}).bind()
    replicas = serve.deployment(
        Replica, name="TidalReplica", num_replicas=ray_config.replicas,
        max_ongoing_requests=ray_config.max_ongoing_requests,
        ray_actor_options={"num_cpus": ray_config.num_cpus, "num_gpus": ray_config.gpus(config.device)}, **grace,
    ).bind(config, ray_config, board)
    return serve.deployment(Router, name="TidalRouter", num_replicas=1,
                            max_ongoing_requests=ray_config.max_ongoing_requests * ray_config.replicas,
                            ray_actor_options={"num_cpus": 0}, **grace).bind(config, ray_config, replicas, board)


def build(args: dict):
    """`serve run tidal.ray.app:build config=serve.toml [replicas=N]`: the application of the config file's
    models, server settings and [ray] table (the flags `serve run` passes override the table)."""
    from ..errors import ConfigError
    from ..serve import config as serve_config
    from . import config as ray_config

    usage = "tidal.ray.app:build takes config=FILE [replicas=N] [max_models_per_replica=K]"
    unknown = sorted(set(args) - {"config", "replicas", "max_models_per_replica"})
    if unknown or "config" not in args:
        raise ConfigError(f"{usage}; got {sorted(args)}")
    flags = {}
    for k in ("replicas", "max_models_per_replica"):
        if k in args:  # `serve run` passes them as strings, a config file's args as YAML values
            try:
                flags[k] = int(args[k])
            except (TypeError, ValueError):
                raise ConfigError(f"{usage}; {k}={args[k]!r} is not an integer") from None
    return build_app(serve_config.build(args["config"]), ray_config.build(args["config"], **flags))


def run(config, ray_config) -> int:
    """Serve `config` on Ray until SIGTERM or SIGINT (`tidal serve --ray`): join the cluster at
    `ray_config.address` (None: the one running here, else a new local one), start Serve's HTTP proxy on the
    config's host and port, run the application, and at the signal delete it and leave the cluster."""
    import ray
    from ray import serve

    stop = threading.Event()
    ray.init(address=ray_config.address, log_to_driver=False)
    for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs its own
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(build_app(config, ray_config), name=ray_config.app_name, route_prefix="/")
        log.info("tidal serve --ray: %d replicas of %s on %s (Ray cluster %s)", ray_config.replicas,
                 [m.name for m in config.models], config.url, ray.get_runtime_context().gcs_address)
        stop.wait()
        log.info("tidal serve --ray: stopping")
        serve.shutdown()  # the application's deployments, the HTTP proxy, the controller
    finally:
        ray.shutdown()
    return 0
