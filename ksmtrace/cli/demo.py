"""``ksmtrace demo``: the policies compared at equal cost on a shipped sample trace, and the plots."""
from __future__ import annotations

import click

from ksmtrace.cli import cli
from ksmtrace.cli._options import emit_json, json_option, quiet_option, table
from ksmtrace.progress import Progress


def _ints(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r}: give comma-separated integers, e.g. 0,1,2,4,8") from None
    if not vals or any(v < 0 for v in vals):
        raise click.BadParameter(f"{text!r}: give comma-separated integers >= 0, e.g. 0,1,2,4,8")
    return vals


@cli.command("demo")
@click.option("-t", "--trace", "trace", default=None, metavar="NAME|PATH",
              help="A shipped sample trace (see --list) or a trace directory.  [default: vm]")
@click.option("-o", "--output", default="ksmtrace-demo", show_default=True, type=click.Path(file_okay=False),
              help="Directory for the plots, tables and result files.")
@click.option("--probation", default="0,1,2,4,8", show_default=True, metavar="N,N,...",
              help="pksm-delay probation_passes values to sweep.")
@click.option("--budget", type=float, default=None, metavar="PCT",
              help="The CPU budget (% of one core) at which the policies are set side by side.  [default: 1]")
@click.option("--grid", "level", type=click.Choice(["standard", "coarse"]), default="standard", show_default=True,
              help="The frontier's rate grid.")
@click.option("--no-plots", is_flag=True, help="Skip the figures (tables and result files only).")
@click.option("-j", "--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Processes for the sweeps.")
@click.option("--list", "list_only", is_flag=True, help="List the shipped sample traces and exit.")
@json_option
@quiet_option
def demo_cmd(trace, output, probation, budget, level, no_plots, workers, list_only, as_json, quiet):
    """Compare every policy at equal cost on a shipped real trace, check the simulated KSM against
    the real one, sweep the Delay plan, and draw the figures.

    On the sample trace (default: three QEMU guests booting the same kernel, captured with the
    real KSM running): the frontier first — ksm, pksm, pksm-delay and hashtable each swept over
    its scan rate, their saving at matched CPU budgets and the CPU each needs to keep 50 / 80 /
    95 % of the oracle's saving — then each policy at its best setting within one budget, ksm
    replayed as captured beside the kernel's own counters, and the pksm-delay probation sweep.
    Writes the figures (frontier-cpu, frontier-cow, timeline, latency, breakdown, heatmap) and
    the tables into the output directory.  Needs no root.

    \b
    Example:
      ksmtrace demo
      ksmtrace demo --trace python-sci -o demo-py
      ksmtrace demo --trace ./my.trace --probation 0,2,8 --json
    """
    from ksmtrace import samples
    from ksmtrace.demo import DEFAULT_SAMPLE, format_report, run_demo

    if list_only:
        rows = [{"name": s.name, "snapshots": s.snapshots, "MiB": round(s.trace_bytes / 2**20, 2), "title": s.title,
                 "path": str(s.path)} for s in samples.list_samples()]
        if as_json:
            emit_json(rows)
        else:
            click.echo(table(rows, ["name", "snapshots", "MiB", "title"]) if rows else "(no sample traces installed)")
        return
    prog = Progress("demo", quiet=quiet or as_json)
    try:
        res = run_demo(trace or DEFAULT_SAMPLE, output, probation_passes=_ints(probation), budget_pct=budget,
                       level=level, plots=not no_plots, workers=workers, progress=prog)
    finally:
        prog.close()
    if as_json:
        emit_json(res.to_json())
        return
    click.echo(format_report(res))
