"""Analyses of traces and results, and studies built on replays.

* :mod:`ksmtrace.analysis.breakdown` — the sharing breakdown of a trace (zero pages, duplicates
  within one process, across processes, what a same-domain-only rule keeps);
* :mod:`ksmtrace.analysis.delay` — the Delay plan's study (``pksm`` against ``pksm-delay``).

Non-dominated points are :mod:`ksmtrace.pareto` (sweeps, the frontier and the Pareto plot use them).
Nothing here imports matplotlib; :mod:`ksmtrace.plot` draws these tables.
"""
