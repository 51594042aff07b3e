"""The sharing breakdown of a trace: where the duplicate frames are, snapshot by snapshot.

>>> from ksmtrace.trace.reader import open_trace
>>> from ksmtrace.analysis.breakdown import breakdown
>>> df = breakdown(open_trace("my-trace"), scope="recorded")
>>> df.select("t_s", "oracle_saved", "zero_saved", "within_process_saved", "across_process_saved")

Everything is counted on physical frames, exactly as the ``oracle`` policy counts: pages that
already share a frame without any deduplication (fork COW, equal PFN and equal content) are one
frame; pages mapping the kernel's shared zero page are not candidates and use no frame.  At every
snapshot, for the candidate pages of the scope:

``oracle_saved``
    frames a perfect, instantaneous dedup frees = frames in use with no dedup − frames left after
    merging every equal content into one frame and every all-zero page into the zero page.  It is
    split exactly (``oracle_saved = zero_saved + within_process_saved + across_process_saved``):
``zero_saved``
    frames holding all-zero content (each can be mapped to the kernel's zero page).
``within_process_saved``
    frames freed by merging non-zero pages only with equal pages *of the same process* (Barker
    2012's "self-sharing").  A frame already shared by fork between two processes stays one frame,
    so merging inside each process can leave pages of both on one frame.
``across_process_saved``
    the rest of the non-zero saving: what needs merges between different processes.
``same_domain_saved``, ``windows_saved``, ``same_process_saved``, ``read_only_saved``
    what the oracle saves under a safe preset (:mod:`ksmtrace.trace.restrict`, the very rule a replay
    with ``restrict=`` obeys): ``same-domain`` (no frame shared across security domains, uid +
    cgroup — the domain the engine's ``exposed_merges`` counts crossings of — all-zero pages
    included), ``windows`` (Microsoft's rule: the same, except that all-zero pages are common),
    ``same-domain:process`` (each process — each VM — its own domain) and ``read-only`` (only pages of
    VMAs without write permission; None when the trace has no vmas table).  ``across_domain_saved =
    oracle_saved − same_domain_saved`` is what the same-domain rule gives up.  (``zero_saved`` is
    exactly what the ``zero-pages`` preset keeps.)
``hash_only_saved``
    the naive count (present pages minus distinct hashes, zero-page mappings included) that
    studies which compare hashes only quote.  Shown for comparison; it overcounts.

The within-process count is the number of connected components of the graph whose nodes are the
frames and whose edges join two frames holding equal content in the same process: each component
can collapse to one frame, and a fork-shared frame joins the processes it spans (Barker's
self-sharing, counted on frames).  The presets are stricter about such frames: a frame shared by
fork across domains stays one frame and nothing more merges into it.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import polars as pl

from ksmtrace.errors import KsmtraceError

BREAKDOWN_COLUMNS = (
    "snap", "t_s", "candidate_pages", "base_frames", "processes", "domains",
    "oracle_saved", "zero_saved", "nonzero_saved", "within_process_saved", "across_process_saved",
    "same_domain_saved", "across_domain_saved", "windows_saved", "same_process_saved", "read_only_saved",
    "hash_only_saved", "zero_page_mapped",
)
#: breakdown column -> the preset whose oracle it is (ksmtrace.trace.restrict)
PRESET_COLUMNS = {"same_domain_saved": "same-domain", "windows_saved": "windows", "same_process_saved": "same-domain:process",
                  "read_only_saved": "read-only"}

BREAKDOWN_DEFINITIONS = {
    "candidate_pages": "pages the scope's dedup could consider (present, private anonymous, not the zero page)",
    "base_frames": "physical frames those pages use with no dedup (fork-shared frames once)",
    "processes": "processes holding candidate pages",
    "domains": "security domains (uid + cgroup) holding candidate pages",
    "oracle_saved": "frames a perfect instantaneous dedup frees (= zero + within-process + across-process)",
    "zero_saved": "frames holding all-zero content (mapped to the kernel zero page)",
    "nonzero_saved": "oracle_saved minus zero_saved",
    "within_process_saved": "non-zero frames freed by merging only within one process",
    "across_process_saved": "non-zero frames that need merges between processes",
    "same_domain_saved": "what the same-domain preset keeps: no frame shared across uid+cgroup domains, all-zero pages "
                         "included (exposed_merges 0)",
    "across_domain_saved": "what the same-domain preset gives up (oracle_saved - same_domain_saved)",
    "windows_saved": "what Microsoft's rule (Windows 10 1903+) keeps: same-domain, but all-zero pages merge across domains",
    "same_process_saved": "what the same-domain:process preset keeps: each process (each VM) its own domain",
    "read_only_saved": "what the read-only preset keeps: only pages of VMAs without write permission merge "
                       "(empty without a vmas table)",
    "hash_only_saved": "naive count: present pages minus distinct hashes (overcounts; for comparison)",
    "zero_page_mapped": "pages in scope already mapping the kernel zero page (no frame; not candidates)",
}


def breakdown(source, scope: str | None = None, *, snaps: Iterable[int] | None = None) -> pl.DataFrame:
    """The sharing breakdown of every snapshot (or of ``snaps``) as a DataFrame of frame counts.

    ``source`` is a :class:`~ksmtrace.trace.reader.Trace` or the path of one (prepared under
    ``scope``; default: the one :func:`ksmtrace.replay.choose_scope` picks), or an already
    :class:`~ksmtrace.trace.prepared.Prepared` one.  Columns:
    :data:`BREAKDOWN_COLUMNS`, defined in :data:`BREAKDOWN_DEFINITIONS` and the module docstring.
    """
    from ksmtrace.trace.prepared import EV_APPEAR, EV_GONE, EV_UNMERGE, EV_WRITE, Prepared

    trace = None
    if isinstance(source, Prepared):
        if scope is not None and scope != source.scope:
            raise KsmtraceError(f"breakdown: the prepared trace has scope {source.scope!r}, not {scope!r}")
        prep = source
    else:
        from ksmtrace.trace.reader import as_trace

        try:
            trace = as_trace(source)
        except KsmtraceError:
            raise KsmtraceError(f"breakdown: expected a trace, its path or a prepared trace, got {type(source).__name__}") from None
        if scope in (None, "auto"):
            from ksmtrace.replay import choose_scope

            scope = choose_scope(trace)[0]
        prep = trace.prepare(scope)

    n = prep.n_snaps
    wanted = np.zeros(n, dtype=bool)
    if snaps is None:
        wanted[:] = True
    else:
        for s in snaps:
            if not 0 <= int(s) < n:
                raise KsmtraceError(f"breakdown: snapshot {s} out of range (the trace has {n})")
            wanted[int(s)] = True

    presets = _preset_savings(trace, prep)
    cur_cid = np.full(prep.n_pages, -1, dtype=np.int64)
    cur_gid = np.full(prep.n_pages, -1, dtype=np.int64)
    page_proc = prep.page_proc.astype(np.int64)
    proc_dom = prep.proc_domain.astype(np.int64)
    rows: list[dict] = []
    for s in range(n):
        sl = prep.events(s)
        pgs = prep.ev_pg[sl].astype(np.int64)
        kinds = prep.ev_kind[sl]
        rem = (kinds == EV_GONE) | (kinds == EV_UNMERGE)
        add = (kinds == EV_APPEAR) | (kinds == EV_WRITE)
        cur_cid[pgs[rem]] = -1
        cur_gid[pgs[rem]] = -1
        cur_cid[pgs[add]] = prep.ev_cid[sl][add]
        cur_gid[pgs[add]] = prep.event_frames(sl)[add]
        if not wanted[s]:
            continue
        active = np.flatnonzero(cur_cid >= 0)
        cid = cur_cid[active]
        gid = cur_gid[active]
        proc = page_proc[active]
        row = _snapshot_row(cid, gid, proc, proc_dom[proc])
        row["snap"] = s
        row["t_s"] = float(prep.times_ns[s]) / 1e9
        row["candidate_pages"] = int(active.size)
        row["hash_only_saved"] = int(prep.hash_dup_pages[s])
        row["zero_page_mapped"] = int(prep.zero_page_mapped[s])
        for col, saved in presets.items():
            row[col] = None if saved is None else int(saved[s])
        row["across_domain_saved"] = row["oracle_saved"] - row["same_domain_saved"]
        rows.append(row)
    schema = {c: (pl.Float64 if c == "t_s" else pl.Int64) for c in BREAKDOWN_COLUMNS}
    if not rows:
        return pl.DataFrame(schema=schema)
    return pl.DataFrame([{c: r[c] for c in BREAKDOWN_COLUMNS} for r in rows], schema=schema)


def _snapshot_row(cid: np.ndarray, gid: np.ndarray, proc: np.ndarray, dom: np.ndarray) -> dict:
    base_frames = _n_distinct(gid)
    zero = cid == 0
    zero_saved = _n_distinct(gid[zero])
    nz = ~zero
    cid_nz, gid_nz = cid[nz], gid[nz]
    frames_nz = _n_distinct(gid_nz)
    distinct_nz = _n_distinct(cid_nz)
    nonzero_saved = frames_nz - distinct_nz
    within = frames_nz - _components(gid_nz, cid_nz, proc[nz])
    oracle = zero_saved + nonzero_saved
    return {
        "base_frames": base_frames,
        "processes": _n_distinct(proc),
        "domains": _n_distinct(dom),
        "oracle_saved": oracle,
        "zero_saved": zero_saved,
        "nonzero_saved": nonzero_saved,
        "within_process_saved": within,
        "across_process_saved": nonzero_saved - within,
    }


def _preset_savings(trace, prep) -> dict:
    """Frames the oracle saves under each preset of :data:`PRESET_COLUMNS` at every snapshot (None:
    not known for this trace: read-only needs the trace's vmas table)."""
    from ksmtrace.trace.restrict import oracle_saved, restrict_prepared

    out = {}
    for col, preset in PRESET_COLUMNS.items():
        if preset == "read-only" and prep.vmas is None:
            out[col] = None
            continue
        out[col] = oracle_saved(restrict_prepared(trace, prep, preset))
    return out


def _n_distinct(a: np.ndarray) -> int:
    if a.size == 0:
        return 0
    s = np.sort(a, kind="stable")
    return int(np.count_nonzero(s[1:] != s[:-1])) + 1


def _pair_key(a: np.ndarray, b: np.ndarray) -> np.ndarray | None:
    """One int64 per (a, b) pair, ordered as the pairs (None if it could overflow)."""
    if a.size == 0:
        return a.astype(np.int64)
    amin, bmin = int(a.min()), int(b.min())
    span = int(b.max()) - bmin + 1
    if amin < 0 or (int(a.max()) + 1) * span >= 2**62:
        return None
    return a.astype(np.int64) * span + (b.astype(np.int64) - bmin)


def dense_ids(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, int]:
    """Dense ids of the distinct (a, b) pairs, and how many there are."""
    if a.size == 0:
        return np.zeros(0, dtype=np.int64), 0
    key = _pair_key(a, b)
    order = np.argsort(key, kind="stable") if key is not None else np.lexsort((b, a))
    sa, sb = a[order], b[order]
    change = np.ones(order.size, dtype=bool)
    change[1:] = (sa[1:] != sa[:-1]) | (sb[1:] != sb[:-1])
    ids_sorted = np.cumsum(change) - 1
    ids = np.empty(order.size, dtype=np.int64)
    ids[order] = ids_sorted
    return ids, int(ids_sorted[-1]) + 1


def _components(gid: np.ndarray, cid: np.ndarray, key: np.ndarray) -> int:
    """Frames left when pages of equal content merge only within equal ``key``.

    Connected components of the bipartite graph frame — (content, key) group, one edge per page.
    Every group is a node; a frame that lies in several groups (fork-shared across processes or
    domains) joins them.  Only the groups such frames touch need a graph search.
    """
    if gid.size == 0:
        return 0
    k, n_k = dense_ids(cid, key)
    # the distinct (frame, group) pairs, sorted by frame
    pk = _pair_key(gid, k)
    order = np.argsort(pk, kind="stable") if pk is not None else np.lexsort((k, gid))
    gs, ks = gid[order], k[order]
    keep = np.ones(gs.size, dtype=bool)
    keep[1:] = (gs[1:] != gs[:-1]) | (ks[1:] != ks[:-1])
    gs, ks = gs[keep], ks[keep]
    same = gs[1:] == gs[:-1]
    if not same.any():  # every frame lies in one group: one component per group
        return n_k
    ea, eb = ks[:-1][same], ks[1:][same]  # groups joined by a shared frame
    nodes, inv = np.unique(np.concatenate([ea, eb]), return_inverse=True)
    ea, eb = inv[: ea.size], inv[ea.size:]
    lab = np.arange(nodes.size, dtype=np.int64)  # label: the smallest node of the component found so far
    while True:
        new = lab.copy()
        np.minimum.at(new, ea, lab[eb])
        np.minimum.at(new, eb, lab[ea])
        new = new[new]  # pointer jumping: a label is a node of the same component
        if np.array_equal(new, lab):
            break
        lab = new
    return n_k - nodes.size + _n_distinct(lab)
