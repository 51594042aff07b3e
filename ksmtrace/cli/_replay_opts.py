"""Options shared by replay, compare and sweep."""
from __future__ import annotations

import click

from ksmtrace.cli._options import no_cache_option
from ksmtrace.errors import KsmtraceError
from ksmtrace.policies.base import parse_assignments

restrict_option = click.option(
    "--restrict", default=None, metavar="PRESET[+PRESET]",
    help="A safe preset every policy obeys (merges it may not make): zero-pages, same-domain[:DOMAIN], "
         "windows[:DOMAIN] (Microsoft's rule), read-only; DOMAIN = user-cgroup (default), user, cgroup, process. "
         "Same as -p restrict=PRESET (docs/safe-presets.md).")


writes_option = click.option(
    "--writes", type=click.Choice(["auto", "faults", "snapshots"]), default="auto", show_default=True,
    help="How the replay learns of writes: faults = the trace's recorded write faults, each at its time (a COW "
         "break of a page merged in the replay even when its content did not change); snapshots = the content "
         "changes the snapshots show, at the snapshot; auto = faults when the trace has a faults table "
         "(capture --kernel-events).  docs/replay-semantics.md.")


def replay_options(f):
    f = click.option("--engine", type=click.Choice(["fast", "reference"]), default="fast", show_default=True,
                     help="fast (numba arrays) or reference (the page-by-page executable spec).")(f)
    f = click.option("--scope", type=click.Choice(["auto", "recorded", "anon", "file"]), default="auto", show_default=True,
                     help="Candidate pages: recorded = what ksmd scans (mergeable VMAs); anon = every private anonymous "
                          "page; auto = recorded when the trace has mergeable memory, else anon (one scope for every "
                          "policy, printed with why; the pagecache policy: file, the page cache).")(f)
    f = click.option("--cost", "cost", type=click.Path(dir_okay=False), default=None,
                     help="Cost file (JSON, from `ksmtrace calibrate`) for CPU seconds in the report.")(f)
    f = click.option("--timing-cost", type=click.Path(dir_okay=False), default=None,
                     help="Cost file the daemon's virtual clock uses (default: the shipped one).")(f)
    f = click.option("--start", "start_s", type=float, default=0.0, show_default=True,
                     help="Virtual time (s after the first snapshot) at which the daemon starts.")(f)
    f = click.option("--seed", type=int, default=0, show_default=True, help="Seed for policies with random choices.")(f)
    f = no_cache_option(f)
    f = restrict_option(f)
    return f


def with_restrict(params: dict, restrict: str | None) -> dict:
    """``params`` with ``--restrict`` (as ``restrict``, which every policy takes); an error if
    ``-p restrict=`` says otherwise."""
    if restrict is None:
        return params
    given = params.get("restrict")
    if given is not None:
        from ksmtrace.trace.restrict import parse_restriction

        a, b = parse_restriction(given), parse_restriction(restrict)
        if (a.spec if a else None) != (b.spec if b else None):
            raise KsmtraceError(f"--restrict {restrict} and -p restrict={given} disagree: give one")
    return {**params, "restrict": restrict}


def params_from(items) -> dict:
    return parse_assignments(list(items or ()))


def resolve_run(trace, policy, params: dict, scope: str | None) -> tuple[dict, str, str, list[str]]:
    """What a command replays: the policy's parameters with what the trace implies (the ksm profile
    of the traced kernel, unless given), the scope (``auto``: chosen from the trace) and why."""
    from ksmtrace.replay import resolve_scope, trace_params

    params, notes = trace_params(trace, policy, params)
    scope, why = resolve_scope(trace, scope, policy)
    return params, scope, why, notes
