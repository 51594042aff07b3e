"""The oracle's fast route (its numba kernel: the fast engine's snapshot step and the oracle's merges
in one jitted call, arriving pages put straight onto the KSM page of their content) against the
oracle's readable runtime: identical tables, per-process tables and latency histograms on the
contract scenarios (readable runtime on the reference engine), the shipped samples in both scopes
(readable runtime on the fast engine: the reference engine takes minutes there) and generated
traces (tests/differential/test_runtimes.py runs every policy's kernel against its readable
runtime on both engines)."""
from __future__ import annotations

import numpy as np
import pytest

from ksmtrace import samples
from ksmtrace.replay import replay
from ksmtrace.testing import make_trace
from ksmtrace.testing.scenarios import library_trace


def _same(a, b, what):
    assert a.table.columns == b.table.columns, what
    for c in a.table.columns:
        assert a.table[c].equals(b.table[c]), f"{what}: column {c}: {a.table[c].to_list()} vs {b.table[c].to_list()}"
    assert a.procs.equals(b.procs), f"{what}: per-process tables differ"
    assert np.array_equal(a.latency_hist, b.latency_hist), f"{what}: latency histograms differ"


@pytest.mark.parametrize("name", ["mixed", "mixed-slow", "random-5", "random-6", "random-7"])
def test_fast_route_equals_the_readable_oracle_on_the_scenarios(scenarios, name):
    tr = scenarios(name)
    for scope in ("recorded", "anon"):
        ref = replay(tr, "oracle", engine="reference", scope=scope)
        fast = replay(tr, "oracle", runtime="kernel", scope=scope)
        _same(ref, fast, f"{name} {scope}")
    assert ref.table["exposed_merges"].sum() > 0 if name.startswith("mixed") else True


def test_fast_route_on_the_library_trace(tmp_path):
    tr = library_trace(tmp_path / "lib")
    _same(replay(tr, "oracle", engine="reference"), replay(tr, "oracle", runtime="kernel"), "library")


@pytest.mark.parametrize("name", ["prefork", "python-sci", "vm"])
def test_fast_route_equals_the_readable_oracle_on_the_samples(name):
    tr = samples.open_sample(name)
    for scope in ("recorded", "anon"):
        readable = replay(tr, "oracle", runtime="readable", scope=scope)
        fast = replay(tr, "oracle", runtime="kernel", scope=scope)
        _same(readable, fast, f"{name} {scope}")
        assert fast.table["merges"].sum() > 0


def test_fast_route_with_fork_sharing_mixed_domains_and_a_dying_ksm_page(tmp_path):
    """The arrivals step's shortcut is off in a snapshot where an arrival shares a frame (fork);
    merges onto one KSM page from two domains are exposed in the order the oracle makes them; a
    KSM page whose last page is written dies, and the next copy starts a new one."""
    s0 = {(0, 0): "a", (1, 0): "a", (2, 0): "b", (0, 1): 0}
    s1 = {(0, 0): "a", (1, 0): "a", (2, 0): "a", (2, 1): "a", (0, 1): 0, (1, 1): 0,
          (3, 0): {"c": "a", "frame": "F"}, (4, 0): {"c": "a", "frame": "F"}}
    s2 = {(0, 0): "x", (1, 0): "y", (2, 0): "z", (2, 1): "w", (3, 0): "v", (4, 0): "q", (0, 2): "a", (1, 2): "a"}
    s3 = {(0, 2): "a", (1, 2): "a", (2, 2): "a", (0, 3): 0}
    tr = make_trace(tmp_path / "t", [s0, s1, s2, s3], procs={2: {"cgroup": "/vm2"}, 4: {"cgroup": "/vm4"}})
    ref = replay(tr, "oracle", engine="reference")
    fast = replay(tr, "oracle", runtime="kernel")
    _same(ref, fast, "hand-made")
    assert ref.table["exposed_merges"].sum() >= 2
    assert ref.table["cow_breaks"].sum() >= 4
