"""``ksmtrace replay``: one trace through one policy."""
from __future__ import annotations

import click

from ksmtrace.cli import cli
from ksmtrace.cli._options import emit_json, json_option, kv_lines, note, quiet_option, trace_argument
from ksmtrace.cli._replay_opts import params_from, replay_options, resolve_run, with_restrict, writes_option
from ksmtrace.errors import KsmtraceError
from ksmtrace.outputs import check_output_dir
from ksmtrace.progress import Progress
from ksmtrace.results import FRAMES_SAVED_DEFINITION


@cli.command("replay")
@trace_argument()
@click.option("--policy", "-P", "policy", default="ksm", show_default=True, help="Policy name (see `ksmtrace policies`).")
@click.option("-p", "--param", "params", multiple=True, metavar="KEY=VALUE", help="Policy parameter (repeatable).")
@click.option("-o", "--output", type=click.Path(file_okay=False), default=None, help="Write result files (<run_id>.json/.parquet) here.")
@click.option("--as-captured", is_flag=True,
              help="ksm only: replay with the settings the real KSM had during the capture, from when it started "
                   "(the trace's ground truth; -p overrides a setting).")
@click.option("--controller", default=None, metavar="NAME[:key=value,...]",
              help="A controller that retunes the policy during the run: ksmtuned, kubevirt (memory pressure on "
                   "--host-memory) or scan-time (the kernel's advisor); docs/controllers.md.")
@click.option("--host-memory", default=None, metavar="SIZE",
              help="The host's memory (MemTotal) for the controller's rules, e.g. 16G, 512M: free memory is this "
                   "minus what the traced processes use.")
@replay_options
@writes_option
@json_option
@quiet_option
def replay_cmd(trace, policy, params, output, as_captured, controller, host_memory, engine, scope, cost, timing_cost,
               start_s, seed, restrict, writes, as_json, quiet):
    """Replay TRACE through a policy in virtual time and summarise it.

    Prints frames saved (and as a fraction of the oracle), COW breaks, merges, merge latency, CPU
    seconds and the policy's kernel-named counters at the last snapshot.  The ksm policy's profile
    follows the traced kernel unless -p profile= is given; the scope is chosen from the trace
    unless --scope is given (both printed with why).

    \b
    Example:
      ksmtrace replay my-trace --policy ksm -p pages_to_scan=1000 -p sleep_millisecs=20
      ksmtrace replay my-trace --policy pksm-delay -p probation_passes=3 -o results/
      ksmtrace replay my-trace --as-captured
      ksmtrace replay my-trace --policy ksm --controller ksmtuned --host-memory 16G
      ksmtrace replay my-trace --policy pksm --restrict same-domain:process
    """
    from ksmtrace.policies.registry import get_policy
    from ksmtrace.replay import replay
    from ksmtrace.trace.reader import open_trace

    tr = open_trace(trace)
    if output:
        check_output_dir(output)  # refuse a directory we may not write before the replay, not after
    given = with_restrict(params_from(params), restrict)
    if host_memory is not None and controller is None:
        raise KsmtraceError("--host-memory is the host size for a controller's rules: give --controller too")
    notes: list[str] = []
    if as_captured:
        from ksmtrace.fidelity.groundtruth import as_captured as infer

        if get_policy(policy).name != "ksm":
            raise KsmtraceError(f"--as-captured replays the ksm policy (the real KSM's settings), not {policy!r}")
        cap = infer(tr)
        if cap is None:
            raise KsmtraceError(f"{tr.path}: --as-captured needs a trace captured while the real KSM ran "
                                "(ground truth with run=1); this one has none")
        given = {**cap.params, **given}
        start_s = cap.start_s
        notes.append(f"as captured: the kernel's settings, ksmd starting {cap.start_s:.3f} s after the first snapshot "
                     f"({cap.start_source}); profile {cap.params.get('profile')}: {cap.profile_source}")
    run_params, scope, scope_why, more = resolve_run(tr, policy, given, scope)
    notes += more
    span_s = (int(tr.times_ns[-1]) - int(tr.times_ns[0])) / 1e9
    if start_s > span_s:
        notes.append(f"the daemon starts at {start_s:g} s, after the trace's last snapshot ({span_s:.3f} s): it never runs")
    prog = Progress(f"replay {policy}", quiet=quiet)
    try:
        res = replay(tr, policy, run_params, engine=engine, scope=scope, timing_cost=timing_cost,
                     report_cost=cost, start_s=start_s, seed=seed, progress=prog, controller=controller,
                     host_memory=host_memory, writes=writes)
    finally:
        prog.close()
    path = res.write(output) if output else None
    if as_json:
        emit_json({"run_id": res.run_id, "spec": res.spec, "summary": res.summary, "scope_reason": scope_why,
                   "notes": notes, "path": str(path) if path else None})
        return
    s = res.summary
    click.echo(f"{res.run_id}: policy {res.policy} on {tr.name} ({s['snapshots']} snapshots, {s['duration_s']:.1f} s, scope {res.spec['scope']})")
    click.echo(scope_why)
    for n in notes:
        click.echo(n)
    for line in run_option_lines(res):
        click.echo(line)
    pairs = [
        ("frames_saved (final)", s["frames_saved_final"]),
        ("oracle_saved (final)", s["oracle_saved_final"]),
        ("fraction of oracle (final)", s["fraction_of_oracle_final"]),
        ("fraction of oracle (mean)", s["fraction_of_oracle_mean"]),
        ("hash-only duplicates (final, naive)", s["hash_only_saved_final"]),
        ("cow_breaks", s["cow_breaks"]),
        ("merges", s["merges"]),
        ("merge latency p50 / mean (s)", f"{_f(s['merge_latency_p50_s'])} / {_f(s['merge_latency_mean_s'])}"),
        ("exposed merges (across domains)", s["exposed_merges"]),
        (f"CPU seconds ({s['cpu_model']})", s["cpu_seconds"]),
    ]
    for k in res.spec.get("kernel_counters", []):
        if k in s:
            pairs.append((k, s[k]))
    click.echo(kv_lines(pairs))
    extra = res.extras.get("policy", {})
    if extra.get("report"):
        click.echo("")
        click.echo(kv_lines(list(extra["report"].items())))
    note("", quiet)
    note(FRAMES_SAVED_DEFINITION, quiet)
    if path:
        note(f"result written to {path}", quiet)


def _f(v):
    return "-" if v is None or v != v else f"{v:.3g}"


def run_option_lines(res) -> list[str]:
    """What a restriction kept and what a controller did, in a sentence each."""
    out = []
    s = res.summary
    r = res.extras.get("restrict")
    if r:
        line = f"restriction {r['spec']}: {r['rules']}"
        u = s.get("unrestricted_oracle_saved_mean") or 0.0
        if u > 0:
            line += (f"; under it a perfect dedup keeps {100 * s['oracle_saved_mean'] / u:.1f} % of the unrestricted "
                     f"saving, this run {100 * s['frames_saved_mean'] / u:.1f} %")
        out.append(line)
    c = res.extras.get("controller")
    if c:
        from ksmtrace.controllers import format_kib

        t = res.table
        host = f" on a {format_kib(c['host_kib'])} host" if c.get("host_kib") else ""
        line = f"controller {c['name']}{host}: {c['ticks']} adjustments"
        if "run" in t.columns and t.height:
            line += f"; ksmd running at {100 * float(t['run'].mean()):.0f} % of the snapshots"
        for k in ("pages_to_scan", "sleep_millisecs"):
            if k in t.columns and t.height and t[k].null_count() < t.height:
                lo, hi = t[k].min(), t[k].max()
                line += f"; {k} {lo}" + (f"-{hi}" if hi != lo else "")
        refused = sum(1 for e in c["log"] if e.get("refused"))
        if refused:
            line += f"; {refused} writes refused by the kernel (see the result's log)"
        if c.get("snapshots_overcommitted"):
            n = c["snapshots_overcommitted"]
            line += (f"; the traced processes use more than the stated host at {n} snapshot{'s' if n != 1 else ''} "
                     "(free memory counted as 0)")
        out.append(line)
    w = res.extras.get("writes")
    if w:
        out.append(f"writes: {w.get('applied', 0):,} recorded write faults replayed at their time "
                   f"({w['recorded']:,} in the trace; {w.get('not_candidate', 0):,} on pages that were not candidates then, "
                   f"{w['unknown_page']:,} on no page of the trace or outside the snapshots); --writes snapshots to ignore them")
    return out
