"""``ksmtrace redact TRACE -o OUT``: a copy of a trace fit to share (over :mod:`ksmtrace.trace.redact`)."""
from __future__ import annotations

import click

from ksmtrace.cli import cli
from ksmtrace.cli._options import emit_json, json_option, kv_lines, note, quiet_option, trace_argument
from ksmtrace.progress import Progress


@cli.command("redact")
@trace_argument()
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False),
              help="Directory of the redacted trace (new or empty; yours, nobody else's to write).")
@click.option("--key-file", type=click.Path(dir_okay=False), default=None,
              help="Re-key with the key in this file (64 hex digits; created 0600 if missing), so several "
                   "redacted traces stay comparable with each other. Default: a fresh random key, never stored.")
@click.option("--names/--no-names", default=True, show_default=True,
              help="Keep process names (comm); --no-names replaces them with proc-N. Command lines are always dropped.")
@click.option("--ground-truth/--no-ground-truth", default=True, show_default=True,
              help="Keep the host's KSM counter samples (fidelity needs them).")
@json_option
@quiet_option
def redact_cmd(trace, output, key_file, names, ground_truth, as_json, quiet):
    """Write a copy of TRACE that can be shared: the same replay results, no identifiers.

    Page hashes are re-keyed with a secret key (equal pages stay equal); physical frame numbers
    become frame classes (pages sharing a frame or a huge page still do); virtual addresses, pids
    and start times are remapped keeping their order; command lines are dropped; cgroups, uids
    and file paths become labels; times are shifted; the hostname, the capture's command line
    and targets are dropped; page contents are never copied.  Two redactions cannot be linked by
    any identifier.  docs/trace-format.md says what a trace reveals.

    \b
    Example:
      ksmtrace redact my.trace -o my-shared.trace
      ksmtrace redact a.trace -o a-shared.trace --key-file team.key --no-names
    """
    from ksmtrace.keys import key_file_warning, read_or_create_key
    from ksmtrace.outputs import check_output_dir
    from ksmtrace.trace.reader import open_trace
    from ksmtrace.trace.redact import redact

    tr = open_trace(trace)
    check_output_dir(output, empty=True, what="trace directory")
    key = None
    if key_file:
        key, created = read_or_create_key(key_file)
        warning = key_file_warning(key_file)
        if warning:
            click.echo(f"ksmtrace: warning: {warning}", err=True)
        if created:
            note(f"new key written to {key_file} (mode 0600)", quiet)
    prog = Progress("redact", quiet=quiet)
    try:
        out = redact(tr, output, key=key, names=names, ground_truth=ground_truth, progress=prog)
    finally:
        prog.close()
    info = {"trace": str(out.path), "from": str(tr.path), "snapshots": out.n_snapshots,
            "key_fingerprint": out.capture.get("hash", {}).get("key_fingerprint"),
            "key": "from " + str(key_file) if key_file else "random, not stored",
            "names": "kept" if names else "proc-N", "ground_truth": bool(ground_truth and out.has_ground_truth)}
    if as_json:
        emit_json(info)
        return
    click.echo(kv_lines(list(info.items())))
