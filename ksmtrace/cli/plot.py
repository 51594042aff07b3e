"""``ksmtrace plot``: figures from result files (and, for the sharing breakdown, from a trace)."""
from __future__ import annotations

from pathlib import Path

import click

from ksmtrace.cli import cli
from ksmtrace.cli._options import emit_json, json_option, no_cache_option, note, quiet_option
from ksmtrace.errors import KsmtraceError

KINDS = ("timeline", "pareto", "latency", "breakdown", "heatmap")


def _is_trace(path: Path) -> bool:
    from ksmtrace.trace.schema import MANIFEST

    return path.is_dir() and (path / MANIFEST).is_file()


def _breakdown_source(paths: list[Path], scope: str | None):
    """A trace directory, or results whose spec names one trace (then its scope is the default)."""
    from ksmtrace.results import read_results
    from ksmtrace.trace.reader import open_trace

    from ksmtrace.replay import resolve_scope

    if len(paths) == 1 and _is_trace(paths[0]):
        tr = open_trace(paths[0])
        return tr, resolve_scope(tr, scope)[0]
    results = read_results(paths)
    traces = sorted({r.spec.get("trace") for r in results if r.spec.get("trace")})
    if len(traces) != 1:
        raise KsmtraceError("--kind breakdown needs one trace: give the trace directory (or results of a single trace)")
    scopes = sorted({r.spec.get("scope") for r in results if r.spec.get("scope")})
    tr = open_trace(traces[0])
    return tr, scope or (scopes[0] if len(scopes) == 1 else resolve_scope(tr, None)[0])


@cli.command("plot")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Image file to write: .png, .svg or .pdf (by suffix).")
@click.option("-k", "--kind", type=click.Choice(KINDS), default="timeline", show_default=True,
              help="timeline: saved vs oracle, COW breaks, CPU over time; pareto: saving vs CPU and vs COW breaks, "
                   "one point per run; latency: merge-latency CDF; breakdown: zero / within / across process "
                   "duplicates of a TRACE; heatmap: fraction merged per process over time.")
@click.option("--units", type=click.Choice(["MiB", "frames"]), default="MiB", show_default=True,
              help="Memory axis units (frames are 4 KiB).")
@click.option("--cost", "cost", type=click.Path(dir_okay=False), default=None,
              help="Cost file (JSON, from `ksmtrace calibrate`) for CPU seconds (timeline, pareto).")
@click.option("--y", "y_metric", type=click.Choice(["saved", "pct"]), default="saved", show_default=True,
              help="pareto: memory saved as mean frames_saved (in --units) or mean % of the oracle.")
@click.option("--top", type=click.IntRange(min=1), default=20, show_default=True, help="heatmap: processes shown.")
@click.option("--value", type=click.Choice(["fraction", "merged"]), default="fraction", show_default=True,
              help="heatmap: merged/candidate pages per process, or merged pages.")
@click.option("--scale", type=click.Choice(["percentile", "log", "linear"]), default=None,
              help="heatmap colour scale (default: percentile for fraction, log for merged).")
@click.option("--scope", type=click.Choice(["recorded", "anon"]), default=None,
              help="breakdown: candidate pages (default: the results' scope, or chosen from the trace: recorded "
                   "when it has mergeable memory, else anon).")
@no_cache_option
@json_option
@quiet_option
def plot_cmd(inputs, output, kind, units, cost, y_metric, top, value, scale, scope, as_json, quiet):
    """Draw a figure from INPUTS (result .json files or directories of them; a trace directory
    for --kind breakdown) into an image file.

    Every axis carries its units; the title says which trace, policies and parameters are shown
    (parameters not named are at their defaults).  The same inputs give a byte-identical file.

    \b
    Example:
      ksmtrace compare my-trace --policies oracle,ksm,pksm -o results/
      ksmtrace plot results/ -o timeline.png
      ksmtrace plot results/ --kind latency -o latency.svg
      ksmtrace plot sweeps/ksm --kind pareto --y pct -o pareto.png
      ksmtrace plot my-trace --kind breakdown -o breakdown.png
    """
    from ksmtrace import plot

    for p in inputs:
        if not p.exists():
            raise KsmtraceError(f"{p}: no such file or directory")
    if kind == "breakdown":
        trace, scope = _breakdown_source(list(inputs), scope)
        fig = plot.breakdown(trace, scope=scope, trace_name=trace.name, units=units)
        runs = []
    else:
        from ksmtrace.results import read_results

        for p in inputs:
            if _is_trace(p):
                raise KsmtraceError(f"{p}: is a trace, not results; replay it first "
                                    f"(ksmtrace replay {p} -o results/) or use --kind breakdown")
        results = read_results(list(inputs))
        runs = [r.run_id for r in results]
        if kind == "timeline":
            fig = plot.timeline(results, units=units, cost=cost)
        elif kind == "pareto":
            fig = plot.pareto(results, y=y_metric, units=units, cost=cost)
        elif kind == "latency":
            fig = plot.latency(results)
        else:
            fig = plot.heatmap(results, value=value, top=top, scale=scale)
    path = plot.save(fig, output)
    if as_json:
        emit_json({"kind": kind, "path": str(path), "runs": runs})
        return
    note(f"{kind} plot written to {path}", quiet)
