"""``ksmtrace fleet``: several hosts' traces (one hash key) — sharing within vs across hosts, the
sharing matrix, and a colocation what-if."""
from __future__ import annotations

import click

from ksmtrace.cli import cli
from ksmtrace.cli._options import echo_table, emit_json, executor_option, json_option, note, quiet_option, trace_argument
from ksmtrace.progress import Progress

STEP_SHOWN = ["step", "t_s", "base_frames", "intra_host_saved", "cross_host_saved", "fleet_saved", "zero_saved",
              "fleet_distinct_contents", "wall_skew_s"]
STEP_HEADERS = {"base_frames": "frames", "intra_host_saved": "intra_host", "cross_host_saved": "cross_host",
                "fleet_saved": "fleet", "zero_saved": "zero", "fleet_distinct_contents": "distinct", "wall_skew_s": "skew_s"}


def _snaps(text: str | None):
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected comma-separated snapshot indices (negative: from the end)") from None


def _matrix_rows(labels, mat):
    return [{"": labels[i], **{str(j): round(float(mat[i][j]), 1) for j in range(len(labels))}} for i in range(len(labels))]


@cli.command("fleet")
@trace_argument("traces", nargs=-1, required=True)
@click.option("--scope", type=click.Choice(["recorded", "anon"]), default="recorded", show_default=True,
              help="Candidate pages: recorded = mergeable VMAs (what ksmd scans); anon = every private anonymous page.")
@click.option("--snaps", "snaps", default=None, metavar="LIST",
              help="Aligned snapshots to count (comma-separated indices; -1 = the last). Default: all.")
@click.option("--capacity", type=click.IntRange(min=1), default=None,
              help="Colocation what-if: units (VMs / processes) per host. Default: no what-if.")
@click.option("--hosts", "n_hosts", type=click.IntRange(min=1), default=None,
              help="Hosts for the what-if (default: as few as hold every unit at --capacity).")
@click.option("--place-at", type=int, default=-1, show_default=True, help="Aligned snapshot the placement is made at.")
@click.option("--top-units", type=click.IntRange(min=0), default=20, show_default=True,
              help="Units (processes) in the unit sharing matrix: the largest N.")
@click.option("--partitions", type=int, default=16, show_default=True,
              help="Hash-prefix partitions (a power of two): more = less memory per partition task.")
@click.option("--sketch", is_flag=True, help="Count with mergeable HyperLogLog sketches instead of exactly (huge fleets).")
@click.option("--sketch-precision", "precision", type=int, default=14, show_default=True,
              help="Sketch registers = 2^P; standard error of a distinct count 1.04/sqrt(2^P).")
@click.option("--work-dir", type=click.Path(file_okay=False), default=None,
              help="Where partition files go (default: a private temporary directory, removed at the end; "
                   "on shared storage with a remote Dask scheduler).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Write the host sharing-matrix heatmap here (.png, .svg or .pdf).")
@click.option("--units", type=click.Choice(["MiB", "frames"]), default="MiB", show_default=True, help="Units of the figure.")
@click.option("-j", "--workers", type=click.IntRange(min=1), default=None,
              help="Workers for the host and partition tasks (default: one per CPU).")
@executor_option
@json_option
@quiet_option
def fleet_cmd(traces, scope, snaps, capacity, n_hosts, place_at, top_units, partitions, sketch, precision, work_dir,
              plot_path, units, workers, executor, as_json, quiet):
    """How much more would dedup save across the hosts of a fleet than within each?

    TRACES are one trace per host, captured with one --hash-key (their key fingerprints must
    agree).  Snapshot i of every trace is aligned snapshot i.  Counted on physical frames as the
    oracle counts them on each host: intra_host = every host's own oracle saving; cross_host =
    what merging across hosts frees on top (a content held by frames on k hosts frees k - 1);
    zero pages are freed within each host.  Also: which hosts (and processes) share most, and
    with --capacity K a colocation what-if: the units placed greedily on hosts of K units, against
    their current placement and the bound (all on one host).  Numbers are 4 KiB frames.

    \b
    Example:
      ksmtrace fleet sample-traces/fleet-vm/guest0 sample-traces/fleet-vm/guest1 sample-traces/fleet-vm/guest2 --capacity 2
      ksmtrace fleet /shared/traces/web* --executor dask://sched:8786 --work-dir /shared/tmp/fleet --plot fleet.png
    """
    from ksmtrace.analysis.fleet import DEFINITIONS, fleet

    prog = Progress("fleet", quiet=quiet)
    try:
        res = fleet(list(traces), scope=scope, snaps=_snaps(snaps), partitions=partitions, sketch=sketch,
                    precision=precision, top_units=top_units, capacity=capacity, n_hosts=n_hosts, place_at=place_at,
                    executor=executor, workers=workers, work_dir=work_dir, progress=prog)
    finally:
        prog.close()
    if plot_path:
        from ksmtrace import plot

        plot.save(plot.fleet_matrix(res, units=units), plot_path)
    if as_json:
        out = res.to_json()
        if plot_path:
            out["figure"] = plot_path
        emit_json(out)
        return
    summ = res.summary()
    m = summ["mean_frames"]
    click.echo(f"fleet of {len(res.hosts)} hosts, hash key {res.hosts[0].key_fingerprint}, scope {scope}, "
               f"{res.steps.height} aligned snapshots (snapshot index), {res.method} counts; numbers are 4 KiB frames")
    hosts = [{"host": h.index, "trace": h.name, "hostname": h.hostname, "snapshots": h.n_snapshots} for h in res.hosts]
    import polars as pl

    ht = res.host_table.group_by("host").agg([pl.col(c).mean() for c in ("base_frames", "intra_host_saved", "zero_saved",
                                                                         "distinct_contents")]).sort("host")
    for row, r in zip(hosts, ht.iter_rows(named=True)):
        row.update({k: round(v, 1) for k, v in r.items() if k != "host"})
    echo_table(hosts, None, {"base_frames": "frames(mean)", "intra_host_saved": "intra_host", "zero_saved": "zero",
                             "distinct_contents": "distinct"})
    click.echo("")
    echo_table(res.steps.to_dicts(), STEP_SHOWN, STEP_HEADERS)
    click.echo("")
    click.echo(f"mean over aligned snapshots: fleet saving {summ['fleet_saved_pct_of_frames']}% of frames, "
               f"of which across hosts {summ['cross_host_pct_of_fleet_saved']}% "
               f"({m['cross_host_saved']:,.0f} of {m['fleet_saved']:,.0f} frames)")
    click.echo("")
    labels = [f"{h.index}:{h.name}" for h in res.hosts]
    click.echo("host sharing matrix (mean frames; off-diagonal: distinct contents both hosts hold; "
               "diagonal: the host's own saving); columns are host indices")
    echo_table(_matrix_rows(labels, res.host_matrix_mean), None)
    um = res.unit_matrix_mean
    if um is not None and len(res.unit_labels) > len(res.hosts):
        click.echo("")
        click.echo(f"unit sharing matrix, the {len(res.unit_labels)} largest processes (mean frames; diagonal: "
                   "what merging inside the process frees)")
        echo_table(_matrix_rows([f"{i}:{lab}" for i, lab in enumerate(res.unit_labels)], um), None)
    p = res.placement
    if p:
        click.echo("")
        click.echo(f"colocation what-if at aligned snapshot {p['snapshot']}: {p['units']} units, {p['capacity']} per host "
                   f"(frames freed by merging across the units of each host; zero pages {p['zero_saved']:,} and "
                   f"duplicates inside units {p['self_saved'] - p['zero_saved']:,} are freed wherever they run)")
        rows = []
        for name in ("current", "greedy"):
            q = p[name]
            rows.append({"placement": name, "hosts": q["hosts"], "max_per_host": q["max_units_per_host"],
                         "saved": q["saved"], "%bound": q["pct_of_bound"],
                         "groups": " | ".join(", ".join(g) for g in q["groups"])})
        rows.append({"placement": "bound (one host)", "hosts": 1, "max_per_host": p["units"], "saved": p["bound_saved"],
                     "%bound": 100.0, "groups": "all"})
        echo_table(rows, ["placement", "hosts", "max_per_host", "saved", "%bound", "groups"])
    note("", quiet)
    for k in ("intra_host_saved", "cross_host_saved", "fleet_saved", "host_matrix"):
        note(f"{STEP_HEADERS.get(k, k)}: {DEFINITIONS[k]}", quiet)
    if plot_path:
        note(f"figure written to {plot_path}", quiet)
