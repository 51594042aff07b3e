"""Capture building blocks on synthetic input: pagemap/kpageflags decoding, smaps parsing, hashing,
fingerprints, hash keys, target errors, and the soft-dirty delta semantics."""
from __future__ import annotations

import mmap
import os
import stat

import numpy as np
import pytest
import xxhash

from ksmtrace.errors import CaptureError, TargetError
from ksmtrace.trace import schema as S
from ksmtrace_tracers import hashing as H
from ksmtrace_tracers import pagemap as PM
from ksmtrace_tracers.procfs_reader import page_delta as _delta, vanished
from ksmtrace_tracers.procmaps import classify, parse_smaps
from ksmtrace_tracers.targets import TargetSet, TargetSpec

from tests._capture_util import needs_root


# --- pagemap ------------------------------------------------------------------------------------
def test_pagemap_decode_every_bit_including_soft_dirty():
    b = lambda n: 1 << n  # noqa: E731
    entries = np.array(
        [
            0,  # not mapped
            b(63) | 0x1234,  # present, PFN 0x1234
            b(63) | b(56) | b(55) | 0x42,  # present, exclusive, soft-dirty
            b(62) | (7 << 5) | 3,  # swapped (type 3, offset 7): no PFN
            b(63) | b(61) | 0x99,  # present file page
            b(55),  # soft-dirty only (not present)
            b(63) | ((1 << 55) - 1),  # the largest PFN
        ],
        dtype=np.uint64,
    )
    d = PM.decode(entries)
    assert d["present"].tolist() == [False, True, True, False, True, False, True]
    assert d["swapped"].tolist() == [False, False, False, True, False, False, False]
    assert d["file"].tolist() == [False, False, False, False, True, False, False]
    assert d["exclusive"].tolist() == [False, False, True, False, False, False, False]
    assert d["soft_dirty"].tolist() == [False, False, True, False, False, True, False]
    assert d["pfn"].tolist() == [0, 0x1234, 0x42, 0, 0x99, 0, (1 << 55) - 1]


def test_read_pagemap_of_own_pages():
    m = mmap.mmap(-1, 8 * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        for i in (0, 2, 3):
            m[i * 4096] = 1
        addr = PM._address_of(m)
        fd = os.open("/proc/self/pagemap", os.O_RDONLY)
        try:
            pm = PM.read_pagemap(fd, addr // 4096, 8)
        finally:
            os.close(fd)
        d = PM.decode(pm)
        assert d["present"].tolist() == [True, False, True, True, False, False, False, False]
        assert d["exclusive"][[0, 2, 3]].all()
    finally:
        m.close()


def test_kpageflags_reader_runs_window_and_scatter(tmp_path):
    n = 100_000
    values = (np.arange(n, dtype=np.uint64) * np.uint64(3)) | np.uint64(1 << 40)
    f = tmp_path / "kpf"
    f.write_bytes(values.tobytes())
    r = PM.KpageflagsReader(str(f))
    assert r.readable
    # dense (one window) with repeats and unsorted order
    pfns = np.array([5, 3, 5, 4, 1000, 3], dtype=np.uint64)
    flags, ok = r.read(pfns)
    assert ok.all() and flags.tolist() == values[pfns.astype(np.int64)].tolist()
    # sparse (one preadv per run) with an entry beyond the end of "memory"
    pfns = np.array([10, 11, 12, 50_000, 99_999, 10, 10**9], dtype=np.uint64)
    flags, ok = r.read(pfns)
    assert ok.tolist() == [True] * 6 + [False]
    assert flags[:6].tolist() == values[pfns[:6].astype(np.int64)].tolist()
    assert flags[6] == 0
    r.close()
    assert not PM.KpageflagsReader(str(tmp_path / "missing")).readable


def test_kpf_bits():
    f = np.array([1 << PM.KPF_ZERO_PAGE, (1 << PM.KPF_KSM) | (1 << PM.KPF_ANON), 1 << PM.KPF_THP], np.uint64)
    assert PM.kpf_bit(f, PM.KPF_ZERO_PAGE).tolist() == [True, False, False]
    assert PM.kpf_bit(f, PM.KPF_KSM).tolist() == [False, True, False]
    assert PM.kpf_bit(f, PM.KPF_ANON).tolist() == [False, True, False]
    assert PM.kpf_bit(f, PM.KPF_THP).tolist() == [False, False, True]


def test_soft_dirty_probe_is_a_bool():
    # this host has no CONFIG_MEM_SOFT_DIRTY; the probe must say so rather than guess
    assert isinstance(PM.soft_dirty_available(), bool)


# --- smaps -----------------------------------------------------------------------------------------
SMAPS = b"""\
55d0a0000000-55d0a0002000 r--p 00000000 fe:00 1234                       /usr/bin/python3
Size:                  8 kB
Rss:                   8 kB
Anonymous:             0 kB
VmFlags: rd mr mw me sd
55d0a1000000-55d0a1400000 rw-p 00000000 00:00 0                          [heap]
Rss:                2048 kB
Anonymous:          2048 kB
VmFlags: rd wr mr mw me ac sd
7f0000000000-7f0000100000 rw-p 00000000 00:00 0 
Rss:                1024 kB
Anonymous:          1024 kB
VmFlags: rd wr mr mw me ac sd mg nh
7f0000200000-7f0000300000 rw-s 00000000 00:01 99                         /dev/zero (deleted)
Rss:                  64 kB
VmFlags: rd wr sh mr mw me ms sd
7f97a184d000-7f97a1851000 r--p 00000000 00:00 0                          [vvar]
VmFlags: rd mr pf io de dd
7f97a1853000-7f97a1855000 r-xp 00000000 00:00 0                          [vdso]
VmFlags: rd ex mr mw me de
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
Rss:                  16 kB
Anonymous:            16 kB
VmFlags: rd wr mr mw me gd ac
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
VmFlags: ex
"""


def test_parse_smaps_and_scopes():
    vmas = parse_smaps(SMAPS)
    assert [v.path for v in vmas] == ["/usr/bin/python3", "[heap]", "", "/dev/zero (deleted)", "[vvar]", "[vdso]", "[stack]", "[vsyscall]"]
    heap = vmas[1]
    assert heap.rss_kb == 2048 and heap.anon_kb == 2048 and heap.pages == 0x400000 // 4096
    assert vmas[2].mergeable and "nh" in vmas[2].vmflags
    classify(vmas, "mergeable")
    assert [v.in_scope for v in vmas] == [False, False, True, False, False, False, False, False]
    classify(vmas, "anon")
    assert [v.in_scope for v in vmas] == [True, True, True, False, False, False, True, False]
    classify(vmas, "all")
    assert [v.in_scope for v in vmas] == [True, True, True, True, False, False, True, False]
    f = [v.flags for v in vmas]
    assert f[0] & S.V_FILE and f[0] & S.V_PRIVATE and not f[0] & S.V_ANON
    assert f[1] & S.V_HEAP and f[1] & S.V_ANON
    assert f[2] & S.V_MERGEABLE and f[2] & S.V_NOHUGEPAGE and f[2] & S.V_ANON
    assert f[3] & S.V_SHARED and not f[3] & S.V_PRIVATE
    assert f[6] & S.V_STACK
    assert not f[4] & S.V_IN_SCOPE  # VM_IO|VM_PFNMAP
    with pytest.raises(ValueError):
        classify(vmas, "everything")


# --- hashing ---------------------------------------------------------------------------------------
def _pages(n, seed=1):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, size=(n, 4096), dtype=np.uint8)
    a[3] = 0  # one zero page
    return a


def _prf(key, data):
    return H.siphash24_reference(H.subkey(key, b"page hash"), xxhash.xxh3_128_digest(data))


def test_siphash_matches_the_reference_vectors():
    # SipHash-2-4 paper, appendix A: key 00..0f, message 00..0e (15 bytes)
    key = bytes(range(16))
    assert H.siphash24_reference(key, bytes(range(15))) == 0xA129CA6149BE45E5
    assert H.siphash24_reference(key, b"") == 0x726FDB47DD0E0E31  # vectors[0]
    assert H.siphash24_reference(key, bytes(range(16))) == 0x3F2ACC7F57C29BDB  # vectors[16]
    # the batch version (16-byte messages) agrees with the reference
    rng = np.random.default_rng(3)
    msgs = rng.integers(0, 256, size=(50, 16), dtype=np.uint8)
    out = np.zeros(50, np.uint64)
    k0, k1 = np.uint64(int.from_bytes(key[:8], "little")), np.uint64(int.from_bytes(key[8:], "little"))
    H.siphash24_16(msgs.view("<u8").reshape(50, 2), k0, k1, out)
    assert out.tolist() == [H.siphash24_reference(key, m.tobytes()) for m in msgs]


def test_keyed_page_hashes_and_zero_detection():
    key = 0x0123456789ABCDEF_FEDCBA9876543210
    h = H.PageHasher(key)
    pages = _pages(8)
    buf = np.ascontiguousarray(pages).reshape(-1)
    mv = memoryview(buf)
    got = h.hash(h.slices(mv, 8), 8)
    assert got.tolist() == [_prf(key, pages[i].tobytes()) for i in range(8)]
    assert h.hash(h.slices(mv, 8), 5).tolist() == got[:5].tolist()
    assert got[3] == h.zero_hash == h.hash_bytes(bytes(4096))
    assert (got == h.zero_hash).sum() == 1
    assert H.PageHasher(key + 1).zero_hash != h.zero_hash  # keyed: no public zero-page hash
    assert H.PageHasher(key ^ (1 << 100)).zero_hash != h.zero_hash  # all 128 key bits count


def test_pksm_sampled_hash_matches_the_reference_and_is_keyed():
    perm = H.pksm_permutation(1234)
    assert sorted(perm.tolist()) == list(range(1024))  # a permutation of the word offsets
    assert H.pksm_permutation(1234).tolist() == perm.tolist()  # deterministic
    assert H.pksm_permutation(1235)[:64].tolist() != perm[:64].tolist()  # depends on the key
    pages = _pages(16)
    vec = H.sample_hashes(pages, perm[:64])
    ref = [H.pksm_sample_reference(pages[i].tobytes(), perm[:64]) for i in range(16)]
    assert vec.dtype == np.uint32 and vec.tolist() == ref
    # the zero page's sampled hash is PKSM's constant, whatever the permutation
    assert vec[3] == H.PKSM_ZERO_SAMPLE == 0x7AEC7314
    assert H.pksm_sample_reference(bytes(4096), range(64)) == 0x7AEC7314


def test_prefix_hashes():
    key = 99
    h = H.PageHasher(key, fingerprints=True)
    pages = _pages(4)
    buf = np.ascontiguousarray(pages).reshape(-1)
    got = h.prefixes(h.prefix_slices(memoryview(buf), 4), 4)
    pk = H.subkey(key, b"prefix hash")
    for n in S.PREFIX_LENGTHS:
        want = [H.siphash24_reference(pk, xxhash.xxh3_128_digest(pages[i, :n].tobytes())) & 0xFFFFFFFF for i in range(4)]
        assert got[n].tolist() == want
        assert got[n][3] == h.zero_prefix[n]


def test_hash_key_file_created_private_and_reused(tmp_path):
    p = tmp_path / "key"
    k1, created = H.load_or_create_key(p)
    assert created and stat.S_IMODE(os.stat(p).st_mode) == 0o600
    assert len(p.read_text().strip()) == 32 and k1 < 1 << 128
    k2, created2 = H.load_or_create_key(p)
    assert not created2 and k1 == k2
    fp = H.key_fingerprint(k1)
    assert len(fp) == 16 and int(fp, 16) != k1 and fp == H.key_fingerprint(k2)
    assert H.key_fingerprint(k1 + 1) != fp
    bad = tmp_path / "bad"
    bad.write_text("not a key\n")
    with pytest.raises(CaptureError, match="not a hash key"):
        H.load_or_create_key(bad)
    old = tmp_path / "old"  # a 64-bit key file of format version 1 is still a key
    old.write_text("0123456789abcdef\n")
    old.chmod(0o600)
    assert H.load_or_create_key(old) == (0x0123456789ABCDEF, False)


def test_a_key_file_others_can_read_is_used_with_a_warning(tmp_path):
    p = tmp_path / "key"
    H.load_or_create_key(p)
    warnings = []
    H.load_or_create_key(p, warn=warnings.append)
    assert warnings == []
    p.chmod(0o644)
    key, _ = H.load_or_create_key(p, warn=warnings.append)
    assert len(warnings) == 1 and "readable by group or others (mode 0644)" in warnings[0] and "chmod 600" in warnings[0]
    assert key == int(p.read_text(), 16)


# --- delta with and without soft-dirty ----------------------------------------------------------------
def _state(vpn, h, flags, pfn=None):
    n = len(vpn)
    return {
        "vpn": np.array(vpn, np.uint64),
        "hash": np.array(h, np.uint64),
        "flags": np.array(flags, np.uint32),
        "pfn": np.array(pfn if pfn is not None else [0] * n, np.uint64),
    }


def test_delta_soft_dirty_semantics():
    P, SD = S.F_PRESENT, S.F_SOFT_DIRTY
    prev = _state([1, 2, 3, 4], [10, 20, 30, 40], [P | SD, P, P, P])
    cur = _state([1, 2, 3, 4], [10, 20, 31, 40], [P, P | SD, P, P])
    # without soft-dirty (this host): only the content change counts
    d = _delta(prev, cur, soft_dirty=False)
    assert d.changed.tolist() == [2] and d.same.tolist() == [0, 1, 3]
    # with soft-dirty: page 2 was written (same content) -> a CHANGED row; page 1 only lost its
    # soft-dirty bit (not written this interval) -> unchanged
    d = _delta(prev, cur, soft_dirty=True)
    assert d.changed.tolist() == [1, 2] and d.same.tolist() == [0, 3]
    # the slow path (different page sets) applies the same rules
    cur2 = _state([2, 3, 4, 5], [20, 31, 40, 50], [P | SD, P, P, P])
    d = _delta(prev, cur2, soft_dirty=True)
    assert d.new.tolist() == [3] and d.gone.tolist() == [0]
    assert d.changed.tolist() == [0, 1] and d.same.tolist() == [2]
    d = _delta(prev, cur2, soft_dirty=False)
    assert d.changed.tolist() == [1] and d.same.tolist() == [0, 2]


# --- targets --------------------------------------------------------------------------------------------
def _free_pid() -> int:
    pid = 4_000_000
    while os.path.exists(f"/proc/{pid}"):
        pid -= 1
    return pid


def test_target_errors_are_one_clear_line():
    with pytest.raises(TargetError, match="no such process"):
        TargetSet(TargetSpec(pids=(_free_pid(),)))
    with pytest.raises(TargetError, match="bad regular expression"):
        TargetSet(TargetSpec(names=("([",)))
    with pytest.raises(TargetError, match="kernel thread"):
        TargetSet(TargetSpec(pids=(2,)))
    with pytest.raises(TargetError, match="no such cgroup"):
        TargetSet(TargetSpec(cgroups=("/no/such/cgroup-ksmtrace",)))
    with pytest.raises(TargetError, match="no process matches"):
        TargetSet(TargetSpec(names=("^no-such-process-name-[0-9]{20}$",))).first()
    with pytest.raises(TargetError, match="no targets"):
        TargetSet(TargetSpec())


def test_target_spec_forms():
    assert TargetSpec.of(5) == TargetSpec(pids=(5,))
    assert TargetSpec.of([5, 6]).pids == (5, 6)
    assert TargetSpec.of({"names": ["x"], "all": True}) == TargetSpec(names=("x",), all=True)
    assert TargetSpec(pids=(1,)).fixed and TargetSpec(trees=(1,)).fixed
    assert not TargetSpec(pids=(1,), names=("x",)).fixed


def test_vanished_pages_are_dropped_not_failed():
    """A page whose read failed because it was unmapped meanwhile is no longer there."""
    m = mmap.mmap(-1, 4 * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m2 = mmap.mmap(-1, 4 * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for mm in (m, m2):
        for i in range(4):
            mm[i * 4096] = 1
    a, b = PM._address_of(m) // 4096, PM._address_of(m2) // 4096
    vpn = np.array(sorted([a, a + 1, b, b + 1]), np.uint64)
    m2.close()  # unmapped "mid-read"
    failed = np.ones(4, bool)
    drop = vanished(os.getpid(), vpn, failed)
    gone = {b, b + 1}
    assert drop.tolist() == [int(v) in gone for v in vpn]
    m.close()


@needs_root
def test_all_excludes_ourselves_and_kernel_threads():
    ts = TargetSet(TargetSpec(all=True))
    members = ts.resolve()
    pids = {m.pid for m in members}
    assert os.getpid() not in pids
    assert 2 not in pids
    from ksmtrace_tracers.procinfo import read_stat

    assert not any(read_stat(p) and read_stat(p).kthread for p in pids)
