"""The ``ksmtrace`` program's entry point: Ctrl-C while the command modules load (numba, polars,
the policies: a second or more on a busy host) ends like Ctrl-C anywhere else — one line, exit
130 — instead of Python's KeyboardInterrupt traceback."""
from __future__ import annotations

import sys

EXIT_INTERRUPTED = 130


def main(argv=None):
    try:
        from ksmtrace.cli import main as cli_main
    except KeyboardInterrupt:
        print("ksmtrace: interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    return cli_main(argv)
