"""The fuzz suite (issue 9): seeded mutations of a small trace, each through ``ksmtrace info`` and
``ksmtrace replay`` in-process under a hang guard (ksmtrace.testing.fuzz).

Every case must end as its class says — the tool's own one-line error for an inconsistent or
crafted trace, or exactly the numbers of the trace it is equivalent to — with zero tracebacks,
zero hangs and zero silent successes.  The counts per class and outcome are printed (pytest -s)
and recorded in docs/robustness.md.

    KSMTRACE_FUZZ_CASES=10000 KSMTRACE_FUZZ_SEED=50000 pytest -s tests/fuzz   # explore further
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from ksmtrace.cli import cli
from ksmtrace.errors import KsmtraceError
from ksmtrace.testing import fuzz

REPLAY_POLICY = "ksm"
HANG_SECONDS = 10


class Hang(BaseException):
    """The hang guard's alarm (a BaseException: no ``except Exception`` under test swallows it)."""


def _alarm(signum, frame):
    raise Hang()


def run_cli(path: Path) -> tuple[str, Any]:
    """``ksmtrace --debug info PATH`` (JSON and text) and ``ksmtrace --debug replay PATH --json``,
    in-process, each under a HANG_SECONDS alarm (a fuzz.Runner)."""
    runner = CliRunner()
    results: dict[str, Any] = {}
    old = signal.signal(signal.SIGALRM, _alarm)
    try:
        for name, args in (("info", ["--debug", "info", str(path), "--max-rows", "0", "--json"]),
                           ("info-text", ["--debug", "info", str(path), "--max-rows", "0"]),
                           ("replay", ["--debug", "replay", str(path), "--policy", REPLAY_POLICY, "--json", "-q"])):
            signal.setitimer(signal.ITIMER_REAL, HANG_SECONDS)
            try:
                r = runner.invoke(cli, args, catch_exceptions=True)
            except Hang:
                return "hang", name
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            exc = r.exception
            if exc is not None and not isinstance(exc, SystemExit):
                if isinstance(exc, KsmtraceError):
                    return "error", str(exc)
                return "traceback", f"{name}: {exc.__class__.__name__}: {str(exc)[:200]}"
            if r.exit_code != 0:
                return "traceback", f"{name}: exit {r.exit_code}: {r.output[-300:]}"
            if name == "info":
                results["info"] = json.loads(r.stdout)["per_snapshot"]
            elif name == "replay":
                summary = json.loads(r.stdout)["summary"]
                summary.pop("cpu_seconds", None)
                results["replay"] = summary
    finally:
        signal.signal(signal.SIGALRM, old)
    return "ok", results


N_CASES = int(os.environ.get("KSMTRACE_FUZZ_CASES", 70 * len(fuzz.CLASSES)))  # 2,030 with 29 classes
SEED0 = int(os.environ.get("KSMTRACE_FUZZ_SEED", "0"))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A scratch directory on tmpfs when there is one: each case copies and removes a trace, and
    on a journaled disk that costs more than the case itself.  The prepared cache lives there too
    (it must not mask a mutation)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        d = Path(tempfile.mkdtemp(prefix="ksmtrace-fuzz-", dir=shm))
    else:
        d = tmp_path_factory.mktemp("fuzz")
    before = os.environ.get("KSMTRACE_CACHE_DIR")
    os.environ["KSMTRACE_CACHE_DIR"] = str(d / "cache")
    yield d
    if before is None:
        os.environ.pop("KSMTRACE_CACHE_DIR", None)
    else:
        os.environ["KSMTRACE_CACHE_DIR"] = before
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def bases(work):
    return fuzz.build_bases(work / "bases", run_cli)


def test_fuzzed_traces_end_in_a_result_or_one_error(work, bases):
    counts: Counter = Counter()
    failures = []
    for seed in range(SEED0, SEED0 + N_CASES):
        case = fuzz.make_case(bases, work / "cases", seed)
        out = fuzz.run_case(bases, case, run_cli)
        counts[(case.cls, out.kind)] += 1
        if not out.ok:
            failures.append(f"seed {seed} {case.cls} ({case.base}: {case.detail}): {out.kind}: {out.detail}")
    kinds = sorted({k for _, k in counts})
    lines = [f"{N_CASES} cases, {len(fuzz.CLASSES)} classes, seeds {SEED0}..{SEED0 + N_CASES - 1}",
             f"{'class':<18}" + "".join(f"{k:>10}" for k in kinds)]
    for cls in fuzz.CLASSES:
        lines.append(f"{cls:<18}" + "".join(f"{counts[(cls, k)]:>10}" for k in kinds))
    lines.append(f"{'total':<18}" + "".join(f"{sum(v for (c, kk), v in counts.items() if kk == k):>10}" for k in kinds))
    print("\n" + "\n".join(lines))
    assert not failures, f"{len(failures)} failing case(s):\n" + "\n".join(failures[:40]) + "\n" + "\n".join(lines)
    assert N_CASES >= 2000 or "KSMTRACE_FUZZ_CASES" in os.environ
    assert all(sum(v for (c, _), v in counts.items() if c == cls) for cls in fuzz.CLASSES)
    assert {k for _, k in counts} == {"error", "same", "prefix"}  # every kind of expectation was exercised


def test_a_case_is_reproducible_from_its_seed(work, bases):
    a = fuzz.make_case(bases, work / "a", 1234)
    b = fuzz.make_case(bases, work / "b", 1234)
    assert (a.cls, a.base, a.expect, a.detail) == (b.cls, b.base, b.expect, b.detail)


def test_the_judge_catches_a_silent_success(work, bases):
    """A case that should be refused but is accepted is a failure, not a pass."""
    case = fuzz.make_case(bases, work / "c", 0)
    shutil.rmtree(case.path)
    shutil.copytree(bases.dirs[case.base], case.path)  # the unmutated trace, still expected to fail
    case.expect = "error"
    assert fuzz.run_case(bases, case, run_cli).kind == "silent"
    case.expect = "prefix:2"
    assert fuzz.run_case(bases, case, run_cli).kind == "wrong"
