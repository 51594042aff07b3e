"""The ``ksmtrace`` program's entry point: Ctrl-C while the command modules load (numba, polars,
the policies: a second or more on a busy host) ends like Ctrl-C anywhere else — one line, exit
130 — instead of Python's KeyboardInterrupt traceback."""
from __future__ import annotations

import os
import sys

EXIT_INTERRUPTED = 130


def interrupted() -> None:
    """One line and exit 130, now: without the interpreter's finalisation, during which Python has
    already put SIGINT back to its default action (a second Ctrl-C, or one that a library's thread
    re-delivers, would end the process by the signal, exit -2) and half-imported modules tear down."""
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    try:
        print("ksmtrace: interrupted", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass
    os._exit(EXIT_INTERRUPTED)


def main(argv=None):
    try:
        from ksmtrace.cli import main as cli_main

        return cli_main(argv)
    except KeyboardInterrupt:  # while the modules load, or outside any command
        interrupted()
