"""The simulated KSM against the real one, on a workload whose answer is known by hand.

Two processes with 1,536 mergeable pages each: copies of two templates (hundreds of copies
each, so max_page_sharing=256 forces chains), zero-filled pages (use_zero_pages=0: one more
content), and unique pages.  The real KSM merges it while the capture records it; the replay of
that trace with the same settings must reach the kernel's final pages_shared/pages_sharing, and
both must equal the numbers computed by hand from the layout.
"""
from __future__ import annotations

import time

import pytest

from ksmtrace.lab import kernelksm as K

from tests._capture_util import settled_ksm_settings
from ksmtrace.replay import replay
from ksmtrace.trace.reader import open_trace
from ksmtrace.lab.workloads import get_workload

pytestmark = [pytest.mark.live, pytest.mark.kernel_ksm]

MPS = 256


def expected_from_layout(contents, mps=MPS):
    """pages_shared/pages_sharing KSM reaches on a static layout: each content with n copies is
    packed into dups of at most ``mps`` mappings; a lone leftover copy cannot pair and stays out."""
    shared = sharing = 0
    for key, n in contents:
        if key == "u" or n < 2:
            continue
        full, rest = divmod(n, mps)
        dups = full + (1 if rest >= 2 else 0)
        mapped = n - (1 if rest == 1 else 0)
        shared += dups
        sharing += mapped - dups
    return shared, sharing


def test_expected_from_layout_by_hand():
    assert expected_from_layout([("t0", 2)]) == (1, 1)
    assert expected_from_layout([("t0", 256)]) == (1, 255)
    assert expected_from_layout([("t0", 257)]) == (1, 255)  # the 257th waits alone
    assert expected_from_layout([("t0", 258)]) == (2, 256)  # ... until it has a partner: a chain
    assert expected_from_layout([("t0", 768), ("zero", 306), ("u", 1000)]) == (3 + 2, 765 + 304)


@pytest.fixture
def ksm_available():
    if not K.available():
        pytest.skip("no /sys/kernel/mm/ksm on this host")
    import os

    if os.geteuid() != 0:
        pytest.skip("needs root to drive KSM")


def test_simulated_ksm_converges_to_the_kernel(tmp_path, ksm_available):
    from ksmtrace_tracers.capture import Capture, CaptureOptions
    from ksmtrace_tracers.targets import TargetSpec

    before = settled_ksm_settings()
    wl = get_workload("static", processes=2, pages=1536, dup_fraction=0.5, zero_fraction=0.1, templates=2, seed=7)
    settings = {"pages_to_scan": 5000, "sleep_millisecs": 10, "use_zero_pages": 0, "max_page_sharing": MPS, "smart_scan": 1}
    out = tmp_path / "live.trace"
    with wl.start() as run:
        layout = run.layout()
        want_shared, want_sharing = expected_from_layout(layout["contents"])
        assert want_shared >= 5 and want_sharing > 1000  # chains are exercised
        with Capture(out, TargetSpec(pids=tuple(run.pids)), CaptureOptions(scope="mergeable", ksm_sample_interval=0.05)) as cap:
            cap.snapshot()  # before KSM runs
            with K.ksm_settings(run=0, **settings):
                K.write("run", 1)
                t_run = time.monotonic_ns()
                converged = K.wait_for(lambda: int(K.read("pages_sharing")) >= want_sharing and int(K.read("full_scans")) >= 4, timeout=60)
                real = {k: int(K.read(k)) for k in ("pages_shared", "pages_sharing", "full_scans")}
                cap.snapshot()
        assert settled_ksm_settings() == before  # every setting restored (and everything unmerged)
    assert converged, f"the kernel did not converge: {real}"
    assert (real["pages_shared"], real["pages_sharing"]) == (want_shared, want_sharing)

    tr = open_trace(out)
    start_s = (t_run - tr.t0_ns) / 1e9
    res = replay(tr, "ksm", settings, start_s=start_s)
    last = res.table.row(res.table.height - 1, named=True)
    assert (last["pages_shared"], last["pages_sharing"]) == (want_shared, want_sharing)
    chains = sum(1 for key, n in layout["contents"] if key != "u" and n >= MPS + 2)
    assert last["stable_node_chains"] == chains >= 2
    assert last["frames_saved"] == want_sharing  # no fork sharing: every mapping beyond a dup's first is a frame
