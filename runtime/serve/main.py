"""`tidal serve`: the command's parser (`add_parser`), and `serve(config)`, which builds the Service, starts
the scheduler's thread, and runs uvicorn until SIGTERM or SIGINT.

Shutdown: the signal makes uvicorn stop accepting connections and close idle ones, and makes the Service
refuse new requests (503); requests in flight get `shutdown_grace_s` to finish, then are aborted (their
answers end with finish_reason "abort"); once every connection has closed the scheduler stops, the models are
released, and the command exits 0."""
from __future__ import annotations

import logging

from .config import POLICIES, build

log = logging.getLogger("tidal.serve")


def add_parser(subparsers) -> None:
    """Add `tidal serve` to the `tidal` command's subparsers."""
    p = subparsers.add_parser(
        "serve", help="an OpenAI-compatible HTTP server for several models on one device",
        description="Serve models over HTTP with OpenAI's API (/v1/models, /v1/completions, "
        "/v1/chat/completions, streamed or not), /health, /metrics and /v1/tidal/status. tidal's scheduler "
        "decides which models are on the device. Per-model settings go in the --config file (TOML); the "
        "flags override it. See docs/SERVE.md.")
    p.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                   help="serve the checkpoint directory or preset PATH as NAME (repeat for more models)")
    p.add_argument("--config", metavar="FILE", help="a TOML file: server settings and [models.NAME] tables")
    p.add_argument("--host", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to bind (default 8000; 0: any free port)")
    p.add_argument("--device", help="cpu or cuda[:n] (default: cuda when available)")
    p.add_argument("--device-budget", metavar="SIZE", help="device bytes all models share, e.g. 40GiB")
    p.add_argument("--host-budget", metavar="SIZE", help="host bytes all models share, e.g. 64GiB")
    p.add_argument("--policy", choices=POLICIES, help="scheduling policy (default lru; cost needs each "
                   "model's profile in the config file)")
    p.add_argument("--kv-cache", metavar="SIZE", help="device KV cache of every model that sets none, e.g. "
                   "512MiB (needed with a device budget)")
    p.add_argument("--shutdown-grace", type=float, metavar="SECONDS",
                   help="after SIGTERM, how long requests in flight may run on before they are aborted "
                   "(default 10)")
    p.add_argument("--no-warmup", action="store_true",
                   help="do not run a token through each model at start-up")
    p.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"))
    ray = p.add_argument_group("Ray Serve (tidal[ray]; docs/SCALING.md)")
    ray.add_argument("--ray", action="store_true", help="serve on Ray Serve: several replicas, each its own "
                     "device and scheduler (the budgets apply per replica), Ray's multiplexing routing each model")
    ray.add_argument("--replicas", type=int, help="replicas (default: [ray] replicas, else 1)")
    ray.add_argument("--max-models-per-replica", type=int, metavar="K",
                     help="models a replica owns at once (default: [ray] max_models_per_replica, else 2)")
    ray.add_argument("--ray-address", metavar="ADDRESS",
                     help="the Ray cluster to join (default: the one running here, else a new local one)")
    p.set_defaults(func=serve_command)


def serve_command(args) -> int:
    config = build(args.config, args.model, host=args.host, port=args.port, device=args.device,
                   device_budget=args.device_budget, host_budget=args.host_budget, policy=args.policy,
                   kv_cache_bytes=args.kv_cache, shutdown_grace_s=args.shutdown_grace,
                   warmup=False if args.no_warmup else None, log_level=args.log_level)
    ray_flags = {"replicas": args.replicas, "max_models_per_replica": args.max_models_per_replica,
                 "address": args.ray_address}
    if not args.ray:
        flags = {"replicas": "--replicas", "max_models_per_replica": "--max-models-per-replica",
                 "address": "--ray-address"}
        given = [flags[k] for k, v in ray_flags.items() if v is not None]
        if given:
            from ..errors import ConfigError

            raise ConfigError(f"{given[0]} needs --ray")
        return serve(config)
    from ..ray import app, config as ray_config

    logging.getLogger("tidal").setLevel(config.log_level.upper())
    return app.run(config, ray_config.build(args.config, **ray_flags))


def serve(config) -> int:
    """Serve `config` (a ServeConfig) until SIGTERM or SIGINT; returns 0 after a graceful shutdown."""
    import uvicorn

    from .app import create_app
    from .loading import build_service
    from .server import Server

    logging.getLogger("tidal").setLevel(config.log_level.upper())
    service = build_service(config)
    try:
        service.start(warmup=config.warmup)
        app = create_app(service)
        uv = uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level,
                            timeout_graceful_shutdown=config.shutdown_grace_s + 5.0)
        Server(uv, service).run()
    finally:
        service.close()
    log.info("tidal serve: stopped")
    return 0
