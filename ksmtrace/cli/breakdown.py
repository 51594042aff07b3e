"""``ksmtrace breakdown``: where a trace's duplicate frames are, snapshot by snapshot (no replay)."""
from __future__ import annotations

import sys

import click

from ksmtrace.cli import cli
from ksmtrace.cli._options import echo_table, emit_json, json_option, no_cache_option, note, quiet_option, trace_argument

SHOWN = ["snap", "t_s", "candidate_pages", "base_frames", "oracle_saved", "zero_saved", "within_process_saved",
         "across_process_saved", "same_domain_saved", "windows_saved", "same_process_saved", "read_only_saved",
         "hash_only_saved"]
HEADERS = {"candidate_pages": "candidates", "base_frames": "frames", "oracle_saved": "oracle", "zero_saved": "zero",
           "within_process_saved": "within_proc", "across_process_saved": "across_proc",
           "same_domain_saved": "same_domain", "windows_saved": "windows", "same_process_saved": "same_proc",
           "read_only_saved": "read_only", "hash_only_saved": "hash_only"}
#: what each safe preset keeps, in the summary line (ksmtrace.trace.restrict)
PRESET_SUMMARY = (("zero_saved", "zero-pages"), ("same_domain_saved", "same-domain"), ("windows_saved", "windows"),
                  ("same_process_saved", "same-domain:process"), ("read_only_saved", "read-only"))


def _pct(a: float, b: float):
    return None if not b else round(100.0 * a / b, 1)


def summary_line(summary: dict) -> str:
    """The mean-over-snapshots sentence, with no undefined share printed as a number."""
    pf, po = summary["pct_of_frames"], summary["pct_of_oracle"]
    if pf.get("oracle_saved") is None:
        return "mean over snapshots: no candidate pages in this scope, so there is nothing to deduplicate"
    head = f"mean over snapshots: duplicates {pf['oracle_saved']}% of frames"
    if po.get("oracle_saved") is None:
        return head + " (no duplicate frames: nothing for any dedup to save)"
    kept = ", ".join(f"{name} {po[col]}%" for col, name in PRESET_SUMMARY if po.get(col) is not None)
    return (head + f" (zero pages {po['zero_saved']}% of them, within one process {po['within_process_saved']}%, "
            f"across processes {po['across_process_saved']}%); excluding zero pages {pf['nonzero_saved']}% of frames; "
            f"of the saving, the safe presets keep: {kept}")


@cli.command("breakdown")
@trace_argument()
@click.option("--scope", type=click.Choice(["auto", "recorded", "anon"]), default="auto", show_default=True,
              help="Candidate pages: recorded = mergeable VMAs (what ksmd scans); anon = every private anonymous page; "
                   "auto = recorded when the trace has mergeable memory, else anon.")
@click.option("--csv", "as_csv", is_flag=True, help="CSV on stdout (every column).")
@no_cache_option
@json_option
@quiet_option
def breakdown_cmd(trace, scope, as_csv, as_json, quiet):
    """Split TRACE's duplicate frames at every snapshot into all-zero pages, duplicates within
    one process and duplicates across processes, and show what each safe preset keeps (the
    oracle under it, as `replay --restrict` obeys it): same-domain (nothing shared across uid +
    cgroup), windows (Microsoft's rule: the same, but all-zero pages are common), same-domain per
    process (per VM), read-only (when the trace has VMA permissions); zero = the zero-pages preset.

    Counted on physical frames, as the oracle counts: frames already shared by fork count once,
    so oracle = zero + within_proc + across_proc is exactly the oracle's saving.  hash_only is
    the naive duplicate-hash count, shown for comparison.  All numbers are 4 KiB frames.

    \b
    Example:
      ksmtrace breakdown my-trace
      ksmtrace breakdown my-trace --scope anon --json
      ksmtrace plot my-trace --kind breakdown -o breakdown.png
    """
    from ksmtrace.analysis.breakdown import BREAKDOWN_DEFINITIONS, breakdown
    from ksmtrace.replay import resolve_scope
    from ksmtrace.trace.reader import open_trace

    tr = open_trace(trace)
    scope, scope_why = resolve_scope(tr, scope)
    df = breakdown(tr, scope)
    known = [c for c in df.columns if c not in ("snap", "t_s") and df[c].null_count() < df.height]
    means = {c: float(df[c].mean() or 0.0) for c in known} if df.height else {}
    summary = {
        "snapshots": df.height,
        "mean_frames": means,
        "pct_of_frames": {c: _pct(means[c], means["base_frames"]) for c in means if c.endswith("_saved")},
        "pct_of_oracle": {c: _pct(means[c], means["oracle_saved"]) for c in means if c.endswith("_saved")},
    }
    if as_json:
        emit_json({"trace": str(tr.path), "scope": scope, "scope_reason": scope_why, "rows": df.to_dicts(),
                   "summary": summary, "definitions": BREAKDOWN_DEFINITIONS})
        return
    if as_csv:
        sys.stdout.write(df.write_csv())
        return
    click.echo(f"trace {tr.name}: {df.height} snapshots, scope {scope}; numbers are 4 KiB frames")
    echo_table(df.to_dicts(), [c for c in SHOWN if c in known or c in ("snap", "t_s")], HEADERS)
    click.echo("")
    if df.height:
        click.echo(summary_line(summary))
    click.echo(scope_why)
    note("", quiet)
    for k in ("zero_saved", "within_process_saved", "across_process_saved", "same_domain_saved", "windows_saved",
              "same_process_saved", "read_only_saved", "hash_only_saved"):
        if k in known:
            note(f"{HEADERS.get(k, k)}: {BREAKDOWN_DEFINITIONS[k]}", quiet)
