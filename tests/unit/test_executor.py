"""Executors: local worker processes (own process group, die with the parent, a lost worker is an
error) and Dask distributed (a sweep and a comparison give the same table as on local workers)."""
from __future__ import annotations

import ctypes
import os
import signal

import pytest

from ksmtrace.errors import KsmtraceError
from ksmtrace.executor import (DaskExecutor, ExecutorError, LocalExecutor, WorkerLost, make_executor,
                               parse_executor)
from ksmtrace.testing.scenarios import library_trace

GRID = {"pages_to_scan": [5, 20, 100], "sleep_millisecs": [20, 200]}


# task functions: module level, so that spawned workers import them by reference
def square(x):
    return x * x


def fail_on_three(x):
    if x == 3:
        raise KsmtraceError("three is bad")
    return x


def who_am_i(_):
    libc = ctypes.CDLL(None, use_errno=True)
    sig = ctypes.c_int(0)
    libc.prctl(2, ctypes.byref(sig), 0, 0, 0)  # PR_GET_PDEATHSIG
    return {"pid": os.getpid(), "pgid": os.getpgid(0), "ppid": os.getppid(), "pdeathsig": sig.value}


def die(x):
    if x == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("KSMTRACE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "prep-cache"))


def test_parse_executor():
    assert parse_executor(None) == ("local", None)
    assert parse_executor("dask") == ("dask", None)
    assert parse_executor("dask://10.0.0.5:8786") == ("dask", "tcp://10.0.0.5:8786")
    assert parse_executor("tcp://sched:8786") == ("dask", "tcp://sched:8786")
    for bad in ("ray", "dask://nohost", "dask://:1", "dask://h:port"):
        with pytest.raises(ExecutorError):
            parse_executor(bad)


def test_local_in_process_and_pool():
    with LocalExecutor(1) as ex:
        got = sorted((d.index, d.value) for d in ex.run(square, [1, 2, 3]))
        assert got == [(0, 1), (1, 4), (2, 9)]
        assert ex.worker_pids() == []  # one worker: runs here
    with LocalExecutor(2) as ex:
        done = list(ex.run(fail_on_three, [1, 2, 3, 4, 5]))
        assert sorted(d.index for d in done) == [0, 1, 2, 3, 4]
        errs = [d for d in done if d.error is not None]
        assert len(errs) == 1 and errs[0].index == 2 and isinstance(errs[0].error, KsmtraceError)
        assert str(errs[0].error) == "three is bad"
        pids = ex.worker_pids()
        assert len(pids) == 2
    for pid in pids:  # close() stopped and reaped them
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"


def test_local_workers_own_process_group_and_die_with_parent():
    with LocalExecutor(2) as ex:
        infos = [d.value for d in ex.run(who_am_i, [0, 1, 2, 3])]
    me = os.getpid()
    for info in infos:
        assert info["ppid"] == me
        assert info["pgid"] == info["pid"] != os.getpgid(0)  # a Ctrl-C at the terminal does not reach it
        assert info["pdeathsig"] == signal.SIGKILL


def test_local_lost_worker_is_an_error():
    with LocalExecutor(2) as ex:
        with pytest.raises(WorkerLost, match=r"worker process died \(killed by signal 9"):
            list(ex.run(die, [0, 1, 2, 3]))


# --- Dask ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster():
    """A Dask LocalCluster (2 single-threaded worker processes), shut down on every path."""
    distributed = pytest.importorskip("distributed", reason="the test extra installs dask")
    import logging

    c = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                 silence_logs=logging.ERROR)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def trace_path(tmp_path_factory):
    p = tmp_path_factory.mktemp("dasktrace") / "trace"
    library_trace(p)
    return p


def test_dask_executor_runs_tasks(cluster):
    with make_executor(f"dask://{cluster.scheduler_address.split('://')[1]}") as ex:
        assert isinstance(ex, DaskExecutor) and ex.workers == 2
        done = list(ex.run(fail_on_three, [1, 2, 3, 4]))
    assert sorted(d.index for d in done) == [0, 1, 2, 3]
    assert [str(d.error) for d in done if d.error is not None] == ["three is bad"]
    assert sorted(d.value for d in done if d.error is None) == [1, 2, 4]


def test_dask_unreachable_scheduler_is_one_line():
    with pytest.raises(ExecutorError, match=r"dask: cannot start or reach tcp://127.0.0.1:9"):
        DaskExecutor("tcp://127.0.0.1:9", timeout_s=2)


def test_sweep_on_dask_gives_the_local_table(cluster, trace_path, tmp_path):
    from ksmtrace.replay import compare
    from ksmtrace.sweep import sweep
    from ksmtrace.trace.reader import open_trace

    local = sweep(trace_path, "ksm", GRID, tmp_path / "local", workers=1)
    on_cluster = sweep(trace_path, "ksm", GRID, tmp_path / "dask", executor=cluster.scheduler_address)
    assert on_cluster.equals(local)
    assert (tmp_path / "dask" / "sweep.csv").read_bytes() == (tmp_path / "local" / "sweep.csv").read_bytes()
    # resumable on the cluster: delete two results, only those run again, same table
    for rid in local["run_id"].to_list()[:2]:
        (tmp_path / "dask" / f"{rid}.json").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "dask").glob("*.parquet") if p.name != "sweep.parquet"}
    again = sweep(trace_path, "ksm", GRID, tmp_path / "dask", executor=cluster.scheduler_address)
    assert again.equals(local)
    changed = [n for n, t in kept.items() if (tmp_path / "dask" / n).stat().st_mtime_ns != t]
    assert sorted(changed) == sorted(f"{rid}{ext}" for rid in local["run_id"].to_list()[:2] for ext in (".parquet", ".procs.parquet"))
    # compare: the same results, in the order given, on the cluster and here
    tr = open_trace(trace_path)
    pols = ["oracle", ("ksm", {"pages_to_scan": 20}), "pksm"]
    here = compare(tr, pols)
    there = compare(tr, pols, executor=cluster.scheduler_address)
    assert [r.run_id for r in there] == [r.run_id for r in here]
    assert all(a.table.equals(b.table) and a.summary == b.summary for a, b in zip(here, there))


def test_sweep_on_an_in_process_dask_cluster(trace_path, tmp_path):
    pytest.importorskip("distributed")
    from ksmtrace.sweep import sweep

    small = {"pages_to_scan": [5, 100], "sleep_millisecs": [20]}
    local = sweep(trace_path, "ksm", small, tmp_path / "local", workers=1)
    df = sweep(trace_path, "ksm", small, tmp_path / "dask", executor="dask", workers=2)
    assert df.equals(local)


def test_cli_compare_on_local_workers_gives_the_same_rows(trace_path):
    import json

    from click.testing import CliRunner

    from ksmtrace.cli import cli

    runner = CliRunner()
    args = ["compare", str(trace_path), "--policies", "oracle,ksm,ksm:pages_to_scan=20,pksm", "--json", "-q"]
    here = runner.invoke(cli, args)
    pool = runner.invoke(cli, args + ["-j", "2"])
    assert here.exit_code == 0 and pool.exit_code == 0, (here.output, pool.output)
    assert json.loads(pool.stdout)["rows"] == json.loads(here.stdout)["rows"]
    assert [r["policy"] for r in json.loads(pool.stdout)["rows"]] == ["oracle", "ksm", "ksm:pages_to_scan=20", "pksm"]
    bad = runner.invoke(cli, args + ["--executor", "ray"])
    assert bad.exit_code != 0 and bad.stderr.strip() == "ksmtrace: error: unknown executor 'ray' (use local, dask or dask://HOST:PORT)"
