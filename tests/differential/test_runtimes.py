"""Every registered policy, on generated traces at generated parameter values (with recorded write
faults replayed at their time in half of them): its readable runtime
on the reference engine, the same runtime on the fast engine, and its numba kernel (where it has
one) give identical results — every column of every snapshot, the per-process table and the
merge-latency histogram.

The first pair checks the two engines against each other (the reference engine is the executable
spec of the ground truth); the second checks the kernel against the readable runtime it
accelerates.  A policy added later is covered by registering it.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ksmtrace.engine.cost import default_cost_model
from ksmtrace.errors import PolicyParamError
from ksmtrace.policies.registry import list_policies
from ksmtrace.replay import replay
from ksmtrace.testing import make_trace

POLICIES = list_policies()
IDS = [p.name for p in POLICIES]
CONTENTS = [0, "a", "b", "c", "d"]


@st.composite
def traces(draw):
    """Small traces with churn, zero pages, a fork sharing frames, an exit and a huge page; and
    the trace's keyword arguments: the child's start time (just before it appears: fork-time
    registration) and, sometimes, VMAs (holes, fork clones, a split, a stack)."""
    nproc = draw(st.integers(1, 3))
    nsnap = draw(st.integers(2, 7))
    fork_at = draw(st.integers(1, nsnap))  # the fork happens at this snapshot (nsnap: never)
    exit_at = draw(st.integers(1, nsnap + 2))
    snaps, state = [], {}
    for s in range(nsnap):
        new = dict(state)
        for _ in range(draw(st.integers(0, 14))):
            key = (draw(st.integers(0, nproc - 1)), draw(st.integers(0, 15)))
            action = draw(st.integers(0, 9))
            if action == 0:
                new.pop(key, None)
            else:
                new[key] = draw(st.sampled_from(CONTENTS)) if action < 8 else f"u{s}{key}"
        if s == 0 and draw(st.booleans()):  # a huge page with zero subpages
            for v in range(32, 40):
                new[(0, v)] = {"c": 0 if v % 2 else "a", "thp": "H"}
        state = {k: (v["c"] if isinstance(v, dict) and "frame" in v else v) for k, v in new.items()}
        if s >= fork_at:  # proc 9 forked from proc 0: same frames until either writes
            for (p, v), c in list(new.items()):
                if p == 0 and draw(st.integers(0, 4)) > 0:
                    c = c["c"] if isinstance(c, dict) else c
                    new[(0, v)] = {"c": c, "frame": ("F", v, c)}
                    new[(9, v)] = {"c": c, "frame": ("F", v, c)}
        if s >= exit_at and nproc > 1:
            new = {k: v for k, v in new.items() if k[0] != nproc - 1}
        snaps.append(new)
    kw = {"procs": {9: {"ppid": 1000, "start": max(2 * fork_at - 1, 0)}}}  # forked 10 ms before it shows
    layout = draw(st.sampled_from(["none", "one", "split", "stack"]))
    if layout != "none":
        split_at = draw(st.integers(0, nsnap))
        vmas = []
        for s in range(nsnap):
            v = {p: [(0, 64)] for p in list(range(nproc)) + [9]}
            if layout == "split" and s >= split_at:
                v[0] = [(0, 8), (8, 64)]
            if layout == "stack":
                v[0] = [{"start": 0, "end": 64, "path": "[stack]"}]
                v[9] = [{"start": 0, "end": 64, "path": "[stack]"}]
            vmas.append(v)
        kw["vmas"] = vmas
    if draw(st.booleans()):  # recorded write faults (capture --kernel-events): replayed at their time
        procs = list(range(nproc)) + [9]
        kw["faults"] = [{"t": draw(st.integers(1, 20 * (nsnap - 1) + 5)) * 0.001, "proc": draw(st.sampled_from(procs)),
                         "vpn": draw(st.sampled_from(list(range(16)) + [33, 34])), "present": draw(st.integers(0, 5)) > 0}
                        for _ in range(draw(st.integers(0, 14)))]
    return snaps, kw


def _values(cls, name):
    """The values a parameter is tried at: its default, its sensitivity case's value, and the
    bounds of small integer ranges."""
    f = {x.name: x for x in dataclasses.fields(cls.Params)}[name]
    vals = [f.default]
    alt = (cls.sensitivity or {}).get(name)
    if alt is not None:
        vals.append(alt[0])
    md = f.metadata
    if md.get("choices"):
        vals.extend(md["choices"])
    elif isinstance(f.default, bool):
        vals.append(not f.default)
    return list(dict.fromkeys(vals))


def params_for(cls):
    """A strategy of parameter dictionaries for ``cls``, with fast daemons so short traces see work."""
    fields = [f.name for f in dataclasses.fields(cls.Params)]
    strat = {n: st.sampled_from(_values(cls, n)) for n in fields}
    for n in ("sleep_millisecs",):
        if n in fields:
            strat[n] = st.sampled_from([1, 5, 20])
    for n in ("pages_to_scan",):
        if n in fields:
            strat[n] = st.sampled_from([1, 3, 12, 100])
    return st.fixed_dictionaries(strat)


def _same(a, b, what):
    assert a.table.columns == b.table.columns, what
    for c in a.table.columns:
        assert a.table[c].equals(b.table[c]), f"{what}: column {c}: {a.table[c].to_list()} vs {b.table[c].to_list()}"
    assert a.procs.equals(b.procs), f"{what}: per-process tables differ"
    assert np.array_equal(a.latency_hist, b.latency_hist), f"{what}: latency histograms differ"
    assert np.array_equal(a.first_merge_ns, b.first_merge_ns), f"{what}: first merge times differ"


@pytest.mark.parametrize("cls", POLICIES, ids=IDS)
def test_runtimes_agree_on_generated_traces(cls, tmp_path_factory):
    @settings(max_examples=20, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(trace=traces(), params=params_for(cls), seed=st.integers(0, 3), wake_wait=st.sampled_from([0.0, 3e6]))
    def check(trace, params, seed, wake_wait):
        snaps, kw = trace
        try:
            cls(params)
        except PolicyParamError:
            assume(False)
        tr = make_trace(tmp_path_factory.mktemp("gen") / "t", snaps, interval=0.02, **kw)
        # a busy host's clock too: every wake-up waits for a CPU (ksmtrace.engine.clock.wake_wait)
        spec = dict(seed=seed, timing_cost=dataclasses.replace(default_cost_model(), wake_wait_ns=wake_wait))
        ref = replay(tr, cls, params, engine="reference", **spec)
        readable = replay(tr, cls, params, engine="fast", runtime="readable", **spec)
        _same(ref, readable, f"{cls.name} {params}: readable runtime, reference vs fast engine")
        if cls.has_kernel():
            kern = replay(tr, cls, params, engine="fast", runtime="kernel", **spec)
            _same(readable, kern, f"{cls.name} {params}: readable runtime vs numba kernel")
        assert (ref.table["frames_saved"] <= ref.table["oracle_saved"]).all()

    check()


def test_a_kernel_is_never_forced_onto_the_reference_engine(tmp_path):
    from ksmtrace.errors import KsmtraceError

    tr = make_trace(tmp_path / "t", [{(0, 0): "a", (1, 0): "a"}])
    with pytest.raises(KsmtraceError, match="readable runtimes only"):
        replay(tr, "ksm", engine="reference", runtime="kernel")
    with pytest.raises(KsmtraceError, match="unknown runtime"):
        replay(tr, "ksm", runtime="turbo")


@pytest.mark.parametrize("params", [{"pages_to_scan": 3, "sleep_millisecs": 1},
                                    {"pages_to_scan": 12, "sleep_millisecs": 1, "max_page_sharing": 2}])
def test_ksm_kernel_grows_its_node_table(scenarios, monkeypatch, params):
    """The ksm kernel's stable-node table starts small and grows between wake-ups: from one row,
    it grows many times and still equals the readable runtime."""
    from ksmtrace.policies.ksm import kernel

    monkeypatch.setattr(kernel, "NODES_START", 1)
    grown = []
    real = kernel.grow_nodes
    monkeypatch.setattr(kernel, "grow_nodes", lambda K, extra: grown.append(extra) or real(K, extra))
    tr = scenarios("mixed")
    fast = replay(tr, "ksm", params, runtime="kernel")
    assert len(grown) >= 3
    _same(replay(tr, "ksm", params, runtime="readable"), fast, f"ksm {params}: grown node table")
