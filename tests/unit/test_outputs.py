"""Outputs nobody can redirect (issue 9, item 4): ksmtrace.outputs and the writers that use it."""
from __future__ import annotations

import os
import stat

import pytest

from ksmtrace.errors import OutputError
from ksmtrace.outputs import check_output_dir, open_output_dir

ROOT = os.geteuid() == 0
NOBODY = 65534


def test_creates_missing_directories_nobody_else_can_write(tmp_path):
    old = os.umask(0o002)  # a umask that would leave them group-writable
    try:
        with open_output_dir(tmp_path / "a" / "b") as d:
            d.write_bytes("x.json", b"{}")
    finally:
        os.umask(old)
    for p in (tmp_path / "a", tmp_path / "a" / "b"):
        assert stat.S_IMODE(p.stat().st_mode) & 0o022 == 0
    assert (tmp_path / "a" / "b" / "x.json").read_bytes() == b"{}"


@pytest.mark.skipif(not ROOT, reason="needs root to give a directory to another user")
def test_refuses_another_users_empty_directory(tmp_path):
    d = tmp_path / "theirs"
    d.mkdir(mode=0o777)
    d.chmod(0o777)
    os.chown(d, NOBODY, NOBODY)
    with pytest.raises(OutputError, match=rf"{d}: output directory is owned by uid {NOBODY}, not by you"):
        open_output_dir(d)
    with pytest.raises(OutputError, match="owned by uid"):
        check_output_dir(d, empty=True)


def test_refuses_a_directory_others_can_write(tmp_path):
    d = tmp_path / "shared"
    d.mkdir()
    d.chmod(0o777)
    with pytest.raises(OutputError, match=r"group or others can write to this output directory \(mode 0777\)"):
        open_output_dir(d)


def test_refuses_a_non_empty_directory_when_it_must_be_new(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "x").write_text("x")
    with pytest.raises(OutputError, match="output exists and is not an empty directory"):
        open_output_dir(tmp_path / "t", empty=True)


def test_a_file_is_not_a_directory(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match="exists and is not a directory"):
        open_output_dir(tmp_path / "f")


@pytest.mark.skipif(not ROOT, reason="needs root to plant another user's link")
def test_refuses_a_link_planted_by_another_user(tmp_path):
    """/tmp/out -> /root/secret, planted by another user in a sticky world-writable directory."""
    sticky = tmp_path / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    target = tmp_path / "mine"
    target.mkdir(mode=0o700)
    link = sticky / "out"
    os.symlink(target, link)
    os.lchown(link, NOBODY, NOBODY)
    with pytest.raises(OutputError, match="is a symbolic link another user could change"):
        open_output_dir(link)


def test_accepts_the_users_own_link_in_their_own_directory(tmp_path):
    target = tmp_path / "real"
    target.mkdir()
    os.symlink(target, tmp_path / "alias")
    with open_output_dir(tmp_path / "alias") as d:
        d.write_bytes("r.json", b"1")
    assert (target / "r.json").read_bytes() == b"1"


def test_a_link_at_the_file_name_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(victim, out / "r.json")
    with open_output_dir(out) as d:
        d.write_bytes("r.json", b"result")
    assert victim.read_text() == "precious"
    assert not (out / "r.json").is_symlink() and (out / "r.json").read_bytes() == b"result"


def test_a_failed_write_leaves_no_temporary_file(tmp_path):
    def boom(fh):
        fh.write(b"half")
        raise RuntimeError("boom")

    with open_output_dir(tmp_path / "o") as d:
        with pytest.raises(RuntimeError):
            d.write_atomic("r.parquet", boom)
    assert os.listdir(tmp_path / "o") == []


def test_a_directory_swapped_for_a_link_after_the_check_gets_nothing(tmp_path):
    """Everything is written relative to the descriptor opened at the check: renaming the
    directory and putting a link in its place redirects nothing."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with open_output_dir(tmp_path / "o") as d:
        os.rename(tmp_path / "o", tmp_path / "moved")
        os.symlink(elsewhere, tmp_path / "o")
        d.write_bytes("r.json", b"1")
        sub = d.subdir("pages")
        sub.write_bytes("p", b"2")
    assert os.listdir(elsewhere) == []
    assert (tmp_path / "moved" / "r.json").exists() and (tmp_path / "moved" / "pages" / "p").exists()


def test_a_link_where_a_sub_directory_goes_is_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with open_output_dir(tmp_path / "o") as d:
        os.symlink(elsewhere, tmp_path / "o" / "pages")
        with pytest.raises(OutputError, match="pages: is a symbolic link or not a directory"):
            d.subdir("pages")


def test_trace_writer_refuses_a_shared_directory(tmp_path):
    from ksmtrace.trace.writer import TraceWriter

    d = tmp_path / "t"
    d.mkdir()
    d.chmod(0o777)
    with pytest.raises(OutputError, match="group or others can write to this trace directory"):
        TraceWriter(d, host={}, capture={}, tracer={"name": "t"})
    assert os.listdir(d) == []


def test_trace_writer_creates_a_private_trace(tmp_path):
    from ksmtrace.trace import schema as S
    from ksmtrace.trace.writer import TraceWriter

    w = TraceWriter(tmp_path / "t", host={}, capture={}, tracer={"name": "t"})
    w.commit_snapshot(0, 0, 0, {"pages": S.PAGES_SCHEMA.empty_table()}, keyframe=True)
    w.close("done")
    assert not w.open
    for root, dirs, files in os.walk(tmp_path / "t"):
        for x in dirs:
            assert stat.S_IMODE(os.stat(os.path.join(root, x)).st_mode) == 0o700
        for x in files:
            assert stat.S_IMODE(os.stat(os.path.join(root, x)).st_mode) == 0o600


def test_results_and_plots_refuse_a_shared_directory(tmp_path):
    from ksmtrace import plot, samples
    from ksmtrace.replay import replay

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    res = replay(samples.open_sample("prefork"), "oracle")
    with pytest.raises(OutputError, match="group or others can write"):
        res.write(shared)
    with pytest.raises(OutputError, match="group or others can write"):
        plot.save(plot.timeline([res]), shared / "t.png")
    assert os.listdir(shared) == []
    path = res.write(tmp_path / "mine")
    assert path.exists() and sorted(p.suffix for p in (tmp_path / "mine").iterdir()) == [".json", ".parquet", ".parquet"]
