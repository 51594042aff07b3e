"""Sampled hashes at several strengths (issue 11 item 2): the hash itself, the trace format's strength
columns (version 2, version 1 still read), the test-trace builder's collision groups, and ``pksm``'s
``hash_strength`` on traces with and without them."""
import json

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

from ksmtrace.cli import cli
from ksmtrace.errors import TraceError
from ksmtrace.policies import hashkeys
from ksmtrace.replay import replay
from ksmtrace.testing import make_trace
from ksmtrace.testing.builders import strength_sample
from ksmtrace.trace import schema as S
from ksmtrace.trace.reader import open_trace
from ksmtrace.trace.sampled import random_sample_hash, strength_samples, zero_sample


def test_zero_page_hash_matches_uksm_zero_hash_table():
    """uksm-spec §4.5 (computed there; 64 is also the capture's PKSM_ZERO_SAMPLE)."""
    want = {8: 0x5DC458C1, 16: 0x11765A08, 32: 0x8ACCC620, 64: 0x7AEC7314, 128: 0x915A591E, 256: 0xD108C99F,
            512: 0x83070C41, 1024: 0xF3AA7E93, 1033: 0x445263EF}
    assert {s: zero_sample(s) for s in want} == want


def test_one_pass_gives_every_strength_of_one_permutation():
    rng = np.random.default_rng(7)
    pages = rng.integers(0, 256, size=(5, 4096), dtype=np.uint8)
    pages[1] = 0
    perm = rng.permutation(1024)
    got = strength_samples(pages, perm)
    for i in range(len(pages)):
        for k, s in enumerate(S.SAMPLE_STRENGTHS):
            assert got[i, k] == random_sample_hash(pages[i].tobytes(), perm, s)
    assert list(got[1]) == [zero_sample(s) for s in S.SAMPLE_STRENGTHS]
    assert random_sample_hash(pages[0].tobytes(), perm, 1030) != random_sample_hash(pages[0].tobytes(), perm, 1024)


def test_the_capture_hash_is_strength_64_of_the_same_function():
    hashing = pytest.importorskip("ksmtrace_tracers.hashing")
    rng = np.random.default_rng(3)
    pages = rng.integers(0, 256, size=(4, 4096), dtype=np.uint8)
    perm = hashing.pksm_permutation(0x1234)
    want = hashing.sample_hashes(pages, perm)
    assert (strength_samples(pages, perm)[:, S.SAMPLE_STRENGTHS.index(64)] == want).all()


def test_the_capture_computes_every_strength_in_one_pass_like_the_spec():
    hashing = pytest.importorskip("ksmtrace_tracers.hashing")
    rng = np.random.default_rng(5)
    pages = rng.integers(0, 256, size=(6, 4096), dtype=np.uint8)
    pages[2] = 0
    perm = hashing.pksm_permutation(0x77)
    got = hashing.strength_hashes(pages, perm)
    assert (got == strength_samples(pages, perm)).all()
    assert (got[:, hashing.I64] == hashing.sample_hashes(pages, perm)).all()
    h = hashing.PageHasher(0x77, fingerprints=True)
    assert list(h.zero_strengths) == list(got[2]) == [zero_sample(x) for x in S.SAMPLE_STRENGTHS]
    assert hashing.strength_hashes(pages[:0], perm).shape == (0, len(S.SAMPLE_STRENGTHS))


def test_builder_collision_groups():
    coll = {"a": ("g", 32), "b": ("g", 16), "z": (0, 8)}
    assert strength_sample("a", 16, coll) == strength_sample("b", 16, coll) == strength_sample("g", 16, coll)
    assert strength_sample("a", 32, coll) != strength_sample("b", 32, coll)
    assert strength_sample("a", 64, coll) != strength_sample("g", 64, coll)
    assert strength_sample("z", 8, coll) == zero_sample(8) != strength_sample("z", 16, coll)
    assert strength_sample(0, 1024) == zero_sample(1024)


def test_strength_columns_round_trip_through_prepare(tmp_path):
    snaps = [{(0, 1): "a", (0, 2): "b", (0, 3): 0}, {(0, 1): "a", (0, 2): "c"}]
    tr = make_trace(tmp_path / "t", snaps, strengths=True, collisions={"b": ("a", 16)})
    assert tr.manifest["format_version"] == 2 and tr.has_sample_strengths and tr.has_sample_hash
    assert tr.pages_columns[-7:] == [f.name for f in S.STRENGTH_FIELDS]
    p = tr.prepare("anon", cache=False)
    assert p.ev_strength.shape == (len(p.ev_pg), 8)
    k64 = S.SAMPLE_STRENGTHS.index(64)
    assert (p.ev_strength[:, k64] == p.ev_sample).all()
    row = {c: p.ev_strength[i] for i, c in enumerate(p.ev_cid.tolist()) if c >= 0}
    a, b = row[p.ev_cid[0]], row[p.ev_cid[1]]
    assert (a[:2] == b[:2]).all() and (a[2:] != b[2:]).all()  # equal at 8 and 16 only
    keys = hashkeys.content_keys(p, S.SAMPLE_STRENGTHS)
    assert keys[0][0][p.ev_cid[0]] == keys[0][0][p.ev_cid[1]] and keys[3][0][p.ev_cid[0]] != keys[3][0][p.ev_cid[1]]
    assert all(k[2] == k[0][0] for k in keys)  # the zero content has the zero page's key


def test_version_1_traces_open_and_a_v1_manifest_cannot_claim_strengths(tmp_path):
    tr = make_trace(tmp_path / "a", [{(0, 1): "a"}], samples={"a": 5})
    m = json.loads((tr.path / "manifest.json").read_text())
    m["format_version"] = 1
    (tr.path / "manifest.json").write_text(json.dumps(m))
    old = open_trace(tr.path)
    assert old.has_sample_hash and not old.has_sample_strengths
    p = old.prepare("anon", cache=False)
    assert p.ev_strength is None and hashkeys.recorded_strengths(p) == (64,)
    tr2 = make_trace(tmp_path / "b", [{(0, 1): "a"}], strengths=True)
    m = json.loads((tr2.path / "manifest.json").read_text())
    m["format_version"] = 1
    (tr2.path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(TraceError, match="not a pages layout of format version 1"):
        open_trace(tr2.path)


# --- pksm hash_strength --------------------------------------------------------------------------------------
def collide_trace(tmp_path, **kw):
    snaps = [{**{(p, v): f"g{v % 5}" for p in range(3) for v in range(20)}, **{(p, 30 + v): f"u{p}-{v}" for p in range(3) for v in range(10)}}] * 6
    return make_trace(tmp_path / "t", snaps, interval=0.05, **kw)


def test_pksm_strength_keys_the_trees_and_prices_the_hash(tmp_path):
    tr = collide_trace(tmp_path, strengths=True, collisions={f"g{i}": ("g", 16) for i in range(5)})
    base = {"collision_counts_as_merge": False, "pages_to_scan": 20}
    r64 = replay(tr, "pksm", base)
    assert r64.extras["policy"]["sampled_hash"] == "from trace"
    assert r64.table["u_sampled_words"].sum() == 0 and r64.table["u_sampled_hashes"].sum() > 0
    r16 = replay(tr, "pksm", {**base, "hash_strength": 16})
    r8 = replay(tr, "pksm", {**base, "hash_strength": 8})
    assert r16.table["u_sampled_hashes"].sum() == 0 and r8.table["u_sampled_hashes"].sum() == 0
    w16, w8 = r16.table["u_sampled_words"].sum(), r8.table["u_sampled_words"].sum()
    assert w16 > 0 and w16 % 16 == 0 and w8 > 0 and w8 % 8 == 0
    assert r16.summary["collision_merges"] == 0 == r64.summary["collision_merges"]  # (failed merges: counted off)
    assert r16.summary["frames_saved_final"] < r64.summary["frames_saved_final"]  # collisions cost merges
    assert r8.summary["frames_saved_final"] < r64.summary["frames_saved_final"]
    ref = replay(tr, "pksm", {**base, "hash_strength": 16}, engine="reference")
    assert ref.table.equals(r16.table)


def test_pksm_strength_without_the_columns(tmp_path):
    tr = collide_trace(tmp_path, samples={})
    r = replay(tr, "pksm", {"hash_strength": 16})
    assert r.extras["policy"]["sampled_hash"] == "from trace at strength 64 (strength 16 not recorded)"
    tr2 = make_trace(tmp_path / "u", [{(0, 1): "a", (0, 2): "a"}] * 3, interval=0.05)
    assert replay(tr2, "pksm", {"hash_strength": 512}).extras["policy"]["sampled_hash"] == "modelled collision-free"


def test_cli_replay_with_a_strength(tmp_path):
    tr = collide_trace(tmp_path, samples={})
    r = CliRunner().invoke(cli, ["replay", str(tr.path), "--policy", "pksm", "-p", "hash_strength=16", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["spec"]["params"]["hash_strength"] == 16
    r = CliRunner().invoke(cli, ["replay", str(tr.path), "--policy", "pksm", "-p", "hash_strength=48"])
    assert r.exit_code != 0 and r.output.count("\n") == 1 and "hash_strength" in r.output
    r = CliRunner().invoke(cli, ["replay", str(tr.path), "--policy", "uksm", "-p", "cpu_governor=low", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["summary"]["full_scans"] >= 1


# --- the tool: strengths from stored contents --------------------------------------------------------------------
def test_strengths_from_stored_contents_with_the_capture_key(tmp_path):
    from ksmtrace.testing.builders import content_bytes
    from ksmtrace.trace.sampled import key_fingerprint, keyed_permutation
    from ksmtrace.trace.strengths import add_strengths

    key = 0x1234ABCD
    perm = keyed_permutation(key)
    labels = ["a", "b", "c", 0]
    page = {c: np.frombuffer(content_bytes(c), np.uint8) for c in labels}
    want = {c: strength_samples(page[c][None, :], perm)[0] for c in labels}
    snaps = [{(0, 1): "a", (0, 2): "b", (1, 1): 0}, {(0, 1): "a", (0, 2): "c"}]
    cap = {"hash": {"algorithm": "xxh3_64", "key_fingerprint": key_fingerprint(key)}}
    tr = make_trace(tmp_path / "t", snaps, contents=True, capture=cap,
                    samples={c: int(want[c][S.SAMPLE_STRENGTHS.index(64)]) for c in labels})
    out = add_strengths(tr, tmp_path / "s", key=key)
    assert out.has_sample_strengths and out.capture["strength_permutation"] == "the capture's (hash key)"
    got = {}
    pages = out.read_table("pages")
    for r in pages.iter_rows(named=True):
        if r["op"] != S.OP_GONE:
            got[(r["snap"], r["proc"], r["vpn"])] = [r[S.strength_column(x)] for x in S.SAMPLE_STRENGTHS]
    assert got[(0, 0, 1)] == want["a"].tolist() and got[(0, 0, 2)] == want["b"].tolist()
    assert got[(0, 1, 1)] == [zero_sample(x) for x in S.SAMPLE_STRENGTHS]
    assert got[(1, 0, 2)] == want["c"].tolist()
    assert out.n_snapshots == tr.n_snapshots and out.read_table("processes").height == tr.read_table("processes").height
    assert out.snapshot(0).height == 3
    with pytest.raises(TraceError, match="key fingerprint"):
        add_strengths(tr, tmp_path / "x", key=key + 1)


def test_strengths_without_the_key_recompute_sample_and_cli_errors(tmp_path):
    tr = make_trace(tmp_path / "t", [{(0, 1): "a", (0, 2): "a", (0, 3): "b"}] * 2, contents=True, samples={"a": 1, "b": 2})
    r = CliRunner().invoke(cli, ["strengths", str(tr.path), str(tmp_path / "s"), "-q"])
    assert r.exit_code == 0, r.output
    out = open_trace(tmp_path / "s")
    pages = out.read_table("pages").filter(pl.col("op") != S.OP_GONE)
    a = pages.filter(pages["vpn"] == 1).row(0, named=True)
    assert a["sample"] not in (1, 2) and a["sample8"] != 0
    assert pages.filter(pages["vpn"] == 2).row(0, named=True)["sample1024"] == a["sample1024"]
    r = CliRunner().invoke(cli, ["strengths", str(tmp_path / "s"), str(tmp_path / "s2")])
    assert r.exit_code != 0 and "already has" in r.output and r.output.count("\n") == 1
    plain = make_trace(tmp_path / "p", [{(0, 1): "a"}])
    r = CliRunner().invoke(cli, ["strengths", str(plain.path), str(tmp_path / "p2")])
    assert r.exit_code != 0 and "--contents" in r.output


def test_generated_collision_traces_have_their_structure(tmp_path):
    from ksmtrace.testing.collisions import collision_trace

    tr = collision_trace(tmp_path / "c", procs=2, pages=300, snapshots=3, sparse=0.5, template=0.3, dup=0.1, zero=0.05)
    assert tr.has_sample_strengths and tr.read_table("vmas").height == 3 * 2 * 2
    p = tr.prepare("anon", cache=False)
    zero_like = []
    for k, s in enumerate(S.SAMPLE_STRENGTHS):
        keys = hashkeys.content_keys(p, [s])[0]
        zero_like.append(int(((keys[0] == keys[2]) & (np.arange(len(keys[0])) > 0)).sum()))
    assert zero_like[0] > zero_like[3] > zero_like[-1] == 0  # sparse pages look like zero at weak strengths only
    uniq = [hashkeys.content_keys(p, [s])[0][1] for s in S.SAMPLE_STRENGTHS]
    assert uniq == sorted(uniq) and uniq[0] < uniq[-1] == p.n_cids  # collisions vanish at 1024 words


def test_strengths_tool_reproduces_a_version_2_capture_with_its_key(tmp_path):
    """``ksmtrace strengths --hash-key`` uses the capture's own permutation and key fingerprint:
    on a version-2 trace whose ``sample`` column the capture's hasher computed, it reproduces that
    column (a different key is refused by its fingerprint)."""
    hashing = pytest.importorskip("ksmtrace_tracers.hashing")
    from ksmtrace.testing.builders import content_bytes
    from ksmtrace.trace.strengths import add_strengths

    key = (0x0123456789ABCDEF << 64) | 0xFEDCBA9876543210  # a 128-bit key, as the capture makes
    h = hashing.PageHasher(key, fingerprints=True)
    labels = ["a", "b", "c"]
    pages = np.stack([np.frombuffer(content_bytes(c), np.uint8) for c in labels])
    sample = dict(zip(labels, (int(x) for x in hashing.sample_hashes(pages, h.perm))))
    cap = {"hash": {"algorithm": hashing.HASH_ALGORITHM, "key_fingerprint": hashing.key_fingerprint(key)}}
    snaps = [{(0, 1): "a", (0, 2): "b"}, {(0, 1): "a", (0, 2): "c"}]
    tr = make_trace(tmp_path / "t", snaps, contents=True, capture=cap, samples=sample)
    assert tr.version == 2
    out = add_strengths(tr, tmp_path / "s", key=key)  # raises if the key does not reproduce `sample`
    assert out.capture["strength_permutation"] == "the capture's (hash key)"
    with pytest.raises(Exception, match="key fingerprint"):
        add_strengths(tr, tmp_path / "x", key=key ^ 1)
