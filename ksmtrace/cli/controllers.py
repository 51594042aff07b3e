"""``ksmtrace controllers``: ksmtuned, KubeVirt's handler and the scan-time advisor against the best
static ksm setting on the frontier."""
from __future__ import annotations

import click

from ksmtrace.cli import cli
from ksmtrace.cli._options import (auto_scope_option, cost_file_option, emit_json, executor_for, executor_option,
                                   grid_option, json_option, no_plots_option, note, quiet_option, sweep_workers_option,
                                   write_answer, trace_argument)
from ksmtrace.progress import Progress


@cli.command("controllers")
@trace_argument()
@click.option("--host-memory", default=None, metavar="SIZE",
              help="The host's memory (MemTotal), e.g. 16G or 900M: free memory is this minus what the traced "
                   "processes use, and ksmtuned's and KubeVirt's rules act on it (needed for them).")
@click.option("--controller", "specs", multiple=True, metavar="NAME[:key=value,...]",
              help="A controller (repeatable; default: ksmtuned, kubevirt, scan-time), e.g. "
                   "ksmtuned:monitor_interval=5 to act every 5 s of the trace instead of every 60 s.")
@grid_option
@auto_scope_option
@cost_file_option
@click.option("-o", "--output", type=click.Path(file_okay=False), default=None,
              help="Directory for the static runs (ksm/), the controllers' runs (controllers/), controllers.json and "
                   "the figure controllers.png; a second call reuses the static runs.")
@no_plots_option
@sweep_workers_option
@executor_option
@json_option
@quiet_option
def controllers_cmd(trace, host_memory, specs, level, scope, cost, output, no_plots, workers, executor, as_json, quiet):
    """Replay ksm on TRACE under each controller and compare it with the static settings.

    Each controller retunes ksm during the run from the memory the traced processes use on a
    host of --host-memory (ksmtuned, kubevirt) or from its scan times (scan-time, the kernel's
    advisor).  Its saving (% of the oracle), ksmd CPU (% of one core) and COW breaks are set
    beside the static ksm setting that saves the most within the same CPU and the cheapest one
    that saves as much (docs/controllers.md).

    \b
    Example:
      ksmtrace controllers my-trace --host-memory 16G
      ksmtrace controllers sample-traces/vm --host-memory 900M --controller ksmtuned:monitor_interval=5 \\
          --controller kubevirt:interval=10 --controller scan-time -o out/controllers
      ksmtrace replay my-trace --controller ksmtuned --host-memory 16G      # one run, its trajectory
    """
    from pathlib import Path

    from ksmtrace.analysis.controllers import DEFAULT_CONTROLLERS, compare_controllers

    prog = Progress("controllers", quiet=quiet or as_json)
    try:
        cc = compare_controllers(trace, list(specs) or list(DEFAULT_CONTROLLERS), host_memory, output, level=level,
                                 scope=scope, cost=cost, workers=workers,
                                 executor=executor_for(workers, executor), progress=prog)
    finally:
        prog.close()
    files: dict[str, str] = {}
    if output:
        out = Path(output)
        files.update(write_answer(output, "controllers.json", cc.to_json()))
        if not no_plots:
            from ksmtrace import plot

            files["figure"] = str(plot.save(plot.controllers(cc), out / "controllers.png"))
    if as_json:
        emit_json({**cc.to_json(), "files": files})
        return
    click.echo(cc.text())
    for k, v in files.items():
        note(f"{k}: {v}", quiet)
