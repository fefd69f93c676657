"""Where a request's time goes on `tidal.ray` (issue 17): one model on one replica, on the device already (no
switch), the same completion (max_tokens 1, so the answer is the prefill's token) timed along each part of its
path, interleaved round by round, medians:

  engine        `tidal.Engine.generate` in this process (one torch thread, as a replica with one CPU runs).
  handle        a Serve handle's call to the replica (`Replica.answer`, routed by the model's multiplexed id):
                the replica's event loop, tidal serve's app, its scheduler and the engine, and one Ray hop.
  http          the OpenAI request over HTTP: Ray's proxy, the router, the replica (what a client sees).
  handle-health, http-health: the same two paths for `GET /health` (the replica's app and the router answer it
                without the scheduler): what the hops cost alone.

    .venv/bin/python bench/ray_overhead.py --out out/ray_overhead [--model PATH] [--rounds 15]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import httpx
import torch

PROMPT = "The capital of France is"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="smollm2-135m", help="a checkpoint path or preset name (default: SmolLM2-135M)")
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args(argv)
    import ray
    from ray import serve

    import tidal
    from tidal.ray.app import build_app
    from tidal.ray.config import RayConfig
    from tidal.serve.config import ModelConfig, ServeConfig
    from tidal.text import Tokenizer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = str(tidal.presets.resolve(args.model, log=lambda s: None, dtype=torch.float32))
    kv = 16 << 20
    torch.set_num_threads(1)
    engine = tidal.Engine.from_pretrained(path, device="cpu", dtype=torch.float32, kv_cache_bytes=kv,
                                          kernels="reference")
    ids = Tokenizer.from_checkpoint(path).encode(PROMPT)
    body = json.dumps({"model": "m", "prompt": PROMPT, "max_tokens": 1, "temperature": 0.0}).encode()
    headers = [(b"content-type", b"application/json")]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = ServeConfig((ModelConfig("m", path, dtype="float32", kv_cache_bytes=kv, kernels="reference"),),
                             device="cpu", policy="lru", warmup=False, log_level="warning")
        serve.run(build_app(config, RayConfig(replicas=1, num_cpus=1)), name="tidal", route_prefix="/tidal")
        handle = serve.get_deployment_handle("TidalReplica", "tidal").options(multiplexed_model_id="m")

        def replica(method: str, route: str, payload: bytes) -> None:
            answer = handle.answer.remote(method, route, b"", headers, payload).result()
            if answer["status"] != 200:
                raise RuntimeError(f"{route}: {answer['status']} {answer['body'][:500]!r}")

        with httpx.Client(timeout=600) as client:
            url = f"http://127.0.0.1:{port}/tidal"
            paths = {
                "engine": lambda: engine.generate([ids], max_new_tokens=1, stop_token_ids=[]),
                "handle": lambda: replica("POST", "/v1/completions", body),
                "http": lambda: client.post(f"{url}/v1/completions", content=body,
                                            headers={"content-type": "application/json"}).raise_for_status(),
                "handle-health": lambda: replica("GET", "/health", b""),
                "http-health": lambda: client.get(f"{url}/health").raise_for_status(),
            }
            for fn in paths.values():  # the model loads at its first request; then one more, untimed
                fn()
                fn()
            times: dict[str, list[float]] = {name: [] for name in paths}
            for _ in range(args.rounds):
                for name, fn in paths.items():
                    t = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t)
    finally:
        serve.shutdown()
        ray.shutdown()
        engine.close()
    med = {name: statistics.median(v) for name, v in times.items()}
    rows = [{"path": name, "median_ms": med[name] * 1e3, "min_ms": min(v) * 1e3, "max_ms": max(v) * 1e3,
             "above_engine_ms": (med[name] - med["engine"]) * 1e3 if "health" not in name else None}
            for name, v in times.items()]
    doc = {"command": "bench/ray_overhead.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}", "model": path,
           "prompt_tokens": len(ids), "rounds": args.rounds, "rows": rows}
    (out / "ray_overhead.json").write_text(json.dumps(doc, indent=1))
    print(f"{path}, {len(ids)} prompt tokens, {args.rounds} rounds")
    print("| path | median (min-max) ms | above the engine ms |")
    print("|---|---|---|")
    for r in rows:
        above = "" if r["above_engine_ms"] is None else f"{r['above_engine_ms']:.1f}"
        print(f"| {r['path']} | {r['median_ms']:.1f} ({r['min_ms']:.1f}-{r['max_ms']:.1f}) | {above} |")


if __name__ == "__main__":
    main()
