"""``ksmtrace advise``: go or no-go for KSM on a trace, and the settings for a CPU budget."""
from __future__ import annotations

import click

from ksmtrace.cli import cli
from ksmtrace.cli._options import (cost_file_option, emit_json, executor_for, executor_option, json_option, note,
                                   quiet_option, sweep_workers_option, write_answer, trace_argument)
from ksmtrace.progress import Progress


@cli.command("advise")
@trace_argument()
@click.option("--cpu-budget", "budget", type=float, default=1.0, show_default=True, metavar="PCT",
              help="ksmd CPU the host can spend, in % of one core (0.1 % = 3.6 s of CPU per hour).")
@click.option("--target-latency", "latency", type=float, default=None, metavar="S",
              help="Also require duplicates to be merged within S seconds (p90 of the merge latency).")
@click.option("--min-saving", "min_saving", type=float, default=1.0, show_default=True, metavar="PCT",
              help="Go only when the saving is at least this % of the memory the candidate pages use.")
@click.option("--min-saving-mib", "min_saving_mib", type=click.FloatRange(min=0), default=1.0, show_default=True,
              metavar="MIB", help="... and at least this many MiB (a few KiB saved is not worth running ksmd).")
@cost_file_option
@click.option("-o", "--output", type=click.Path(file_okay=False), default=None,
              help="Keep every replay's result files here (a second call reuses them) and write advise.json.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Write the figure (the search, and the recommended run over time) to this file (.png/.svg/.pdf).")
@click.option("--no-attribution", is_flag=True, help="Skip the per-process opt-out replays.")
@sweep_workers_option
@executor_option
@json_option
@quiet_option
def advise_cmd(trace, budget, latency, min_saving, min_saving_mib, cost, output, plot_path, no_attribution, workers, executor, as_json, quiet):
    """Should KSM be enabled for the processes in TRACE, and with which settings?

    Searches ksm settings by replaying TRACE (a grid of pages_to_scan x sleep_millisecs, then
    its neighbours, then smart_scan, use_zero_pages, max_page_sharing and the scan-time advisor)
    for the most saving within the CPU budget, and prints the verdict, the recommended sysfs
    settings, the expected saving (MiB and general_profit), the time until 50 % and 90 % of it is
    there, ksmd CPU, COW breaks per second, the unmerge headroom, a confidence statement (from
    `fidelity` when the trace has ground truth), what short-lived processes get, and what each
    process (or cgroup) saves and costs, with the ones better opted out.

    \b
    Example:
      ksmtrace advise my-trace
      ksmtrace advise my-trace --cpu-budget 0.5 --target-latency 30 --plot advise.png
      ksmtrace advise sample-traces/vm --json
    """
    from ksmtrace.analysis.advise import advise

    prog = Progress("advise", quiet=quiet or as_json)
    try:
        adv = advise(trace, cpu_budget_pct=budget, target_latency_s=latency, min_saving_pct=min_saving, min_saving_mib=min_saving_mib, out_dir=output,
                     cost=cost, workers=workers,
                     executor=executor_for(workers, executor),
                     attribution=not no_attribution, progress=prog)
    finally:
        prog.close()
    files = {}
    if output:
        files.update(write_answer(output, "advise.json", adv.to_json()))
    if plot_path:
        from ksmtrace import plot

        files["figure"] = str(plot.save(plot.advise(adv), plot_path))
    if as_json:
        emit_json({**adv.to_json(), "files": files})
        return
    click.echo(adv.text())
    for k, v in files.items():
        note(f"{k}: {v}", quiet)
