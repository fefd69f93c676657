"""The `tidal` command line. Each subcommand's parser lives with its code: `add_parser(subparsers)` adds it
and sets `func`, which runs it and returns the exit status.

`tidal profile` (tidal.study.profile) measures this machine for a model and writes profile.json; `tidal
compare` (tidal.study.compare) measures a baseline beside it; `tidal study` (tidal.study.report) does both for
several models and writes a report. Their parsers are tidal.study.commands'. `tidal serve` (tidal.serve.main)
serves models over HTTP with OpenAI's API. `tidal demo` is `tidal profile tiny --quick` and a short compare,
then (tidal.demo) the real SmolLM2-135M-Instruct (`smollm2-135m`): built into tidal's cache, a short profile,
and `tidal serve` on a free local port streaming one greedy chat answer through the `openai` client, printed
beside the profile's key numbers."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .errors import TidalError

DEMO_MODEL = "tiny"


def add_demo_parser(subparsers) -> None:
    d = subparsers.add_parser("demo", help=f"`tidal profile {DEMO_MODEL} --quick`, a short compare with "
                              "accelerate, then a short profile of smollm2-135m and one streamed chat answer "
                              "from it through `tidal serve` (a minute or two on a CPU)")
    d.add_argument("--device", default=None, help="cpu or cuda[:n] (default: cuda when available)")
    d.add_argument("--out", metavar="DIR", default="out/demo", help="where the documents and figures go "
                   "(default: out/demo)")
    d.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: steady numbers on a "
                   "shared machine)")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.add_argument("--no-serve", action="store_true", help="only the tiny preset's profile and compare")
    d.set_defaults(func=demo_command)


def demo_command(args) -> int:
    import torch

    from .study import compare, profile
    from .study.summary import side_by_side, summary

    if args.threads < 1:
        raise TidalError(f"--threads={args.threads}: need at least 1")
    torch.set_num_threads(args.threads)
    out, progress = Path(args.out), not args.no_progress
    quick = profile.ProfileSettings.quick()
    print(f"== tidal profile {DEMO_MODEL} --quick ==", flush=True)
    doc = profile.run_profile(DEMO_MODEL, quick, out / "profile", device=args.device, progress=progress)
    print(summary(doc))
    print(f"profile: {out / 'profile' / profile.PROFILE_FILE}\nfigure: {out / 'profile' / profile.FIGURE_FILE}")
    if not doc["complete"]:
        return 130
    short = quick.replace(fractions=(1.0, 0.0), batches=(quick.batches[0],), contexts=quick.contexts[:1])
    print(f"\n== tidal compare {DEMO_MODEL} --baseline accelerate (fractions 1 and 0, batch {short.batches[0]}) ==",
          flush=True)
    doc = compare.run_compare(DEMO_MODEL, short, "accelerate", out / "compare", device=args.device,
                              progress=progress)
    print(side_by_side(doc))
    print("notes:\n" + "\n".join(f"- {n}" for n in compare.notes("accelerate", doc["machine"]["device"])))
    print(f"figure: {out / 'compare' / compare.FIGURE_FILE}")
    if not doc["complete"]:
        return 130
    if args.no_serve:
        return 0
    from . import demo

    got = demo.run(out, device=args.device, progress=progress)
    return 130 if got is not None and got["chat"] is None else 0


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other error of the command."""

    def error(self, message):
        self.exit(2, f"tidal: error: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    from .serve import main as serve
    from .simulate import main as simulate
    from .study import commands

    parser = _Parser(prog="tidal", description="tidal: offload and preemption runtime for LLM inference")
    sub = parser.add_subparsers(dest="command", required=True)
    add_demo_parser(sub)
    commands.add_parsers(sub)
    serve.add_parser(sub)
    simulate.add_parser(sub)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.command_line = " ".join(["tidal"] + argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        return args.func(args)
    except (TidalError, ValueError) as exc:
        print(f"tidal: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside a profile's sweep, which stops cleanly on its own
        print("tidal: interrupted", file=sys.stderr)
        return 130
