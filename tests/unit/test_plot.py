"""Plots: every kind drawn from a tiny trace and its results, checked for content (axis labels with
units, the series and their data, titles naming trace/policies/parameters), files, determinism."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

from ksmtrace import plot
from ksmtrace.plot import palette
from ksmtrace.testing.figures import layout_problems
from ksmtrace.analysis.breakdown import breakdown as compute_breakdown
from ksmtrace.cli import cli
from ksmtrace.errors import KsmtraceError
from ksmtrace.replay import replay
from ksmtrace.results import RunResult
from ksmtrace.testing.builders import make_trace
from ksmtrace.testing.scenarios import library_trace

MIB = 4096 / 2**20
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("plotworld")
    mp = pytest.MonkeyPatch()
    mp.setenv("KSMTRACE_CACHE_DIR", str(base / "cache"))
    tr = library_trace(base / "trace")
    runs = [
        replay(tr, "oracle"),
        replay(tr, "ksm", {"pages_to_scan": 100}),
        replay(tr, "ksm", {"pages_to_scan": 5, "sleep_millisecs": 200}),
    ]
    out = base / "results"
    for r in runs:
        r.write(out)
    yield {"trace": tr, "runs": runs, "dir": out, "base": base}
    mp.undo()


def _rgb(color):
    from matplotlib.colors import to_rgb

    return to_rgb(color)


def _texts(fig):
    return fig._suptitle.get_text()


def _line(ax, gid):
    found = [ln for ln in ax.get_lines() if ln.get_gid() == gid]
    assert found, f"no line {gid!r} in {[ln.get_gid() for ln in ax.get_lines()]}"
    return found[0]


# --- timeline ------------------------------------------------------------------------------------
def test_timeline_content(world):
    runs = world["runs"]
    fig = plot.timeline(runs)
    ax_mem, ax_cow, ax_cpu = fig.axes[:3]
    assert ax_mem.get_ylabel() == "memory saved (MiB)"
    assert "(count)" in ax_cow.get_ylabel() and "COW breaks" in ax_cow.get_ylabel()
    assert ax_cpu.get_ylabel().endswith("(s)") and "CPU" in ax_cpu.get_ylabel()
    assert ax_cpu.get_xlabel() == "time since first snapshot (s)"
    oracle = _line(ax_mem, "oracle")
    assert np.allclose(oracle.get_ydata(), runs[0].table["oracle_saved"].to_numpy() * MIB)
    assert np.allclose(oracle.get_xdata(), runs[0].table["t_s"].to_numpy())
    hash_only = _line(ax_mem, "hash_only")
    assert np.allclose(hash_only.get_ydata(), runs[0].table["hash_only_saved"].to_numpy() * MIB)
    for r in runs:
        gid = f"run:{r.run_id}"
        assert np.array_equal(_line(ax_cow, gid).get_ydata(), r.table["cow_breaks"].to_numpy())
        if r.policy == "oracle":  # the oracle is the dashed reference line, drawn once
            assert not [ln for ln in ax_mem.get_lines() + ax_cpu.get_lines() if ln.get_gid() == gid]
            continue
        assert np.allclose(_line(ax_mem, gid).get_ydata(), r.table["frames_saved"].to_numpy() * MIB)
        assert np.allclose(_line(ax_cpu, gid).get_ydata(), r.cpu_per_snapshot())
    assert runs[1].table["cow_breaks"].sum() > 0  # the trace does produce COW breaks
    legend = [t.get_text() for t in ax_mem.get_legend().get_texts()]
    assert any(t.startswith("ksm pages_to_scan=100") for t in legend)
    assert any(t.startswith("ksm pages_to_scan=5 sleep_millisecs=200") for t in legend)
    assert sum(t.startswith("oracle") for t in legend) == 1  # the oracle is listed once
    assert any("% of oracle" in t for t in legend)
    # one colour per policy, run styles told apart by the line style
    ksm_lines = [_line(ax_mem, f"run:{r.run_id}") for r in runs[1:]]
    assert {ln.get_color() for ln in ksm_lines} == {palette.policy_color("ksm")}
    assert len({ln.get_linestyle() for ln in ksm_lines}) == 2
    assert _line(ax_mem, "oracle").get_color() == palette.ORACLE_COLOR
    title = _texts(fig)
    assert "trace trace" in title and "scope recorded" in title and "cost model" in title


def test_timeline_in_frames(world):
    runs = world["runs"]
    fig = plot.timeline(runs[1:2], units="frames", hash_only=False)
    ax_mem = fig.axes[0]
    assert ax_mem.get_ylabel() == "memory saved (4 KiB frames)"
    assert np.array_equal(_line(ax_mem, f"run:{runs[1].run_id}").get_ydata(), runs[1].table["frames_saved"].to_numpy())
    assert not [ln for ln in ax_mem.get_lines() if ln.get_gid() == "hash_only"]
    with pytest.raises(KsmtraceError, match="units"):
        plot.timeline(runs, units="GiB")
    with pytest.raises(KsmtraceError, match="no results"):
        plot.timeline([])


# --- pareto --------------------------------------------------------------------------------------
def test_pareto_content(world):
    runs = world["runs"]
    fig = plot.pareto(runs)
    ax_cpu, ax_cow = fig.axes[:2]
    assert ax_cpu.get_ylabel() == "memory saved, mean over snapshots (MiB)"
    assert "CPU time (s" in ax_cpu.get_xlabel()
    assert "COW breaks" in ax_cow.get_xlabel() and "(count)" in ax_cow.get_xlabel()
    pts = plot.pareto_points(runs)
    assert np.allclose(pts["y"], [r.table["frames_saved"].mean() * MIB for r in runs])
    assert np.allclose(pts["cpu_s"], [r.cpu_seconds() for r in runs])
    assert np.array_equal(pts["cow_breaks"], [r.table["cow_breaks"].sum() for r in runs])
    # one point per run, grouped by policy; the oracle is a ceiling line, never a point
    coll = {c.get_gid(): c for c in ax_cpu.collections if c.get_gid()}
    assert "points:oracle" not in coll
    ksm_pts = coll["points:ksm"].get_offsets()
    assert len(ksm_pts) == 2
    assert np.allclose(ksm_pts[:, 0], pts["cpu_s"][1:])
    assert np.allclose(_line(ax_cpu, "oracle-ceiling").get_ydata(), pts["y"][0])
    # the front is among the other runs: the fast ksm saves more, the slow one costs less CPU
    from ksmtrace.pareto import non_dominated

    expect = non_dominated([pts["y"][1:]], [pts["cpu_s"][1:]])
    assert len(_line(ax_cpu, "front").get_xdata()) == int(expect.sum())
    labels = [t.get_text() for t in ax_cpu.texts]
    assert labels and all(t.startswith("pages_to_scan=") for t in labels)
    expect = non_dominated([pts["y"][1:]], [pts["cow_breaks"][1:]])
    assert len(_line(ax_cow, "front").get_xdata()) == int(expect.sum())
    assert coll["points:ksm"].get_facecolor()[0][:3] == pytest.approx(_rgb(palette.policy_color("ksm")))
    assert not layout_problems(fig), layout_problems(fig)
    assert "non-dominated front" in " ".join(t.get_text() for t in ax_cow.get_legend().get_texts())
    assert "trace trace" in _texts(fig)


def test_pareto_percent_of_oracle(world):
    runs = world["runs"]
    fig = plot.pareto(runs, y="pct")
    assert fig.axes[0].get_ylabel() == "memory saved, mean % of the oracle (%)"
    pts = plot.pareto_points(runs, y="pct")
    assert pts["y"][0] == pytest.approx(100.0)
    assert np.allclose(pts["y"][1:], [100 * r.summary["fraction_of_oracle_mean"] for r in runs[1:]])
    with pytest.raises(KsmtraceError):
        plot.pareto(runs, y="bogus")


# --- latency -------------------------------------------------------------------------------------
def test_latency_content(world):
    runs = world["runs"]
    idle = replay(world["trace"], "ksm", {"pages_to_scan": 100}, start_s=1000.0)  # the daemon never runs
    fig = plot.latency(runs + [idle])
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    assert ax.get_xlabel().startswith("merge latency (s")
    assert "fraction of merges" in ax.get_ylabel()
    for r in runs:
        x, y = plot.latency_cdf_points(r)
        line = _line(ax, f"run:{r.run_id}")
        assert np.allclose(line.get_xdata(), x) and np.allclose(line.get_ydata(), y)
        assert y[0] == 0.0 and y[-1] == pytest.approx(1.0)
        assert np.all(np.diff(y) >= 0)
        # p50 from the curve agrees with the result's own quantile
        assert x[np.searchsorted(y, 0.5)] == pytest.approx(r.latency_quantile(0.5) if r.latency_quantile(0.5) > 0 else 1e-3)
    x, y = plot.latency_cdf_points(runs[0])  # the oracle merges at once: everything under 1 ms
    assert y[1] == pytest.approx(1.0) and x[1] == pytest.approx(1e-3)
    assert len(_line(ax, f"run:{idle.run_id}").get_xdata()) == 0
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(t.endswith(": no merges") for t in legend)
    assert any("n=" in t and "p50" in t for t in legend)


# --- breakdown -----------------------------------------------------------------------------------
def test_breakdown_plot_content(world):
    tr = world["trace"]
    df = compute_breakdown(tr, "recorded")
    fig = plot.breakdown(df, scope="recorded", trace_name=tr.name)
    ax, axp = fig.axes[:2]
    assert ax.get_ylabel() == "duplicate frames (MiB)"
    assert axp.get_ylabel() == "% of frames with no dedup (%)"
    assert axp.get_xlabel() == "time since first snapshot (s)"
    parts = {c.get_gid() for c in ax.collections}
    assert {"part:zero_saved", "part:within_process_saved", "part:across_process_saved"} <= parts
    assert np.allclose(_line(ax, "oracle_saved").get_ydata(), df["oracle_saved"].to_numpy() * MIB)
    assert np.allclose(_line(ax, "same_domain_saved").get_ydata(), df["same_domain_saved"].to_numpy() * MIB)
    pct = 100 * df["nonzero_saved"].to_numpy() / df["base_frames"].to_numpy()
    assert np.allclose(_line(axp, "pct:nonzero_saved").get_ydata(), pct)
    assert "trace trace" in _texts(fig) and "scope recorded" in _texts(fig)
    # straight from a trace, in frames
    fig2 = plot.breakdown(tr, units="frames")
    assert fig2.axes[0].get_ylabel() == "duplicate frames (4 KiB frames)"
    assert np.array_equal(_line(fig2.axes[0], "oracle_saved").get_ydata(), df["oracle_saved"].to_numpy())


def test_breakdown_plot_single_snapshot(tmp_path):
    tr = make_trace(tmp_path / "one", [{(0, 1): "a", (0, 2): "a", (1, 1): "a", (1, 2): 0}])
    fig = plot.breakdown(tr)
    bars = {p.get_gid(): p for p in fig.axes[0].patches}
    assert bars["part:within_process_saved"].get_height() == pytest.approx(1 * MIB)
    assert bars["part:across_process_saved"].get_height() == pytest.approx(1 * MIB)
    assert bars["part:zero_saved"].get_height() == pytest.approx(1 * MIB)


# --- heatmap -------------------------------------------------------------------------------------
def test_heatmap_content(world):
    r = world["runs"][2]  # the slow ksm: fractions change over time
    fig = plot.heatmap([r])
    ax = fig.axes[0]
    mesh = [c for c in ax.collections if c.get_gid() == f"heatmap:{r.run_id}"][0]
    data = np.asarray(mesh.get_array()).reshape(3, r.table.height)
    mat, labels, times, n = plot.heatmap_matrix(r)
    assert n == 3 and len(labels) == 3
    assert np.allclose(data, mat)
    procs = r.procs
    for i, lab in enumerate(labels):
        pid = int(lab.split("(")[1].rstrip(")"))
        rows = procs.filter(procs["pid"] == pid).sort("snap")
        assert np.allclose(mat[i], rows["merged_pages"].to_numpy() / rows["candidate_pages"].to_numpy())
    # rows ranked by merged pages over the run, labelled "comm (pid)"
    totals = procs.group_by("pid").agg(pl.col("merged_pages").sum()).sort(["merged_pages", "pid"], descending=[True, False])
    assert [t.get_text() for t in ax.get_yticklabels()] == labels
    assert [int(lab.split("(")[1].rstrip(")")) for lab in labels] == totals["pid"].to_list()
    assert {lab.split(" ")[0] for lab in labels} == {"alpha", "beta", "gamma"}
    assert ax.get_xlabel() == "time since first snapshot (s)"
    cbar = fig.axes[-1]
    assert "fraction" in cbar.get_ylabel() and "percentile" in cbar.get_ylabel()
    assert ax.get_title(loc="left").endswith(": 3 processes")
    assert "rows: the top 3 processes by merged pages over all panels" in _texts(fig)


def test_heatmap_log_top_and_errors(world):
    r = world["runs"][1]
    fig = plot.heatmap([r], value="merged", top=1)
    ax = fig.axes[0]
    assert len(ax.get_yticklabels()) == 1
    cbar = fig.axes[-1]
    assert "merged pages (count" in cbar.get_ylabel() and "log scale" in cbar.get_ylabel()
    mat, _, _, _ = plot.heatmap_matrix(r, value="merged", top=1)
    by = r.procs.group_by("proc").agg(pl.col("merged_pages").sum()).sort("merged_pages", descending=True)
    assert mat[0].sum() == by["merged_pages"][0]
    two = plot.heatmap(world["runs"][1:])
    assert sum(1 for a in two.axes if a.get_title(loc="left").startswith("ksm")) == 2
    bare = RunResult(spec=dict(r.spec), table=r.table, latency_hist=r.latency_hist, procs=None)
    with pytest.raises(KsmtraceError, match="per-process"):
        plot.heatmap([bare])
    with pytest.raises(KsmtraceError, match="scale"):
        plot.heatmap([r], scale="cubic")


# --- files and determinism -----------------------------------------------------------------------
def test_save_png_svg_and_determinism(world, tmp_path):
    runs = world["runs"]
    a = plot.save(plot.timeline(runs), tmp_path / "a.svg")
    b = plot.save(plot.timeline(runs), tmp_path / "b.svg")
    assert a.read_bytes() == b.read_bytes()
    text = a.read_text()
    assert text.startswith("<?xml") and "<svg" in text
    assert "<dc:date>" not in text
    p1 = plot.save(plot.pareto(runs), tmp_path / "p1.png")
    p2 = plot.save(plot.pareto(runs), tmp_path / "p2.png")
    assert p1.read_bytes()[:8] == PNG_MAGIC
    assert p1.read_bytes() == p2.read_bytes()
    h1 = plot.save(plot.heatmap(runs[1:]), tmp_path / "h1.svg")
    h2 = plot.save(plot.heatmap(runs[1:]), tmp_path / "h2.svg")
    assert h1.read_bytes() == h2.read_bytes()
    with pytest.raises(KsmtraceError, match="suffix"):
        plot.save(plot.latency(runs), tmp_path / "x.jpeg")
    assert not list(tmp_path.glob(".*tmp*"))


def test_replay_and_sweep_never_import_matplotlib():
    code = ("import sys, ksmtrace.replay, ksmtrace.sweep, ksmtrace.analysis, ksmtrace.cli; "
            "import ksmtrace.cli.plot, ksmtrace.cli.sweep, ksmtrace.cli.breakdown; "
            "bad = [m for m in sys.modules if m.startswith('matplotlib')]; print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


# --- CLI -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,suffix", [("timeline", "png"), ("pareto", "svg"), ("latency", "png"), ("heatmap", "svg")])
def test_cli_plot_kinds(world, tmp_path, kind, suffix):
    out = tmp_path / f"{kind}.{suffix}"
    res = CliRunner().invoke(cli, ["plot", str(world["dir"]), "--kind", kind, "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["kind"] == kind and len(info["runs"]) == 3
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC if suffix == "png" else data.startswith(b"<?xml")


def test_cli_plot_breakdown_from_trace_or_results(world, tmp_path):
    runner = CliRunner()
    out = tmp_path / "b.svg"
    res = runner.invoke(cli, ["plot", str(world["base"] / "trace"), "--kind", "breakdown", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "breakdown plot written" in res.stderr
    out2 = tmp_path / "b2.svg"
    res = runner.invoke(cli, ["plot", str(world["dir"]), "--kind", "breakdown", "-o", str(out2), "-q"])
    assert res.exit_code == 0, res.output
    assert res.stderr == ""
    assert out.read_bytes() == out2.read_bytes()  # the results name the same trace and scope


def test_cli_plot_help_and_errors(world, tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli, ["plot", "--help"])
    assert res.exit_code == 0 and "Example:" in res.output
    cases = [
        ["plot", str(world["base"] / "trace"), "-o", str(tmp_path / "x.png")],  # a trace for a results kind
        ["plot", str(world["dir"]), "-o", str(tmp_path / "x.gif")],  # unsupported suffix
        ["plot", str(tmp_path / "nothing"), "-o", str(tmp_path / "x.png")],  # missing input
        ["plot", str(tmp_path), "-o", str(tmp_path / "x.png")],  # a directory without results
    ]
    for args in cases:
        res = runner.invoke(cli, args)
        assert res.exit_code != 0, args
        err = res.stderr.strip()
        assert err.startswith("ksmtrace: error:") and len(err.splitlines()) == 1, err
