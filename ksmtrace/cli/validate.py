"""``ksmtrace validate``: run workloads under the real KSM while capturing them, then compare."""
from __future__ import annotations

import json
from pathlib import Path

import click

from ksmtrace.cli import cli
from ksmtrace.cli._options import emit_json, json_option, note, quiet_option
from ksmtrace.policies.base import parse_assignments
from ksmtrace.progress import Progress


def _settings_help() -> str:
    from ksmtrace.fidelity.settings import SETTINGS_HELP

    return "; ".join(f"{k}: {v}" for k, v in SETTINGS_HELP.items())


@cli.command("validate", context_settings={"max_content_width": 100})
@click.option("--workload", default="static", show_default=True, metavar="NAME",
              help="static, rewrite, samewrite, zero, forkdiverge, churn (seeded generators), vms (QEMU guests booting the same "
                   "kernel; run sample-traces/vm/prepare.sh first), prefork (gunicorn pool under load; -w gunicorn=PATH).")
@click.option("-w", "--workload-param", "wparams", multiple=True, metavar="KEY=VALUE",
              help="Workload parameter (repeatable), e.g. -w processes=2 -w pages=2048.")
@click.option("--command", default=None, metavar="CMD",
              help="Validate an arbitrary command instead (run with `sh -c`, all its anonymous memory mergeable "
                   "unless -w merge_any=0; ready after -w warmup=S seconds, default 2).")
@click.option("--settings", "preset", default="fast", show_default=True, metavar="NAME",
              help="KSM parameter set. " + "defaults | fast | nosmart | zero | chains | defaults-nosmart.")
@click.option("-s", "--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override one KSM setting of the set (repeatable), e.g. -s pages_to_scan=500.")
@click.option("--duration", type=float, default=10.0, show_default=True, help="Seconds captured after the first snapshot.")
@click.option("--interval", type=float, default=0.25, show_default=True, help="Seconds between snapshots.")
@click.option("--runs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Real runs of the workload (racy workloads need two or more for the spread goal).")
@click.option("--ksm-sample-interval", type=float, default=0.1, show_default=True,
              help="Seconds between ground-truth samples of /sys/kernel/mm/ksm (besides one per snapshot).")
@click.option("-o", "--output", default="validate-out", show_default=True, type=click.Path(file_okay=False),
              help="Directory for the traces, fidelity reports (.json) and plots (.png).")
@click.option("--label", default=None, help="Name of this workload x settings (default: WORKLOAD-SETTINGS).")
@click.option("--no-plot", is_flag=True, help="Do not draw the trajectories of each run.")
@json_option
@quiet_option
def validate_cmd(workload, wparams, command, preset, sets, duration, interval, runs, ksm_sample_interval, output,
                 label, no_plot, as_json, quiet):
    """Run a workload under the real KSM with chosen settings while capturing it, then compare
    the kernel's counters with the ksm replay (as `ksmtrace fidelity` does) and check the goals.

    Every KSM setting is saved first and restored on every path — normal end, errors, Ctrl-C,
    SIGTERM — with run=2 (unmerge) before max_page_sharing changes and at the end, and `run` left
    as found.  Needs root.  Parameter sets:

    \b
      defaults          the kernel defaults (pages_to_scan=100 sleep_millisecs=20 smart_scan=1
                        use_zero_pages=0 max_page_sharing=256 advisor_mode=none)
      fast              a 10x faster scan (pages_to_scan=1000)
      nosmart           fast, smart_scan=0
      zero              fast, use_zero_pages=1
      chains            fast, max_page_sharing=8
      defaults-nosmart  defaults, smart_scan=0

    \b
    Example:
      ksmtrace validate --workload static -w processes=2 -w pages=2048 --settings fast --duration 8
      ksmtrace validate --workload rewrite -w period=1 --settings defaults --runs 2 -o out/
      ksmtrace validate --workload vms -w guests=3 --settings zero --duration 40 --interval 1
      ksmtrace validate --command "python3 my_server.py" --duration 30 --interval 1 --runs 2
    """
    from ksmtrace.fidelity.goals import evaluate_goals, goals_table
    from ksmtrace.fidelity.settings import resolve_settings
    from ksmtrace.lab.validate import ValidateOptions, validate

    opts = ValidateOptions(workload=workload, workload_params=parse_assignments(list(wparams)), command=command,
                           settings=preset, setting_overrides=parse_assignments(list(sets)), duration=duration,
                           interval=interval, runs=runs, output=output, ksm_sample_interval=ksm_sample_interval,
                           label=label, plot=not no_plot)
    opts.validate()
    resolve_settings(preset, opts.setting_overrides)  # bad settings fail before anything starts
    prog = Progress("validate", quiet=quiet)
    try:
        records = validate(opts, progress=prog, log=lambda m: note(m, quiet))
    finally:
        prog.close()
    wl_params = records[0].workload.get("params", opts.workload_params) if records else opts.workload_params
    racy = records[0].racy if records else False
    goals = evaluate_goals([r.report for r in records], workload=opts.name, settings=preset, racy=racy,
                           params=wl_params)
    out_dir = Path(output) / (label or opts.default_label())
    summary = {"label": label or opts.default_label(), "workload": opts.name, "settings": preset,
               "runs": [r.to_json() for r in records], "goals": goals}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    if as_json:
        emit_json(summary)
        return
    for r in records:
        click.echo(r.report.text())
        click.echo("")
    click.echo(goals_table(goals))
    note("", quiet)
    note(f"traces, fidelity reports and plots in {out_dir}", quiet)
