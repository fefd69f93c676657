"""The options `tidal profile`, `tidal compare` and `tidal study` share, and what they turn into: a
`ProfileSettings`, a dtype and an emulated link."""
from __future__ import annotations

from ..backends.link import TARGETS, parse as parse_link
from ..errors import ConfigError
from .settings import ProfileSettings

DTYPES = ("float32", "float16", "bfloat16")


def add_run_arguments(p, out_help: str, out_default: str) -> None:
    """The options `tidal profile`, `tidal compare` and `tidal study` share: device, dtype, output directory,
    the grid (ProfileSettings, `settings_from_args`), torch threads and the progress bar."""
    p.add_argument("--device", default=None, help="cpu or cuda[:n] (default: cuda when available)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="weights and KV dtype (default: float32 on the CPU, bfloat16 on CUDA)")
    p.add_argument("--out", metavar="DIR", default=out_default, help=f"{out_help} (default: {out_default})")
    p.add_argument("--quick", action="store_true", help="a small grid: seconds on a small model")
    p.add_argument("--fractions", nargs="+", metavar="F", help="resident fractions in [0, 1]")
    p.add_argument("--batches", nargs="+", metavar="B", help="decode batch sizes")
    p.add_argument("--output-lengths", nargs="+", metavar="N", help="new tokens per timed decode (>= 2)")
    p.add_argument("--contexts", nargs="+", metavar="T", help="tokens per sequence at preemption")
    p.add_argument("--repeats", metavar="N", help="timed repetitions per cell (decode: at least)")
    p.add_argument("--max-repeats", metavar="N", help="decode: repetitions at most, while the spread is above "
                   "--max-spread (default 10, --quick 5)")
    p.add_argument("--max-spread", metavar="F", help="decode: repeat while (max - min) / median of a cell's "
                   "times is above F (default 0.1)")
    p.add_argument("--link", metavar="GBPS|TARGET", help="CPU backend: emulate a host<->device link of GBPS "
                   "(e.g. 2.5), or one that makes a layer's copy as slow against its decode as on TARGET: "
                   f"{', '.join(TARGETS)}")
    p.add_argument("--threads", metavar="N", help="torch CPU threads (default: torch's own); on a machine "
                   "shared with other work, 1 gives steadier numbers (a busy core stalls OpenMP's others)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_options(args):
    """(ProfileSettings, dtype or None) of the shared options; sets torch's CPU threads when --threads is
    given (the document records the threads used)."""
    import torch

    if args.threads is not None:
        threads = _numbers("--threads", [args.threads], int)[0]
        if threads < 1:
            raise ConfigError(f"--threads={threads}: need at least 1")
        torch.set_num_threads(threads)
    return settings_from_args(args), (getattr(torch, args.dtype) if args.dtype else None)


def _numbers(option: str, values, kind):
    """Values of a list option, space- or comma-separated; ConfigError naming the option for a bad one."""
    out = []
    for v in (x for value in values for x in value.split(",") if x):
        try:
            out.append(kind(v))
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise ConfigError(f"{option}: {v!r} is not {what}") from None
    return tuple(out)


def settings_from_args(args) -> ProfileSettings:
    """ProfileSettings of `tidal profile`'s arguments: full() or quick(), the options given replacing it."""
    settings = ProfileSettings.quick() if args.quick else ProfileSettings.full()
    changes = {}
    for option, field, kind in (("--fractions", "fractions", float), ("--batches", "batches", int),
                                ("--output-lengths", "output_lengths", int), ("--contexts", "contexts", int)):
        values = getattr(args, field)
        if values is not None:
            changes[field] = _numbers(option, values, kind)
    if args.repeats is not None:
        changes["repeats"] = _numbers("--repeats", [args.repeats], int)[0]
    if args.max_repeats is not None:
        changes["max_repeats"] = _numbers("--max-repeats", [args.max_repeats], int)[0]
    elif changes.get("repeats", 0) > settings.max_repeats:  # --repeats alone raises the cap with it
        changes["max_repeats"] = changes["repeats"]
    if args.max_spread is not None:
        changes["max_spread"] = _numbers("--max-spread", [args.max_spread], float)[0]
    try:
        return settings.replace(**changes)
    except ConfigError as exc:  # name the option, not the field
        msg = str(exc)
        field = msg.split(":")[0].split("=")[0]
        if field in changes:
            msg = "--" + field.replace("_", "-") + msg[len(field):]
        raise ConfigError(msg) from None


def link_option(args):
    """--link as `run_profile` takes it: None, a bandwidth in GB/s or a LinkTarget (ConfigError naming
    --link otherwise)."""
    return None if args.link is None else parse_link(args.link, "--link")
