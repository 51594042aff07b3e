"""Workload generators, checked from outside the processes: mergeable VMAs from
/proc/PID/smaps, presence and PFNs from /proc/PID/pagemap, contents from /proc/PID/mem."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest

from ksmtrace.errors import WorkloadError
from ksmtrace.lab.workloads import (PAGE_SIZE, WORKLOADS, KnownLayout, get_workload,
                                template_page)
from ksmtrace.lab.workloads.content import render
from ksmtrace.lab.workloads.procs import is_running

try:
    import xxhash
except ImportError:  # pragma: no cover
    xxhash = None

pytestmark = pytest.mark.live

IS_ROOT = os.geteuid() == 0
ZERO_PAGE = bytes(PAGE_SIZE)
VMA_RE = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) ")
PFN_MASK = (1 << 55) - 1


def digest(data) -> bytes:
    data = bytes(data)
    if xxhash is not None:
        return xxhash.xxh3_128_digest(data)
    return hashlib.blake2b(data, digest_size=16).digest()  # pragma: no cover


# --- the outside observer ----------------------------------------------------------------------

def mergeable_vmas(pid: int) -> list[tuple[int, int, list[str]]]:
    """(start, end, VmFlags) of every VMA with ``mg`` in its VmFlags."""
    out, current = [], None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            m = VMA_RE.match(line)
            if m:
                current = (int(m[1], 16), int(m[2], 16))
            elif line.startswith("VmFlags:"):
                flags = line.split()[1:]
                if "mg" in flags:
                    out.append((*current, flags))
    return out


@dataclasses.dataclass(frozen=True)
class Page:
    hash: bytes
    pfn: int
    zero: bool
    data: bytes


def read_pages(pid: int, ranges) -> dict[int, Page]:
    """Present pages in ``ranges`` of ``pid``: address -> Page (pagemap bit 63 = present)."""
    out: dict[int, Page] = {}
    pm = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
    mem = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        for start, end in ranges:
            n = (end - start) // PAGE_SIZE
            entries = np.frombuffer(os.pread(pm, 8 * n, 8 * (start // PAGE_SIZE)), "<u8")
            present = np.flatnonzero(entries >> np.uint64(63))
            # read runs of consecutive present pages in one pread
            runs = np.split(present, np.flatnonzero(np.diff(present) != 1) + 1)
            for run in runs:
                for lo in range(0, len(run), 256):
                    chunk = run[lo:lo + 256]
                    first = int(chunk[0])
                    addr = start + first * PAGE_SIZE
                    data = os.pread(mem, len(chunk) * PAGE_SIZE, addr)
                    for j, i in enumerate(chunk):
                        page = data[j * PAGE_SIZE:(j + 1) * PAGE_SIZE]
                        out[start + int(i) * PAGE_SIZE] = Page(
                            digest(page), int(entries[i]) & PFN_MASK, page == ZERO_PAGE, page)
    finally:
        os.close(pm)
        os.close(mem)
    return out


def observe(pids) -> dict[int, dict[int, Page]]:
    """Present pages of the mergeable VMAs of every pid."""
    return {pid: read_pages(pid, [(s, e) for s, e, _ in mergeable_vmas(pid)]) for pid in pids}


def counts(obs: dict[int, dict[int, Page]]) -> dict:
    """pages_total, distinct, duplicate_pages, zero_pages and sorted multiplicities."""
    pages = [p for per_pid in obs.values() for p in per_pid.values()]
    by_hash = Counter(p.hash for p in pages)
    return {"pages_total": len(pages), "distinct": len(by_hash),
            "duplicate_pages": len(pages) - len(by_hash),
            "zero_pages": sum(p.zero for p in pages),
            "multiplicities": sorted(by_hash.values())}


def expected_counts(layout: dict) -> dict:
    mult = []
    for key, count in layout["contents"]:
        mult += [1] * count if key == "u" else [count]
    return {k: layout[k] for k in ("pages_total", "distinct", "duplicate_pages", "zero_pages")} \
        | {"multiplicities": sorted(mult)}


def assert_counts(obs, layout) -> None:
    assert counts(obs) == expected_counts(layout)


def expected_pages(run, t) -> dict[int, dict[int, bytes]]:
    """pid -> address -> expected page hash, from the model at offset ``t``."""
    seed = run.workload.params.seed
    regions = run.regions()
    out: dict[int, dict[int, bytes]] = {}
    for proc, regs in run.memory(t).items():
        pid = run.proc_pid[proc]
        starts = {r["region"]: r["start"] for r in regions[pid]}
        exp = out.setdefault(pid, {})
        for region, cells in regs.items():
            data = render(seed, cells)
            for i in range(len(cells)):
                exp[starts[region] + i * PAGE_SIZE] = digest(data[i])
    return out


def assert_model(run, t, obs) -> None:
    """Every present mergeable page is exactly where the model puts it, with its content."""
    expected = expected_pages(run, t)
    assert sorted(obs) == sorted(expected)
    for pid, exp in expected.items():
        got = obs[pid]
        assert set(got) == set(exp), f"pid {pid}: present pages differ from the model"
        wrong = sum(got[a].hash != h for a, h in exp.items())
        assert wrong == 0, f"pid {pid}: {wrong} pages differ from the model at t={t}"


def base_time(run) -> float:
    """The latest READY of the top-level workers: offsets are safe relative to it."""
    return max(run.t0[p.pid] for p in run._popen)


def at(run, t: float) -> None:
    delay = base_time(run) + t - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def next_step(run, t: float) -> float:
    """Offset of the model's first step after ``t`` (inf if none)."""
    return min((e.t for e in run.events() if e.t > t + 1e-9), default=float("inf"))


class frozen:
    """SIGSTOP ``pids`` for the block (SIGCONT after, whatever happens).  On a busy host reading
    the pages can take long enough for a worker to perform its next step midway, and the
    observation would mix two states of the model; frozen, the worker performs it after, late, as
    a starved worker would anyway."""

    def __init__(self, pids) -> None:
        self.pids = list(pids)

    def __enter__(self) -> "frozen":
        from tests._capture_util import proc_state, wait_until

        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                pass
        assert wait_until(lambda: all(proc_state(p) in ("T", "t", None, "Z") for p in self.pids), 10)
        return self

    def __exit__(self, *exc) -> None:
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


def check_and_count(run, t):
    """Observe at offset ``t`` (the workers frozen while their pages are read): model match,
    counts match ``layout(t)``; returns the observation."""
    at(run, t)
    with frozen(run.pids_now()):
        # the worker that became ready first is the furthest on: none may have reached its next step
        first = min(run.t0[p.pid] for p in run._popen)
        now = time.monotonic() - first
        nxt = next_step(run, t)
        assert now < nxt, (f"test or workers too slow on this host: frozen at t={now:.3f} (workers ready "
                           f"{1e3 * (base_time(run) - first):.0f} ms apart), after the step at {nxt:.3f} "
                           f"(observing t={t})")
        obs = observe(run.pids_now())
    assert_model(run, t, obs)
    assert_counts(obs, run.layout(t))
    return obs


# --- fixtures ----------------------------------------------------------------------------------

@pytest.fixture
def start():
    """start(name, **params) -> WorkloadRun; every run is stopped and checked gone."""
    runs = []

    def _start(name, **params):
        run = get_workload(name, **params).start(timeout=30)
        runs.append(run)
        return run

    yield _start
    for run in runs:
        pids = run.pids + run.pids_now()
        t = time.monotonic()
        run.stop()
        assert time.monotonic() - t < 5.0
        assert not [p for p in pids if is_running(p)], "workload processes left behind"


@pytest.fixture(scope="module", autouse=True)
def no_leftovers():
    yield
    left = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        # only this test run's (its interpreter): other test runs on the host have their own
        if b"ksmtrace.lab.workloads." in cmd and cmd.startswith(sys.executable.encode()) and is_running(int(name)):
            left.append(int(name))
    assert not left, f"workload processes still running: {left}"


# --- parameters, registry, model (no processes) -------------------------------------------------

def test_registry_and_params_help():
    assert set(WORKLOADS) == {"static", "rewrite", "samewrite", "zero", "forkdiverge", "churn"}
    for name, cls in WORKLOADS.items():
        assert cls.__doc__ and len(cls.__doc__) > 80
        assert dataclasses.is_dataclass(cls.Params)
        for entry in cls.describe_params():
            assert entry["help"], f"{name}.{entry['name']} has no help"
        wl = get_workload(name)
        with pytest.raises(dataclasses.FrozenInstanceError):
            wl.params.seed = 1
        # default sizes: 16-64 MiB of workload memory
        mib = wl.layout()["pages_total"] * PAGE_SIZE / 2**20
        assert 16 <= mib <= 64, (name, mib)


def test_params_errors_and_coercion():
    with pytest.raises(WorkloadError, match="unknown workload 'nope'"):
        get_workload("nope")
    with pytest.raises(WorkloadError, match="unknown parameter 'pagez'"):
        get_workload("static", pagez=3)
    with pytest.raises(WorkloadError, match="dup_fraction"):
        get_workload("static", dup_fraction=1.5)
    with pytest.raises(WorkloadError, match="must not exceed 1"):
        get_workload("static", dup_fraction=0.6, zero_fraction=0.6)
    with pytest.raises(WorkloadError, match="pages=.* must be an int"):
        get_workload("static", pages="many")
    with pytest.raises(WorkloadError, match="period"):
        get_workload("rewrite", period=0)
    with pytest.raises(WorkloadError, match="fork_delay"):
        get_workload("forkdiverge", fork_delay=-1)
    wl = get_workload("static", pages="128", duration="none", thp="false", dup_fraction="0.25")
    assert (wl.params.pages, wl.params.duration, wl.params.thp, wl.params.dup_fraction) == \
        (128, None, False, 0.25)
    for exc in (lambda: KnownLayout(dup=4, templates=4), lambda: KnownLayout(bogus=1)):
        with pytest.raises(WorkloadError):
            exc()


def test_template_formula_and_layout_arithmetic():
    for k in (0, 5):
        ref = np.random.default_rng([9, 1, k]).integers(0, 256, 4096, dtype=np.uint8)
        assert np.array_equal(template_page(9, k), ref)
    wl = get_workload("static", processes=3, pages=100, dup_fraction=0.5, zero_fraction=0.2,
                      templates=10)
    lay = wl.layout()
    contents = dict(lay["contents"])
    assert lay["pages_total"] == 300
    assert contents["zero"] == 60 and contents["u"] == 90
    assert all(contents[f"t{k}"] == 15 for k in range(10))
    assert lay["distinct"] == 1 + 10 + 90 and lay["duplicate_pages"] == 300 - 101
    # pure: same parameters, same memory and events; another seed, another placement
    again = get_workload("static", processes=3, pages=100, dup_fraction=0.5,
                         zero_fraction=0.2, templates=10)
    assert all(np.array_equal(wl.memory()[p][0], again.memory()[p][0]) for p in range(3))
    other = get_workload("static", processes=3, pages=100, dup_fraction=0.5,
                         zero_fraction=0.2, templates=10, seed=1)
    assert not np.array_equal(wl.memory()[0][0], other.memory()[0][0])
    ev = get_workload("rewrite", processes=2, pages=200, period=1.5)
    assert ev.events(until=4.5) == ev.events(until=4.5)
    assert [e.t for e in ev.events(until=4.5)] == [1.5, 1.5, 3.0, 3.0, 4.5, 4.5]
    assert get_workload("static").events() == []
    assert len(get_workload("rewrite", duration=5.0, period=2.0).events()) == 3 * 2


def test_forkdiverge_schedule():
    wl = get_workload("forkdiverge", pages=100, children=2, fork_delay=1.0, period=0.5,
                      diverge_step=10, reconverge_after=2.0)
    events = wl.events(until=10)
    forks = [e for e in events if "fork" in e.description]
    assert [e.t for e in forks] == [1.0, 1.0] and all(e.pages == 100 for e in forks)
    diverge = [e for e in events if "diverge" in e.description and "reconverge" not in
               e.description]
    assert sorted({e.t for e in diverge}) == [1.5, 2.0, 2.5]
    assert [e.t for e in events] == sorted(e.t for e in events)
    lay = wl.layout(2.6)  # 30 pages diverged in each child
    assert [p["proc"] for p in lay["processes"]] == [0, 1, 2]
    parent_distinct = wl.layout()["distinct"]
    assert lay["distinct"] == parent_distinct + 2 * 30
    done = wl.layout(10)
    assert done["distinct"] == parent_distinct and done["pages_total"] == 300


# --- live workloads ------------------------------------------------------------------------------

def test_static(start):
    run = start("static", processes=3, pages=300, dup_fraction=0.5, zero_fraction=0.1,
                templates=8, seed=7)
    assert len(run.pids) == 3 and run.pids_now() == sorted(run.pids)
    assert run.ready_time >= max(run.t0.values())
    lay = run.layout()
    assert lay["pages_total"] == 900
    for pid in run.pids:
        vmas = mergeable_vmas(pid)
        assert vmas and all("nh" in flags for _, _, flags in vmas)
    obs = observe(run.pids)
    assert all(len(obs[pid]) == 300 for pid in run.pids)
    assert_model(run, None, obs)
    assert_counts(obs, lay)
    by_hash = Counter(p.hash for per in obs.values() for p in per.values())
    contents = dict(lay["contents"])
    for k in range(8):
        assert by_hash[digest(template_page(7, k))] == contents[f"t{k}"]
    assert by_hash[digest(ZERO_PAGE)] == contents["zero"] == 90
    # per-process layout carries pids and addresses
    for entry in lay["processes"]:
        assert entry["pid"] in run.pids and entry["regions"][0]["start"]
    time.sleep(0.3)
    assert_model(run, None, observe(run.pids))  # static stays static


def test_rewrite(start):
    run = start("rewrite", processes=2, pages=256, dup_fraction=0.5, templates=8,
                period=0.7, rewrite_fraction=0.25, seed=3)
    obs0 = check_and_count(run, 0.35)
    obs1 = check_and_count(run, 1.05)
    obs2 = check_and_count(run, 1.75)
    mem = {t: run.memory(t) for t in (0.35, 1.05, 1.75)}
    for pid in run.pids:
        proc = next(p for p, q in run.proc_pid.items() if q == pid)
        for before, after, t0, t1 in ((obs0, obs1, 0.35, 1.05), (obs1, obs2, 1.05, 1.75)):
            changed = sum(before[pid][a].hash != after[pid][a].hash for a in before[pid])
            model = int(np.any(mem[t0][proc][0] != mem[t1][proc][0], axis=1).sum())
            assert changed == model > 0
    # rewritten count is constant: 25% of 128 template pages -> 32 per process
    assert dict(run.layout(1.05)["contents"])["u"] == dict(run.layout(1.75)["contents"])["u"] \
        == 2 * (128 + 32)
    assert len(run.log) >= 4 and all(e["proc"] in (0, 1) for e in run.log)


def test_zero(start):
    run = start("zero", processes=2, pages=256, zero_fraction=0.7, dup_fraction=0.1,
                templates=4, rezero_period=0.8, rezero_pages=16)
    obs0 = check_and_count(run, 0.4)
    assert counts(obs0)["zero_pages"] == 2 * 179
    obs1 = check_and_count(run, 1.0)
    assert counts(obs1)["zero_pages"] == 2 * (179 - 16)
    dirty = [p for pid in run.pids for a, p in obs1[pid].items()
             if obs0[pid][a].zero and not p.zero]
    assert len(dirty) == 32
    assert all(not any(p.data[40:]) for p in dirty)  # only a few bytes were written
    obs2 = check_and_count(run, 1.4)
    assert counts(obs2) == counts(obs0)


@pytest.fixture
def ksm_stopped():
    """KSM held at run=0 (under the settings lock) for a test that compares frames: another test
    run's ksmd would merge this workload's mergeable pages and change them."""
    if not (IS_ROOT and os.path.isdir("/sys/kernel/mm/ksm")):
        yield
        return
    from ksmtrace.lab import kernelksm as K

    with K.ksm_settings(run=0):
        yield


def test_forkdiverge(start, ksm_stopped):
    run = start("forkdiverge", pages=256, dup_fraction=0.25, templates=8, children=2,
                fork_delay=0.5, period=0.5, diverge_step=32, reconverge_after=1.5)
    parent = run.pids[0]
    check_and_count(run, 0.25)
    assert run.pids_now() == [parent]
    obs = check_and_count(run, 0.75)
    assert run.wait_for(lambda r: len(r.pids) == 3, timeout=2)
    children = run.pids[1:]
    assert sorted(run.pids_now()) == sorted([parent, *children])
    assert all(is_running(c) for c in children)
    if IS_ROOT:  # fresh fork: every page shares the parent's frame
        for c in children:
            assert all(obs[c][a].pfn == obs[parent][a].pfn for a in obs[parent])
    expected_diff = {1.25: 32, 1.75: 64, 2.25: 32, 2.75: 0}
    for t, n in expected_diff.items():
        obs = check_and_count(run, t)
        for c in children:
            differ = sum(obs[c][a].hash != obs[parent][a].hash for a in obs[parent])
            assert differ == n, (t, c)
            if IS_ROOT:
                private = sum(obs[c][a].pfn != obs[parent][a].pfn for a in obs[parent])
                assert private == 64 if t >= 1.75 else private == 32
    # after reconverging: same content as the parent, in private frames
    assert run.layout(2.75)["distinct"] == run.layout()["distinct"]


def test_churn(start):
    run = start("churn", processes=2, region_pages=64, regions=3, lifetime=1.2,
                dup_fraction=0.5, zero_fraction=0.1, templates=8)
    obs0 = check_and_count(run, 0.2)
    assert all(len(obs0[pid]) == 3 * 64 for pid in run.pids)
    obs1 = check_and_count(run, 1.0)  # regions 0 and 1 replaced by 3 and 4
    for pid in run.pids:
        assert len(obs1[pid]) == 3 * 64
        assert sorted(r["region"] for r in run.regions()[pid]) == [2, 3, 4]
        assert Counter(p.hash for p in obs0[pid].values()) != \
            Counter(p.hash for p in obs1[pid].values())
    unmapped = [r["region"] for e in run.log for r in e.get("unmapped", [])]
    assert sorted(unmapped) == [0, 0, 1, 1]


# --- the worker process ------------------------------------------------------------------------

def _worker_cmd(spec) -> list[str]:
    return [sys.executable, "-m", "ksmtrace.lab.workloads.worker", json.dumps(spec)]


def test_worker_ready_line_and_duration():
    spec = {"workload": "static", "params": {"processes": 1, "pages": 64, "duration": 0.4}}
    t = time.monotonic()
    p = subprocess.Popen(_worker_cmd(spec), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err
    lines = out.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("READY ")
    ready = json.loads(lines[0][6:])
    assert ready["pid"] == p.pid and ready["regions"][0]["pages"] == 64
    assert time.monotonic() - t < 10


def test_worker_bad_spec():
    for spec in ({"workload": "static", "params": {"pages": -1}},
                 {"workload": "static", "bogus": 1}):
        r = subprocess.run(_worker_cmd(spec), capture_output=True, timeout=20)
        assert r.returncode == 2
        assert len(r.stderr.decode().strip().splitlines()) == 1


def test_workers_die_with_their_parent():
    """A parent killed by SIGKILL leaves nothing behind: workers and forked children go."""
    code = ("import time; from ksmtrace.lab.workloads import get_workload\n"
            "r = get_workload('forkdiverge', pages=64, children=2, fork_delay=0.05)"
            ".start()\n"
            "r.wait_for(lambda r: len(r.pids) == 3, timeout=10)\n"
            "print(' '.join(map(str, r.pids)), flush=True)\n"
            "time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    pids = []
    try:
        pids = [int(x) for x in parent.stdout.readline().split()]
        assert len(pids) == 3 and all(is_running(p) for p in pids)
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()
    deadline = time.monotonic() + 5
    while any(is_running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not [p for p in pids if is_running(p)]


# --- the known-layout helper -------------------------------------------------------------------

def _region_pages(obs_pid: dict[int, Page], region: dict) -> list[Page]:
    return [obs_pid.get(region["start"] + i * PAGE_SIZE) for i in range(region["pages"])]


def test_known_layout():
    kl = KnownLayout(unique=64, dup=48, templates=6, zero=32, rewrite=16, unmap=16, seed=5,
                     peer=True)
    with kl:
        main, peer = kl.pid, kl.peer_pid
        assert kl.pids_now() == sorted([main, peer])
        lay = kl.layout()
        regions = {r["name"]: r for r in lay["regions"]}
        assert list(regions) == ["A", "B", "C", "R", "X"]
        assert [r["name"] for r in lay["peer"]["regions"]] == ["B"]
        obs = observe([main, peer])
        assert len(obs[main]) == 64 + 48 + 32 + 16 + 16 and len(obs[peer]) == 48
        assert_counts(obs, kl.expected())
        a = _region_pages(obs[main], regions["A"])
        assert len({p.hash for p in a}) == 64 and not any(p.zero for p in a)
        for i, p in enumerate(_region_pages(obs[main], regions["B"])):
            assert p.hash == digest(template_page(5, i % 6))
        peer_b = _region_pages(obs[peer], lay["peer"]["regions"][0])
        assert [p.hash for p in peer_b] == \
            [p.hash for p in _region_pages(obs[main], regions["B"])]
        assert all(p.zero for p in _region_pages(obs[main], regions["C"]))

        before_r = [p.hash for p in _region_pages(obs[main], regions["R"])]
        assert kl.rewrite()["generation"] == 1
        obs = observe([main, peer])
        after_r = [p.hash for p in _region_pages(obs[main], regions["R"])]
        assert all(x != y for x, y in zip(before_r, after_r))
        assert_counts(obs, kl.expected())

        x = regions["X"]
        assert kl.unmap()["unmapped"]["start"] == x["start"]
        assert not any(s < x["start"] + x["pages"] * PAGE_SIZE and x["start"] < e
                       for s, e, _ in mergeable_vmas(main))
        obs = observe([main, peer])
        assert len(obs[main]) == 64 + 48 + 32 + 16
        assert_counts(obs, kl.expected())
        with pytest.raises(WorkloadError, match="already unmapped"):
            kl.unmap()

        child = kl.fork()
        assert is_running(child) and kl.pids_now() == sorted([main, peer, child])
        assert kl.layout()["child"]["pid"] == child
        obs = observe([main, peer, child])
        assert set(obs[child]) == set(obs[main])
        assert all(obs[child][a].hash == p.hash for a, p in obs[main].items())
        if IS_ROOT:
            assert all(obs[child][a].pfn == p.pfn for a, p in obs[main].items())
        assert_counts(obs, kl.expected())
        with pytest.raises(WorkloadError, match="already forked"):
            kl.fork()

        assert kl.write_child(10)["pages"] == 10
        obs = observe([main, peer, child])
        a_addrs = [regions["A"]["start"] + i * PAGE_SIZE for i in range(64)]
        differ = [obs[child][a].hash != obs[main][a].hash for a in a_addrs]
        assert differ == [True] * 10 + [False] * 54
        if IS_ROOT:
            assert [obs[child][a].pfn != obs[main][a].pfn for a in a_addrs] == differ
        assert_counts(obs, kl.expected())
        exp = kl.expected()
        assert exp["pages_total"] == 2 * (64 + 48 + 32 + 16) + 48

        with pytest.raises(WorkloadError, match="write-child needs"):
            kl.write_child(0)
        with pytest.raises(WorkloadError, match="peer mode"):
            kl.command("rewrite", peer=True)
        with pytest.raises(WorkloadError, match="unknown command"):
            kl.command("frobnicate")

        assert kl.quit() == {"ok": True, "cmd": "quit"}
        deadline = time.monotonic() + 5
        while kl.pids_now() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert kl.pids_now() == []
    assert not any(is_running(p) for p in (main, peer, child))


def test_known_layout_stop_without_quit():
    with KnownLayout(unique=8, dup=8, templates=2, zero=4, rewrite=4, unmap=4) as kl:
        child = kl.fork()
        pids = [kl.pid, child]
    assert not any(is_running(p) for p in pids)
