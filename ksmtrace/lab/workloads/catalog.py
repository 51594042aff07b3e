"""The workload generators: static, rewrite, samewrite, zero, forkdiverge, churn.

Every workload is a pure function of its parameters: the initial memory (cells, see
:mod:`ksmtrace.lab.workloads.content`) and the schedule of steps (see
:mod:`ksmtrace.lab.workloads.model`).  Page placement, rewrite choices and content all come from
seeded generators, so two runs with the same parameters hold byte-identical memory at the
same offsets from READY.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from ksmtrace.lab.workloads.base import Workload, register
from ksmtrace.lab.workloads.content import (SPARSE, STREAM_DIVERGE, STREAM_REWRITE, STREAM_REZERO,
                                        UNIQUE, ZERO, mixed_cells, tagged_cells,
                                        zero_cells)
from ksmtrace.lab.workloads.model import FORK, MAP, UNMAP, WRITE, Memory, Op, Step
from ksmtrace.lab.workloads.params import CommonParams, check, check_fraction, param

_EMPTY = np.zeros(0, dtype=np.int64)


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(list(key))


def _pick(seed: int, stream: int, proc: int, round_: int, candidates: np.ndarray,
          count: int) -> np.ndarray:
    """``count`` distinct page indices from ``candidates``, sorted, seeded by
    ``(seed, stream, proc, round)``."""
    count = min(count, len(candidates))
    if count <= 0:
        return _EMPTY
    return np.sort(_rng(seed, stream, proc, round_).choice(candidates, count, replace=False))


def _rewrite_rounds(p, init) -> Iterator[tuple[int, int, np.ndarray]]:
    """``(round, proc, pages)`` for round 1, 2, ...: the seeded random ``p.rewrite_fraction`` of
    each process's template pages (region 0) that the round rewrites (stream (seed, 4, proc, r))."""
    template_pages = {proc: np.flatnonzero(regions[0][:, 0] >= 0) for proc, regions in init.items()}
    counts = {proc: int(round(p.rewrite_fraction * len(t))) for proc, t in template_pages.items()}
    if not any(counts.values()):
        return
    round_ = 0
    while True:
        round_ += 1
        for proc in sorted(init):
            yield round_, proc, _pick(p.seed, STREAM_REWRITE, proc, round_, template_pages[proc], counts[proc])


# --- parameters --------------------------------------------------------------------------------

@dataclass(frozen=True)
class ContentParams(CommonParams):
    """Content mix of the pages a process fills."""

    dup_fraction: float = param(0.5, "fraction of pages that are copies of the templates")
    zero_fraction: float = param(0.0, "fraction of pages that are zero-filled")
    templates: int = param(64, "number of distinct templates, shared across and within "
                               "processes (template i%templates for the i-th template page)")

    def __post_init__(self):
        super().__post_init__()
        check_fraction("dup_fraction", self.dup_fraction)
        check_fraction("zero_fraction", self.zero_fraction)
        check(self.dup_fraction + self.zero_fraction <= 1.0 + 1e-9, "dup_fraction",
              self.dup_fraction, f"plus zero_fraction={self.zero_fraction} must not exceed 1")
        check(self.templates >= 1, "templates", self.templates, "must be >= 1")

    def mix(self) -> dict:
        return {"dup_fraction": self.dup_fraction, "zero_fraction": self.zero_fraction,
                "templates": self.templates}


@dataclass(frozen=True)
class StaticParams(ContentParams):
    processes: int = param(3, "number of worker processes")
    pages: int = param(4096, "pages per process (4 KiB each)")

    def __post_init__(self):
        super().__post_init__()
        check(1 <= self.processes <= 256, "processes", self.processes, "must be 1..256")
        check(self.pages >= 1, "pages", self.pages, "must be >= 1")


@dataclass(frozen=True)
class RewriteParams(StaticParams):
    period: float = param(2.0, "seconds between rewrite rounds (round r at r*period)")
    rewrite_fraction: float = param(0.05, "fraction of each process's template pages "
                                          "rewritten with unique content per round")

    def __post_init__(self):
        super().__post_init__()
        check(self.period > 0, "period", self.period, "must be > 0")
        check_fraction("rewrite_fraction", self.rewrite_fraction)


@dataclass(frozen=True)
class SameWriteParams(RewriteParams):
    period: float = param(0.3, "seconds between rounds (round r at r*period)")
    rewrite_fraction: float = param(0.1, "fraction of each process's template pages rewritten "
                                         "with their own bytes per round")


@dataclass(frozen=True)
class ZeroParams(StaticParams):
    processes: int = param(2, "number of worker processes")
    zero_fraction: float = param(0.7, "fraction of pages that are zero-filled")
    dup_fraction: float = param(0.1, "fraction of pages that are copies of the templates")
    templates: int = param(16, "number of distinct templates, shared across and within "
                               "processes")
    rezero_period: float = param(0.0, "seconds between dirty/re-zero rounds; 0 = static")
    rezero_pages: int = param(64, "zero pages per process dirtied per round (capped at the "
                                  "number of zero pages)")

    def __post_init__(self):
        super().__post_init__()
        check(self.rezero_period >= 0, "rezero_period", self.rezero_period, "must be >= 0")
        check(self.rezero_pages >= 0, "rezero_pages", self.rezero_pages, "must be >= 0")


@dataclass(frozen=True)
class ForkDivergeParams(ContentParams):
    pages: int = param(4096, "pages of the parent (4 KiB each)")
    dup_fraction: float = param(0.2, "fraction of pages that are copies of the templates")
    templates: int = param(16, "number of distinct templates")
    children: int = param(2, "children forked by the parent")
    fork_delay: float = param(1.0, "seconds after READY at which the parent forks")
    period: float = param(0.5, "seconds between a child's diverge/reconverge rounds")
    diverge_step: int = param(256, "pages a child rewrites (or restores) per round")
    reconverge_after: float = param(3.0, "seconds after the fork at which children start "
                                         "restoring the parent's content")

    def __post_init__(self):
        super().__post_init__()
        check(self.pages >= 1, "pages", self.pages, "must be >= 1")
        check(1 <= self.children <= 64, "children", self.children, "must be 1..64")
        check(self.fork_delay >= 0, "fork_delay", self.fork_delay, "must be >= 0")
        check(self.period > 0, "period", self.period, "must be > 0")
        check(self.diverge_step >= 0, "diverge_step", self.diverge_step, "must be >= 0")
        check(self.reconverge_after > 0, "reconverge_after", self.reconverge_after,
              "must be > 0")


@dataclass(frozen=True)
class ChurnParams(ContentParams):
    processes: int = param(2, "number of worker processes")
    region_pages: int = param(1024, "pages per region")
    regions: int = param(4, "regions alive at once per process")
    lifetime: float = param(2.0, "seconds a region lives (the initial ones are staggered)")
    templates: int = param(32, "number of distinct templates, shared by all regions")

    def __post_init__(self):
        super().__post_init__()
        check(1 <= self.processes <= 256, "processes", self.processes, "must be 1..256")
        check(self.region_pages >= 1, "region_pages", self.region_pages, "must be >= 1")
        check(1 <= self.regions <= 4096, "regions", self.regions, "must be 1..4096")
        check(self.lifetime > 0, "lifetime", self.lifetime, "must be > 0")


# --- workloads ---------------------------------------------------------------------------------

@register
class Static(Workload):
    """``processes`` processes, each with one region of ``pages`` pages: ``dup_fraction`` of
    them copies of ``templates`` templates (template i%templates for the i-th template page, so
    each template occurs equally often in every process), ``zero_fraction`` zero-filled, the
    rest unique; positions shuffled by a seeded permutation.  Never changes."""

    name = "static"
    Params = StaticParams

    def build_initial(self) -> Memory:
        p = self.params
        return {proc: {0: mixed_cells(p.seed, proc, 0, p.pages, **p.mix())}
                for proc in range(p.processes)}


@register
class Rewrite(Static):
    """Like ``static``; in addition, at every ``t = r*period`` (round r = 1, 2, ...) each
    process first restores the pages it rewrote in round r-1 to their templates, then rewrites
    a seeded random ``rewrite_fraction`` of its template pages (stream (seed, 4, proc, r)) with
    fresh unique content.  After round 1 every process always holds exactly
    ``round(rewrite_fraction * template pages)`` rewritten pages: duplicates stay constant
    while merged pages get COW-broken and volatile pages appear."""

    name = "rewrite"
    Params = RewriteParams

    def schedule(self) -> Iterator[Step]:
        p = self.params
        init = self.initial()
        previous = {proc: _EMPTY for proc in init}
        for round_, proc, chosen in _rewrite_rounds(p, init):
            restore = np.setdiff1d(previous[proc], chosen)
            ops = []
            if len(restore):
                ops.append(Op(WRITE, 0, restore, init[proc][0][restore]))
            if len(chosen):
                ops.append(Op(WRITE, 0, chosen,
                              tagged_cells(UNIQUE, proc, 0, chosen, round_)))
            previous[proc] = chosen
            yield Step(round_ * p.period, proc,
                       f"round {round_}: restore {len(restore)} pages to their templates, "
                       f"rewrite {len(chosen)} template pages with unique content",
                       len(restore) + len(chosen), ops)


@register
class SameWrite(Static):
    """Like ``static``; in addition, at every ``t = r*period`` (round r = 1, 2, ...) each process
    rewrites a seeded random ``rewrite_fraction`` of its template pages (stream (seed, 4, proc, r))
    with the bytes they already hold, as redis or memcached rewrite a value with the same data.
    The content never changes, so no snapshot sees these writes; a write to a merged page still
    faults and breaks COW (``cow_ksm``), and ksmd merges the page again from the stable tree."""

    name = "samewrite"
    Params = SameWriteParams

    def schedule(self) -> Iterator[Step]:
        p = self.params
        init = self.initial()
        for round_, proc, chosen in _rewrite_rounds(p, init):
            yield Step(round_ * p.period, proc,
                       f"round {round_}: rewrite {len(chosen)} template pages with their own bytes",
                       len(chosen), [Op(WRITE, 0, chosen, init[proc][0][chosen])])


@register
class Zero(Static):
    """Zero-heavy: ``zero_fraction`` of each process's pages zero-filled, ``dup_fraction``
    template copies, the rest unique (placement as in ``static``).  If ``rezero_period`` > 0,
    at ``t = r*rezero_period`` each process writes a 40-byte header into ``rezero_pages``
    seeded-random zero pages (stream (seed, 6, proc, r)), making them unique, and at
    ``t = (r + 0.5)*rezero_period`` zeroes those pages again."""

    name = "zero"
    Params = ZeroParams

    def schedule(self) -> Iterator[Step]:
        p = self.params
        if p.rezero_period <= 0 or p.rezero_pages <= 0:
            return
        init = self.initial()
        zero_pages = {proc: np.flatnonzero(regions[0][:, 0] == ZERO)
                      for proc, regions in init.items()}
        if not any(len(z) for z in zero_pages.values()):
            return
        round_ = 0
        while True:
            round_ += 1
            chosen = {proc: _pick(p.seed, STREAM_REZERO, proc, round_, zero_pages[proc],
                                  p.rezero_pages) for proc in sorted(init)}
            for proc, pages in chosen.items():
                yield Step(round_ * p.rezero_period, proc,
                           f"round {round_}: write a few bytes into {len(pages)} zero pages",
                           len(pages), [Op(WRITE, 0, pages,
                                           tagged_cells(SPARSE, proc, 0, pages, round_))])
            for proc, pages in chosen.items():
                yield Step((round_ + 0.5) * p.rezero_period, proc,
                           f"round {round_}: zero the {len(pages)} dirtied pages again",
                           len(pages), [Op(WRITE, 0, pages, zero_cells(len(pages)))])


@register
class ForkDiverge(Workload):
    """One parent (proc 0) fills ``pages`` pages (``dup_fraction`` template copies,
    ``zero_fraction`` zero, the rest unique) and stays static.  At ``fork_delay`` it forks
    ``children`` children (procs 1..children, os.fork, no exec), which share all pages
    copy-on-write.  Child c walks a seeded permutation of the pages (stream (seed, 5, c)):
    at ``fork_delay + r*period`` for every r >= 1 with ``r*period < reconverge_after`` it
    rewrites the next ``diverge_step`` pages with child-specific unique content (diverge);
    from ``fork_delay + reconverge_after`` on, one round per ``period``, it restores those
    chunks in the same order to the parent's original content (re-converge), then stays
    static: the child ends with the parent's content in private (unshared) pages."""

    name = "forkdiverge"
    Params = ForkDivergeParams

    def build_initial(self) -> Memory:
        p = self.params
        return {0: {0: mixed_cells(p.seed, 0, 0, p.pages, **p.mix())}}

    def diverge_rounds(self) -> int:
        p = self.params
        rounds = 0
        while (rounds + 1) * p.period < p.reconverge_after - 1e-9:
            rounds += 1
        if p.diverge_step == 0:
            return 0
        return min(rounds, -(-p.pages // p.diverge_step))

    def max_pages(self) -> int:
        return self.params.pages * (1 + self.params.children)

    def schedule(self) -> Iterator[Step]:
        p = self.params
        original = self.initial()[0][0]
        steps = [Step(p.fork_delay, 0, f"fork child {c} (proc {c})", p.pages,
                      [Op(FORK, child=c)]) for c in range(1, p.children + 1)]
        rounds = self.diverge_rounds()
        for c in range(1, p.children + 1):
            order = _rng(p.seed, STREAM_DIVERGE, c).permutation(p.pages)
            chunks = [np.sort(order[i * p.diverge_step:(i + 1) * p.diverge_step])
                      for i in range(rounds)]
            for r, chunk in enumerate(chunks, start=1):
                steps.append(Step(p.fork_delay + r * p.period, c,
                                  f"round {r}: diverge {len(chunk)} pages with child-specific "
                                  f"content", len(chunk),
                                  [Op(WRITE, 0, chunk, tagged_cells(UNIQUE, c, 0, chunk, r))]))
            for j, chunk in enumerate(chunks):
                steps.append(Step(p.fork_delay + p.reconverge_after + j * p.period, c,
                                  f"reconverge {len(chunk)} pages diverged in round {j + 1} "
                                  f"to the parent's content", len(chunk),
                                  [Op(WRITE, 0, chunk, original[chunk])]))
        steps.sort(key=lambda s: s.t)
        yield from steps


@register
class Churn(Workload):
    """``processes`` processes each keep ``regions`` regions of ``region_pages`` pages alive
    (content mix as in ``static``, a fresh seeded placement per region; unique content differs
    per region).  Region n (n = 0, 1, ...) dies (munmap) at ``lifetime*(n+1)/regions`` and is
    immediately replaced by region n+regions (mmap + fill), so region n lives from
    ``max(0, lifetime*(n+1-regions)/regions)``: the initial regions are staggered, later ones
    live exactly ``lifetime``, and never more than ``regions`` are alive."""

    name = "churn"
    Params = ChurnParams

    def _region(self, proc: int, n: int):
        p = self.params
        return mixed_cells(p.seed, proc, n, p.region_pages, **p.mix())

    def build_initial(self) -> Memory:
        p = self.params
        return {proc: {n: self._region(proc, n) for n in range(p.regions)}
                for proc in range(p.processes)}

    def schedule(self) -> Iterator[Step]:
        p = self.params
        n = 0
        while True:
            t = p.lifetime * (n + 1) / p.regions
            for proc in range(p.processes):
                yield Step(t, proc, f"unmap region {n}, map region {n + p.regions}",
                           2 * p.region_pages,
                           [Op(UNMAP, n), Op(MAP, n + p.regions, cells=self._region(proc,
                                                                                    n + p.regions))])
            n += 1


__all__ = ["Static", "Rewrite", "Zero", "ForkDiverge", "Churn"]
