"""Golden replay summaries of the shipped sample traces (tests/golden/<trace>.<policy>.json).

    python -m ksmtrace.testing.golden --check            # compare, print the differences
    python -m ksmtrace.testing.golden --update           # rewrite them (on purpose!)
    python -m ksmtrace.testing.golden --update vm ksm    # only some traces / policies

A golden file holds, for one sample trace and one core policy (or ``pagecache``) with its default parameters, or
one of the :data:`VARIANTS` (the hash-strength and same-address what-ifs; fast engine, the policy's default scope), the run's :attr:`RunResult.summary` minus what depends on the
machine or on a cost model (``cpu_seconds``, ``cpu_model``), plus the total work units (exact
counts, from which any cost model derives CPU seconds).  ``tests/golden/test_samples.py`` compares every
value exactly (floats to a relative 1e-9).  When a change to the engine or a policy changes the
numbers on purpose, regenerate them with ``--update`` and commit the diff with the change.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Iterable

CORE_POLICIES = ("oracle", "ksm", "pksm", "pksm-delay", "hashtable", "uksm")
#: policies with golden files that replay a scope of their own (pagecache: the page cache, ``file``)
OWN_SCOPE_POLICIES = ("pagecache",)
#: the founding notes' what-ifs that are parameters of a core policy, each golden too:
#: ``<trace>.<policy>+<param>=<value>.json``
VARIANTS = (
    ("pksm", {"hash_strength": 16}),
    ("uksm", {"hash_adapt": 0, "hash_strength": 256}),
    ("ksm", {"same_address_first": 1}),
    ("pksm", {"same_address_first": 1}),
    ("oracle", {"same_address_only": 1}),
)


def variant_name(policy: str, params: dict[str, Any]) -> str:
    return policy + "".join(f"+{k}={v}" for k, v in params.items())


VARIANT_NAMES = {variant_name(p, kw): (p, kw) for p, kw in VARIANTS}
GOLDEN_POLICIES = CORE_POLICIES + OWN_SCOPE_POLICIES + tuple(VARIANT_NAMES)
MACHINE_DEPENDENT = ("cpu_seconds", "cpu_model")
REL_TOL = 1e-9
ABS_TOL = 1e-12
UPDATE_COMMAND = "python -m ksmtrace.testing.golden --update"


def golden_dir() -> Path:
    """tests/golden of the source tree this package lives in."""
    return Path(__file__).resolve().parents[2] / "tests" / "golden"


def golden_path(trace: str, policy: str, directory: Path | None = None) -> Path:
    return (directory or golden_dir()) / f"{trace}.{policy}.json"


def _clean(v: Any) -> Any:
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    if hasattr(v, "item"):
        return _clean(v.item())
    return v


def golden_summary(trace, policy: str) -> dict[str, Any]:
    """What a golden file holds for ``policy`` (default parameters, or a variant's name from
    :data:`VARIANT_NAMES`) on ``trace`` (a Trace)."""
    from ksmtrace.replay import replay

    name, params = VARIANT_NAMES.get(policy, (policy, {}))
    res = replay(trace, name, params)
    summary = {k: _clean(v) for k, v in sorted(res.summary.items()) if k not in MACHINE_DEPENDENT}
    return {
        "trace": trace.name,
        "trace_fingerprint": trace.fingerprint,
        "policy": name,
        "engine": res.spec["engine"],
        "scope": res.spec["scope"],
        "params": res.spec["params"],
        "summary": summary,
        "units": {k: int(v) for k, v in sorted(res.units_total().items())},
        "regenerate": UPDATE_COMMAND,
    }


def diff(expected: Any, actual: Any, path: str = "") -> list[str]:
    """Human-readable differences (floats compared to a relative 1e-9)."""
    out: list[str] = []
    if isinstance(expected, dict) and isinstance(actual, dict):
        for k in sorted(set(expected) | set(actual)):
            p = f"{path}.{k}" if path else k
            if k not in actual:
                out.append(f"{p}: missing (expected {expected[k]!r})")
            elif k not in expected:
                out.append(f"{p}: unexpected {actual[k]!r}")
            else:
                out += diff(expected[k], actual[k], p)
        return out
    if isinstance(expected, float) or isinstance(actual, float):
        if expected is None or actual is None:
            if expected != actual:
                out.append(f"{path}: expected {expected!r}, got {actual!r}")
        elif not math.isclose(float(expected), float(actual), rel_tol=REL_TOL, abs_tol=ABS_TOL):
            out.append(f"{path}: expected {expected!r}, got {actual!r}")
        return out
    if expected != actual:
        out.append(f"{path}: expected {expected!r}, got {actual!r}")
    return out


def compare_to_golden(trace, policy: str, directory: Path | None = None) -> list[str]:
    path = golden_path(trace.name, policy, directory)
    try:
        expected = json.loads(path.read_text())
    except FileNotFoundError:
        return [f"{path}: missing"]
    actual = json.loads(json.dumps(golden_summary(trace, policy)))
    keys = ("trace", "trace_fingerprint", "policy", "engine", "scope", "params", "summary", "units")
    exp = {k: expected.get(k) for k in keys}
    if isinstance(exp["units"], dict):  # a cost unit added after the file was written, unused by this run
        exp["units"] = {**{u: 0 for u, v in actual["units"].items() if v == 0}, **exp["units"]}
    return diff(exp, {k: actual.get(k) for k in keys})


def write_golden(trace, policy: str, directory: Path | None = None) -> Path:
    path = golden_path(trace.name, policy, directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(golden_summary(trace, policy), indent=1, sort_keys=True) + "\n")
    return path


def _select(names: Iterable[str]) -> tuple[list[str], list[str]]:
    from ksmtrace.samples import sample_names

    names = list(names)
    traces = [n for n in names if n in sample_names()] or sample_names()
    policies = [n for n in names if n in GOLDEN_POLICIES] or list(GOLDEN_POLICIES)
    unknown = [n for n in names if n not in traces and n not in policies]
    if unknown:
        raise SystemExit(f"golden: unknown trace or policy {unknown[0]!r} (traces: {', '.join(sample_names())}; "
                         f"policies: {', '.join(GOLDEN_POLICIES)})")
    return traces, policies


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ksmtrace.testing.golden", description=__doc__.split("\n\n")[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--update", action="store_true", help="rewrite the golden files")
    g.add_argument("--check", action="store_true", help="compare and print differences")
    ap.add_argument("names", nargs="*", help="sample traces and/or policies (default: all)")
    ap.add_argument("--dir", type=Path, default=None, help="golden directory (default: tests/golden)")
    args = ap.parse_args(argv)
    from ksmtrace.samples import open_sample

    traces, policies = _select(args.names)
    bad = 0
    for t in traces:
        tr = open_sample(t)
        for p in policies:
            if args.update:
                print(f"wrote {write_golden(tr, p, args.dir)}")
            else:
                d = compare_to_golden(tr, p, args.dir)
                bad += bool(d)
                print(f"{t}.{p}: " + ("ok" if not d else f"{len(d)} differences"))
                for line in d[:20]:
                    print("   " + line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
