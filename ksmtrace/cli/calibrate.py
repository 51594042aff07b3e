"""``ksmtrace calibrate``: per-unit costs from microbenchmarks, or fitted to ksmd's real CPU."""
from __future__ import annotations


import click

from ksmtrace.cli import cli
from ksmtrace.cli._options import emit_json, json_option, note, quiet_option, table
from ksmtrace.progress import Progress


@cli.command("calibrate", context_settings={"max_content_width": 100})
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Cost file to write (JSON). Default: print it only.")
@click.option("--from-runs", "from_runs", is_flag=True,
              help="Fit to ksmd's CPU in the ground-truth traces given as RUNS (trace directories, or directories "
                   "searched for traces, e.g. the -o directories of `ksmtrace validate`).")
@click.argument("runs", nargs=-1, type=click.Path(exists=True))
@click.option("--base", type=click.Path(dir_okay=False, exists=True), default=None,
              help="With --from-runs: the per-unit costs the fitted group scales multiply "
                   "(default: the built-in table; a microbenchmark cost file is a good base).")
@click.option("--holdout-every", type=click.IntRange(min=0), default=3, show_default=True,
              help="With --from-runs: hold out runs for the error report (the 2nd run of each workload and "
                   "setting; every N-th single run); 0 = fit on all.")
@click.option("--window", type=float, default=1.0, show_default=True,
              help="With --from-runs: seconds of CPU per fitted data point.")
@click.option("--seconds", type=float, default=2.0, show_default=True,
              help="Without --from-runs: about how long the microbenchmarks run.")
@json_option
@quiet_option
def calibrate_cmd(output, from_runs, runs, base, holdout_every, window, seconds, as_json, quiet):
    """Measure or fit the cost model (nanoseconds per unit of work).

    Without --from-runs: microbenchmarks on this host (xxhash of a 4 KiB page, jhash2, memcmp of
    equal pages, an all-zero check, a page copy, mprotect of one page, a copy-on-write fault...)
    write a cost file.  With --from-runs: replay every ground-truth trace with the kernel's
    settings and fit a few groups of units (page visits, checksums, wake-ups, tree visits,
    merges) to ksmd's measured CPU with non-negative least squares; the report shows each run's
    error, held-out runs separately.  CPU seconds are always computed at report time from a run's
    raw counts and a cost file (`--cost FILE` of replay, compare, plot, fidelity).

    \b
    Example:
      ksmtrace calibrate -o host-costs.json
      ksmtrace calibrate --from-runs validate-out/ --base host-costs.json -o fitted.json
      ksmtrace calibrate --from-runs out/static-fast out/rewrite-fast out/vms-zero -o fitted.json
    """
    if runs and not from_runs:
        raise click.UsageError("trace directories are only read with --from-runs")
    if from_runs and not runs:
        raise click.UsageError("--from-runs needs at least one trace or directory")
    if not from_runs:
        from ksmtrace.lab.microbench import microbenchmark

        prog = Progress("calibrate", quiet=quiet)
        try:
            model = microbenchmark(seconds=seconds, progress=prog)
        finally:
            prog.close()
        if output:
            model.save(output)
        if as_json:
            emit_json(dict(model.to_json(), output=output))
            return
        notes = getattr(model, "notes", {})
        rows = [{"unit": u, "ns": model.ns[u], "how": notes.get(u, "built-in")} for u in model.ns]
        click.echo(table(rows))
        note("", quiet)
        note(model.source, quiet)
        if output:
            note(f"cost file written to {output}", quiet)
        return
    from ksmtrace.calibrate import fit_from_runs

    prog = Progress("calibrate", quiet=quiet)
    try:
        res = fit_from_runs(list(runs), base=base, holdout_every=holdout_every, window_s=window, progress=prog,
                            log=lambda m: note(m, quiet))
    finally:
        prog.close()
    if output:
        res.model.save(output)
    if as_json:
        emit_json(dict(res.to_json(), output=output))
        return
    rows = []
    for side, items in (("fit", res.train), ("held out", res.holdout)):
        for r in items:
            rows.append({"run": r["label"] + "/" + r["trace"].rsplit("/", 1)[-1], "set": side,
                         "real CPU (s)": r["real_cpu_s"], "model CPU (s)": r["model_cpu_s"],
                         "error": None if r["rel_error"] is None else f"{100 * r['rel_error']:+.1f}%"})
    click.echo(table(rows))
    s = res.summary()
    click.echo("")
    click.echo("group scales: " + ", ".join(f"{g}={v:.3g}" for g, v in res.scales.items()))
    for side in ("train", "holdout"):
        st = s[side]
        if st["runs"]:
            click.echo(f"{side}: {st['runs']} runs, mean |error| {100 * st['mean_abs_error']:.1f}%, "
                       f"max {100 * st['max_abs_error']:.1f}%, {st['within_25pct']} within 25%")
    note("", quiet)
    note(res.model.source, quiet)
    if output:
        note(f"cost file written to {output}", quiet)
