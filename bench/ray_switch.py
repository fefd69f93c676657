"""Model switch on a Ray Serve replica (issue 17): the time from a request to its first token when the replica
must switch to the request's model, tidal against Ray Serve's own multiplexing as users write it today, side by
side in one run.

  tidal        `tidal.ray`: one replica owning both models (max_models_per_replica 2) under a device budget
               that fits one, each with keep_host_copy; the switch is tidal's preempt (the device freed, the
               weights' host copy kept, KV swapped) and resume (the weights copied back in).
  rebuild-hf   a Serve deployment whose `@serve.multiplexed(max_num_models_per_replica=1)` loader builds the
               model anew with transformers (`AutoModelForCausalLM.from_pretrained`) and deletes it on eviction
               (Ray's documented pattern), answering with `generate`.
  rebuild-hf-cold  the same, the checkpoint's files evicted from the OS page cache before each load
               (`drop_page_cache`): a model evicted among many is read from the disk again.
  rebuild-tidal the same pattern with the model built anew as a `tidal.Engine`: the same engine as tidal's,
               so the ratio is the switch alone.

Each arm gets the same requests, one at a time: B then A (each loaded once), then B, A, B, A, ... (each a
switch; those to A timed), then A again (no switch), max_tokens 1 (the answer is the first token), timed at
the client over HTTP through Ray's proxy. Reported per arm and pair: the median (and min, max) seconds of the requests that switch to A, and of
the same request once A is on the device (no switch). Beside each speed-up, in brackets, what a switch that cost
nothing would score: the baseline's switch over tidal's request without one.

    .venv/bin/python bench/ray_switch.py --out out/ray_switch [--pairs smol,large] [--rounds 4]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import socket
import statistics
import sys
import time
from pathlib import Path

import httpx
import torch

import tidal
from tidal.presets import PRESETS, write_checkpoint

PROMPT = "The capital of France is"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def checkpoints(root: Path) -> dict[str, str]:
    """smol: SmolLM2-135M-Instruct (real); small: a random `tiny`-shaped Llama; large: a random qwen2.5-0.5b-shaped
    model (494M parameters); the random ones with SmolLM2's tokenizer files."""
    smol = str(tidal.presets.resolve("smollm2-135m", log=lambda s: None))
    out = {"smol": smol}
    # `tiny`'s shape with SmolLM2's vocabulary, so that its tokenizer's ids fit
    small = dataclasses.replace(PRESETS["tiny"], name="tiny-v49152", vocab_size=49152)
    for name, preset in (("small", small), ("large", PRESETS["qwen2.5-0.5b"])):
        path = root / name
        if not (path / "config.json").exists():
            write_checkpoint(path, preset, torch.float32, seed=0)
            for f in TOKENIZER_FILES:
                shutil.copy(Path(smol) / f, path / f)
        out[name] = str(path)
    return out


# -- the baselines: Ray's multiplexing pattern, the model built anew on load and deleted on eviction ------------
# (the deployment classes import inside their methods: Ray pickles classes of a script by value, with the
# module globals they name)
def drop_page_cache(path: str) -> None:
    """Evict the checkpoint's files from the OS page cache (POSIX_FADV_DONTNEED), so that the next load reads
    them from the disk: a model Ray's LRU evicted among many is not in the page cache either."""
    import os

    for name in os.listdir(path):
        f = os.path.join(path, name)
        if os.path.isfile(f):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


class RebuildHF:
    def __init__(self, paths: dict, cold: bool = False):
        import torch
        from ray import serve

        torch.set_num_threads(1)
        self.paths, self.cold = paths, cold

        async def load(model_id: str):
            import asyncio

            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            def build():
                if self.cold:
                    drop_page_cache(self.paths[model_id])
                return (AutoModelForCausalLM.from_pretrained(self.paths[model_id], dtype=torch.float32).eval(),
                        AutoTokenizer.from_pretrained(self.paths[model_id]))
            return _Owned(await asyncio.to_thread(build))

        self.get_model = serve.multiplexed(max_num_models_per_replica=1)(load)

    async def __call__(self, request):
        import torch
        from ray import serve
        from starlette.responses import JSONResponse

        (model, tok) = (await self.get_model(serve.get_multiplexed_model_id())).value
        ids = tok(PROMPT, return_tensors="pt").input_ids
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=1, do_sample=False)
        return JSONResponse({"token": int(out[0, -1])})


class RebuildTidal:
    def __init__(self, paths: dict, kv: int):
        import torch
        from ray import serve

        torch.set_num_threads(1)
        self.paths, self.kv = paths, kv

        async def load(model_id: str):
            import asyncio

            import torch

            import tidal
            from tidal.text import Tokenizer

            def build():
                path = self.paths[model_id]
                return (tidal.Engine.from_pretrained(path, device="cpu", dtype=torch.float32, kv_cache_bytes=self.kv,
                                     kernels="reference"), Tokenizer.from_checkpoint(path))
            return _Owned(await asyncio.to_thread(build))

        self.get_model = serve.multiplexed(max_num_models_per_replica=1)(load)

    async def __call__(self, request):
        from ray import serve
        from starlette.responses import JSONResponse

        engine, tok = (await self.get_model(serve.get_multiplexed_model_id())).value
        out = engine.generate([tok.encode(PROMPT)], max_new_tokens=1, stop_token_ids=[])
        return JSONResponse({"token": out[0][0]})


class _Owned:
    def __init__(self, value):
        self.value = value

    def __del__(self):  # Ray calls it when its LRU evicts the model: free it now
        engine = self.value[0] if getattr(self, "value", None) else None
        if hasattr(engine, "preempted"):  # a tidal.Engine
            engine.close()
        self.value = None


# -- measuring ---------------------------------------------------------------------------------------------------
def _timed(client: httpx.Client, url: str, model: str, header: bool) -> float:
    t = time.perf_counter()
    if header:  # the baselines: Ray routes by the multiplexing header
        r = client.post(url, json={}, headers={"serve_multiplexed_model_id": model})
    else:
        r = client.post(url, json={"model": model, "prompt": PROMPT, "max_tokens": 1, "temperature": 0.0})
    elapsed = time.perf_counter() - t
    if r.status_code != 200:
        raise RuntimeError(f"{url} ({model}): {r.status_code} {r.text[:500]}")
    return elapsed


def run_arm(name: str, url: str, a: str, b: str, rounds: int, header: bool) -> dict:
    """Warm-up: B, then A (each loaded once: tidal loads a model at its first request); then `rounds` times B
    (a switch away) and A (a switch back to A: timed); then A three times more (on the device: timed)."""
    with httpx.Client(timeout=600) as client:
        for model in (b, a):
            _timed(client, url, model, header)
        switch = []
        for _ in range(rounds):
            _timed(client, url, b, header)
            switch.append(_timed(client, url, a, header))
        stay = [_timed(client, url, a, header) for _ in range(3)]
    return {"arm": name, "switch_s": switch, "switch_median_s": statistics.median(switch),
            "switch_min_s": min(switch), "switch_max_s": max(switch), "stay_median_s": statistics.median(stay)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--pairs", default="smol,large", help="the switched-to model of each pair: smol (SmolLM2-135M, "
                    "beside small) and large (a qwen2.5-0.5b-shaped model, beside smol)")
    ap.add_argument("--rounds", type=int, default=4, help="A,B alternations per arm (2 switches each)")
    args = ap.parse_args(argv)
    import ray
    from ray import serve

    from tidal.ray.app import build_app
    from tidal.ray.config import RayConfig
    from tidal.serve.config import ModelConfig, ServeConfig

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = checkpoints(out / "checkpoints")
    kv = 16 << 20
    pairs = {"smol": ("smol", "small"), "large": ("large", "smol")}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for pair in args.pairs.split(","):
            a, b = pairs[pair]
            both = {a: paths[a], b: paths[b]}
            models = tuple(ModelConfig(n, p, dtype="float32", kv_cache_bytes=kv, kernels="reference")
                           for n, p in both.items())
            sizes = [tidal.Engine.placement(m.path, device="cpu", **m.engine_kwargs()).footprint.device
                     for m in models]
            # keep_host_copy: a preemption frees the device and copies nothing out (the host arena keeps the
            # weights while the model is active), so a switch copies only the incoming model in
            models = tuple(dataclasses.replace(m, keep_host_copy=True) for m in models)
            config = ServeConfig(models, device="cpu", device_budget=max(sizes) + 1, policy="lru", warmup=False,
                                 log_level="warning")
            one_cpu = {"num_cpus": 1}
            arms = [("tidal", build_app(config, RayConfig(replicas=1, max_models_per_replica=2, num_cpus=1)),
                     "/v1/completions", False),
                    ("rebuild-tidal", serve.deployment(RebuildTidal, ray_actor_options=one_cpu).bind(both, kv), "/", True),
                    ("rebuild-hf", serve.deployment(RebuildHF, ray_actor_options=one_cpu).bind(both), "/", True),
                    ("rebuild-hf-cold", serve.deployment(RebuildHF, ray_actor_options=one_cpu).bind(both, True), "/",
                     True)]
            for arm, application, path, header in arms:
                serve.run(application, name=arm, route_prefix=f"/{arm}")
                row = run_arm(arm, f"{base}/{arm}{path}", a, b, args.rounds, header)
                row.update(pair=pair, model=a, other=b, params_M=round(_params(paths[a]) / 1e6, 1))
                rows.append(row)
                print(f"{pair} {arm}: switch median {row['switch_median_s']:.3f} s "
                      f"(min {row['switch_min_s']:.3f}, max {row['switch_max_s']:.3f}); "
                      f"no switch {row['stay_median_s']:.3f} s", flush=True)
                serve.delete(arm)
    finally:
        serve.shutdown()
        ray.shutdown()
    for pair in {r["pair"] for r in rows}:
        by = {r["arm"]: r for r in rows if r["pair"] == pair}
        for base_arm in ("rebuild-hf", "rebuild-hf-cold", "rebuild-tidal"):
            if "tidal" in by and base_arm in by:
                by["tidal"][f"speedup_vs_{base_arm}"] = by[base_arm]["switch_median_s"] / by["tidal"]["switch_median_s"]
                # what a switch that cost nothing would score: tidal's same request without one
                by["tidal"][f"free_switch_bound_vs_{base_arm}"] = (by[base_arm]["switch_median_s"]
                                                                   / by["tidal"]["stay_median_s"])
    doc = {"command": "bench/ray_switch.py " + " ".join(sys.argv[1:] if argv is None else argv), "date": time.strftime("%Y-%m-%d %H:%M UTC",
           time.gmtime()), "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}", "rows": rows}
    (out / "ray_switch.json").write_text(json.dumps(doc, indent=1))
    print("| pair | arm | model (M params) | switch: median (min-max) s | no switch s | tidal speed-up "
          "(a free switch's) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        speed = "; ".join(f"{v:.1f}x ({r['free_switch_bound_vs_' + k.removeprefix('speedup_vs_')]:.1f}x) vs "
                          f"{k.removeprefix('speedup_vs_')}" for k, v in r.items() if k.startswith("speedup_vs_"))
        print(f"| {r['pair']} | {r['arm']} | {r['model']} ({r['params_M']}) | {r['switch_median_s']:.3f} "
              f"({r['switch_min_s']:.3f}-{r['switch_max_s']:.3f}) | {r['stay_median_s']:.3f} | {speed} |")


def _params(path: str) -> int:
    """Parameters of an fp32 checkpoint: its safetensors bytes / 4."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors")) // 4


if __name__ == "__main__":
    main()
