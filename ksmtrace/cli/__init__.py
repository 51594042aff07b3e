"""The ksmtrace command line: a thin click layer over the library.

One error boundary lives here: every :class:`~ksmtrace.errors.KsmtraceError` becomes one line on
stderr and a non-zero exit; ``--debug`` re-raises with the traceback.
"""
import sys

import click

from ksmtrace._version import __version__
from ksmtrace.errors import KsmtraceError


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KsmtraceError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"ksmtrace: error: {exc}", err=True)
            ctx.exit(exc.exit_code)


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
    try:
        cli.main(args=argv, prog_name="ksmtrace", standalone_mode=True)
    except KeyboardInterrupt:  # pragma: no cover - interactive
        click.echo("ksmtrace: interrupted", err=True)
        sys.exit(130)


# Commands live one per module; importing them registers them on ``cli``.
from ksmtrace.cli import commands as _commands  # noqa: E402,F401
