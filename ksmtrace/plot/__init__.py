"""Figures from replay results and traces (matplotlib, Agg canvas, no pyplot).

>>> from ksmtrace.results import read_results
>>> from ksmtrace import plot
>>> fig = plot.timeline(read_results(["results/"]), units="MiB")
>>> plot.save(fig, "timeline.svg")

Every function takes :class:`~ksmtrace.results.RunResult` objects (or, for ``breakdown``, a trace
or the DataFrame of :func:`ksmtrace.analysis.breakdown.breakdown`; for ``frontier_cpu`` and
``frontier_cow``, a :class:`~ksmtrace.analysis.frontier.Frontier`; for ``controllers``, a
:class:`~ksmtrace.analysis.controllers.ControllerComparison`) and returns a
:class:`matplotlib.figure.Figure`; :func:`save` writes PNG, SVG or PDF by suffix, deterministically.
Importing this package imports matplotlib; replay and sweeps never do.  Every figure gives a
policy the same colour and marker (:mod:`ksmtrace.plot.palette`) and keeps its legend off the data.
"""
from ksmtrace.plot._common import STYLE, changed_params, run_labels, save
from ksmtrace.plot._advise import advise
from ksmtrace.plot._breakdown import breakdown
from ksmtrace.plot._controllers import controllers
from ksmtrace.plot._fleet import fleet_matrix
from ksmtrace.plot._frontier import frontier_cow, frontier_cpu, frontier_points
from ksmtrace.plot._heatmap import heatmap, heatmap_matrix
from ksmtrace.plot._latency import latency, latency_cdf_points
from ksmtrace.plot._pareto import pareto, pareto_points
from ksmtrace.plot._timeline import timeline

KINDS = ("timeline", "pareto", "latency", "breakdown", "heatmap")

__all__ = [
    "KINDS", "STYLE", "advise", "breakdown", "changed_params", "controllers", "fleet_matrix", "frontier_cow", "frontier_cpu",
    "frontier_points", "heatmap", "heatmap_matrix", "latency", "latency_cdf_points",
    "pareto", "pareto_points", "run_labels", "save", "timeline",
]
