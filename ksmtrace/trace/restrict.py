"""Safe presets: rules that forbid some merges, for any policy, applied to the prepared trace.

>>> from ksmtrace.replay import replay
>>> replay("vms.trace", "ksm", {"pages_to_scan": 1000, "restrict": "same-domain:process"})
>>> replay("vms.trace", "pksm", restrict="zero-pages")

A preset is not a policy parameter that every policy would have to implement.  It rewrites the
prepared trace's content ids (``Prepared.ev_cid``) so that **two pages the preset forbids to share
a frame never have equal content ids**.  Every engine refuses a merge of unequal content, so every
policy — built-in, plug-in or future, and the oracle — obeys the preset with no change to its code,
and the oracle under a preset is the bound for that preset.  The presets (``RESTRICT`` syntax:
``NAME[:DOMAIN]``, several joined with ``+``):

``zero-pages``
    only all-zero pages are merged (with each other, or mapped to the kernel's zero page).
``same-domain[:DOMAIN]``
    merges only between pages of one security domain, all-zero pages included: no frame is ever
    shared across domains because of deduplication, so the engine's ``exposed_merges`` is 0 (for
    ``user-cgroup`` or ``process``).  All-zero pages are merged within their domain like any
    content, never with the kernel's zero page (which every domain maps).
``windows[:DOMAIN]``
    Microsoft's rule since Windows 10 1903 ("page combining is limited to processes within the same
    security domain ... except for common pages": ``PROCESS_MITIGATION_SIDE_CHANNEL_ISOLATION_POLICY``,
    learn.microsoft.com; Dedup Est Machina Returns, vusec.net): ``same-domain``, except that common
    pages are combined across domains.  The common pages here are the all-zero pages; Windows also
    counts other fixed fills (0xFF...) that a trace of keyed hashes cannot recognise, so this keeps a
    little less than Windows would.  ``exposed_merges`` under it counts only all-zero pages merged into
    a shared frame (a policy that maps them to the kernel's zero page exposes none).
``read-only``
    only pages of VMAs without write permission (VmFlags ``wr`` — ``VM_WRITE``, the ``w`` of
    ``perms`` — in the trace's vmas table, e.g. RELRO and ``mprotect``-ed data) are merged — with any
    other such page; a page that cannot be written
    cannot be COW-broken, so its merge cannot be timed by writing to it.  The permission is the one
    at the page's arrival (its ``APPEAR`` or ``WRITE`` snapshot); a page with no VMA in the table is
    treated as writable.

``DOMAIN`` is ``user-cgroup`` (default: uid and cgroup, the domain the engine's ``exposed_merges``
counts crossings of), ``user`` (uid), ``cgroup``, or ``process`` (each process its own domain: a VM
is a process, so this is the per-VM rule).

How the content ids are rewritten (every arrival event, ``APPEAR``/``WRITE``):

* a page a preset lets merge with nothing gets a content of its own: one per frame for a frame
  several arrivals share (``ev_gid``), else one per page and content (so a rewrite with the same
  content is still unchanged for a checksum gate);
* otherwise its content id is the pair (content, the preset's group: the domain), with all-zero
  pages kept as content 0 where every preset in force lets them be common;
* **fork-shared frames**: pages that share a frame with no dedup (fork, ``ev_gid``) keep one frame
  and one content id.  If the preset puts them in different groups (a child in another cgroup, a
  page writable in one process and read-only in the other), their frame gets a content id of its
  own: it stays one frame (the sharing was not dedup's doing) and nothing more merges into it;
* **zero pages**: content 0 is the kernel's zero page, shared by every process; presets that
  forbid an all-zero page to be common (``same-domain``, ``read-only`` for a writable page) give it
  an ordinary content id, so no policy maps it to the zero page (``use_zero_pages``, a 6.12 THP
  split) and the oracle keeps one frame of zeros per group;
* **COW**: the engine's rules are unchanged — a write to a merged page is a COW break, a page that
  could not merge cannot be COW-broken.

The baselines (frames with no dedup, zero-filled pages, the naive hash count) are the trace's;
only the oracle's frames change (``oracle_saved`` is the preset's bound).  The unrestricted oracle
is kept (``Prepared.extras["unrestricted_oracle_frames"]``) so that a result can say how much of
the saving the preset keeps.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
from ksmtrace import _jit  # noqa: F401  (numba cache location: before any decorator)
from numba import njit

from ksmtrace.errors import KsmtraceError
from ksmtrace.trace.prepared import (EV_APPEAR, EV_GONE, EV_THP, EV_UNMERGE, EV_WRITE, Prepared, baseline_counts, dense_ids,
                                     dense_pair_ids, vmflag_mask)

PRESETS = {
    "zero-pages": "only all-zero pages are merged",
    "same-domain": "merges only within one security domain, all-zero pages included (no frame shared across domains)",
    "windows": "Microsoft's rule (Windows 10 1903+): same-domain, except common (all-zero) pages",
    "read-only": "only pages of VMAs without write permission are merged",
}
DOMAINS = ("user-cgroup", "user", "cgroup", "process")
DEFAULT_DOMAIN = "user-cgroup"
_WITH_DOMAIN = ("same-domain", "windows")


@dataclass(frozen=True)
class Restriction:
    """A parsed ``RESTRICT``: presets with their domain, in a canonical order."""

    rules: tuple[tuple[str, str | None], ...]

    @property
    def spec(self) -> str:
        return "+".join(n + (f":{d}" if d else "") for n, d in self.rules)

    def __str__(self) -> str:
        return self.spec

    def describe(self) -> str:
        return "; ".join(PRESETS[n] + (f" (domain: {d})" if d else "") for n, d in self.rules)


def parse_restriction(text: Any) -> Restriction | None:
    """``None``, ``""`` or ``none`` -> None; else ``NAME[:DOMAIN][+NAME[:DOMAIN]...]``."""
    if text is None:
        return None
    if isinstance(text, Restriction):
        return text
    s = str(text).strip().lower()
    if s in ("", "none", "off"):
        return None
    rules: dict[str, str | None] = {}
    for part in s.split("+"):
        name, _, dom = part.strip().partition(":")
        name, dom = name.strip(), dom.strip()
        if name not in PRESETS:
            raise KsmtraceError(f"unknown restriction {name!r} in {text!r} (presets: {', '.join(PRESETS)}; "
                                "join several with +)")
        if name in _WITH_DOMAIN:
            dom = dom or DEFAULT_DOMAIN
            if dom not in DOMAINS:
                raise KsmtraceError(f"restriction {part.strip()!r}: unknown domain {dom!r} (domains: {', '.join(DOMAINS)})")
        elif dom:
            raise KsmtraceError(f"restriction {name!r} takes no domain (got {part.strip()!r})")
        if name in rules and rules[name] != (dom or None):
            raise KsmtraceError(f"restriction {name!r} given twice in {text!r}")
        rules[name] = dom or None
    return Restriction(tuple((n, rules[n]) for n in PRESETS if n in rules))


# --- the transform ------------------------------------------------------------------------------
def restrict_prepared(trace, prep: Prepared, restriction: "Restriction | str | None") -> Prepared:
    """``prep`` with its content ids rewritten for ``restriction`` (see the module docstring);
    ``prep`` itself when there is none.  ``trace`` supplies the processes' uid and cgroup (None will
    do for the other presets and the ``user-cgroup`` and ``process`` domains)."""
    r = parse_restriction(restriction)
    if r is None:
        return prep
    return _restrict(trace, prep, r)


def _restrict(trace, prep: Prepared, r: Restriction) -> Prepared:
    kind = prep.ev_kind
    arrive = np.flatnonzero((kind == EV_APPEAR) | (kind == EV_WRITE))
    cid = prep.ev_cid[arrive].astype(np.int64)
    pg = prep.ev_pg[arrive].astype(np.int64)
    gid = prep.ev_gid[arrive]
    proc = prep.page_proc[pg].astype(np.int64)
    zero = cid == 0
    alone = np.zeros(len(arrive), dtype=bool)  # may merge with nothing
    common = zero.copy()  # all-zero pages that stay content 0
    label = cid.copy()  # (content, groups...) folded into one dense id
    for name, dom in r.rules:
        if name == "zero-pages":
            alone |= ~zero
        elif name == "read-only":
            alone |= _writable(trace, prep, arrive)
        else:
            d = domain_of(trace, prep, dom)[proc]
            if name == "windows":
                d = np.where(zero, -1, d)
            else:
                common[:] = False
            label, _ = dense_pair_ids(label, d - d.min() if len(d) else d)
    common &= ~alone
    # pages that merge with nothing: a content of their own, per shared frame or per (page, content)
    lab = np.where(common, -1, label)
    n_lab = int(lab.max()) + 1 if len(lab) else 0
    per_page, _ = dense_pair_ids(pg, np.maximum(cid, 0))
    own = np.where(gid >= 0, gid, prep.n_gids + per_page)
    lab = np.where(alone, n_lab + own, lab)
    # a frame shared with no dedup (fork) whose pages the preset puts in different groups: a content
    # of its own for the whole frame (one frame, nothing more merges into it)
    shared = gid >= 0
    if shared.any():
        g = gid[shared]
        lo = np.full(prep.n_gids, np.iinfo(np.int64).max, np.int64)
        hi = np.full(prep.n_gids, np.iinfo(np.int64).min, np.int64)
        np.minimum.at(lo, g, lab[shared])
        np.maximum.at(hi, g, lab[shared])
        mixed = (lo != hi)[np.maximum(gid, 0)] & shared
        top = int(lab.max()) + 1
        lab = np.where(mixed, top + gid, lab)
    new_arr = np.zeros(len(arrive), np.int64)
    nz = lab >= 0
    if nz.any():
        dense, n = dense_ids(lab[nz])
        new_arr[nz] = dense + 1
        n_cids = n + 1
    else:
        n_cids = 1
    ev_cid = np.full(len(kind), -1, np.int64)
    ev_cid[arrive] = new_arr
    ev_cid = _carry_cids(prep.ev_pg, kind, ev_cid, prep.n_pages).astype(np.int32)
    bf, of, _ = baseline_counts(prep.off, prep.ev_pg, prep.ev_kind, ev_cid, prep.ev_gid, prep.n_pages, n_cids, prep.n_gids)
    extras = {**prep.extras, "restrict": r.spec, "unrestricted_oracle_frames": prep.oracle_frames}
    return dataclasses.replace(prep, store=prep.store.with_column("cid", ev_cid), n_cids=int(n_cids), oracle_frames=of,
                               extras=extras)


@njit(cache=True)
def _carry_cids(ev_pg, ev_kind, ev_cid, n_pages):
    """Events that carry a page's current content without an arrival (THP) get its new id."""
    last = np.full(n_pages, -1, np.int64)
    out = ev_cid.copy()
    for i in range(len(ev_pg)):
        k = ev_kind[i]
        p = ev_pg[i]
        if k == 1 or k == 4:  # EV_APPEAR, EV_WRITE
            last[p] = ev_cid[i]
        elif k == 2 or k == 3:  # EV_GONE, EV_UNMERGE
            last[p] = -1
        elif k == 5:  # EV_THP
            out[i] = last[p]
    return out


assert (EV_APPEAR, EV_GONE, EV_UNMERGE, EV_WRITE, EV_THP) == (1, 2, 3, 4, 5)  # _carry_cids's constants


def domain_of(trace, prep: Prepared, domain: str) -> np.ndarray:
    """The security domain (a dense int) of every process of ``prep``."""
    if domain == "user-cgroup":
        return prep.proc_domain.astype(np.int64)
    if domain == "process":
        return np.arange(prep.n_procs, dtype=np.int64)
    col = {"user": "uid", "cgroup": "cgroup"}[domain]
    if not trace.has_table("processes"):
        raise KsmtraceError(f"{trace.path}: the {domain} domain needs the processes table (uid and cgroup); this trace has none")
    p = trace.read_table("processes", columns=["proc", col])
    first = p.group_by("proc").agg(pl.col(col).first()).sort("proc")
    rank = first.select(pl.col(col).rank("dense")).to_series().to_numpy().astype(np.int64) - 1
    by_id = dict(zip(first["proc"].to_list(), rank.tolist()))
    return np.array([by_id.get(int(i), -1 - k) for k, i in enumerate(prep.proc_id.tolist())], dtype=np.int64)


def _writable(trace, prep: Prepared, arrive: np.ndarray) -> np.ndarray:
    """For each arrival event: is the page's VMA writable (VmFlags ``wr``: ``VM_WRITE``) at the event's
    snapshot, or unknown?  From the prepared trace's VMAs (``Prepared.vmas``)."""
    v = prep.vmas
    if v is None:
        where = getattr(trace, "path", "the trace")
        raise KsmtraceError(f"{where}: the read-only preset needs the vmas table (VMA permissions); this trace has none")
    out = np.ones(len(arrive), dtype=bool)  # no VMA found: writable
    if len(v.proc) == 0 or len(arrive) == 0:
        return out
    pg = prep.ev_pg[arrive].astype(np.int64)
    ev = pl.DataFrame({
        "i": np.arange(len(arrive), dtype=np.int64),
        "snap": (np.searchsorted(prep.off, arrive, side="right") - 1).astype(np.int64),
        "proc": prep.page_proc[pg].astype(np.int64),
        "vpn": prep.page_vpn[pg].astype(np.int64),
    }).sort("vpn")
    vs = np.repeat(np.arange(len(v.off) - 1, dtype=np.int64), np.diff(v.off))
    vt = pl.DataFrame({"snap": vs, "proc": v.proc.astype(np.int64), "lo": v.start, "hi": v.end,
                       "w": (v.vmflags & vmflag_mask("wr")) != 0}).sort("lo")
    j = ev.join_asof(vt, left_on="vpn", right_on="lo", by=["snap", "proc"], strategy="backward",
                     check_sortedness=False)  # sorted by address overall, so within every group
    inside = j.filter(pl.col("hi").is_not_null() & (pl.col("vpn") < pl.col("hi")))
    out[inside["i"].to_numpy()] = inside["w"].to_numpy()
    return out


def oracle_saved(prep: Prepared) -> np.ndarray:
    """Frames the oracle saves at every snapshot (under the prepared trace's restriction, if any)."""
    return prep.base_frames - prep.oracle_frames


def unrestricted_oracle_saved(prep: Prepared) -> np.ndarray:
    """Frames a perfect dedup with no restriction saves at every snapshot."""
    of = prep.extras.get("unrestricted_oracle_frames")
    return prep.base_frames - (prep.oracle_frames if of is None else of)
