"""Same virtual address first (issue 11 item 3): the founding notes' "same virtual address" plan.

Pages of related processes — a fork family, guests started from the same image, workers of one
server — tend to hold equal content at equal virtual addresses.  With ``same_address_first`` the
``ksm`` and ``pksm`` policies compare a page, before any tree search, with the pages at the same
virtual address in its related processes, and merge on equality; ``oracle`` with
``same_address_only`` bounds what such merges can save.  Which pages are related is
``same_address_key`` (:meth:`ksmtrace.trace.addrspace.AddressSpaces.page_classes`):

* ``family`` — the same vpn in a process of the same fork family (``processes.ppid``);
* ``vma`` — the same offset in a VMA of the same path and length (e.g. guest RAM of guests of one
  size, the data of one library), whatever its address;
* ``any`` — the same vpn in any process.

:class:`SameAddress` keeps, for a runtime and its numba kernel alike, the class of every page and
the pages of each class (in process start order) current across snapshots; ``docs/policies-same-
address.md`` says what is modelled and where it deviates.
"""
from __future__ import annotations

import numpy as np

from ksmtrace.policies.base import param
from ksmtrace.trace.addrspace import SA_KEYS, address_spaces, class_members, dense_rows

__all__ = ["SA_KEYS", "SameAddress", "same_address_first_param", "same_address_key_param"]


def same_address_first_param():
    """The ``same_address_first`` parameter of ``ksm`` and ``pksm``."""
    return param(False, "what-if: before any tree search, compare the page with the pages at the same virtual address "
                        "in related processes (same_address_key) and merge on equality")


def same_address_key_param():
    """The ``same_address_key`` parameter of every policy that has the plan."""
    return param("family", "which pages are related: the same vpn in the fork family; the same offset in a VMA of "
                           "the same path and length; the same vpn in any process", choices=SA_KEYS)


class SameAddress:
    """The same-address classes of the pages now: ``cls[pg]`` (-1: none) and the pages of class
    ``c`` at ``mem[off[c]:off[c + 1]]``, in process start order.  The arrays are updated in place
    (:meth:`update` at every snapshot), so a kernel holding them sees the current ones."""

    def __init__(self, ctx, on: bool, key: str) -> None:
        prep = ctx.prep
        self.on = bool(on) and ctx.trace is not None and prep.n_pages > 0
        n = max(int(prep.n_pages), 1) if on else 1  # (the plan off: no memory for the classes)
        # one buffer (a kernel takes it as one array): cls [n], off [n + 2], mem [n]
        self.buf = np.zeros(3 * n + 2, np.int64)
        self.cls = self.buf[:n]
        self.off = self.buf[n: 2 * n + 2]
        self.mem = self.buf[2 * n + 2:]
        self.cls[:] = -1
        self.key = key
        self.prep = prep
        self.asp = address_spaces(ctx.trace, prep) if self.on else None
        self.snap = self.asp.snap_index(prep) if self.on else None
        self.last = -1

    def update(self, s: int) -> None:
        if not self.on:
            return
        ts = int(self.snap[s])
        if self.last >= 0 and (self.key != "vma" or ts == self.last
                               or (ts == self.last + 1 and not self.asp.changed[ts].any())):
            self.last = ts
            return
        prep = self.prep
        cls = self.asp.page_classes(prep, self.key, ts)
        off, mem = class_members(cls, self.asp.proc_rank[prep.page_proc.astype(np.int64)])
        self.cls[: len(cls)] = cls
        self.off[: len(off)] = off
        self.off[len(off):] = off[-1] if len(off) else 0
        self.mem[: len(mem)] = mem
        self.last = ts

    def related(self, pg: int) -> np.ndarray:
        """The pages of ``pg``'s class (``pg`` included), in process start order."""
        c = int(self.cls[pg])
        if c < 0:
            return self.mem[:0]
        return self.mem[self.off[c]: self.off[c + 1]]

    def event_keys(self, prep) -> tuple[np.ndarray, int]:
        """For every event of ``prep``: a dense key of (its page's class at that snapshot, its new
        content), -1 where the page has no class or the event brings no content; and the number
        of keys.  The oracle's ``same_address_only`` merges pages of equal key only."""
        n_ev = len(prep.ev_pg)
        out = np.full(n_ev, -1, np.int64)
        if not self.on or n_ev == 0:
            return out, 0
        cls_ev = np.full(n_ev, -1, np.int64)
        for s in range(prep.n_snaps):
            sl = prep.events(s)
            if sl.stop > sl.start:
                self.update(s)
                cls_ev[sl] = self.cls[prep.ev_pg[sl]]
        ok = (cls_ev >= 0) & (prep.ev_cid >= 0)
        if ok.any():
            out[ok] = dense_rows(np.stack([cls_ev[ok], prep.ev_cid[ok].astype(np.int64)], axis=1))
        return out, int(out.max()) + 1 if ok.any() else 0
