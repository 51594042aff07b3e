"""``ksmtrace frontier``: each policy's saving against its CPU and its COW breaks, swept over its scan rate."""
from __future__ import annotations

import click

from ksmtrace.analysis.frontier import DEFAULT_POLICIES
from ksmtrace.cli import cli
from ksmtrace.cli._options import (auto_scope_option, cost_file_option, emit_json, executor_for, executor_option,
                                   grid_option, json_option, no_plots_option, note, quiet_option, sweep_workers_option,
                                   write_answer, trace_argument)
from ksmtrace.cli._replay_opts import restrict_option
from ksmtrace.errors import KsmtraceError
from ksmtrace.progress import Progress


def floats(text: str, what: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise KsmtraceError(f"--{what} {text!r}: give comma-separated numbers, e.g. 0.1,1,5") from None
    if not vals or any(not v > 0 for v in vals):
        raise KsmtraceError(f"--{what} {text!r}: give comma-separated numbers > 0, e.g. 0.1,1,5")
    return vals


@cli.command("frontier")
@trace_argument()
@click.option("--policies", default=",".join(DEFAULT_POLICIES), show_default=True,
              help="Comma-separated policies; each is swept over its rate parameters (oracle is always the ceiling).")
@grid_option
@click.option("--budgets", default="0.1,1,5", show_default=True, metavar="PCT,...",
              help="CPU budgets (% of one core) for the matched-budget table.")
@click.option("--targets", default="50,80,95", show_default=True, metavar="PCT,...",
              help="Shares of the oracle's saving for the CPU-needed table.")
@auto_scope_option
@cost_file_option
@click.option("-o", "--output", type=click.Path(file_okay=False), default=None,
              help="Directory for every run's result files, frontier.json, frontier-runs.csv and the two figures "
                   "(frontier-cpu.png, frontier-cow.png); a second call reuses the runs.")
@no_plots_option
@sweep_workers_option
@executor_option
@restrict_option
@json_option
@quiet_option
def frontier_cmd(trace, policies, level, budgets, targets, scope, cost, output, no_plots, workers, executor, restrict, as_json,
                 quiet):
    """Sweep each policy over its scan rate on TRACE and compare them at equal cost.

    Every policy becomes a curve: its mean saving (in % of the oracle, the ceiling) against
    ksmd CPU (% of one core: modelled CPU seconds / trace duration) and against COW breaks.
    Prints each policy's saving at matched CPU budgets, the CPU it needs to keep 50 / 80 / 95 %
    of the oracle's saving (and from when), and each policy's front.

    \b
    Example:
      ksmtrace frontier my-trace
      ksmtrace frontier my-trace --policies ksm,hashtable --budgets 0.5,2 -o frontier/
      ksmtrace frontier sample-traces/prefork --grid coarse --json
    """
    from pathlib import Path

    from ksmtrace.analysis.frontier import frontier

    names = [p.strip() for p in policies.split(",") if p.strip()]
    prog = Progress("frontier", quiet=quiet or as_json)
    try:
        fr = frontier(trace, names, output, level=level, scope=scope, budgets_pct=floats(budgets, "budgets"),
                      targets_pct=floats(targets, "targets"), cost=cost, workers=workers, restrict=restrict,
                      executor=executor_for(workers, executor), progress=prog)
    finally:
        prog.close()
    files: dict[str, str] = {}
    if output:
        out = Path(output)
        files = write_answer(output, "frontier.json", fr.to_json(), csv=("frontier-runs.csv", fr.runs))
        if not no_plots:
            from ksmtrace import plot

            for kind, make in (("cpu", plot.frontier_cpu), ("cow", plot.frontier_cow)):
                files[f"figure_{kind}"] = str(plot.save(make(fr), out / f"frontier-{kind}.png"))
    if as_json:
        emit_json({**fr.to_json(), "files": files})
        return
    click.echo(fr.text())
    for k, v in files.items():
        note(f"{k}: {v}", quiet)
