"""``ksmtrace capture``: a thin layer over the tracer found through the ``ksmtrace.tracers``
entry point (the ksmtrace library never imports capture code by name)."""
from __future__ import annotations

import sys

import click

from ksmtrace.cli import cli
from ksmtrace.cli._options import emit_json, json_option, kv_lines, note, quiet_option
from ksmtrace.progress import Progress
from ksmtrace.tracer import load_tracer


@cli.command(context_settings={"max_content_width": 100})
@click.option("-o", "--output", required=True, type=click.Path(), help="Trace directory to create (must not exist, or be empty).")
@click.option("-p", "--pid", "pids", type=int, multiple=True, help="Capture this process (repeatable). The capture ends when all --pid/--tree targets are gone.")
@click.option("--name", "names", multiple=True, metavar="REGEX", help="Capture processes whose comm or command line matches (re-evaluated every snapshot; repeatable).")
@click.option("--tree", "trees", type=int, multiple=True, metavar="PID", help="Capture PID and all its descendants, including children born during the capture.")
@click.option("--cgroup", "cgroups", multiple=True, metavar="PATH", help="Capture the processes of a cgroup v2 (and its sub-cgroups), re-read every snapshot.")
@click.option("--all", "all_", is_flag=True, help="Capture every user process with anonymous memory (not ksmtrace itself, not kernel threads).")
@click.option("--interval", type=float, default=1.0, show_default=True, help="Seconds between snapshot starts.")
@click.option("--duration", type=float, default=None, help="Stop after this many seconds (default: until Ctrl-C).")
@click.option("--count", type=int, default=None, help="Stop after this many snapshots (with --duration: whichever comes first).")
@click.option("--scope", type=click.Choice(["mergeable", "anon", "all"]), default="anon", show_default=True,
              help="mergeable: VMAs marked mergeable (what KSM scans); anon: every private anonymous page; all: file pages too.")
@click.option("--freeze", is_flag=True, help="Stop the targets (SIGSTOP or cgroup.freeze) while a snapshot is read; always resumed, even if ksmtrace dies. "
              "Refuses ksmtrace's ancestors, session leaders, init/systemd, sshd and other users' processes; refused with --all.")
@click.option("--freeze-unsafe", is_flag=True, help="With --freeze: stop even the processes --freeze refuses (not with --all).")
@click.option("--fingerprints", is_flag=True, help="Also record a PKSM-style sampled hash and 64/256/1024-byte prefix hashes per page.")
@click.option("--files", "files", multiple=True, type=click.Path(), metavar="PATH",
              help="Also record the resident page cache of the files under PATH (repeatable; read without changing residency).")
@click.option("--contents", is_flag=True, help="Also store page contents (each distinct content once, zstd). Off by default: contents are private.")
@click.option("--hash-key", type=click.Path(dir_okay=False), default=None, help="Key file shared across captures/hosts (created, 0600, if missing). Default: a random key per capture, never stored.")
@click.option("--keyframe-every", type=int, default=0, show_default=True, help="Write a full keyframe every N snapshots (0: only snapshot 0).")
@click.option("--ksm-sample-interval", type=float, default=None, help="Also sample the real KSM counters every SECONDS between snapshots.")
@click.option("--no-soft-dirty", is_flag=True, help="Do not use (or clear) soft-dirty bits even when the kernel has them.")
@click.option("--no-ground-truth", is_flag=True, help="Do not sample /sys/kernel/mm/ksm, /proc/vmstat or ksm_stat.")
@click.option("--workers", type=int, default=0, show_default=True, help="Read and hash large page lists in N worker processes.")
@click.option("--kernel-events/--no-kernel-events", default=None,
              help="Record the ksm:* tracepoints and the targets' write faults in private tracefs instances "
                   "(default: on when root and the kernel has them; a note says why not).")
@click.option("--kernel-events-buffer", "kernel_events_buffer", type=int, default=4096, show_default=True, metavar="KIB",
              help="Trace buffer per CPU and instance for --kernel-events; lost events are counted.")
@click.option("--nice", type=int, default=None, help="Run the capture (every thread and worker) at this nice value (-20..19; 19: yield to everything else).")
@click.option("--sched-idle", is_flag=True, help="Run the capture under SCHED_IDLE: it only gets CPU time no other task wants (ksmd and the targets go first).")
@click.option("--tracer", "tracer_name", default="procfs", show_default=True, help="Capture backend (entry point in ksmtrace.tracers).")
@json_option
@quiet_option
@click.pass_context
def capture(ctx, output, pids, names, trees, cgroups, all_, interval, duration, count, scope, freeze, freeze_unsafe, fingerprints,
            files, contents, hash_key, keyframe_every, ksm_sample_interval, no_soft_dirty, no_ground_truth, workers,
            kernel_events, kernel_events_buffer, nice, sched_idle, tracer_name, as_json, quiet):
    """Snapshot the memory of live processes into a delta-encoded Parquet trace.

    Every snapshot records, per target process, every page in scope: a keyed hash of its
    content, its flags (anonymous, swapped, exclusive, zero-filled, THP, KSM, soft-dirty...)
    and its physical frame when readable (root). Only pages that appeared, changed or vanished
    are stored after the first snapshot. Ctrl-C ends the capture after the snapshot in progress
    (twice: discards it); the trace is always valid.

    \b
    Example:
      ksmtrace capture --name qemu --interval 2 --duration 600 -o vms.trace
      ksmtrace capture --pid 1234 --count 10 --scope mergeable --freeze -o app.trace
      ksmtrace info vms.trace
    """
    tracer = load_tracer(tracer_name)
    targets = tracer.targets(pids=pids, names=names, trees=trees, cgroups=cgroups, all=all_)
    options = tracer.options(
        output=output,
        targets=targets,
        interval=interval,
        duration=duration,
        count=count,
        scope=scope,
        freeze=freeze,
        freeze_unsafe=freeze_unsafe,
        fingerprints=fingerprints,
        files=tuple(files),
        contents=contents,
        hash_key=hash_key,
        keyframe_every=keyframe_every,
        ksm_sample_interval=ksm_sample_interval,
        soft_dirty=not no_soft_dirty,
        ground_truth=not no_ground_truth,
        workers=workers,
        kernel_events=kernel_events,
        kernel_events_buffer_kb=kernel_events_buffer,
        nice=nice,
        sched_idle=sched_idle,
        command_line=["ksmtrace"] + sys.argv[1:],
        notify=lambda text: note(f"ksmtrace: note: {text}", quiet),
    )
    prog = Progress("capture", quiet=quiet)
    try:
        summary = tracer.run(options, progress=prog)
    finally:
        prog.close()
    status = int(summary.get("exit_status", 0))
    if as_json:
        emit_json(summary)
    else:
        click.echo(_summary_text(summary))
    if status != 0:
        n = summary.get("snapshots", 0)
        kept = f"the trace keeps {n} complete snapshot(s)" if n else "no snapshot was committed"
        click.echo(f"ksmtrace: capture ended early: {summary.get('end_reason')}; {kept}", err=True)
        ctx.exit(status)


def _summary_text(s: dict) -> str:
    def num(v, f="{:,.2f}"):
        return "-" if v is None else f.format(v)

    lines = [
        ("trace", s.get("output")),
        ("end reason", s.get("end_reason")),
        ("snapshots", s.get("snapshots")),
        ("processes", s.get("processes")),
        ("pages", f"{s.get('present_pages', 0):,} present page-snapshots, {s.get('page_rows', 0):,} page rows written"),
        ("read", f"{s.get('bytes_read', 0) / 2**30:,.3f} GiB at {num(s.get('gib_per_s'))} GiB/s ({num(s.get('pages_per_s'), '{:,.0f}')} pages/s)"),
        ("capture CPU", f"{num(s.get('capture_cpu_seconds'), '{:,.3f}')} s (every thread and worker)"),
        ("kernel events", "not recorded" if not s.get("kernel_events") else
         f"{s['kernel_events']['faults']:,} write faults, {s['kernel_events']['ksm_events']:,} ksm events, "
         f"{s['kernel_events']['lost']:,} lost"),
        ("trace size", f"{s.get('trace_bytes', 0):,} bytes, {num(s.get('bytes_per_page_snapshot'), '{:.3f}')} B per page-snapshot"),
    ]
    if s.get("max_pause_ms") is not None:
        lines.append(("max pause", f"{s['max_pause_ms']:.1f} ms (--freeze)"))
    if s.get("denied_pids"):
        lines.append(("denied", "no permission to read pid(s) " + ", ".join(map(str, s["denied_pids"])) + " (recorded with state 'denied', no pages)"))
    if s.get("all_targets_exited"):
        lines.append(("note", "every --pid/--tree target exited, so the capture ended"))
    return kv_lines(lines)
