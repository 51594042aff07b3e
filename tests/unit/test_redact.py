"""ksmtrace redact (issue 9, item 8): the same replay results, no identifiers, no linking."""
from __future__ import annotations

import json
import os
import re
import stat

import numpy as np
import pytest
from click.testing import CliRunner

from ksmtrace import samples
from ksmtrace.cli import cli
from ksmtrace.keys import key_file_warning, read_or_create_key
from ksmtrace.replay import replay
from ksmtrace.testing.golden import CORE_POLICIES
from ksmtrace.trace.info import trace_info
from ksmtrace.trace.reader import open_trace
from ksmtrace.trace import schema as S
from ksmtrace.trace.redact import Permutation32, redact

KEY_A = bytes(range(32))
KEY_B = bytes(range(1, 33))


@pytest.fixture(scope="module")
def src():
    return samples.open_sample("prefork")


@pytest.fixture(scope="module")
def red(src, tmp_path_factory):
    return redact(src, tmp_path_factory.mktemp("r") / "a", key=KEY_A)


@pytest.fixture(scope="module")
def red_b(src, tmp_path_factory):
    return redact(src, tmp_path_factory.mktemp("r") / "b", key=KEY_B)


def _summary(r):
    return {k: v for k, v in r.summary.items() if k != "cpu_seconds"}


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == b[k] or (a[k] != a[k] and b[k] != b[k]), (k, a[k], b[k])


@pytest.mark.parametrize("policy", CORE_POLICIES)
def test_every_policy_gives_the_same_numbers(src, red, policy):
    a, b = replay(src, policy), replay(red, policy)
    _same(_summary(a), _summary(b))
    assert a.units_total() == b.units_total()
    assert a.table.drop("t_s").equals(b.table.drop("t_s"))


def test_info_breakdown_and_fidelity_are_unchanged(src, red, tmp_path):
    import shutil

    from ksmtrace.analysis.breakdown import breakdown
    from ksmtrace.fidelity import fidelity

    ia, ib = trace_info(src, cache=False), trace_info(red, cache=False)
    assert ia["per_snapshot"] == ib["per_snapshot"]
    for k in ("snapshots", "pages", "distinct_contents", "saved_frames", "processes"):
        assert ia[k] == ib[k], k
    assert breakdown(src, "recorded").equals(breakdown(red, "recorded"))
    # the trace alone (a sample's capture.json beside it, which tells fidelity when KSM started,
    # is not part of the trace and not copied)
    alone = tmp_path / "alone"
    shutil.copytree(src.path, alone, ignore=shutil.ignore_patterns("*.json", "*.md", "*.py", "*.sh"))
    shutil.copy(src.path / "manifest.json", alone / "manifest.json")
    fa, fb = fidelity(open_trace(alone)), fidelity(red)
    assert json.dumps(fa.to_json()["counters"], sort_keys=True) == json.dumps(fb.to_json()["counters"], sort_keys=True)
    assert fa.to_json()["start_s"] == fb.to_json()["start_s"]


def test_the_copy_is_a_valid_private_trace(red):
    red.check()
    assert red.meta.complete
    for root, dirs, files in os.walk(red.path):
        for x in dirs:
            assert stat.S_IMODE(os.stat(os.path.join(root, x)).st_mode) == 0o700
        for x in files:
            assert stat.S_IMODE(os.stat(os.path.join(root, x)).st_mode) == 0o600


def test_no_identifier_survives(src, red):
    text = (red.path / "manifest.json").read_text() + (red.path / "snapshots.jsonl").read_text()
    assert "hostname" in src.host and "hostname" not in red.host and f'"{src.host["hostname"]}"' not in text
    assert red.manifest["command_line"] == [] and "gunicorn" not in text
    assert "targets" not in red.capture and "summary" not in red.manifest and "created" not in red.manifest
    assert all(e["wall"] is None for e in red.snapshots)
    pa_, pb = src.read_table("pages"), red.read_table("pages")
    assert pa_.height == pb.height
    old_h, new_h = set(pa_["hash"].to_list()) - {0}, set(pb["hash"].to_list()) - {0}
    assert len(old_h) == len(new_h) and not old_h & new_h
    # frame classes: no physical frame number left, the sharing structure kept
    old_pfn, new_pfn = pa_["pfn"].to_numpy(), pb["pfn"].to_numpy()
    assert ((old_pfn == 0) == (new_pfn == 0)).all()
    assert (new_pfn[new_pfn != 0] >> 9).max() == len(np.unique(old_pfn[old_pfn != 0] >> 9))
    assert (old_pfn[old_pfn != 0] != new_pfn[new_pfn != 0]).all()
    # addresses, pids, start times: other values, the same order
    assert not set(pa_["vpn"].to_list()) & set(pb["vpn"].to_list())
    pr_a, pr_b = src.read_table("processes"), red.read_table("processes")
    assert not set(pr_a["start_ticks"].to_list()) & set(pr_b["start_ticks"].to_list())
    assert (pr_a["pid"].to_numpy() != pr_b["pid"].to_numpy()).all()
    assert (np.argsort(pr_a["start_ticks"].to_numpy(), kind="stable") == np.argsort(pr_b["start_ticks"].to_numpy(), kind="stable")).all()
    assert pr_b["cmdline"].to_list() == pr_b["comm"].to_list() == pr_a["comm"].to_list()
    assert all(re.fullmatch(r"/cgroup-\d{8}", c) or c == "" for c in pr_b["cgroup"].to_list())
    if red.has_table("vmas"):
        paths = set(red.read_table("vmas")["path"].to_list())
        assert all(p == "" or re.fullmatch(r".path-\d{8}", p) or (p.startswith("[") and "/" not in p) for p in paths)
        assert len(paths) == len(set(src.read_table("vmas")["path"].to_list()))
    assert red.times_ns == src.times_ns and red.t0_ns != src.t0_ns
    # what a start time says about the snapshots is kept (100 clock ticks per second)
    rel = lambda tr, p: (p["start_ticks"].to_numpy().astype(np.int64) * 10_000_000 - tr.t0_ns)
    assert (rel(src, pr_a) == rel(red, pr_b)).all()


def test_two_redactions_cannot_be_linked(red, red_b):
    a, b = red.read_table("pages"), red_b.read_table("pages")
    assert not (set(a["hash"].to_list()) - {0}) & (set(b["hash"].to_list()) - {0})
    pairs_a = set(zip(a["vpn"].to_list(), a["pfn"].to_list()))
    pairs_b = set(zip(b["vpn"].to_list(), b["pfn"].to_list()))
    assert len(pairs_a & pairs_b) == 0  # the tester found all 27,746 (address, PFN) pairs equal
    pa_, pb = red.read_table("processes"), red_b.read_table("processes")
    assert not set(pa_["pid"].to_list()) & set(pb["pid"].to_list())
    assert not set(pa_["start_ticks"].to_list()) & set(pb["start_ticks"].to_list())
    assert red.capture["hash"]["key_fingerprint"] != red_b.capture["hash"]["key_fingerprint"]


def test_one_key_keeps_several_traces_comparable(src, red, tmp_path):
    again = redact(src, tmp_path / "again", key=KEY_A)
    assert again.read_table("pages")["hash"].to_list() == red.read_table("pages")["hash"].to_list()


def test_the_32_bit_permutation_is_a_permutation_with_fixed_points():
    p = Permutation32(KEY_A, "sample", fixed=(0, 0x7AEC7314))
    x = np.arange(0, 1 << 20, dtype=np.uint32) * np.uint32(4093)
    y = p(x)
    assert len(np.unique(y)) == len(np.unique(x))
    assert p(np.array([0, 0x7AEC7314], np.uint32)).tolist() == [0, 0x7AEC7314]
    assert not np.isin(y[(x != 0) & (x != 0x7AEC7314)], [0, 0x7AEC7314]).any()


def test_cli_redact_no_names_and_key_file_warning(tmp_path):
    key = tmp_path / "team.key"
    r = CliRunner().invoke(cli, ["redact", str(samples.sample_path("prefork")), "-o", str(tmp_path / "r1"),
                                 "--key-file", str(key), "--no-names", "-q", "--json"])
    assert r.exit_code == 0, r.output
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and key_file_warning(key) is None
    tr = open_trace(tmp_path / "r1")
    pr = tr.read_table("processes")
    assert all(c.startswith("proc-") for c in pr["comm"].to_list()) and pr["cmdline"].to_list() == pr["comm"].to_list()
    key.chmod(0o644)
    r = CliRunner().invoke(cli, ["redact", str(samples.sample_path("prefork")), "-o", str(tmp_path / "r2"),
                                 "--key-file", str(key), "-q"])
    assert r.exit_code == 0, r.output
    assert "ksmtrace: warning: " in r.stderr and "key file is readable by group and others (mode 0644)" in r.stderr
    h1 = tr.read_table("pages")["hash"].to_list()
    assert open_trace(tmp_path / "r2").read_table("pages")["hash"].to_list() == h1  # same key, same hashes


def test_cli_redact_refuses_a_non_empty_output(tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "x").write_text("x")
    r = CliRunner().invoke(cli, ["redact", str(samples.sample_path("prefork")), "-o", str(tmp_path / "o")])
    assert r.exit_code != 0 and r.stderr.startswith("ksmtrace: error: ") and "not an empty directory" in r.stderr


def test_key_files(tmp_path):
    k, created = read_or_create_key(tmp_path / "k")
    assert created and len(k) == 32 and read_or_create_key(tmp_path / "k") == (k, False)
    (tmp_path / "short").write_text("abcd\n")
    from ksmtrace.keys import KeyFileError

    with pytest.raises(KeyFileError, match="not a key"):
        read_or_create_key(tmp_path / "short")
    os.symlink(tmp_path / "k", tmp_path / "link")
    with pytest.raises(KeyFileError, match="cannot read"):
        read_or_create_key(tmp_path / "link")
    (tmp_path / "k").chmod(0o640)
    assert "readable by group (mode 0640)" in key_file_warning(tmp_path / "k")


def test_redacting_a_killed_capture(tmp_path):
    from ksmtrace.testing import make_trace
    from ksmtrace.testing.fuzz import edit_manifest

    t = make_trace(tmp_path / "t", [{(0, 1): "a", (1, 1): "a"}, {(0, 1): "b", (1, 1): "a"}])
    edit_manifest(t.path, lambda m: m.update(complete=False, end_reason=None, snapshot_count=0) or m.pop("snapshots", None))
    r = redact(tmp_path / "t", tmp_path / "r")
    assert r.n_snapshots == 2 and "unfinished" in r.meta.end_reason
    assert trace_info(r, cache=False)["per_snapshot"] == trace_info(tmp_path / "t", cache=False)["per_snapshot"]


def test_sample_strengths_are_redacted_and_keep_uksm_adaptive(tmp_path):
    """Every sampled-hash strength column goes through a permutation of its own: no value of the
    source survives (except each strength's zero-page hash), and UKSM's adaptive strength walk —
    which compares hashes within a strength and checks the zero-page value — gives the same numbers."""
    from ksmtrace.testing import make_trace
    from ksmtrace.trace.sampled import zero_sample

    snaps = [{(p, v): ("z" if v % 5 == 0 else f"c{v % 7}") for p in range(3) for v in range(40)},
             {(p, v): ("z" if v % 5 == 0 else f"c{(v + p) % 9}") for p in range(3) for v in range(40)}]
    src = make_trace(tmp_path / "s", snaps, strengths=True)
    assert src.has_sample_strengths
    red = redact(src, tmp_path / "r", key=KEY_A)
    assert red.has_sample_strengths
    a, b = src.read_table("pages"), red.read_table("pages")
    for f in S.STRENGTH_FIELDS:
        zero = zero_sample(int(f.name[6:]))
        x, y = a[f.name].to_numpy(), b[f.name].to_numpy()
        others = x != zero
        assert (y[~others] == zero).all()
        assert not np.isin(y[others], x[others]).any(), f.name
    for params in ({"hash_adapt": 0, "hash_strength": 8}, {"hash_adapt": 1}):
        ra, rb = replay(src, "uksm", params), replay(red, "uksm", params)
        _same(_summary(ra), _summary(rb))
        assert ra.table.drop("t_s").equals(rb.table.drop("t_s"))
