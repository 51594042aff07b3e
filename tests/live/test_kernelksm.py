"""ksmtrace.lab.kernelksm: reading /sys/kernel/mm/ksm and changing it safely (every path restores)."""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import pytest

from ksmtrace.lab import kernelksm as K
from ksmtrace.errors import KernelError

from tests._capture_util import needs_ksm, settled_ksm_settings

pytestmark = [pytest.mark.kernel_ksm, needs_ksm]


def test_read_all_and_helpers():
    allv = K.read_all()
    for name in ("run", "pages_to_scan", "sleep_millisecs", "pages_shared", "pages_sharing", "full_scans", "max_page_sharing"):
        assert isinstance(allv[name], int)
    assert allv["advisor_mode"] in ("none", "scan-time")
    w = K.writable_settings()
    assert w[-1] == "run" and w.index("advisor_mode") < w.index("pages_to_scan")
    assert "pages_shared" not in w
    assert isinstance(K.ksmd_cpu_ns(), int) and isinstance(K.cow_ksm(), int)
    t = time.monotonic()
    assert not K.wait_for(lambda: False, 0.2, 0.05)
    assert 0.2 <= time.monotonic() - t < 1.0
    assert K.wait_for(lambda: True, 0)


def test_failing_block_restores_every_setting():
    before = settled_ksm_settings()
    changes = dict(pages_to_scan=4321, sleep_millisecs=7, max_page_sharing=17, use_zero_pages=1, smart_scan=0,
                   advisor_max_cpu=33, stable_node_chains_prune_millisecs=1234, run=1)
    with pytest.raises(RuntimeError, match="boom"):
        with K.ksm_settings(**changes) as ks:
            now = K.settings()
            for k, v in changes.items():
                assert now[k] == v, k
            assert ("run", 2) in ks.applied  # max_page_sharing needed an unmerge first
            raise RuntimeError("boom")
    assert settled_ksm_settings() == before


def test_keyboard_interrupt_and_advisor_order_restore():
    before = settled_ksm_settings()
    with pytest.raises(KeyboardInterrupt):
        with K.ksm_settings(advisor_mode="scan-time", advisor_min_pages_to_scan=600):
            assert K.read("advisor_mode") == "scan-time"
            raise KeyboardInterrupt
    assert settled_ksm_settings() == before
    # pages_to_scan is not writable while the advisor runs: a clear error, nothing left changed
    with pytest.raises(KernelError, match="advisor_mode is scan-time"):
        with K.ksm_settings(advisor_mode="scan-time", pages_to_scan=1000):
            pass
    assert settled_ksm_settings() == before


def test_bad_settings_change_nothing():
    before = settled_ksm_settings()
    with pytest.raises(KernelError, match="not a writable KSM setting"):
        with K.ksm_settings(pages_shared=1):
            pass
    with pytest.raises(KernelError, match="cannot write"):
        with K.ksm_settings(sleep_millisecs=5, pages_to_scan=-3):
            pass
    assert settled_ksm_settings() == before


def test_sigterm_inside_the_block_restores(tmp_path):
    before = settled_ksm_settings()
    code = textwrap.dedent(
        """
        import sys, time
        from ksmtrace.lab import kernelksm as K
        with K.ksm_settings(pages_to_scan=2345, sleep_millisecs=9):
            print("inside", flush=True)
            time.sleep(60)
        """
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "inside"
        assert K.read("pages_to_scan") == 2345
        p.send_signal(signal.SIGTERM)
        p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stdout.close()
        p.stderr.close()
    assert p.returncode != 0
    assert settled_ksm_settings() == before
