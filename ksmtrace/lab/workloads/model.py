"""The deterministic model of a workload: the memory of its logical processes as cells, and
the schedule of steps that change it.

A workload's memory is ``{proc: {region: cells}}`` (logical process number -> region number ->
``(pages, 4)`` cell array, see :mod:`ksmtrace.lab.workloads.content`).  Its dynamics are a
time-ordered sequence of :class:`Step`; a step is performed by one logical process at
``t`` seconds after that process's READY and consists of :class:`Op` (write pages, map a
region, unmap a region, fork a child that becomes a new logical process).  The worker executes
exactly these steps and :class:`State` replays them, so ``layout(t)`` is exact.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from ksmtrace.lab.workloads.content import contents_of, merge_contents, summarize

WRITE, MAP, UNMAP, FORK = "write", "map", "unmap", "fork"

Memory = dict[int, dict[int, np.ndarray]]


@dataclass(eq=False)
class Op:
    """One change: ``write`` cells into page indices of a region, ``map`` a new region with
    cells, ``unmap`` a region, or ``fork`` logical process ``child``."""

    action: str
    region: int = 0
    pages: np.ndarray | None = None
    cells: np.ndarray | None = None
    child: int | None = None


@dataclass(eq=False)
class Step:
    """Ops performed together by logical process ``proc`` at ``t`` seconds after its READY."""

    t: float
    proc: int
    description: str
    pages: int
    ops: list[Op] = field(default_factory=list)

    def __post_init__(self):
        self.t = round(float(self.t), 9)  # 3*0.3 is 0.9, not 0.8999999999999999


class Event(NamedTuple):
    """One entry of ``events()``: offset from READY in seconds, what happens, pages touched
    (written, mapped or unmapped; for a fork, the pages the child shares copy-on-write)."""

    t: float
    description: str
    pages: int


def copy_memory(memory: Memory) -> Memory:
    return {p: {r: c.copy() for r, c in regions.items()} for p, regions in memory.items()}


class State:
    """The memory of all logical processes, advanced step by step."""

    def __init__(self, memory: Memory):
        self.memory = copy_memory(memory)

    def apply(self, step: Step) -> None:
        regions = self.memory[step.proc]
        for op in step.ops:
            if op.action == WRITE:
                regions[op.region][op.pages] = op.cells
            elif op.action == MAP:
                regions[op.region] = np.array(op.cells, dtype=np.int64, copy=True)
            elif op.action == UNMAP:
                del regions[op.region]
            elif op.action == FORK:
                self.memory[op.child] = {r: c.copy() for r, c in regions.items()}
            else:  # pragma: no cover - programming error
                raise ValueError(f"unknown op {op.action!r}")

    def layout(self) -> dict:
        """Whole-workload summary plus a ``processes`` list (one entry per logical process,
        each with its own summary and its regions in ascending order)."""
        procs = []
        for p in sorted(self.memory):
            regions = self.memory[p]
            own = summarize(contents_of(regions.values()))
            own["proc"] = p
            own["regions"] = [{"region": r, "pages": len(c)} for r, c in sorted(regions.items())]
            procs.append(own)
        everything = [c for regions in self.memory.values() for c in regions.values()]
        out = summarize(merge_contents(contents_of(everything)))
        out["processes"] = procs
        return out
