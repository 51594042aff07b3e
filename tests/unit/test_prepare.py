"""The streaming prepare (ksmtrace/trace/prepare.py): checked against a naive page-by-page reference
on generated traces, in memory and spilled to a file, with its Bloom filter at any size, on rows in
any order, and with one clear error for a page row whose NEW row is missing."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ksmtrace.errors import TraceError
from ksmtrace.replay import replay
from ksmtrace.testing import make_trace
from ksmtrace.testing.synth import synthetic_trace
from ksmtrace.trace import prepare as P
from ksmtrace.trace import prepared as PD
from ksmtrace.trace import schema as S
from ksmtrace.trace.reader import open_trace

EV_APPEAR, EV_GONE, EV_UNMERGE, EV_WRITE, EV_THP = PD.EV_APPEAR, PD.EV_GONE, PD.EV_UNMERGE, PD.EV_WRITE, PD.EV_THP


# --- a naive reference: dictionaries, one row at a time ------------------------------------------
def naive_prepare(tr, scope):
    """The rules of ksmtrace/trace/prepare.py's docstring, written out page by page (no fork
    inheritance: traces without KSM-flagged fork children)."""
    zero_on, split_remap = P._real_ksm_zero_rules(tr)  # (when the trace's real KSM ran, and how)
    rows_by_snap = []
    pages = set()
    for s in range(tr.n_snapshots):
        df = tr.read_table("pages", [s])
        rows = [r for r in df.iter_rows(named=True) if r["op"] != S.OP_SAME]
        rows_by_snap.append(rows)
        pages |= {(r["proc"], r["vpn"]) for r in rows if r["op"] == S.OP_NEW}
    procs = sorted({p for p, _ in pages})
    pid = {k: i for i, k in enumerate(sorted(pages, key=lambda k: (procs.index(k[0]), k[1])))}
    cids: dict[int, int] = {}
    thps: dict[tuple[int, int], int] = {}
    prev: dict[int, dict] = {}
    events, counts, keys = [], [], {}
    soft = bool(tr.capture.get("soft_dirty"))
    bad = 0
    for s, rows in enumerate(rows_by_snap):
        ev = []
        for r in sorted(rows, key=lambda r: pid[(r["proc"], r["vpn"])]):
            f = r["flags"]
            present = r["op"] != S.OP_GONE and f & S.F_PRESENT and not f & S.F_SWAPPED
            zp = bool(f & S.F_ZERO_PAGE)
            anon_present = bool(present and f & S.F_ANON and not zp and not f & S.F_HUGETLB)
            in_scope = bool(f & S.F_MERGEABLE) or scope == "anon"
            cand = anon_present and in_scope
            q = pid[(r["proc"], r["vpn"])]
            was = prev.get(q, {"cand": False, "c": -1, "ksm": False, "t": -1, "src": False})
            # a zero-filled candidate the real kernel mapped to the zero page stays one
            thp_now = bool(f & S.F_THP)
            src = cand and bool(f & S.F_ZERO_FILLED) and ((zero_on and not thp_now) or (split_remap and thp_now))
            kz = bool(present and zp and in_scope and q in prev and was["src"])
            if kz:
                cand = src = True
            if not cand:
                c = -1
            elif f & S.F_READ_FAILED:
                bad += 1
                c = ("bad", bad)
            elif f & S.F_ZERO_FILLED:
                c = 0
            else:
                c = cids.setdefault(r["hash"], len(cids) + 1)
            t = -1
            if present and f & S.F_THP and f & S.F_PFN:
                t = thps.setdefault((procs.index(r["proc"]), r["pfn"] >> 9), len(thps))
            if kz:
                t = was["t"]
            ksm = bool(f & S.F_KSM)
            kind = 0
            if cand and not was["cand"]:
                kind = EV_APPEAR
            elif was["cand"] and not cand:
                kind = EV_UNMERGE if anon_present else EV_GONE
            elif cand and (c != was["c"] or (soft and f & S.F_SOFT_DIRTY) or (was["ksm"] and not ksm)):
                kind = EV_WRITE
            elif cand and t != was["t"]:
                kind = EV_THP
            if kind:
                key = None
                if kind in (EV_APPEAR, EV_WRITE) and f & S.F_PFN and not ksm and not zp and r["pfn"] and not isinstance(c, tuple):
                    key = (r["pfn"], c)
                    keys[key] = keys.get(key, 0) + 1
                ev.append((q, kind, -1 if kind in (EV_GONE, EV_UNMERGE) else c, key, t))
            prev[q] = {"cand": cand, "c": c, "ksm": ksm, "t": t, "src": src}
        events.append(ev)
        live = [v["c"] for v in prev.values() if v["cand"]]
        counts.append((len(live), len({c for c in live if c != 0}), sum(1 for c in live if c == 0)))
    n_hashed = len(cids)
    fix = lambda c: n_hashed + c[1] if isinstance(c, tuple) else c  # noqa: E731  (unreadable: after the hashed)
    events = [[(q, k, fix(c), key if key is not None and keys[key] >= 2 else None, t) for q, k, c, key, t in ev] for ev in events]
    return events, counts, n_hashed + 1 + bad, len(thps)


def check_against_naive(tr, scope):
    p = tr.prepare(scope, cache=False)
    events, counts, n_cids, n_thp = naive_prepare(tr, scope)
    assert (p.n_cids, p.n_thp) == (n_cids, n_thp)
    frame_of_key: dict = {}
    for s, ev in enumerate(events):
        b = p.batch(s)
        got = [(int(q), int(k), int(c), int(t)) for q, k, c, t in zip(b.pg, b.kind, b.cid, b.thp)]
        assert got == [(q, k, c, t) for q, k, c, _, t in ev], f"snapshot {s}"
        for (q, k, c, key, _), g in zip(ev, b.gid.tolist()):
            if k in (EV_APPEAR, EV_WRITE):
                assert (g >= 0) == (key is not None), f"snapshot {s} page {q}: shared frame {g} vs key {key}"
                if key is not None:  # one frame id per key, a different one per key
                    assert frame_of_key.setdefault(key, g) == g
        cand, distinct, zero = counts[s]
        assert (p.base_pages[s], p.oracle_frames[s], p.zero_filled[s]) == (cand, distinct, zero), f"snapshot {s}"
    assert len(set(frame_of_key.values())) == len(frame_of_key) == p.n_gids
    return p


CONTENTS = [0, "a", "b", "c"]


@st.composite
def traces(draw):
    """Small traces with churn, zero pages, huge pages, frames shared by fork and by the same page
    re-appearing with its frame and content, soft-dirty pages, pages leaving and re-entering the
    scope."""
    nproc = draw(st.integers(1, 3))
    snaps, state = [], {}
    for s in range(draw(st.integers(2, 6))):
        new = dict(state)
        for _ in range(draw(st.integers(1, 16))):
            key = (draw(st.integers(0, nproc - 1)), draw(st.integers(0, 5)))
            action = draw(st.integers(0, 9))
            if action == 0:
                new.pop(key, None)
            elif action == 1:
                new[key] = {"c": draw(st.sampled_from(CONTENTS)), "mergeable": False}
            elif action == 2:
                new[key] = {"c": draw(st.sampled_from(CONTENTS)), "frame": draw(st.sampled_from(["F", "G"]))}
            elif action == 3:
                new[key] = {"c": draw(st.sampled_from(CONTENTS)), "soft_dirty": True}
            elif action == 4:
                new[key] = {"c": draw(st.sampled_from(CONTENTS)), "thp": draw(st.sampled_from(["H", "I"]))}
            else:
                new[key] = draw(st.sampled_from(CONTENTS)) if action < 8 else f"u{s}{key}"
        state = new
        snaps.append(new)
    return snaps


def test_prepare_equals_a_naive_reference(tmp_path_factory):
    kinds: set[int] = set()

    @settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(snaps=traces(), soft=st.booleans())
    def check(snaps, soft):
        tr = make_trace(tmp_path_factory.mktemp("g") / "t", snaps, capture={"soft_dirty": soft})
        for scope in ("recorded", "anon"):  # (the file scope, the page cache: tests/policies/test_pagecache.py)
            kinds.update(int(k) for k in np.unique(check_against_naive(tr, scope).ev_kind))

    check()
    assert kinds >= {EV_APPEAR, EV_GONE, EV_UNMERGE, EV_WRITE, EV_THP}  # the generator makes every kind


def test_samples_against_the_naive_reference():
    """A real capture: fork-shared frames (PFNs), THP, keyframes, pages the real KSM mapped to the
    zero page (vm has no KSM-flagged fork child)."""
    from ksmtrace import samples

    p = check_against_naive(samples.open_sample("vm"), "recorded")
    assert p.n_gids > 0


def _arrays(p):
    out = {k: np.asarray(getattr(p, k)) for k in ("page_proc", "page_vpn", "off", "base_pages", "base_frames",
                                                   "oracle_frames", "zero_filled", "zero_page_mapped", "hash_dup_pages",
                                                   "proc_reg_snap", "proc_exit_snap", "proc_order")}
    for s in range(p.n_snaps):
        for name, col in p.batch(s)._asdict().items():
            if col is not None:
                out[f"{name}{s}"] = col
    out["n"] = np.array([p.n_pages, p.n_cids, p.n_gids, p.n_thp])
    return out


def _same_arrays(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def test_spilled_events_are_the_same_and_not_in_memory(tmp_path, monkeypatch):
    tr = open_trace(Path(__file__).resolve().parents[2] / "sample-traces" / "prefork")
    monkeypatch.setenv("KSMTRACE_SPILL_MB", "256")
    mem = tr.prepare("recorded", cache=False)
    monkeypatch.setenv("KSMTRACE_SPILL_MB", "0")
    spilled = tr.prepare("recorded", cache=False)
    assert spilled.store.spilled and not mem.store.spilled
    assert spilled.store._mem is None  # nothing but the file holds the events
    thp = [spilled.batch(s).thp for s in range(spilled.n_snaps)]
    assert any(t.strides == (0,) for t in thp if len(t))  # a block of -1 only is a broadcast
    _same_arrays(_arrays(mem), _arrays(spilled))
    a = replay(tr, "ksm", {"pages_to_scan": 500})
    monkeypatch.setenv("KSMTRACE_NO_CACHE", "1")
    b = replay(tr, "ksm", {"pages_to_scan": 500})
    assert a.table.equals(b.table) and a.procs.equals(b.procs)


def test_a_cached_spilled_trace_refers_to_its_event_file(tmp_path, monkeypatch):
    monkeypatch.setenv("KSMTRACE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("KSMTRACE_SPILL_MB", "0")
    tr = synthetic_trace(tmp_path / "syn", pages=3000, snapshots=6, processes=3, seed=3)
    first = tr.prepare("recorded")
    pkl = list((tmp_path / "cache").glob("*.pkl"))
    ev = list((tmp_path / "cache").glob("*.events"))
    assert len(pkl) == 1 and len(ev) == 1
    # the pickle holds the per-page arrays and refers to the events (17+ bytes each, in the file)
    assert pkl[0].stat().st_size < first.n_pages * 12 + 20_000 < first.store.n * 17 < ev[0].stat().st_size
    again = tr.prepare("recorded")
    assert again.store.path == ev[0]
    _same_arrays(_arrays(first), _arrays(again))
    ev[0].unlink()  # a cache whose events are gone is rebuilt
    rebuilt = tr.prepare("recorded")
    _same_arrays(_arrays(first), _arrays(rebuilt))
    assert ev[0].exists()


def test_bloom_false_positives_change_nothing(monkeypatch):
    """The frame-key filter only picks candidates: at one word, every key is one."""
    from ksmtrace import samples

    tr = samples.open_sample("prefork")
    want = _arrays(tr.prepare("recorded", cache=False))
    monkeypatch.setattr(P, "BLOOM_BITS_PER_ROW", 0)
    monkeypatch.setattr(P, "BLOOM_MIN_WORDS", 1)
    _same_arrays(want, _arrays(tr.prepare("recorded", cache=False)))


def test_snapshots_in_chunks_are_the_same(monkeypatch):
    """A big snapshot (a keyframe) is derived in chunks of rows: any chunk size gives the same
    (prefork: fork children inherit frames, resolved once every chunk of their snapshot is in)."""
    from ksmtrace import samples

    tr = samples.open_sample("prefork")
    want = _arrays(tr.prepare("recorded", cache=False))
    monkeypatch.setattr(P, "CHUNK_ROWS", 777)
    _same_arrays(want, _arrays(tr.prepare("recorded", cache=False)))


def test_a_big_trace_sizes_its_content_table_once(monkeypatch):
    """Past HLL_ROWS rows, pass 1 estimates the distinct contents and pass 2's table never grows;
    the result is the same (and a low estimate only means the table grows after all)."""
    from ksmtrace import samples

    tr = samples.open_sample("python-sci")
    want = _arrays(tr.prepare("anon", cache=False))
    grown = []
    real = P._table_grow
    monkeypatch.setattr(P, "_table_grow", lambda *a: grown.append(1) or real(*a))
    monkeypatch.setattr(P, "HLL_ROWS", 0)
    _same_arrays(want, _arrays(tr.prepare("anon", cache=False)))
    assert not grown
    monkeypatch.setattr(P, "_hll_estimate", lambda regs: 10)
    monkeypatch.setattr(P, "CHUNK_ROWS", 1000)
    _same_arrays(want, _arrays(tr.prepare("anon", cache=False)))
    assert grown


def _rewrite_pages(src: Path, dst: Path, edit) -> None:
    """A copy of a trace with every pages file edited (the snapshot log's rows and bytes follow)."""
    from ksmtrace.testing import fuzz

    shutil.copytree(src, dst)
    for f in sorted((dst / "pages").glob("*.parquet")):
        fuzz.rewrite_table(dst, "pages", int(f.stem.split("-")[1]), lambda tab, f=f: edit(f, tab))


def test_rows_in_any_order(tmp_path):
    src = synthetic_trace(tmp_path / "a", pages=2000, snapshots=4, processes=3, seed=5)
    rng = np.random.default_rng(0)
    _rewrite_pages(src.path, tmp_path / "b", lambda f, t: t.take(pa.array(rng.permutation(t.num_rows))))
    _same_arrays(_arrays(src.prepare("recorded", cache=False)), _arrays(open_trace(tmp_path / "b").prepare("recorded", cache=False)))


def test_a_row_whose_page_was_never_new_is_one_error(tmp_path):
    src = synthetic_trace(tmp_path / "a", pages=200, snapshots=2, processes=1, seed=5)

    def edit(f, t):
        if f.name.endswith("000000.parquet"):
            op = t.column("op").to_numpy().copy()
            op[7] = S.OP_CHANGED
            t = t.set_column(t.schema.get_field_index("op"), "op", pa.array(op, pa.uint8()))
        return t

    _rewrite_pages(src.path, tmp_path / "b", edit)
    with pytest.raises(TraceError, match="was not mapped before") as e:
        open_trace(tmp_path / "b").prepare("recorded", cache=False)
    assert "\n" not in str(e.value)
