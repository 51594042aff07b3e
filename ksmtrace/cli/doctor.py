"""``ksmtrace doctor``: why memory is not merging, and what each fix would unlock."""
from __future__ import annotations

import click

from ksmtrace.cli import cli
from ksmtrace.cli._options import emit_json, json_option, quiet_option, trace_argument
from ksmtrace.progress import Progress


@cli.command("doctor")
@trace_argument()
@click.option("--pages-to-scan", type=click.IntRange(min=1), default=None,
              help="Scan size the 'too young' class assumes (default: the real KSM's during the capture, else 100).")
@click.option("--sleep-millisecs", type=click.IntRange(min=0), default=None,
              help="Sleep the 'too young' class assumes (default: the real KSM's during the capture, else 20).")
@json_option
@quiet_option
def doctor_cmd(trace, pages_to_scan, sleep_millisecs, as_json, quiet):
    """Why is the memory of the processes in TRACE not merging?

    Sorts every recorded page into classes — not marked mergeable (no madvise/prctl), shared
    anonymous or shmem mappings, file pages, mergeable but younger than two full scans, THP,
    fork-shared, zero-page mappings, swapped, hugetlb — and prices each class that a fix would
    unlock: the oracle's saving of what ksmd scans plus the class, minus what it scans alone.
    Says the usual fix (mem-merge=on, PR_SET_MEMORY_MERGE, shared=off, ...) and what the trace
    cannot tell (pinned pages, memory outside the capture's scope).

    \b
    Example:
      ksmtrace doctor my-trace
      ksmtrace doctor my-trace --pages-to-scan 1000 --json
    """
    from ksmtrace.analysis.doctor import doctor

    prog = Progress("doctor", quiet=quiet or as_json)
    try:
        dx = doctor(trace, pages_to_scan=pages_to_scan, sleep_millisecs=sleep_millisecs, progress=prog)
    finally:
        prog.close()
    if as_json:
        emit_json(dx.to_json())
        return
    click.echo(dx.text())
