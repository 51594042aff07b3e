"""``ksmtrace compare``: several policies on one trace, side by side."""
from __future__ import annotations

import csv
import sys

import click

from ksmtrace.cli import cli
from ksmtrace.cli._options import echo_table, emit_json, executor_option, json_option, note, quiet_option, trace_argument
from ksmtrace.cli._replay_opts import params_from, replay_options, resolve_run, with_restrict, writes_option
from ksmtrace.outputs import check_output_dir
from ksmtrace.progress import Progress
from ksmtrace.results import FRAMES_SAVED_DEFINITION

COLUMNS = ["policy", "frames_saved_mean", "frames_saved_final", "pct_of_oracle", "cow_breaks", "cpu_seconds", "merges", "merge_latency_p50_s", "exposed_merges"]
#: with safe presets: which one, and the saving as a share of the unrestricted oracle's
RESTRICT_COLUMNS = ["restrict", "pct_of_unrestricted_oracle"]


def _num(v):
    """A number for a table, CSV or JSON: None for a missing or undefined value (never NaN)."""
    return None if v is None or (isinstance(v, float) and v != v) else v


def comparison_rows(results) -> list[dict]:
    rows = []
    for r in results:
        s = r.summary
        pct = _num(s["fraction_of_oracle_mean"])
        u = s.get("fraction_of_unrestricted_oracle_mean", s["fraction_of_oracle_mean"] if not r.spec.get("restrict") else None)
        rows.append({
            "policy": r.spec["policy"] if not r.spec.get("label") else r.spec["label"],
            "restrict": r.spec.get("restrict"),
            "run_id": r.run_id,
            "frames_saved_mean": round(s["frames_saved_mean"], 1),
            "frames_saved_final": s["frames_saved_final"],
            "oracle_saved_mean": round(s["oracle_saved_mean"], 1),
            "pct_of_oracle": None if pct is None else round(100 * pct, 1),
            "pct_of_unrestricted_oracle": None if _num(u) is None else round(100 * u, 1),
            "cow_breaks": s["cow_breaks"],
            "cpu_seconds": _num(s["cpu_seconds"]),
            "merges": s["merges"],
            "merge_latency_p50_s": _num(s["merge_latency_p50_s"]),
            "merge_latency_mean_s": _num(s["merge_latency_mean_s"]),
            "exposed_merges": s["exposed_merges"],
        })
    return rows


@cli.command("compare")
@trace_argument()
@click.option("--policies", default="oracle,ksm", show_default=True,
              help="Comma-separated policy names; NAME:key=value;key=value gives one its own parameters.")
@click.option("-p", "--param", "params", multiple=True, metavar="KEY=VALUE",
              help="Parameter applied to every policy that has it (repeatable).")
@click.option("-o", "--output", type=click.Path(file_okay=False), default=None, help="Write every run's result files here.")
@click.option("--csv", "as_csv", is_flag=True, help="CSV on stdout.")
@click.option("-j", "--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Workers running the replays (1 = here, one after another).")
@click.option("--presets", default=None, metavar="all|PRESET,...",
              help="Also replay every policy under each safe preset (all: zero-pages, same-domain, windows, "
                   "same-domain:process and, with VMA permissions in the trace, read-only): the saving each keeps "
                   "and the exposed merges it removes.")
@executor_option
@replay_options
@writes_option
@json_option
@quiet_option
def compare_cmd(trace, policies, params, output, as_csv, workers, presets, executor, engine, scope, cost, timing_cost, start_s,
                seed, restrict, writes, as_json, quiet):
    """Replay several policies on TRACE and compare memory saved, COW breaks and CPU.

    Memory saved is the mean over snapshots of frames_saved, and as a percentage of what a
    perfect dedup (the oracle) would save at the same snapshots.  Every policy is replayed under
    one scope (--scope auto: recorded when the trace has mergeable memory, else anon), so all
    savings count the same pages as the oracle's; the ksm profile follows the traced kernel.

    \b
    Example:
      ksmtrace compare my-trace --policies oracle,ksm,pksm,hashtable
      ksmtrace compare my-trace --policies "ksm,ksm:pages_to_scan=1000" --csv
      ksmtrace compare my-trace --policies oracle,ksm,pksm,hashtable -j 2
      ksmtrace compare my-trace --policies oracle,ksm --presets all
    """
    from ksmtrace.policies.registry import get_policy
    from ksmtrace.replay import RUN_PARAMS, compare, resolve_scope
    from ksmtrace.trace.reader import open_trace

    tr = open_trace(trace)
    if output:
        check_output_dir(output)  # refuse a directory we may not write before the replay, not after
    common = with_restrict(params_from(params), restrict)
    notes: list[str] = []
    variants = _presets(tr, presets, notes)
    specs = []
    scope, scope_why = resolve_scope(tr, scope)
    for item in [x.strip() for x in policies.split(",") if x.strip()]:
        name, _, rest = item.partition(":")
        own = params_from([kv for kv in rest.split(";") if kv]) if rest else {}
        cls = get_policy(name)
        known = {p["name"] for p in cls.parameter_table()} | set(RUN_PARAMS)
        merged = {k: v for k, v in common.items() if k in known}
        merged.update(own)
        merged, _, _, more = resolve_run(tr, name, merged, scope)
        notes += [n for n in more if n not in notes]
        specs.append((name, merged, item))
        for preset in variants:
            specs.append((name, {**merged, "restrict": preset}, item))
    prog = Progress("compare", quiet=quiet)
    try:
        results = compare(tr, [(name, p) for name, p, _ in specs], engine=engine, scope=scope,
                          timing_cost=timing_cost, report_cost=cost, start_s=start_s, seed=seed, progress=prog,
                          executor=None if workers == 1 and executor == "local" else executor, workers=workers,
                          writes=writes)
    finally:
        prog.close()
    for r, (name, _, label) in zip(results, specs):
        r.spec["label"] = label if label != name else None
        if output:
            r.write(output)
    rows = comparison_rows(results)
    restricted = any(r["restrict"] for r in rows)
    if as_json:
        emit_json({"trace": str(tr.path), "scope": scope, "scope_reason": scope_why, "notes": notes, "rows": rows,
                   "definition": FRAMES_SAVED_DEFINITION})
        return
    if as_csv:
        w = csv.DictWriter(sys.stdout, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
        return
    first = results[0].summary if results else {}
    oracle = first.get("unrestricted_oracle_saved_mean", first.get("oracle_saved_mean", 0.0))
    head = f"trace {tr.name}: {tr.n_snapshots} snapshots over {tr.times_s[-1]:.1f} s; "
    if oracle > 0:
        head += f"a perfect dedup (the oracle) saves {oracle:,.1f} frames ({oracle * 4096 / 2**20:,.1f} MiB) on average"
    else:
        head += "no duplicate pages in this scope: a perfect dedup (the oracle) saves nothing, so %oracle is undefined (-)"
    click.echo(head)
    click.echo(scope_why)
    for n in notes:
        click.echo(n)
    cols = COLUMNS[:1] + RESTRICT_COLUMNS[:1] + COLUMNS[1:4] + RESTRICT_COLUMNS[1:] + COLUMNS[4:] if restricted else COLUMNS
    echo_table(rows, cols, headers={"frames_saved_mean": "saved(mean)", "frames_saved_final": "saved(final)", "pct_of_oracle": "%oracle", "cpu_seconds": "cpu_s", "merge_latency_p50_s": "lat_p50_s", "exposed_merges": "exposed",
                                    "pct_of_unrestricted_oracle": "%unrestricted"})
    note("", quiet)
    note(FRAMES_SAVED_DEFINITION, quiet)
    if restricted:
        note("restrict: the safe preset the run obeyed (docs/safe-presets.md); %oracle is of the oracle under the "
             "same preset, %unrestricted of the oracle with none: the saving the preset keeps", quiet)
    note("-: undefined (no duplicates to save, or no merges to time)", quiet)


def _presets(tr, text: str | None, notes: list[str]) -> list[str]:
    """The presets of ``--presets`` (``all``: every one this trace can be replayed under)."""
    from ksmtrace.trace.restrict import parse_restriction

    if not text:
        return []
    if text.strip() == "all":
        out = ["zero-pages", "same-domain", "windows", "same-domain:process"]
        if tr.has_table("vmas"):
            out.append("read-only")
        else:
            notes.append("read-only preset left out: the trace has no vmas table (VMA permissions)")
        return out
    return [parse_restriction(x).spec for x in text.split(",") if x.strip() and parse_restriction(x) is not None]
