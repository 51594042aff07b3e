"""ksmtrace: capture -> trace -> replay -> report for page deduplication (KSM and friends).

The public API (imported lazily, so ``import ksmtrace`` stays light)::

    from ksmtrace import open_trace, replay, compare, read_results
    tr = open_trace("my-trace")
    res = replay(tr, "ksm", {"pages_to_scan": 1000})
    res.summary["frames_saved_final"], res.table            # polars DataFrame, one row per snapshot
"""
from ksmtrace._version import __version__

_EXPORTS = {
    "open_trace": "ksmtrace.trace.reader",
    "Trace": "ksmtrace.trace.reader",
    "replay": "ksmtrace.replay",
    "compare": "ksmtrace.replay",
    "run_spec": "ksmtrace.replay",
    "RunResult": "ksmtrace.results",
    "read_results": "ksmtrace.results",
    "FRAMES_SAVED_DEFINITION": "ksmtrace.results",
    "get_policy": "ksmtrace.policies.registry",
    "list_policies": "ksmtrace.policies.registry",
    "Policy": "ksmtrace.policies.base",
    "Params": "ksmtrace.policies.base",
    "param": "ksmtrace.policies.base",
    "CostModel": "ksmtrace.engine.cost",
    "KsmtraceError": "ksmtrace.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'ksmtrace' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
