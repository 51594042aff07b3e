"""The fast runtime of ``hashtable``: the same algorithm as
:class:`~ksmtrace.policies.hashtable.HashTableReference` on arrays (the table is indexed by the
content id, which is the collision-free full-page hash), one jitted call per snapshot (the fault
side) and one per interval (the scanner).
"""
from __future__ import annotations

from collections import namedtuple

import numpy as np
from numba import njit

from ksmtrace.engine import state as st
from ksmtrace.engine.clock import next_wake, work_ns
from ksmtrace.engine.cost import N_UNITS, UNIT_INDEX
from ksmtrace.policies.hashtable import UNLIMITED, alive_procs, scan_permutation

U_WAKEUPS = UNIT_INDEX["wakeups"]
U_WALKED = UNIT_INDEX["addresses_walked"]
U_VISITED = UNIT_INDEX["pages_visited"]
U_FHASH = UNIT_INDEX["full_hashes"]
U_OPS = UNIT_INDEX["hashtable_ops"]
U_FOPS = UNIT_INDEX["fault_table_ops"]
U_MEMCMP = UNIT_INDEX["memcmp_pages"]
U_ZCHECK = UNIT_INDEX["zero_checks"]
U_WP = UNIT_INDEX["write_protects"]
U_REMAP = UNIT_INDEX["remaps"]

S_TWAKE, S_BUSY, S_NOW, S_RR, S_GCRED, S_PCRED, S_NHINT, S_NSHARED, S_REFS, S_STALE, S_SCANNED = range(11)
N_SCALARS = 11
P_GRATE, P_PRATE, P_SLEEP, P_BYTES, P_ZERO, P_HZ = range(6)
N_PARAMS = 6
K_NONE, K_HINT, K_SHARED = 0, 1, 2
EV_APPEAR, EV_GONE, EV_UNMERGE, EV_WRITE = 1, 2, 3, 4

E_KIND, E_X, E_REF = range(3)  # table entry columns (one row per key)
Q_HINT, Q_FRAME = range(2)  # page columns: key of the hint it holds, frame (policy's view)

HtState = namedtuple(
    "HtState",
    ["ENT", "PGS", "fr_key", "perm", "cursor", "alive",
     "order", "pg_lo", "pg_hi", "page_proc", "sc", "units", "bunits", "timing", "P"],
)


def new_state(prep, params_arr, perm, timing, start_ns) -> HtState:
    n, c, f, np_ = prep.n_pages, max(prep.n_cids, 1), prep.n_gids, prep.n_procs
    sc = np.zeros(N_SCALARS, np.int64)
    sc[S_TWAKE] = start_ns
    ENT = np.zeros((c, 3), np.int64)
    ENT[:, E_X] = -1
    return HtState(
        ENT=ENT, PGS=np.full((n, 2), -1, np.int64), fr_key=np.full(f, -1, np.int64),
        perm=perm, cursor=np.zeros(max(np_, 1), np.int64), alive=np.zeros(max(np_, 1), np.uint8),
        order=prep.proc_order.astype(np.int64), pg_lo=prep.proc_pg_lo.astype(np.int64),
        pg_hi=prep.proc_pg_hi.astype(np.int64), page_proc=prep.page_proc.astype(np.int64),
        sc=sc, units=np.zeros(N_UNITS, np.int64), bunits=np.zeros(N_UNITS, np.int64),
        timing=timing.astype(np.int64), P=params_arr,
    )


@njit(cache=True)
def _unref(S, key, f):
    S.units[U_FOPS] += 1
    S.ENT[key, E_REF] -= 1
    S.sc[S_REFS] -= 1
    if S.ENT[key, E_REF] == 0:
        S.ENT[key, E_KIND] = K_NONE
        S.ENT[key, E_X] = -1
        S.fr_key[f] = -1
        S.sc[S_NSHARED] -= 1


@njit(cache=True)
def on_snapshot(E, S, pgs, kinds):
    n = len(pgs)
    for i in range(n):
        k = kinds[i]
        pg = pgs[i]
        if not (k == EV_GONE or k == EV_UNMERGE or k == EV_WRITE) or S.PGS[pg, Q_FRAME] < 0:
            continue
        f = S.PGS[pg, Q_FRAME]
        S.PGS[pg, Q_FRAME] = -1
        if f >= 0 and S.fr_key[f] >= 0:
            _unref(S, S.fr_key[f], f)
    for i in range(n):
        k = kinds[i]
        pg = pgs[i]
        if not (k == EV_APPEAR or k == EV_WRITE) or st.cid(E, pg) < 0:
            continue
        f = st.frame(E, pg)
        S.PGS[pg, Q_FRAME] = f
        if f >= 0 and S.fr_key[f] >= 0:
            S.ENT[S.fr_key[f], E_REF] += 1
            S.sc[S_REFS] += 1


@njit(cache=True)
def _split(E, S, pg):
    pr = S.page_proc[pg]
    st.split_thp(E, pg, S.pg_lo[pr], S.pg_hi[pr], False)


@njit(cache=True)
def visit(E, S, pg):
    S.units[U_VISITED] += 1
    S.sc[S_SCANNED] += 1
    f = st.frame(E, pg)
    if st.page_is_ksm(E, pg):
        return
    S.units[U_FHASH] += 1
    key = np.int64(st.cid(E, pg))
    now = S.sc[S_NOW]
    old = S.PGS[pg, Q_HINT]
    if old >= 0 and old != key:
        S.PGS[pg, Q_HINT] = -1
        if S.ENT[old, E_KIND] == K_HINT and S.ENT[old, E_X] == pg:
            S.ENT[old, E_KIND] = K_NONE
            S.ENT[old, E_X] = -1
            S.sc[S_NHINT] -= 1
            S.units[U_OPS] += 1
    if key == 0 and S.P[P_ZERO] == 1:
        S.units[U_ZCHECK] += 1
        S.units[U_WP] += 1
        S.units[U_REMAP] += 1
        _split(E, S, pg)
        st.merge_zero(E, pg, now)
        S.PGS[pg, Q_FRAME] = 0
        return
    S.units[U_OPS] += 1
    kind = S.ENT[key, E_KIND]
    if kind == K_NONE:
        S.ENT[key, E_KIND] = K_HINT
        S.ENT[key, E_X] = pg
        S.PGS[pg, Q_HINT] = key
        S.sc[S_NHINT] += 1
        return
    if kind == K_HINT:
        h = S.ENT[key, E_X]
        if h == pg or (st.cid(E, h) >= 0 and st.frame(E, h) == f):
            return
        S.units[U_FHASH] += 1
        hf = st.frame(E, h)
        if st.cid(E, h) != key or hf <= 0 or st.page_is_ksm(E, h):
            S.sc[S_STALE] += 1
            S.ENT[key, E_X] = pg
            if S.PGS[h, Q_HINT] == key:
                S.PGS[h, Q_HINT] = -1
            S.PGS[pg, Q_HINT] = key
            S.units[U_OPS] += 1
            return
        S.units[U_MEMCMP] += 1
        _split(E, S, h)
        _split(E, S, pg)
        st.stabilize(E, h)
        S.units[U_WP] += E.fr[hf, st.F_REF] + 1
        S.units[U_REMAP] += 1
        st.merge(E, pg, hf, now)
        S.PGS[pg, Q_FRAME] = hf
        S.PGS[h, Q_HINT] = -1
        S.PGS[pg, Q_HINT] = -1
        S.ENT[key, E_KIND] = K_SHARED
        S.ENT[key, E_X] = hf
        S.fr_key[hf] = key
        nref = E.fr[hf, st.F_REF]
        S.ENT[key, E_REF] = nref
        S.sc[S_REFS] += nref
        S.sc[S_NHINT] -= 1
        S.sc[S_NSHARED] += 1
        S.units[U_OPS] += 1
        return
    sf = S.ENT[key, E_X]
    S.units[U_MEMCMP] += 1
    S.units[U_WP] += 1
    S.units[U_REMAP] += 1
    _split(E, S, pg)
    st.merge(E, pg, sf, now)
    S.PGS[pg, Q_FRAME] = sf
    S.PGS[pg, Q_HINT] = -1
    S.ENT[key, E_REF] += 1
    S.sc[S_REFS] += 1


@njit(cache=True)
def _budget(rate, sleep_ms, credit):
    if rate <= 0:
        return UNLIMITED, 0
    credit += rate * sleep_ms
    return credit // 1000, credit % 1000


@njit(cache=True)
def scan_batch(E, S):
    total, S.sc[S_GCRED] = _budget(S.P[P_GRATE], S.P[P_SLEEP], S.sc[S_GCRED])
    per_proc, S.sc[S_PCRED] = _budget(S.P[P_PRATE], S.P[P_SLEEP], S.sc[S_PCRED])
    np_ = len(S.order)
    if np_ == 0:
        return
    start = S.sc[S_RR]
    S.sc[S_RR] = (start + 1) % np_
    for k in range(np_):
        if total <= 0:
            break
        proc = S.order[(start + k) % np_]
        if S.alive[proc] == 0:
            continue
        lo = S.pg_lo[proc]
        size = S.pg_hi[proc] - lo
        quota = per_proc if per_proc < total else total
        steps = 0
        while quota > 0 and steps < size:
            pg = S.perm[lo + S.cursor[proc]]
            S.cursor[proc] = (S.cursor[proc] + 1) % size
            steps += 1
            if st.cid(E, pg) < 0 or st.frame(E, pg) <= 0:
                S.units[U_WALKED] += 1
                continue
            quota -= 1
            total -= 1
            visit(E, S, pg)


@njit(cache=True)
def run_until(E, S, t_end):
    while S.sc[S_TWAKE] < t_end:
        for i in range(len(S.units)):
            S.bunits[i] = S.units[i]
        S.sc[S_NOW] = S.sc[S_TWAKE]
        S.units[U_WAKEUPS] += 1
        scan_batch(E, S)
        w = work_ns(S.bunits, S.units, S.timing)
        S.sc[S_BUSY] += w
        S.sc[S_TWAKE] = next_wake(S.sc[S_TWAKE] + w, S.P[P_SLEEP], S.P[P_HZ])


class HashTableFast:
    def __init__(self, params, ctx) -> None:
        self.p = params
        self.ctx = ctx
        self.prep = ctx.prep
        self.E = ctx.engine.E
        a = np.zeros(N_PARAMS, np.int64)
        a[P_GRATE] = params.pages_per_second
        a[P_PRATE] = params.process_pages_per_second
        a[P_SLEEP] = params.sleep_millisecs
        a[P_BYTES] = params.bytes_per_entry
        a[P_ZERO] = int(params.zero_page)
        a[P_HZ] = ctx.hz
        self.S = new_state(ctx.prep, a, scan_permutation(ctx.prep, ctx.seed), ctx.timing_ps, ctx.start_ns)

    def on_snapshot(self, s: int, now: int) -> None:
        p = self.prep
        self.S.alive[: p.n_procs] = alive_procs(p, s)
        sl = p.events(s)
        on_snapshot(self.E, self.S, p.ev_pg[sl], p.ev_kind[sl])

    def run_until(self, t_end: int) -> None:
        run_until(self.E, self.S, np.int64(t_end))

    def counters(self) -> dict:
        sc = self.S.sc
        entries = int(sc[S_NHINT] + sc[S_NSHARED])
        return {
            "table_entries": entries,
            "hint_entries": int(sc[S_NHINT]),
            "shared_entries": int(sc[S_NSHARED]),
            "table_bytes": entries * self.p.bytes_per_entry,
            "shared_refs": int(sc[S_REFS]),
            "zero_pages": int(self.E.ec[st.C_KSM_ZERO]),
            "stale_hints": int(sc[S_STALE]),
            "pages_scanned": int(sc[S_SCANNED]),
        }

    def units(self) -> np.ndarray:
        return self.S.units

    def busy_ns(self) -> int:
        return int(self.S.sc[S_BUSY])

    def extras(self) -> dict:
        c = self.counters()
        return {"table_entries": c["table_entries"], "table_bytes": c["table_bytes"], "stale_hints": c["stale_hints"], "scan_order_seed": int(self.ctx.seed)}
