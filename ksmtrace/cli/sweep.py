"""``ksmtrace sweep``: one policy over a grid of parameter values, in parallel and resumable."""
from __future__ import annotations

import click

from ksmtrace.cli import cli
from ksmtrace.cli._options import echo_table, emit_json, executor_option, json_option, note, quiet_option, trace_argument
from ksmtrace.cli._replay_opts import replay_options, writes_option
from ksmtrace.errors import KsmtraceError
from ksmtrace.progress import Progress
from ksmtrace.results import FRAMES_SAVED_DEFINITION

SHOWN = ["frames_saved_mean", "pct_of_oracle", "cow_breaks", "cpu_seconds", "merges", "merge_latency_p50_s", "exposed_merges"]
HEADERS = {"frames_saved_mean": "saved(mean)", "pct_of_oracle": "%oracle", "cpu_seconds": "cpu_s",
           "merge_latency_p50_s": "lat_p50_s", "exposed_merges": "exposed"}


@cli.command("sweep")
@trace_argument()
@click.option("--policy", "-P", "policy", required=True, help="Policy name (see `ksmtrace policies`).")
@click.option("-p", "--param", "grid_items", multiple=True, metavar="KEY=LIST",
              help="A parameter and its values: comma-separated values and ranges START:STOP[:STEP] or "
                   "START:STOP:xFACTOR (STOP included). Repeatable; the grid is the cartesian product.")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory for every run's result files and the table (sweep.parquet, sweep.csv).")
@click.option("-j", "--workers", type=click.IntRange(min=1), default=None,
              help="Workers (default: one per CPU, at most one per run; 1 = run here, one by one).")
@executor_option
@click.option("--pareto", is_flag=True, help="Also print the non-dominated runs (most saved, least CPU, fewest COW breaks).")
@click.option("--dry-run", is_flag=True, help="List the grid and which runs are already done; run nothing.")
@replay_options
@writes_option
@json_option
@quiet_option
def sweep_cmd(trace, policy, grid_items, out_dir, workers, executor, pareto, dry_run, engine, scope, cost, timing_cost, start_s,
              seed, restrict, writes, as_json, quiet):
    """Replay TRACE through POLICY for every combination of parameter values.

    Runs go to worker processes (or a Dask cluster: --executor); each run's result is written to
    DIR as soon as it finishes, and a run whose result is already in DIR is not run again, so an
    interrupted sweep resumes where it stopped when the same command is given again.  DIR is
    bound to TRACE, POLICY and the run settings (DIR/sweep.json): another trace into it is an
    error, and a second sweep into it waits for the first.  The table (one row per grid point:
    the swept parameters, scope, engine, run id, memory saved, % of oracle, COW breaks, CPU
    seconds, merges, merge latency, exposed merges) is printed and written to DIR/sweep.parquet
    and DIR/sweep.csv.

    \b
    Example:
      ksmtrace sweep my-trace --policy ksm -p pages_to_scan=100:1600:x2 -p sleep_millisecs=20,200 -o sweeps/ksm --pareto
      ksmtrace sweep my-trace -P pksm-delay -p probation_passes=0:4 -p on_change=restart,keep -o sweeps/delay
      ksmtrace sweep my-trace -P ksm -p pages_to_scan=100,1000 -p restrict=none,same-domain,zero-pages -o sweeps/safe
      ksmtrace plot sweeps/ksm --kind pareto -o ksm-pareto.png
    """
    from ksmtrace.replay import resolve_scope, trace_params
    from ksmtrace.sweep import open_sweep_dir, parse_grid, pareto_front, plan_sweep, run_plan, sweep_table
    from ksmtrace.trace.reader import open_trace

    grid = parse_grid(grid_items)
    if restrict is not None:
        if "restrict" in grid:
            raise KsmtraceError("--restrict and -p restrict= both given: put every preset in -p restrict=a,b")
        if grid:
            grid["restrict"] = [restrict]
    tr = open_trace(trace)
    scope, scope_why = resolve_scope(tr, scope)
    implied, notes = trace_params(tr, policy, {k: None for k in grid})
    if grid:  # an empty grid is an error plan_sweep reports
        grid.update({k: [v] for k, v in implied.items() if k not in grid})
    plan = plan_sweep(trace, policy, grid, out_dir, engine=engine, scope=scope, timing_cost=timing_cost,
                      start_s=start_s, seed=seed, writes=writes)
    why = [scope_why] + notes  # said once the sweep can start (an error is one line, nothing before it)
    n_total = len({r.run_id for r in plan.runs})
    n_todo = len(plan.todo)
    if dry_run:
        rows = [{**{k: v for k, v in r.params.items() if k in plan.keys}, "run_id": r.run_id,
                 "status": "done" if r.done else "to run"} for r in plan.runs]
        if as_json:
            emit_json({"trace": plan.trace_path, "policy": plan.policy, "grid": grid, "out_dir": str(plan.out_dir),
                       "runs": rows, "to_run": n_todo})
            return
        echo_table(rows, plan.keys + ["status", "run_id"])
        for line in why:
            note(line, quiet)
        note(f"{n_total} runs, {n_total - n_todo} already in {plan.out_dir}, {n_todo} to run", quiet)
        return
    prog = Progress(f"sweep {plan.policy}", quiet=quiet)
    try:
        with open_sweep_dir(plan, on_wait=lambda msg: note(msg, quiet)) as sweep_dir:
            n_todo = len(plan.todo)  # another sweep may have finished some while we waited
            for line in why:
                note(line, quiet)
            note(f"sweep {plan.policy} on {plan.trace_name}: {n_total} runs, {n_total - n_todo} already in "
                 f"{plan.out_dir}, {n_todo} to run", quiet)
            ids = run_plan(plan, workers=workers, progress=prog, executor=executor)
            prog.close()
            table = sweep_table(plan, cost=cost, actual_ids=ids)
            pq, csv = sweep_dir.write_table(table)
    except BaseException as exc:
        prog.close()
        if isinstance(exc, KeyboardInterrupt):
            done = sum(1 for r in plan.todo if (plan.out_dir / f"{r.run_id}.json").exists())
            note(f"interrupted: {n_total - n_todo + done} of {n_total} runs are saved in {plan.out_dir}; "
                 "give the same command again to resume", quiet)
        raise
    front = pareto_front(table) if pareto else None
    if as_json:
        out = {"trace": plan.trace_path, "policy": plan.policy, "grid": grid, "out_dir": str(plan.out_dir),
               "table": str(pq), "csv": str(csv), "rows": table.to_dicts(), "definition": FRAMES_SAVED_DEFINITION}
        if front is not None:
            out["pareto"] = front.to_dicts()
        emit_json(out)
        return
    cols = plan.keys + SHOWN
    echo_table(table.to_dicts(), cols, HEADERS)
    if front is not None:
        click.echo("")
        click.echo(f"non-dominated runs ({front.height} of {table.height}: no other run saves more with less CPU "
                   "and fewer COW breaks):")
        echo_table(front.to_dicts(), cols + ["run_id"], HEADERS)
    note("", quiet)
    note(FRAMES_SAVED_DEFINITION, quiet)
    note(f"table written to {pq} and {csv}", quiet)
