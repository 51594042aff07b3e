"""``ksmtrace info TRACE``: what a trace holds (over :func:`ksmtrace.trace.info.trace_info`)."""
from __future__ import annotations

import click

from ksmtrace.cli import cli
from ksmtrace.cli._options import emit_json, fmt, json_option, kv_lines, no_cache_option, table, trace_argument
from ksmtrace.trace.info import trace_info


@cli.command()
@trace_argument()
@click.option("--scope", type=click.Choice(["anon", "recorded"]), default="anon", show_default=True,
              help="Pages counted as dedup candidates: every private anonymous page, or only mergeable ones.")
@click.option("--max-rows", type=int, default=20, show_default=True, help="Per-snapshot rows shown (first and last); 0 = all.")
@no_cache_option
@json_option
def info(trace, scope, max_rows, as_json):
    """Summarise a trace: snapshots, processes, pages, duplicates, coverage, size on disk.

    Duplicates per snapshot are given twice: "saved frames" counts what a perfect
    deduplication would free on physical frames (pages already sharing a frame — fork, the
    shared zero page — count once); "hash-only" is present pages minus distinct hashes, the
    naive count.

    \b
    Example:
      ksmtrace info my.trace
      ksmtrace info my.trace --json | jq .bytes_per_page_snapshot
    """
    d = trace_info(trace, scope=scope)
    if as_json:
        emit_json(d)
        return
    h, has, cap = d["host"], d["has"], d["capture"]
    tracer = d.get("tracer") or {}
    bpp = d["bytes_per_page_snapshot"]
    lines = [
        ("trace", d["path"]),
        ("format", f"{d['format']} v{d['format_version']} (tracer {tracer.get('name', '?')} {tracer.get('version', '')})".rstrip()),
        ("complete", _completion(d)),
        ("snapshots", f"{d['snapshots']:,} ({d['keyframes']} keyframe(s)) over {d['time_span_s']:.3f} s"),
        ("processes", d["processes"]),
        ("pages", f"{d['pages']:,} at the last snapshot; {d['page_snapshots']:,} page-snapshots; {d['page_rows']:,} page rows"),
        ("distinct contents", d["distinct_contents"]),
        ("zero pages", f"{d['zero_filled']:,} zero-filled, {d['zero_page_mapped']:,} mapping the shared zero page (last snapshot)"),
        ("duplicates", f"{d['saved_frames']:,} frames a perfect dedup would save; {d['saved_hash_only']:,} by hashes only (last snapshot, scope {d['scope']})"),
        ("on disk", f"{d['bytes']:,} bytes = {'-' if bpp is None else f'{bpp:.3f}'} B per page-snapshot"),
        ("host", f"{h.get('kernel_release')} root={fmt(h.get('root'))} PFNs={fmt(h.get('pfn_readable'))} "
                 f"kpageflags={fmt(h.get('kpageflags_readable'))} soft-dirty={fmt(h.get('soft_dirty'))} THP={h.get('thp_enabled')}"),
        ("capture", f"scope={cap.get('scope')} interval={cap.get('interval_s')} s freeze={fmt(cap.get('freeze'))}"),
        ("recorded", f"PFNs={fmt(has['pfns'])} kpageflags={fmt(has['kpageflags'])} soft-dirty={fmt(has['soft_dirty'])} "
                     f"ground-truth={fmt(has['ground_truth'])} ({has['ground_truth_samples']} samples) "
                     f"fingerprints={fmt(has['sample_hash'])} contents={fmt(has['contents'])}"),
    ]
    if not has["pfns"]:
        lines.append(("note", "no PFNs (capture without root): fork-shared and zero-page frames cannot be told apart; frame counts are per page"))
    click.echo(kv_lines(lines))
    per = d["per_snapshot"]
    if max_rows and len(per) > max_rows:
        half = max(1, max_rows // 2)
        per = per[:half] + per[-half:]
    click.echo("")
    click.echo(table(per, ["snap", "t_s", "pages", "rows", "new", "changed", "gone", "candidates", "frames",
                           "saved_frames", "saved_hash_only", "zero_filled", "zero_page_mapped"],
                     {"saved_frames": "saved(frames)", "saved_hash_only": "saved(hash-only)", "zero_page_mapped": "zero_page"}))
    if d["process_list"]:
        click.echo("")
        rows = [dict(p, coverage=(None if p["coverage"] is None else round(p["coverage"], 3))) for p in d["process_list"]]
        click.echo(table(rows, ["proc", "pid", "comm", "first_snap", "last_snap", "state", "rss_pages", "captured_pages", "coverage"]))


def _completion(d: dict) -> str:
    """Whether the capture finished, in words."""
    if d["complete"]:
        return f"yes ({d['end_reason']})"
    if d["capture_running"]:
        return f"no: a capture is still writing this trace ({d['snapshots']} snapshot(s) committed so far)"
    s = (f"no: the capture was killed before it finished; the snapshot it was taking was cut, "
         f"the {d['snapshots']} committed before are complete")
    if d["cleaned"]:
        s += f" (removed its leftovers: {', '.join(d['cleaned'])})"
    return s
