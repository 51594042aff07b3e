"""Workload generators: real processes with mergeable anonymous memory whose content dynamics
are deterministic and seeded, to validate the simulator against the kernel's KSM.

    from ksmtrace.lab.workloads import get_workload
    with get_workload("rewrite", processes=2, pages=1024, period=1.0).start() as run:
        run.pids, run.layout(), run.events(until=5)

Modules: :mod:`.content` (page contents as pure functions), :mod:`.memory` (mergeable
regions), :mod:`.model` (cells, steps, expected layouts), :mod:`.params` (parameter
dataclasses), :mod:`.base` (Workload base class, registry), :mod:`.catalog` (the workloads),
:mod:`.worker` (the process entry point), :mod:`.run` (WorkloadRun), :mod:`.procs` (process
plumbing), :mod:`.layout` (the phase-stepped known-layout helper and KnownLayout).
"""
from ksmtrace.lab.workloads.base import DEFAULT_HORIZON, WORKLOADS, Workload, get_workload
from ksmtrace.lab.workloads.catalog import Churn, ForkDiverge, Rewrite, Static, Zero
from ksmtrace.lab.workloads.content import PAGE_SIZE, template_page
from ksmtrace.lab.workloads.known import KnownLayout, LayoutParams
from ksmtrace.lab.workloads.model import Event
from ksmtrace.lab.workloads.run import WorkloadRun

__all__ = [
    "WORKLOADS", "DEFAULT_HORIZON", "PAGE_SIZE", "Workload", "WorkloadRun", "Event",
    "KnownLayout", "LayoutParams", "get_workload", "template_page",
    "Static", "Rewrite", "Zero", "ForkDiverge", "Churn",
]
