"""Running the `tidal` command line in-process, as the CLI tests do."""
import contextlib
import io

from tidal.cli import main


def run_cli(argv) -> tuple[int, str, str]:
    """`tidal ARGV`: (exit status, stdout, stderr); argparse's usage errors give their SystemExit code."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exc:
            rc = exc.code
    return rc, out.getvalue(), err.getvalue()
