"""The shipped sample traces: each opens, is documented, is small, and replays to its golden summary.

Golden files: tests/golden/<trace>.<policy>.json.  When a change to the engine or a policy changes
the numbers on purpose, regenerate them with

    python -m ksmtrace.testing.golden --update

and commit the diff together with the change (review it: every changed number is a changed result).
"""
import json
from pathlib import Path

import pytest

from ksmtrace import samples
from ksmtrace.testing import golden

REPO = Path(__file__).resolve().parents[2]
SAMPLES = ("prefork", "python-sci", "vm")
#: the page-cache sample (KSM idle: its own checks below) and every sample the pagecache golden covers
PAGECACHE_SAMPLE = "venv-copies"
PAGECACHE_GOLDEN = SAMPLES + (PAGECACHE_SAMPLE,)
#: every sample has a golden file per core policy and variant
GOLDEN_SAMPLES = SAMPLES + (PAGECACHE_SAMPLE,)
MAX_TRACE = 10 * 1024 * 1024
MAX_ALL = 30 * 1024 * 1024


def test_the_three_samples_are_found():
    names = samples.sample_names()
    for n in SAMPLES:
        assert n in names
    for s in samples.list_samples():
        if s.name in SAMPLES:
            assert s.path == (REPO / "sample-traces" / s.name).resolve()


@pytest.mark.parametrize("name", SAMPLES)
def test_sample_opens_and_is_documented(name):
    tr = samples.open_sample(name)
    tr.check()
    assert tr.n_snapshots >= 10
    assert tr.manifest.get("complete") is True
    assert tr.has_sample_hash, "captured with --fingerprints (pksm needs the sampled hash)"
    assert tr.has_ground_truth
    d = samples.sample_path(name)
    readme = (d / "README.md").read_text()
    for word in ("ksmtrace capture", "recapture", "KSM", "kernel"):
        assert word in readme, f"{name}/README.md should say how it was captured ({word!r})"
    assert any((d / f).exists() for f in ("recapture.py", "recapture.sh"))
    info = json.loads((d / "capture.json").read_text())
    assert info["trace"] == name
    assert info["commands"]["capture"].startswith("-m ksmtrace capture")


@pytest.mark.parametrize("name", SAMPLES)
def test_sample_size_limit(name):
    assert samples.trace_bytes(samples.sample_path(name)) <= MAX_TRACE


def test_samples_total_size_limit():
    total = sum(f.stat().st_size for f in (REPO / "sample-traces").rglob("*") if f.is_file())
    assert total <= MAX_ALL, f"sample-traces/ holds {total / 2**20:.1f} MiB"


def test_sample_ksm_ran_after_the_first_snapshot():
    """The first snapshot of every sample is taken before the real KSM was started (so a replay
    starts from the unmerged state), and KSM really ran afterwards."""
    for name in SAMPLES:
        tr = samples.open_sample(name)
        ksm = tr.read_table("ksm").sort("t_ns")
        first = ksm.filter(ksm["snap"] == 0).row(0, named=True)
        assert first["run"] == 0 and first["pages_sharing"] == 0, name
        assert ksm["run"].max() == 1, name
        info = samples.capture_info(name)
        assert info["ksm_started_after_snapshot0_s"] > 0
        assert info["ksm_settings_after"]["run"] == info["ksm_settings_before"]["run"]


def test_resolve_trace(tmp_path):
    assert samples.resolve_trace("vm") == samples.sample_path("vm")
    assert samples.resolve_trace(str(samples.sample_path("vm"))) == samples.sample_path("vm")
    with pytest.raises(samples.SampleError, match="samples: "):
        samples.resolve_trace("no-such-sample")
    from ksmtrace.errors import TraceError

    with pytest.raises(TraceError):
        samples.resolve_trace(str(tmp_path / "nope" / "x"))


def test_samples_dir_override(tmp_path, monkeypatch):
    import shutil

    src = samples.sample_path("prefork")
    dst = tmp_path / "mine"
    shutil.copytree(src, dst)
    monkeypatch.setenv("KSMTRACE_SAMPLES_DIR", str(tmp_path))
    assert samples.sample_path("mine") == dst.resolve()
    assert "mine" in samples.sample_names() and "vm" in samples.sample_names()


@pytest.mark.parametrize("policy", golden.CORE_POLICIES + tuple(golden.VARIANT_NAMES))
@pytest.mark.parametrize("name", GOLDEN_SAMPLES)
def test_golden_summary(name, policy):
    tr = samples.open_sample(name)
    differences = golden.compare_to_golden(tr, policy)
    assert not differences, (
        f"{name} under {policy} no longer matches tests/golden/{name}.{policy}.json:\n  "
        + "\n  ".join(differences[:30])
        + f"\nIf this change is intended, regenerate with:  {golden.UPDATE_COMMAND} {name} {policy}"
    )


@pytest.mark.parametrize("name", PAGECACHE_GOLDEN)
def test_pagecache_golden_summary(name):
    """The page-cache what-if on every sample: the anonymous-memory samples have no page-cache
    tables (an empty file scope, zeros), venv-copies has them."""
    tr = samples.open_sample(name)
    differences = golden.compare_to_golden(tr, "pagecache")
    assert not differences, (
        f"{name} under pagecache no longer matches tests/golden/{name}.pagecache.json:\n  "
        + "\n  ".join(differences[:30])
        + f"\nIf this change is intended, regenerate with:  {golden.UPDATE_COMMAND} {name} pagecache"
    )


def test_the_page_cache_sample_is_documented_and_small():
    from ksmtrace.trace import schema as S

    tr = samples.open_sample(PAGECACHE_SAMPLE)
    tr.check()
    assert tr.n_snapshots >= 10 and tr.manifest.get("complete") is True
    assert tr.manifest["capture"]["scope"] == "all" and tr.manifest["capture"]["files"]
    assert all(tr.has_table(t) for t in S.PAGECACHE_TABLES)
    assert samples.trace_bytes(samples.sample_path(PAGECACHE_SAMPLE)) <= 5 * 1024 * 1024
    d = samples.sample_path(PAGECACHE_SAMPLE)
    readme = (d / "README.md").read_text()
    for word in ("ksmtrace capture", "recapture", "--files", "--scope all", "KSM", "kernel"):
        assert word in readme, f"{PAGECACHE_SAMPLE}/README.md should say how it was captured ({word!r})"
    assert (d / "recapture.py").exists()
    info = json.loads((d / "capture.json").read_text())
    assert info["trace"] == PAGECACHE_SAMPLE
    assert info["commands"]["capture"].startswith("-m ksmtrace capture")
    # three copies of one tree: the listed files come in threes of equal size
    files = tr.read_table("files", [tr.n_snapshots - 1])
    listed = files.filter((files["source"] & S.FILE_LISTED) != 0)
    envs = {p.split("/env")[1][0] for p in listed["path"].to_list() if "/env" in p}
    assert envs == {"1", "2", "3"}


def test_variant_goldens_are_the_variants():
    """A variant's golden file records the variant's parameters, and differs from the policy's
    default run where the parameter matters (the what-if is not silently ignored)."""
    differs = 0
    for vname, (policy, params) in golden.VARIANT_NAMES.items():
        for name in GOLDEN_SAMPLES:
            v = json.loads(golden.golden_path(name, vname).read_text())
            base = json.loads(golden.golden_path(name, policy).read_text())
            assert v["policy"] == policy
            assert {k: v["params"][k] for k in params} == params
            differs += v["summary"] != base["summary"]
        assert differs, f"{vname}: same numbers as {policy} on every sample"
        differs = 0


def test_golden_diff_reports_float_and_int_changes():
    a = {"summary": {"x": 1.0, "n": 3, "nan": None}}
    assert golden.diff(a, {"summary": {"x": 1.0 + 1e-12, "n": 3, "nan": None}}) == []
    d = golden.diff(a, {"summary": {"x": 1.001, "n": 4, "nan": 0.5}})
    assert len(d) == 3 and any("summary.n" in x for x in d)


@pytest.mark.slow
def test_the_wheel_ships_the_sample_traces(tmp_path):
    """pyproject force-includes sample-traces/ as ksmtrace/_sample_traces, where samples.py looks."""
    import subprocess
    import sys
    import zipfile

    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0 and ("hatchling" in r.stderr or "Could not find" in r.stderr):
        pytest.skip("cannot build a wheel here (no hatchling from the package index)")
    assert r.returncode == 0, r.stderr[-2000:]
    (whl,) = tmp_path.glob("ksmtrace-*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    for s in SAMPLES:
        assert f"ksmtrace/_sample_traces/{s}/manifest.json" in names
        assert f"ksmtrace/_sample_traces/{s}/README.md" in names
    assert "ksmtrace/samples.py" in names and "ksmtrace/demo.py" in names
