"""The study's subcommands: `tidal profile`, `tidal compare` and `tidal study`, each a parser (`add_parsers`)
and a function that runs it and returns the exit status. The options they share are args.py's."""
from __future__ import annotations

from pathlib import Path

from . import compare, profile, report
from .args import add_run_arguments, link_option, run_options
from .baseline_decode import BASELINES
from .notes import notes
from .summary import side_by_side, summary


def add_parsers(subparsers) -> None:
    """Add `tidal profile`, `tidal compare` and `tidal study` to the `tidal` command's subparsers."""
    _add_profile(subparsers)
    _add_compare(subparsers)
    _add_study(subparsers)


def _add_profile(subparsers) -> None:
    """Add `tidal profile` to the `tidal` command's subparsers."""
    p = subparsers.add_parser("profile", help="measure decode, links and preemption on this machine; write "
                              "profile.json and a figure",
                              description="Measure, on this machine, decode tokens/s against the resident "
                              "fraction, link bandwidths and preemption cost for MODEL; write "
                              "DIR/profile.json and DIR/profile.png and print a summary. Ctrl-C stops and "
                              "keeps what was measured.")
    p.add_argument("model", metavar="MODEL", help="a preset name or a Hugging Face checkpoint directory")
    add_run_arguments(p, "where profile.json and profile.png go", ".")
    p.set_defaults(func=profile_command)


def profile_command(args) -> int:
    """Run `tidal profile`; 0 when complete, 130 when interrupted."""
    settings, dtype = run_options(args)
    doc = profile.run_profile(args.model, settings, args.out, device=args.device, dtype=dtype,
                      progress=not args.no_progress, link=link_option(args))
    out = Path(args.out)
    print(summary(doc))
    print(f"profile: {out / profile.PROFILE_FILE}\nfigure: {out / profile.FIGURE_FILE}")
    return _exit_code(doc)


def _exit_code(doc) -> int:
    """0 for a complete document; 130 (as for SIGINT) for one Ctrl-C cut short, saying where."""
    if doc["complete"]:
        return 0
    print(f"incomplete: interrupted at {doc['interrupted_at']}")
    return 130


def _add_compare(subparsers) -> None:
    """Add `tidal compare` to the `tidal` command's subparsers."""
    p = subparsers.add_parser("compare", help="tidal's profile and a baseline's, same grid, same run; write "
                              "compare.json and a figure",
                              description="Measure MODEL as `tidal profile` does and, in the same run, a "
                              "baseline over the same grid: accelerate offloading the layers tidal streams "
                              "(or plain transformers, all resident), and the transformers user's preemption "
                              "protocol. Write DIR/compare.json and DIR/compare.png (and the tidal sweep's "
                              "profile.json and profile.png) and print the two side by side. Ctrl-C stops "
                              "and keeps what was measured.")
    p.add_argument("model", metavar="MODEL", help="a preset name or a Hugging Face checkpoint directory")
    p.add_argument("--baseline", required=True, choices=BASELINES,
                   help="accelerate (offloading the layers tidal streams) or transformers (all resident)")
    add_run_arguments(p, "where the documents and figures go", ".")
    p.set_defaults(func=compare_command)


def compare_command(args) -> int:
    """Run `tidal compare`; 0 when complete, 130 when interrupted."""
    settings, dtype = run_options(args)
    doc = compare.run_compare(args.model, settings, args.baseline, args.out, device=args.device, dtype=dtype,
                      progress=not args.no_progress, link=link_option(args))
    out = Path(args.out)
    print(summary(doc))
    print()
    print(side_by_side(doc))
    said = notes(args.baseline, doc["machine"]["device"], doc["link"])
    print("\nnotes:\n" + "\n".join(f"- {n}" for n in said))
    print(f"comparison: {out / compare.COMPARE_FILE}\nfigure: {out / compare.FIGURE_FILE}")
    return _exit_code(doc)


def _add_study(subparsers) -> None:
    """Add `tidal study` to the `tidal` command's subparsers."""
    p = subparsers.add_parser("study", help="profile and compare several models; write a report",
                              description="Run `tidal compare` on each MODEL and write DIR/REPORT.md: the "
                              "published study's three findings restated with this machine's numbers.")
    p.add_argument("models", metavar="MODEL", nargs="+", help="preset names or checkpoint directories")
    p.add_argument("--baseline", default="accelerate", choices=("accelerate", "transformers"),
                   help="the decode baseline: accelerate offloading the same layers (default), or transformers "
                   "all resident; the preemption baseline is always the transformers user's protocol")
    add_run_arguments(p, "where REPORT.md, its figures and each model's documents go", "out/study")
    p.set_defaults(func=study_command)


def study_command(args) -> int:
    """Run `tidal study`; 0 when complete, 130 when interrupted."""
    settings, dtype = run_options(args)
    path, complete = report.run_study(args.models, settings, args.out, args.baseline, device=args.device, dtype=dtype,
                               progress=not args.no_progress, command=args.command_line, link=link_option(args))
    print(f"report: {path}")
    return 0 if complete else 130
