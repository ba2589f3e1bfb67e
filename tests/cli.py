"""`rlv` commands called in this process, as `python -m rlv_megatron.cli ...` would run them, without a new
interpreter's start-up (torch and the rest already imported). The entry point itself runs as a real process in
tests/test_packaging.py::test_console_script_help."""

import contextlib
import io
import subprocess


def rlv(*args: str) -> subprocess.CompletedProcess:
    """The command's exit status and what it printed (stdout, stderr)."""
    from rlv_megatron import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = cli.main(list(args))
        except SystemExit as e:  # argparse and the one-line errors end this way
            status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return subprocess.CompletedProcess(["rlv", *args], status or 0, out.getvalue(), err.getvalue())
