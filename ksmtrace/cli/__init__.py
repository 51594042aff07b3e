"""The ksmtrace command line: a thin click layer over the library.

One error boundary lives here: every :class:`~ksmtrace.errors.KsmtraceError` becomes one line on
stderr and a non-zero exit; so does an operating-system error the library did not anticipate (a
file it may not write, a full disk: ``ksmtrace: error: PATH: Permission denied``); Ctrl-C exits
130 (128 + SIGINT) with one line; ``--debug`` re-raises with the traceback.
"""
import errno
import sys

import click

from ksmtrace._version import __version__
from ksmtrace.errors import KsmtraceError

EXIT_INTERRUPTED = 130


def os_error_line(exc: OSError) -> str:
    """One line for an OSError: the file it concerns and the system's words."""
    what = exc.strerror or str(exc)
    name = exc.filename
    return f"{name}: {what}" if name is not None else what


class _Group(click.Group):
    def invoke(self, ctx):
        def debug() -> bool:  # set by the group's callback, inside super().invoke
            return bool(ctx.obj and ctx.obj.get("debug"))

        try:
            return super().invoke(ctx)
        except KsmtraceError as exc:
            if debug():
                raise
            click.echo(f"ksmtrace: error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            if debug():
                raise
            click.echo("ksmtrace: interrupted", err=True)
            ctx.exit(EXIT_INTERRUPTED)
        except BrokenPipeError:  # `ksmtrace ... | head`: the reader went away
            sys.stderr.close()
            ctx.exit(1)
        except OSError as exc:
            if debug() or exc.errno is None or exc.errno == errno.EPIPE:
                raise
            click.echo(f"ksmtrace: error: {os_error_line(exc)}", err=True)
            ctx.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ksmtrace")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.pass_context
def cli(ctx, debug):
    """ksmtrace: capture page-hash traces of live processes, replay them through simulated
    page-deduplication policies (KSM, PKSM, ...) and compare memory saved, COW breaks and CPU.

    \b
    Example:
      ksmtrace demo
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def main(argv=None):
    """The program (a Ctrl-C outside a command is the entry point's: :mod:`ksmtrace._entry`)."""
    cli.main(args=argv, prog_name="ksmtrace", standalone_mode=True)


# Commands live one per module; importing them registers them on ``cli``.
from ksmtrace.cli import commands as _commands  # noqa: E402,F401
