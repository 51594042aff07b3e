"""``ksmtrace fidelity TRACE``: how closely the ksm replay agrees with the real kernel in a ground-truth trace."""
from __future__ import annotations

import click

from ksmtrace.cli import cli
from ksmtrace.cli._options import emit_json, json_option, no_cache_option, note, quiet_option, trace_argument
from ksmtrace.cli._replay_opts import params_from, writes_option
from ksmtrace.errors import KsmtraceError
from ksmtrace.progress import Progress


@cli.command("fidelity", context_settings={"max_content_width": 100})
@trace_argument()
@click.option("-p", "--param", "params", multiple=True, metavar="KEY=VALUE",
              help="Override a ksm parameter read from the trace (repeatable), e.g. -p profile=6.10.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Write the real and simulated trajectories overlaid to this image (.png, .svg, .pdf).")
@click.option("--cost", type=click.Path(dir_okay=False), default=None,
              help="Cost file for the CPU comparison (default: the shipped, calibrated one).")
@click.option("--timing-cost", type=click.Path(dir_okay=False), default=None,
              help="Cost file for the simulated daemon's clock (default: the shipped one).")
@click.option("--sim-step", type=float, default=0.05, show_default=True,
              help="Seconds between simulated samples (finer than the snapshots; 0 = at snapshots only).")
@click.option("--engine", type=click.Choice(["fast", "reference"]), default="fast", show_default=True,
              help="Replay engine.")
@click.option("--intervals", default=None, metavar="K,K,...",
              help="Interval study: also replay coarser traces keeping every K-th snapshot (e.g. 1,2,4,8,16) and "
                   "print how fidelity degrades, with a recommendation.")
@click.option("--rewrite-period", type=float, default=None,
              help="Interval study: the workload's rewrite period in seconds, to express the recommendation in it "
                   "(read from the trace for ksmtrace's own workloads).")
@click.option("--interval-plot", type=click.Path(dir_okay=False), default=None,
              help="Interval study: write the fidelity-vs-interval figure to this image.")
@click.option("--events-plot", type=click.Path(dir_okay=False), default=None,
              help="Write the event-by-event figure (merges per interval, time to merge per page, full-scan ends) "
                   "to this PNG; needs a trace with kernel events.")
@writes_option
@no_cache_option
@json_option
@quiet_option
def fidelity_cmd(trace, params, plot_path, cost, timing_cost, sim_step, engine, intervals, rewrite_period,
                 interval_plot, events_plot, writes, as_json, quiet):
    """Compare the real KSM counters recorded in TRACE with a replay of the ksm policy.

    TRACE must hold ground truth: it was captured while the host ran KSM (`ksmtrace validate`
    makes such traces).  The replay uses the kernel's own settings read from the trace
    (pages_to_scan, sleep_millisecs, smart_scan, use_zero_pages, max_page_sharing, advisor),
    the profile matching the kernel release, scope=recorded, the host's HZ, and starts ksmd
    when the real one started.  For every counter — pages_sharing, pages_shared,
    pages_unshared, pages_volatile, ksm_zero_pages, full_scans, pages_scanned, pages_skipped,
    cow_ksm (real) vs COW breaks (simulated), ksmd CPU vs modelled CPU — it prints the final
    values, the error, the NRMSE over time and the time to 90% of the final value.

    \b
    Example:
      ksmtrace fidelity validate-out/static-fast/run-1.trace
      ksmtrace fidelity vms.trace --plot vms-fidelity.png --json > vms-fidelity.json
      ksmtrace fidelity app.trace -p profile=6.10
      ksmtrace fidelity fine.trace --intervals 1,2,4,8,16,32 --interval-plot intervals.png
    """
    from ksmtrace.fidelity import fidelity
    from ksmtrace.trace.reader import open_trace

    tr = open_trace(trace)
    prog = Progress("fidelity", quiet=quiet)
    try:
        rep = fidelity(tr, params_from(params) or None, engine=engine, cost=cost, timing_cost=timing_cost,
                       sim_step=sim_step, progress=prog, writes=writes)
    finally:
        prog.close()
    if plot_path:
        from ksmtrace.fidelity.plot import trajectories
        from ksmtrace.plot import save

        save(trajectories(rep), plot_path)
    if events_plot:
        if rep.events is None:
            raise KsmtraceError(f"{trace}: --events-plot needs a trace with kernel events (the ksm_events table: "
                                "capture --kernel-events as root)")
        from ksmtrace.fidelity.events import event_plot
        from ksmtrace.plot import save

        save(event_plot(rep), events_plot)
    study, advice = None, None
    if intervals:
        from ksmtrace.fidelity.goals import rewrite_period as _period
        from ksmtrace.fidelity.interval import interval_study, recommend

        try:
            ks = sorted({int(x) for x in intervals.split(",") if x.strip()})
        except ValueError:
            raise click.BadParameter(f"{intervals!r}: expected integers like 1,2,4,8", param_hint="--intervals") from None
        if not ks or ks[0] < 1:
            raise click.BadParameter("factors must be >= 1", param_hint="--intervals")
        period = rewrite_period
        if period is None and rep.validate:
            period = _period(str(rep.validate.get("workload")), rep.validate.get("workload_params"))
        study = interval_study(tr, ks, cost=cost, timing_cost=timing_cost)
        advice = recommend(study, rewrite_period=period)
        if interval_plot:
            from ksmtrace.fidelity.plot import interval_plot as _iplot
            from ksmtrace.plot import save

            save(_iplot(study, rewrite_period=period, full_scan_s=rep.full_scan_period_s), interval_plot)
    if as_json:
        out = rep.to_json()
        out["plot"] = plot_path
        if study is not None:
            out["interval_study"] = study
            out["recommendation"] = advice
        emit_json(out)
        return
    click.echo(rep.text())
    if study is not None:
        from ksmtrace.textfmt import table

        cols = ["every", "interval_s", "sharing_real", "sharing_sim", "sharing_final_err", "sharing_nrmse",
                "t90_err_scans", "cow_real", "cow_sim", "cow_ratio", "full_scans_diff"]
        click.echo("")
        click.echo(table([{c: r.get(c) for c in cols} for r in study]))
        click.echo("")
        click.echo(f"recommendation: {advice}")
    from ksmtrace.fidelity.compare import NRMSE_NOTE

    note("", quiet)
    note(NRMSE_NOTE, quiet)
    if plot_path:
        note(f"plot written to {plot_path}", quiet)
