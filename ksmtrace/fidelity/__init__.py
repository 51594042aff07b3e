"""Fidelity: how closely the ``ksm`` policy's replay agrees with the real kernel.

* :func:`fidelity` — replay a ground-truth trace (one captured while the host ran KSM) with the
  kernel's own settings and compare every KSM counter over time (``ksmtrace fidelity``);
* ``ksmtrace validate`` (live-host, :mod:`ksmtrace.lab.validate`) — run workloads under real
  KSM with chosen settings while capturing them, then compare; every KSM setting is restored on
  every path;
* :func:`subsample_trace` and :func:`interval_study` — how fidelity degrades as the snapshot
  interval grows;
* :mod:`.goals` — the acceptance goals of issue 5 evaluated on a set of runs.

See ``docs/fidelity.md``.
"""
from ksmtrace.fidelity.compare import COUNTERS, COUNTER_NAMES, FidelityReport, fidelity
from ksmtrace.fidelity.groundtruth import FidelityError, GroundTruth, ksm_params, load_ground_truth, profile_for_release

_LAZY = {
    "SETTINGS": "ksmtrace.fidelity.settings",
    "resolve_settings": "ksmtrace.fidelity.settings",
    "subsample_trace": "ksmtrace.fidelity.subsample",
    "interval_study": "ksmtrace.fidelity.interval",
    "evaluate_goals": "ksmtrace.fidelity.goals",
}

__all__ = [
    "COUNTERS", "COUNTER_NAMES", "FidelityError", "FidelityReport", "GroundTruth", "fidelity", "ksm_params",
    "load_ground_truth", "profile_for_release", *_LAZY,
]


def __getattr__(name):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'ksmtrace.fidelity' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value
