"""Sweeps: grid syntax, run-id prediction, the table, resume after deletion / interruption / kill
(same table as an uninterrupted sweep), the Pareto front, and the CLI end to end."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

import ksmtrace.sweep as S
from ksmtrace.cli import cli
from ksmtrace.errors import KsmtraceError, PolicyNotFoundError, PolicyParamError
from ksmtrace.replay import replay
from ksmtrace.sweep import (SweepError, expand_grid, expand_values, pareto_front, parse_grid, plan_sweep,
                            read_sweep_table, sweep)
from ksmtrace.testing.scenarios import library_trace

GRID = {"pages_to_scan": [5, 20, 100], "sleep_millisecs": [20, 200]}


def _results(out: Path) -> list[Path]:
    """The result files in a sweep directory (not its manifest, sweep.json)."""
    return [p for p in out.glob("*.json") if p.name != S.MANIFEST_NAME]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("KSMTRACE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "prep-cache"))


@pytest.fixture(scope="module")
def trace_path(tmp_path_factory):
    p = tmp_path_factory.mktemp("sweeptrace") / "trace"
    library_trace(p)
    return p


@pytest.fixture(scope="module")
def reference(trace_path, tmp_path_factory):
    """One uninterrupted, in-process sweep: the table every other way of running must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    mp = pytest.MonkeyPatch()
    mp.setenv("KSMTRACE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "prep-cache"))
    df = sweep(trace_path, "ksm", GRID, out, workers=1)
    mp.undo()
    return df, out


# --- grid syntax ---------------------------------------------------------------------------------
def test_value_lists_and_ranges():
    assert expand_values("k", "1,2,3") == ["1", "2", "3"]
    assert expand_values("k", "100:1000:x2") == ["100", "200", "400", "800"]
    assert expand_values("k", "100:800:x2") == ["100", "200", "400", "800"]
    assert expand_values("k", "0:6:2") == ["0", "2", "4", "6"]
    assert expand_values("k", "0:3") == ["0", "1", "2", "3"]
    assert expand_values("k", "5:1:-2") == ["5", "3", "1"]
    assert expand_values("k", "10, 100:300:100") == ["10", "100", "200", "300"]
    assert expand_values("k", "0.5:1.5:0.5") == ["0.5", "1.0", "1.5"]
    assert expand_values("k", "1:4:x1.5") == ["1.0", "1.5", "2.25", "3.375"]
    assert expand_values("k", "restart,keep") == ["restart", "keep"]
    assert expand_values("k", "6.11") == ["6.11"]


@pytest.mark.parametrize("text", ["", "1,,2", "1:5:0", "5:1:1", "1:10:x1", "0:10:x2", "a:b", "1:2:3:4"])
def test_bad_value_lists(text):
    with pytest.raises(SweepError):
        expand_values("k", text)


def test_parse_and_expand_grid():
    grid = parse_grid(["pages_to_scan=100:400:x2", "sleep-millisecs=20,200"])
    assert grid == {"pages_to_scan": ["100", "200", "400"], "sleep_millisecs": ["20", "200"]}
    points = expand_grid(grid)
    assert len(points) == 6
    assert points[0] == {"pages_to_scan": "100", "sleep_millisecs": "20"}
    assert points[1] == {"pages_to_scan": "100", "sleep_millisecs": "200"}  # the last key varies fastest
    assert expand_grid({"a": "1:3", "b": np.array([7])}) == [{"a": "1", "b": 7}, {"a": "2", "b": 7}, {"a": "3", "b": 7}]
    for bad in (["pages_to_scan"], ["=1"], ["a=1", "a=2"], ["a="]):
        with pytest.raises(SweepError):
            parse_grid(bad)


def test_plan_checks_parameters(trace_path, tmp_path):
    with pytest.raises(PolicyParamError, match="unknown parameter 'pages'"):
        plan_sweep(trace_path, "ksm", {"pages": [1]}, tmp_path)
    with pytest.raises(PolicyParamError, match="sweep point pages_to_scan=abc"):
        plan_sweep(trace_path, "ksm", {"pages_to_scan": ["100", "abc"]}, tmp_path)
    with pytest.raises(PolicyParamError, match="must be one of"):
        plan_sweep(trace_path, "ksm", {"profile": ["9.99"]}, tmp_path)
    with pytest.raises(PolicyNotFoundError):
        plan_sweep(trace_path, "no-such-policy", {"x": [1]}, tmp_path)
    with pytest.raises(SweepError, match="empty grid"):
        plan_sweep(trace_path, "ksm", {}, tmp_path)


def test_predicted_run_ids_match_replay(trace_path, tmp_path):
    from ksmtrace.trace.reader import open_trace

    tr = open_trace(trace_path)
    cases = [("ksm", {"pages_to_scan": "20"}, {}),
             ("ksm", {"smart_scan": "0", "profile": "3.18"}, {"scope": "anon", "seed": 3, "start_s": 0.5}),
             ("ksm", {"sleep_millisecs": 50}, {"engine": "reference"})]
    for policy, params, opts in cases:
        plan = plan_sweep(trace_path, policy, {k: [v] for k, v in params.items()}, tmp_path, **opts)
        res = replay(tr, policy, params, **opts)
        assert plan.runs[0].run_id == res.run_id
    # a policy without the swept parameter: the oracle has none of ksm's
    with pytest.raises(PolicyParamError):
        plan_sweep(trace_path, "oracle", {"pages_to_scan": [1]}, tmp_path)


# --- running and the table -----------------------------------------------------------------------
def test_sweep_table(reference, trace_path):
    df, out = reference
    assert df.height == 6
    assert df.columns[:6] == ["policy", "pages_to_scan", "sleep_millisecs", "scope", "engine", "run_id"]
    assert set(S.METRICS) <= set(df.columns)
    assert df.schema["pages_to_scan"] == pl.Int64 and df.schema["cpu_seconds"] == pl.Float64
    assert df.select("pages_to_scan", "sleep_millisecs").rows() == [(5, 20), (5, 200), (20, 20), (20, 200), (100, 20), (100, 200)]
    assert (out / "sweep.parquet").exists() and (out / "sweep.csv").exists()
    assert read_sweep_table(out).equals(df)
    assert pl.read_csv(out / "sweep.csv")["run_id"].to_list() == df["run_id"].to_list()
    for rid in df["run_id"]:
        assert (out / f"{rid}.json").exists() and (out / f"{rid}.parquet").exists()
    # one row against a direct replay
    from ksmtrace.trace.reader import open_trace

    r = replay(open_trace(trace_path), "ksm", {"pages_to_scan": 20, "sleep_millisecs": 200})
    row = df.filter((pl.col("pages_to_scan") == 20) & (pl.col("sleep_millisecs") == 200)).row(0, named=True)
    s = r.summary
    assert row["run_id"] == r.run_id
    assert row["frames_saved_mean"] == pytest.approx(s["frames_saved_mean"])
    assert row["frames_saved_final"] == s["frames_saved_final"]
    assert row["pct_of_oracle"] == pytest.approx(100 * s["fraction_of_oracle_mean"])
    assert row["cow_breaks"] == s["cow_breaks"] and row["merges"] == s["merges"]
    assert row["cpu_seconds"] == pytest.approx(r.cpu_seconds())
    assert row["merge_latency_p50_s"] == pytest.approx(s["merge_latency_p50_s"])
    assert row["exposed_merges"] == s["exposed_merges"]
    assert df["cow_breaks"].sum() > 0 and df["frames_saved_mean"].n_unique() > 1  # the grid matters


def test_resume_after_deleting_results(reference, trace_path, tmp_path, monkeypatch):
    ref, ref_dir = reference
    out = tmp_path / "s"
    sweep(trace_path, "ksm", GRID, out, workers=1)
    victims = ref["run_id"].to_list()[1::3]
    for rid in victims:
        (out / f"{rid}.json").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*.json")}
    plan = plan_sweep(trace_path, "ksm", GRID, out)
    assert [r.run_id for r in plan.todo] == victims
    calls = []
    real = S._run_one
    monkeypatch.setattr(S, "_run_one", lambda task: calls.append(task["run_id"]) or real(task))
    df = sweep(trace_path, "ksm", GRID, out, workers=1)
    assert calls == victims
    assert df.equals(ref)
    assert (out / "sweep.csv").read_bytes() == (ref_dir / "sweep.csv").read_bytes()
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.json") if p.name in kept} == kept
    calls.clear()
    assert sweep(trace_path, "ksm", GRID, out, workers=1).equals(ref)  # nothing left to do
    assert calls == []


def test_resume_after_interrupt_and_partial_files(reference, trace_path, tmp_path):
    ref, _ = reference
    out = tmp_path / "s"

    def interrupt_after_two(done, total, msg):
        if done >= 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sweep(trace_path, "ksm", GRID, out, workers=1, progress=interrupt_after_two)
    assert len(_results(out)) == 2
    assert not (out / "sweep.parquet").exists()
    # a run killed while writing leaves a temporary file and a table without its JSON
    plan = plan_sweep(trace_path, "ksm", GRID, out)
    victim = plan.todo[0].run_id
    (out / f".{victim}.parquet.tmp").write_bytes(b"partial")
    (out / f"{victim}.parquet").write_bytes(b"not parquet")
    assert len(plan.todo) == 4
    df = sweep(trace_path, "ksm", GRID, out, workers=1)
    assert df.equals(ref)
    assert not list(out.glob(".*tmp*"))


def test_parallel_workers_give_the_same_table(reference, trace_path, tmp_path):
    ref, _ = reference
    seen = []
    df = sweep(trace_path, "ksm", GRID, tmp_path / "p", workers=2, progress=lambda d, t, m: seen.append((d, t)))
    assert df.equals(ref)
    assert seen[0] == (0, 6) and seen[-1] == (6, 6)


def test_sweep_reports_failed_runs(trace_path, tmp_path, monkeypatch):
    real = S._run_one

    def flaky(task):
        if task["params"]["pages_to_scan"] == 20:
            raise KsmtraceError("simulated failure")
        return real(task)

    monkeypatch.setattr(S, "_run_one", flaky)
    with pytest.raises(SweepError, match=r"2 of 6 runs failed \(first: pages_to_scan=20 sleep_millisecs=20: simulated failure\)"):
        sweep(trace_path, "ksm", GRID, tmp_path / "f", workers=1)
    assert len(_results(tmp_path / "f")) == 4


# --- Pareto ----------------------------------------------------------------------------------------
def test_pareto_front():
    df = pl.DataFrame({
        "name": ["a", "b", "c", "d", "e", "f"],
        "frames_saved_mean": [10.0, 8.0, 10.0, 5.0, 10.0, None],
        "cpu_seconds": [1.0, 0.5, 2.0, 0.5, 1.0, 0.0],
        "cow_breaks": [5, 5, 5, 6, 5, 0],
    })
    # c is beaten by a (same saving, more CPU); d by b; e equals a (both kept); f saves nothing known
    # but costs nothing, so nothing dominates it.
    assert pareto_front(df)["name"].to_list() == ["a", "b", "e", "f"]
    assert pareto_front(df, maximize=["frames_saved_mean"], minimize=["cpu_seconds"])["name"].to_list() == ["a", "b", "e", "f"]
    assert pareto_front(df, minimize=["cow_breaks"], maximize=[])["name"].to_list() == ["f"]
    with pytest.raises(SweepError, match="no column"):
        pareto_front(df, maximize=["nope"])
    assert pareto_front(df.head(0)).height == 0


def test_pareto_of_a_sweep(reference):
    ref, _ = reference
    front = pareto_front(ref)
    assert 1 <= front.height <= ref.height
    rest = ref.join(front.select("run_id"), on="run_id", how="anti")
    for r in rest.iter_rows(named=True):  # every excluded run is dominated by a front run
        assert any(f["frames_saved_mean"] >= r["frames_saved_mean"] and f["cpu_seconds"] <= r["cpu_seconds"]
                   and f["cow_breaks"] <= r["cow_breaks"] for f in front.iter_rows(named=True))


# --- CLI -------------------------------------------------------------------------------------------
def test_cli_sweep_end_to_end(reference, trace_path, tmp_path):
    ref, _ = reference
    runner = CliRunner()
    out = tmp_path / "c"
    args = ["sweep", str(trace_path), "--policy", "ksm", "-p", "pages_to_scan=5,20,100", "-p", "sleep_millisecs=20,200",
            "-o", str(out), "-j", "1"]
    res = runner.invoke(cli, args + ["--json", "--pareto"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert [r["run_id"] for r in info["rows"]] == ref["run_id"].to_list()
    assert [r["run_id"] for r in info["pareto"]] == pareto_front(ref)["run_id"].to_list()
    assert info["grid"] == {"pages_to_scan": ["5", "20", "100"], "sleep_millisecs": ["20", "200"]}
    assert pl.read_parquet(out / "sweep.parquet").equals(ref)
    # text output, resumed (nothing to do)
    res = runner.invoke(cli, args + ["--pareto"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0].split()[:4] == ["pages_to_scan", "sleep_millisecs", "saved(mean)", "%oracle"]
    assert any(line.startswith("non-dominated runs") for line in lines)
    assert "6 already in" in res.stderr and "0 to run" in res.stderr
    # dry run
    res = runner.invoke(cli, ["sweep", str(trace_path), "-P", "ksm", "-p", "pages_to_scan=5,20,100,400", "-o", str(out),
                              "--dry-run", "--json", "-p", "sleep_millisecs=20"])
    assert res.exit_code == 0, res.output
    dry = json.loads(res.stdout)
    assert [r["status"] for r in dry["runs"]] == ["done", "done", "done", "to run"] and dry["to_run"] == 1
    assert not any(p.name.startswith(dry["runs"][3]["run_id"]) for p in out.iterdir())


def test_cli_sweep_help_and_errors(trace_path, tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli, ["sweep", "--help"])
    assert res.exit_code == 0 and "Example:" in res.output
    cases = [
        ["-P", "ksm", "-p", "pages_to_scan=1:5:0"],
        ["-P", "ksm", "-p", "pages_to_scan"],
        ["-P", "ksm", "-p", "bogus=1,2"],
        ["-P", "ksm", "-p", "pages_to_scan=x,y"],
        ["-P", "nope", "-p", "a=1"],
        ["-P", "ksm"],
    ]
    for extra in cases:
        res = runner.invoke(cli, ["sweep", str(trace_path), "-o", str(tmp_path / "e")] + extra)
        assert res.exit_code != 0, extra
        err = res.stderr.strip()
        assert err.startswith("ksmtrace: error:") and len(err.splitlines()) == 1, err
    res = runner.invoke(cli, ["sweep", str(tmp_path / "no-trace"), "-P", "ksm", "-p", "pages_to_scan=1", "-o", str(tmp_path / "e")])
    assert res.exit_code != 0 and res.stderr.startswith("ksmtrace: error:")
    assert not (tmp_path / "e").exists()


# --- a real interruption: a CLI sweep in its own process, signalled mid-way ----------------------------
def _run_until_some_results(cmd, out: Path, sig, env, min_done=1, timeout=60.0):
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout and proc.poll() is None:
        if out.exists() and len(_results(out)) >= min_done:
            break
        time.sleep(0.02)
    if proc.poll() is None:
        proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=timeout)
    return proc.returncode, stdout, stderr


@pytest.mark.parametrize("sig,workers", [(signal.SIGINT, "2"), (signal.SIGKILL, "1")])
def test_cli_sweep_interrupted_then_resumed(tmp_path, sig, workers):
    trace = tmp_path / "trace"
    library_trace(trace, n=10, pages=64)
    grid = ["-p", "pages_to_scan=5,10,20,40,80,160", "-p", "sleep_millisecs=20,100"]
    env = dict(os.environ, KSMTRACE_CACHE_DIR=str(tmp_path / "cache"), KSMTRACE_PROGRESS="0")
    cmd = [sys.executable, "-m", "ksmtrace", "sweep", str(trace), "-P", "ksm", *grid, "-q", "-j", workers]
    out = tmp_path / "run"
    rc, _, stderr = _run_until_some_results(cmd + ["-o", str(out)], out, sig, env)
    done = len(_results(out))
    print(f"signal {sig!r}: exit {rc}, {done} of 12 results saved; stderr: {stderr.strip()[-200:]!r}")
    assert "Traceback" not in stderr
    if done < 12:  # interrupted before the end (the usual case): no table yet
        assert rc != 0 and not (out / "sweep.parquet").exists()
    resume = cmd[:-1] + ["1"]  # resuming needs no pool (test_parallel_workers_give_the_same_table covers one)
    rc2 = subprocess.run(resume + ["-o", str(out)], env=env, capture_output=True, text=True)
    assert rc2.returncode == 0, rc2.stderr
    # the reference: one uninterrupted sweep of the same grid
    ref = sweep(trace, "ksm", {"pages_to_scan": "5,10,20,40,80,160", "sleep_millisecs": "20,100"}, tmp_path / "ref", workers=1)
    assert (out / "sweep.csv").read_bytes() == (tmp_path / "ref" / "sweep.csv").read_bytes()
    assert pl.read_parquet(out / "sweep.parquet").equals(ref)


# --- sweeps that clean up and do not mix ------------------------------------------------------------
def _descendants(pid: int) -> set[int]:
    """Every living (non-zombie) process below ``pid``."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = open(f"/proc/{d}/stat").read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(d))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_sigkilled_sweep_leaves_no_worker(tmp_path):
    # runs of ~20 s each (the reference engine scanning every page 50 times a second), so that a
    # worker left alive would still be busy long after the parent is killed
    trace = tmp_path / "trace"
    library_trace(trace, n=200, pages=600)
    env = dict(os.environ, KSMTRACE_CACHE_DIR=str(tmp_path / "cache"), KSMTRACE_PROGRESS="0")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "ksmtrace", "sweep", str(trace), "-P", "ksm", "-p", "pages_to_scan=2000,2001,2002",
           "--engine", "reference", "-q", "-j", "2", "-o", str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    workers: set[int] = set()
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < 60 and proc.poll() is None:  # until both workers run
            workers = _descendants(proc.pid)
            if len(workers) >= 2:
                break
            time.sleep(0.05)
        time.sleep(3)  # the workers have imported ksmtrace and started their replays
        assert proc.poll() is None, "the sweep ended before it could be killed"
        workers = _descendants(proc.pid)
        assert len(workers) >= 2 and not _results(out)
        proc.kill()
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(p) for p in workers):
            time.sleep(0.05)
        survivors = [p for p in workers if _alive(p)]
    finally:
        for p in _descendants(proc.pid) | workers:  # never leave one behind, even when the test fails
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        proc.stderr.close()
    assert survivors == [], f"orphaned workers: {survivors}"


def test_sweep_directory_is_bound_to_its_trace_policy_and_settings(trace_path, reference, tmp_path):
    ref, ref_dir = reference
    manifest = S.read_sweep_manifest(ref_dir)
    assert manifest["binding"]["policy"] == "ksm" and manifest["binding"]["scope"] == "recorded"
    assert manifest["grid"] == {"pages_to_scan": [5, 20, 100], "sleep_millisecs": [20, 200]}
    other = tmp_path / "other"
    library_trace(other, n=6, pages=16)
    runner = CliRunner()
    base = ["-p", "pages_to_scan=5,20", "-o", str(ref_dir), "-j", "1", "-q"]
    cases = {
        "another trace": (["sweep", str(other), "-P", "ksm"] + base, "holds a sweep of another trace (trace, fingerprint"),
        "another policy": (["sweep", str(trace_path), "-P", "pksm"] + base, "policy 'ksm', this one has 'pksm'"),
        "another scope": (["sweep", str(trace_path), "-P", "ksm", "--scope", "anon"] + base, "scope 'recorded', this one has 'anon'"),
        "another seed": (["sweep", str(trace_path), "-P", "ksm", "--seed", "3"] + base, "seed 0, this one has 3"),
    }
    before = sorted(p.name for p in ref_dir.iterdir())
    for what, (args, msg) in cases.items():
        res = runner.invoke(cli, args)
        err = res.stderr.strip()
        assert res.exit_code != 0, what
        assert err.startswith("ksmtrace: error:") and len(err.splitlines()) == 1 and msg in err, (what, err)
    assert sorted(p.name for p in ref_dir.iterdir()) == before  # nothing written
    assert read_sweep_table(ref_dir).equals(ref)
    # growing the grid is one study: allowed, and recorded
    ext = tmp_path / "ext"
    sweep(trace_path, "ksm", {"pages_to_scan": [5, 20]}, ext, workers=1)
    sweep(trace_path, "ksm", {"pages_to_scan": [20, 400], "sleep_millisecs": [20]}, ext, workers=1)
    assert S.read_sweep_manifest(ext)["grid"] == {"pages_to_scan": [5, 20, 400], "sleep_millisecs": [20]}
    # a directory without a manifest (results of compare -o) is judged by its result files
    mixed = tmp_path / "mixed"
    res = runner.invoke(cli, ["compare", str(trace_path), "--policies", "oracle,ksm", "-o", str(mixed), "-q"])
    assert res.exit_code == 0, res.output
    with pytest.raises(SweepError, match="holds a sweep with policy 'oracle'"):
        sweep(trace_path, "ksm", {"pages_to_scan": [5]}, mixed, workers=1)


def test_concurrent_sweeps_into_one_directory_serialise(trace_path, reference, tmp_path):
    import fcntl

    ref, _ = reference
    out = tmp_path / "s"
    out.mkdir()
    env = dict(os.environ, KSMTRACE_CACHE_DIR=str(Path(os.environ["KSMTRACE_CACHE_DIR"])), KSMTRACE_PROGRESS="0")
    cmd = [sys.executable, "-m", "ksmtrace", "sweep", str(trace_path), "-P", "ksm", "-p", "pages_to_scan=5,20,100",
           "-p", "sleep_millisecs=20,200", "-j", "1", "-o", str(out)]
    lock = os.open(out / S.LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)  # another sweep holds the directory
    logs = [tmp_path / f"err{i}.txt" for i in range(2)]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w")) for log in logs]
    try:
        deadline = time.monotonic() + 120  # both reach the lock (however slow the start-up) and wait
        while time.monotonic() < deadline and not all("waiting for another sweep" in log.read_text() for log in logs):
            assert all(p.poll() is None for p in procs), "a sweep did not wait for the lock"
            time.sleep(0.1)
        time.sleep(1)
        assert all(p.poll() is None for p in procs), "a sweep did not wait for the lock"
        assert _results(out) == []
        fcntl.flock(lock, fcntl.LOCK_UN)
        for p in procs:
            p.wait(timeout=120)
        errs = [log.read_text() for log in logs]
    finally:
        os.close(lock)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], errs
    assert all("waiting for another sweep" in e for e in errs)
    # one of them ran all six runs; the other found them done
    assert sorted("6 already in" in e for e in errs) == [False, True], errs
    assert read_sweep_table(out).equals(ref)


def test_sweep_refuses_unsafe_output_directories(trace_path, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(SweepError, match=r"writable by group or others \(mode 0777"):
        sweep(trace_path, "ksm", {"pages_to_scan": [5]}, shared, workers=1)
    assert list(shared.iterdir()) == []
    if os.geteuid() == 0:
        theirs = tmp_path / "theirs"
        theirs.mkdir()
        os.chown(theirs, 65534, 65534)
        with pytest.raises(SweepError, match="owned by uid 65534, not by you"):
            sweep(trace_path, "ksm", {"pages_to_scan": [5]}, theirs, workers=1)
        assert list(theirs.iterdir()) == []
    res = CliRunner().invoke(cli, ["sweep", str(trace_path), "-P", "ksm", "-p", "pages_to_scan=5", "-o", str(shared)])
    assert res.exit_code != 0 and res.stderr.startswith("ksmtrace: error:") and len(res.stderr.splitlines()) == 1


def test_sweep_takes_the_write_mode_like_replay(tmp_path):
    """--writes reaches every run of a sweep: on a trace with recorded write faults the two modes
    give the numbers replay gives, under different run ids, and cannot share a sweep directory;
    a mode the policy cannot take is one line."""
    from ksmtrace import samples

    path = samples.sample_path("venv-copies")
    grid = {"pages_to_scan": [100, 400]}
    faults = S.sweep(path, "ksm", grid, tmp_path / "faults", workers=1, writes="faults")
    snaps = S.sweep(path, "ksm", grid, tmp_path / "snaps", workers=1, writes="snapshots")
    auto = S.sweep(path, "ksm", grid, tmp_path / "auto", workers=1)
    assert set(faults["run_id"]) == set(auto["run_id"]) and not set(faults["run_id"]) & set(snaps["run_id"])
    tr = samples.open_sample("venv-copies")
    for mode, table in (("faults", faults), ("snapshots", snaps)):
        direct = replay(tr, "ksm", {"pages_to_scan": 400}, writes=mode)
        row = table.filter(pl.col("pages_to_scan") == 400).row(0, named=True)
        assert row["cow_breaks"] == direct.summary["cow_breaks"]
        assert row["frames_saved_mean"] == pytest.approx(direct.summary["frames_saved_mean"])
    with pytest.raises(SweepError, match="writes"):
        S.sweep(path, "ksm", grid, tmp_path / "faults", workers=1, writes="snapshots")
    r = subprocess.run([sys.executable, "-m", "ksmtrace", "sweep", str(path), "-P", "pksm", "-p", "pages_to_scan=10,20",
                        "--writes", "faults", "-o", str(tmp_path / "pk")], capture_output=True, text=True)
    assert r.returncode == 1 and "use --writes snapshots" in r.stderr and len(r.stderr.strip().splitlines()) == 1
