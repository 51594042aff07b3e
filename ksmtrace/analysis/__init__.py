"""Analyses of traces and results that need no replay.

* :mod:`ksmtrace.analysis.breakdown` — the sharing breakdown of a trace (zero pages, duplicates
  within one process, across processes, what a same-domain-only rule keeps);
* :mod:`ksmtrace.analysis.pareto` — non-dominated points (used by sweeps and the Pareto plot).

Nothing here imports matplotlib; :mod:`ksmtrace.plot` draws these tables.
"""
