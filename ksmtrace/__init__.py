"""ksmtrace: capture -> trace -> replay -> report for page deduplication (KSM and friends).

>>> import ksmtrace
>>> tr = ksmtrace.open_sample("vm")                  # or ksmtrace.open_trace("my.trace")
>>> from ksmtrace.replay import replay, compare
>>> res = replay(tr, "ksm", {"pages_to_scan": 1000})
>>> from ksmtrace.sweep import sweep, pareto_front
>>> from ksmtrace import plot, samples

The names below are imported lazily (``import ksmtrace`` stays cheap for the CLI).  ``replay`` and
``sweep`` are modules of this package, so their functions are imported from them, as above.
"""
from ksmtrace._version import __version__

_LAZY = {
    "open_trace": "ksmtrace.trace.reader",
    "Trace": "ksmtrace.trace.reader",
    "read_results": "ksmtrace.results",
    "RunResult": "ksmtrace.results",
    "FRAMES_SAVED_DEFINITION": "ksmtrace.results",
    "open_sample": "ksmtrace.samples",
    "sample_path": "ksmtrace.samples",
    "list_samples": "ksmtrace.samples",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'ksmtrace' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value
