"""The page-cache tables in format version 2: optional tables that validate like every other,
old traces (version 1, and version 2 without them) still open and replay, a version-1 trace may
not list them, and the capture's pieces that need no root (maps' device, the page-cache bits)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from ksmtrace.errors import TraceError
from ksmtrace.replay import replay
from ksmtrace.testing import make_trace
from ksmtrace.testing.pagecache import make_pagecache_trace
from ksmtrace.trace import schema as S
from ksmtrace.trace.reader import open_trace
from ksmtrace_tracers import pagemap as PM
from ksmtrace_tracers.procfs_reader import page_cache_flags
from ksmtrace_tracers.procmaps import parse_smaps


def _set_version(path, version):
    m = json.loads((path / "manifest.json").read_text())
    m["format_version"] = version
    (path / "manifest.json").write_text(json.dumps(m))


def test_page_cache_tables_are_version_2_and_validate(tmp_path):
    tr = make_pagecache_trace(tmp_path / "t", [{(0, 0): "x", (1, 0): "x", (1, 1): {"c": "y", "mapped": [0]}}])
    assert S.FORMAT_VERSION == 2 and S.READ_VERSIONS == (1, 2)
    tr.check()
    for t in S.PAGECACHE_TABLES:
        assert tr.has_table(t) and S.ADDED_TABLES[t] == 2
        assert tr.read_table(t).columns == S.table_schema(t, 2).names


def test_a_version_1_trace_may_not_list_page_cache_tables(tmp_path):
    tr = make_pagecache_trace(tmp_path / "t", [{(0, 0): "x", (1, 0): "x"}])
    _set_version(tr.path, 1)
    with pytest.raises(TraceError, match="table 'vma_files' is not part of format version 1"):
        open_trace(tr.path)


def test_a_foreign_column_in_a_page_cache_table_is_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tr = make_pagecache_trace(tmp_path / "t", [{(0, 0): "x", (1, 0): "x"}])
    f = tr.path / "files" / "snap-000000.parquet"
    t = pq.read_table(f).drop_columns(["mtime_ns"])
    pq.write_table(t, f)
    with pytest.raises(TraceError):
        open_trace(tr.path).check()


@pytest.mark.parametrize("version", [1, 2])
def test_old_traces_without_page_cache_open_and_have_an_empty_file_scope(tmp_path, version):
    tr = make_trace(tmp_path / "t", [{(0, 1): "a", (1, 1): "a"}, {(0, 1): "a", (1, 1): "a"}])
    if version == 1:
        _set_version(tr.path, 1)
        tr = open_trace(tr.path)
    assert not any(tr.has_table(t) for t in S.PAGECACHE_TABLES)
    assert tr.read_table("filepages").height == 0
    res = replay(tr, "pagecache")
    assert res.spec["scope"] == "file" and res.summary["frames_saved_final"] == 0
    assert replay(tr, "ksm").spec["scope"] != "file"


def test_maps_device_is_the_stat_device():
    vmas = parse_smaps(b"7f0000000000-7f0000002000 r--p 00001000 fd:01 1234   /usr/lib/libx.so\n"
                       b"7f0000003000-7f0000004000 rw-p 00000000 00:00 0 \n")
    assert vmas[0].dev == os.makedev(0xFD, 1) and vmas[0].inode == 1234 and vmas[0].offset == 0x1000
    assert vmas[1].dev == 0 and vmas[1].inode == 0
    st = os.stat("/proc/self/exe")
    with open("/proc/self/maps", "rb") as f:
        own = [v for v in parse_smaps(f.read()) if v.inode == st.st_ino]
    assert own and own[0].dev == st.st_dev


def test_page_cache_bits_only_on_file_pages():
    kf = np.array([1 << PM.KPF_DIRTY, 1 << PM.KPF_WRITEBACK, 1 << PM.KPF_ACTIVE, (1 << PM.KPF_DIRTY) | (1 << PM.KPF_ACTIVE)],
                  np.uint64)
    out = page_cache_flags(kf, np.array([True, True, True, False]))
    assert out.tolist() == [S.F_DIRTY, S.F_WRITEBACK, S.F_ACTIVE, 0]
