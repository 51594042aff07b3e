"""``ksmtrace strengths SRC DST``: add the sampled hash at every strength to a trace captured with
``--contents`` (over :func:`ksmtrace.trace.strengths.add_strengths`)."""
from __future__ import annotations

import click

from ksmtrace.cli import cli
from ksmtrace.cli._options import note, quiet_option
from ksmtrace.progress import Progress


@cli.command("strengths")
@click.argument("src", type=click.Path())
@click.argument("dst", type=click.Path())
@click.option("--hash-key", type=click.Path(dir_okay=False), default=None,
              help="The capture's hash-key file: use the capture's own word permutation (else a random one).")
@quiet_option
def strengths_cmd(src, dst, hash_key, quiet):
    """Write DST: the trace SRC with the sampled hash at 8, 16, ..., 1024 words (one u32 each, one
    word permutation), computed from the page contents SRC stored (capture --contents).  Policies
    then model hash collisions exactly at every strength (pksm and uksm hash_strength).

    \b
    Example:
      ksmtrace strengths my-trace my-trace-strengths --hash-key key.hex
      ksmtrace replay my-trace-strengths --policy pksm -p hash_strength=16
    """
    from ksmtrace.trace.strengths import add_strengths, read_key_file

    key = read_key_file(hash_key) if hash_key else None
    prog = Progress("strengths", quiet=quiet)
    try:
        tr = add_strengths(src, dst, key=key, progress=prog)
    finally:
        prog.close()
    note(f"{tr.path}: {tr.n_snapshots} snapshots with the sampled hash at every strength "
         f"({tr.capture.get('strength_permutation')})", quiet)
