"""Shared CLI options and output helpers (results to stdout, progress and messages to stderr)."""
from __future__ import annotations

import os
from typing import Any, Sequence

import click

from ksmtrace.textfmt import dumps, fmt, kv_lines, table  # noqa: F401  (re-exported for the commands)

json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON on stdout.")


def _sample_or_path(value: str) -> str:
    """A trace argument as given, or the shipped sample of that name when no such path exists
    (``ksmtrace replay vm``): a path always wins, so a local directory called ``vm`` is read."""
    if not value or os.path.lexists(value) or "/" in value or os.sep in value:
        return value
    from ksmtrace.samples import sample_names, sample_path

    return str(sample_path(value)) if value in sample_names() else value


def _trace_callback(ctx, param, value):
    if isinstance(value, tuple):
        return tuple(_sample_or_path(v) for v in value)
    return _sample_or_path(value)


def trace_argument(name: str = "trace", **kw):
    """TRACE: a trace directory, or the name of a shipped sample trace (vm, prefork, python-sci, ...)."""
    return click.argument(name, type=click.Path(), callback=_trace_callback, **kw)


def _no_cache(ctx, param, value):
    """Set KSMTRACE_NO_CACHE for the command (the environment reaches a sweep's worker processes
    too) and restore it afterwards (commands can run in-process, one after another)."""
    if value:
        before = os.environ.get("KSMTRACE_NO_CACHE")
        os.environ["KSMTRACE_NO_CACHE"] = "1"

        def restore() -> None:
            if before is None:
                os.environ.pop("KSMTRACE_NO_CACHE", None)
            else:
                os.environ["KSMTRACE_NO_CACHE"] = before

        ctx.call_on_close(restore)
    return value


no_cache_option = click.option("--no-cache", is_flag=True, expose_value=False, callback=_no_cache, is_eager=True,
                               help="Prepare the trace afresh: neither read nor write the prepared-trace cache.")
quiet_option = click.option("-q", "--quiet", is_flag=True, help="No progress and no messages on stderr.")
executor_option = click.option(
    "--executor", default="local", show_default=True, metavar="local|dask|dask://HOST:PORT",
    help="Where the runs execute: local worker processes; dask = a Dask cluster started here; "
         "dask://HOST:PORT = a running Dask scheduler (traces and outputs on storage its workers share). "
         "Dask needs pip install 'ksmtrace[dask]'.")


# options of the commands that sweep replays for an answer (frontier, controllers, advise)
grid_option = click.option("--grid", "level", type=click.Choice(["standard", "coarse"]), default="standard",
                           show_default=True,
                           help="Rate grid swept: standard (6 scan sizes x 3 sleeps for ksm/pksm) or coarse (4 x 2).")
auto_scope_option = click.option("--scope", type=click.Choice(["auto", "recorded", "anon"]), default="auto",
                                 show_default=True,
                                 help="Candidate pages: auto = recorded when the trace has mergeable memory, else anon.")
cost_file_option = click.option("--cost", "cost", type=click.Path(dir_okay=False), default=None,
                                help="Cost file (JSON, from `ksmtrace calibrate`) for ksmd CPU.")
no_plots_option = click.option("--no-plots", is_flag=True, help="With -o: skip the figures.")
sweep_workers_option = click.option("-j", "--workers", type=click.IntRange(min=1), default=1, show_default=True,
                                    help="Worker processes for the sweeps.")


def executor_for(workers: int, executor: str) -> str | None:
    """The executor a sweeping command passes on (None: run in this process)."""
    return None if workers == 1 and executor == "local" else executor


def write_answer(output, name: str, obj: Any, csv: tuple[str, Any] | None = None) -> dict[str, str]:
    """Write ``obj`` as strict JSON to ``output/name`` (and a polars frame as ``csv = (file, frame)``),
    atomically, into a directory that is the user's own (:mod:`ksmtrace.outputs`). Returns the
    files written by kind."""
    from ksmtrace.outputs import open_output_dir

    with open_output_dir(output) as d:
        files = {"json": str(d.write_bytes(name, (dumps(obj) + "\n").encode()))}
        if csv is not None:
            files["csv"] = str(d.write_atomic(csv[0], csv[1].write_csv))
    return files


def emit_json(obj: Any) -> None:
    """Strict JSON on stdout."""
    click.echo(dumps(obj))


def echo_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, headers: dict[str, str] | None = None) -> None:
    click.echo(table(rows, columns, headers))


def note(msg: str, quiet: bool = False) -> None:
    """An informational line on stderr (suppressed by --quiet)."""
    if not quiet:
        click.echo(msg, err=True)
