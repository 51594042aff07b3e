"""Figures a reader can trust, checked from the figure objects (not pixels): every figure keeps its
legends off the data and clips or overprints nothing; a policy has one colour and one marker in
every figure, plug-ins included; heatmap panels share one row order; the naive hash-only line is
marked but does not set the axis."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import polars as pl
import pytest
from matplotlib.colors import to_hex
from matplotlib.figure import Figure

from ksmtrace import plot
from ksmtrace.analysis.advise import advise
from ksmtrace.analysis.frontier import frontier
from ksmtrace.fidelity.plot import trajectories
from ksmtrace.plot import palette
from ksmtrace.replay import replay
from ksmtrace.results import RunResult
from ksmtrace.testing import make_trace
from ksmtrace.testing.figures import layout_problems
from ksmtrace.testing.scenarios import library_trace, plain_processes_trace

GRIDS = {"ksm": {"pages_to_scan": [4, 40], "sleep_millisecs": [20, 200]},
         "pksm": {"pages_to_scan": [4, 40], "sleep_millisecs": [20]},
         "pksm-delay": {"pages_to_scan": [4, 40], "sleep_millisecs": [20]},
         "hashtable": {"pages_per_second": [50, 0], "process_pages_per_second": [0], "sleep_millisecs": [100]}}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("figs")
    tr = library_trace(base / "trace")
    runs = [replay(tr, "oracle"), replay(tr, "ksm", {"pages_to_scan": 100}), replay(tr, "pksm", scope="recorded"),
            replay(tr, "pksm-delay", scope="recorded"), replay(tr, "hashtable", scope="recorded"),
            replay(tr, "ksm", {"pages_to_scan": 5, "sleep_millisecs": 200})]
    fr = frontier(tr, list(GRIDS), base / "fr", grids=GRIDS)
    adv = advise(tr, cpu_budget_pct=5.0, out_dir=base / "adv", attribution=False)
    return {"trace": tr, "runs": runs, "frontier": fr, "advise": adv, "base": base}


def _figures(world):
    runs, fr = world["runs"], world["frontier"]
    return {
        "timeline": plot.timeline(runs),
        "pareto": plot.pareto(runs),
        "latency": plot.latency(runs),
        "breakdown": plot.breakdown(world["trace"]),
        "heatmap": plot.heatmap(runs[1:5]),
        "frontier_cpu": plot.frontier_cpu(fr),
        "frontier_cow": plot.frontier_cow(fr),
        "advise": plot.advise(world["advise"]),
    }


def test_no_legend_on_the_data_nothing_clipped_nothing_overprinted(world):
    for name, fig in _figures(world).items():
        assert not layout_problems(fig), (name, layout_problems(fig))


def test_fidelity_trajectories_keep_their_legends_off_the_data():
    from ksmtrace.fidelity import fidelity
    from ksmtrace.samples import open_sample

    fig = trajectories(fidelity(open_sample("python-sci")))
    assert not layout_problems(fig), layout_problems(fig)


def test_the_checker_finds_a_legend_on_the_data_and_overprinted_labels():
    fig = Figure(figsize=(4, 3))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], label="a line")
    ax.legend(loc="center")
    ax.text(0.5, 0.5, "one label")
    ax.text(0.5, 0.5, "another label")
    ax.text(5.0, 0.5, "far away")
    problems = layout_problems(fig)
    assert any("overlaps the data area" in p for p in problems)
    assert any("overprints" in p for p in problems)
    assert any("leaves its axes" in p for p in problems)


def test_the_checker_finds_a_label_over_a_point():
    fig = Figure(figsize=(4, 3))
    ax = fig.subplots()
    ax.scatter([0.2, 0.8], [0.5, 0.5])
    ax.set(xlim=(0, 1), ylim=(0, 1))
    ax.annotate("a label", (0.2, 0.5), xytext=(0.72, 0.48), textcoords="data")
    assert any("covers 1 plotted point" in p for p in layout_problems(fig))


def test_labels_avoid_every_point_and_the_front_and_far_ones_get_a_leader_line():
    """place_labels: a label never lands on an unlabelled point or on a drawn line; a label moved
    beyond the first ring is joined to its point."""
    from ksmtrace.plot._common import place_labels, text_box

    fig = Figure(figsize=(4, 3))
    ax = fig.subplots()
    rng = np.random.default_rng(1)
    ox, oy = rng.uniform(0, 1, 300), rng.uniform(0, 1, 300)
    ax.scatter(ox, oy, s=4)
    ax.plot([0, 1], [0.5, 0.5])
    ax.set(xlim=(0, 1), ylim=(0, 1))
    xs, ys = [0.3, 0.31, 0.7], [0.52, 0.48, 0.3]
    left_out = place_labels(ax, xs, ys, ["first label", "second label", "third"], others=(ox, oy),
                            lines=[([0, 1], [0.5, 0.5])])
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    placed = [t for t in ax.texts]
    assert len(placed) + len(left_out) == 3 and placed
    line_y = ax.transData.transform([(0, 0.5)])[0][1]
    pts = ax.transData.transform(np.column_stack([ox, oy]))
    for t in placed:
        b = text_box(t, r)
        assert not (b.y0 < line_y < b.y1), t.get_text()
        assert not ((pts[:, 0] > b.x0) & (pts[:, 0] < b.x1) & (pts[:, 1] > b.y0) & (pts[:, 1] < b.y1)).any()
        far = max(abs(v) for v in t.xyann) > 6
        assert (t.arrow_patch is not None) == far, (t.get_text(), t.xyann)
    assert not [p for p in layout_problems(fig) if "overprints" in p or "covers" in p]


def _colours_by_policy(fig) -> dict[str, set[str]]:
    """Policy -> colours of the artists whose gid names a policy's run, points or front."""
    out: dict[str, set[str]] = {}
    for ax in fig.axes:
        for ln in ax.get_lines():
            gid = ln.get_gid() or ""
            for prefix in ("front:", "points:"):
                if gid.startswith(prefix):
                    out.setdefault(gid[len(prefix):], set()).add(to_hex(ln.get_color()))
        for c in ax.collections:
            gid = c.get_gid() or ""
            for prefix in ("points:", "runs:"):
                if gid.startswith(prefix) and len(c.get_facecolor()):
                    out.setdefault(gid[len(prefix):], set()).add(to_hex(c.get_facecolor()[0][:3]))
    return out


def test_one_colour_and_marker_per_policy_in_every_figure(world):
    runs = world["runs"]
    run_policy = {f"run:{r.run_id}": r.policy for r in runs}
    seen: dict[str, set[str]] = {}
    figs = _figures(world)
    for name, fig in figs.items():
        for pol, cols in _colours_by_policy(fig).items():
            seen.setdefault(pol, set()).update(cols)
        for ax in fig.axes:
            for ln in ax.get_lines():
                pol = run_policy.get(ln.get_gid())
                if pol and pol != "oracle":
                    seen.setdefault(pol, set()).add(to_hex(ln.get_color()))
    for pol in ("ksm", "pksm", "pksm-delay", "hashtable"):
        assert seen.get(pol) == {palette.policy_color(pol)}, (pol, seen.get(pol))
    assert len({palette.policy_color(p) for p in palette.KNOWN}) == len(palette.KNOWN)
    assert len({palette.policy_marker(p) for p in palette.KNOWN}) == len(palette.KNOWN)
    # the markers too, in the frontier figure
    fr_fig = figs["frontier_cpu"]
    for ln in fr_fig.axes[0].get_lines():
        if (ln.get_gid() or "").startswith("front:"):
            assert ln.get_marker() == palette.policy_marker(ln.get_gid()[6:])


def test_a_plug_in_policy_gets_a_stable_colour_of_its_own():
    st = palette.policy_style("my-policy")
    assert st.color not in {c for c, _ in palette.KNOWN.values()}
    assert palette.policy_style("my-policy") == st
    code = "from ksmtrace.plot import palette; s = palette.policy_style('my-policy'); print(s.color, s.marker)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [st.color, st.marker]  # the same in another process (no hash randomisation)


def test_runs_of_one_policy_differ_by_line_style_not_colour(world):
    styles = palette.run_styles(world["runs"])
    ksm = [s for s, r in zip(styles, world["runs"]) if r.policy == "ksm"]
    assert len({s["color"] for s in ksm}) == 1 and len({s["linestyle"] for s in ksm}) == 2


def test_heatmap_panels_share_one_row_order(world):
    r = world["runs"][1]
    # a copy whose per-process ranking is the other way round
    procs = r.procs.with_columns((pl.col("merged_pages").max() - pl.col("merged_pages")).alias("merged_pages"))
    other = RunResult(spec={**r.spec, "run_id": r.run_id + "x"}, table=r.table, latency_hist=r.latency_hist, procs=procs)
    assert plot.heatmap_matrix(r)[1] != plot.heatmap_matrix(other)[1]  # alone, they rank differently
    fig = plot.heatmap([r, other])
    rows = [[t.get_text() for t in ax.get_yticklabels()] for ax in fig.axes[:2]]
    assert rows[0] == rows[1] and len(rows[0]) == 3


def test_the_hash_only_line_does_not_set_the_axis(tmp_path):
    # many pages mapping the zero page: the naive count is far above anything a dedup can save
    snaps = [{**{(0, v): {"c": 0, "zero_page": True} for v in range(400)},
              **{(p, 1000 + v): ("lib" if v < 10 else f"u{p}{v}") for p in range(2) for v in range(20)}}
             for _ in range(4)]
    tr = make_trace(tmp_path / "t", snaps, interval=1.0)
    runs = [replay(tr, "oracle"), replay(tr, "ksm", {"pages_to_scan": 50})]
    for fig, ax in ((plot.timeline(runs, units="frames"), 0), (plot.breakdown(tr, units="frames"), 0)):
        a = fig.axes[ax]
        hash_only = next(ln for ln in a.get_lines() if ln.get_gid() in ("hash_only", "hash_only_saved"))
        oracle = next(ln for ln in a.get_lines() if ln.get_gid() in ("oracle", "oracle_saved"))
        top = a.get_ylim()[1]
        assert top >= np.max(oracle.get_ydata()) and top < np.max(hash_only.get_ydata())
        assert any(t.get_gid() == "hash_only_off_scale" for t in a.texts)  # marked as off scale
        assert not layout_problems(fig), layout_problems(fig)


def test_a_trace_without_mergeable_memory_draws_no_nan(tmp_path):
    tr = plain_processes_trace(tmp_path / "t")
    for fig in (plot.breakdown(tr), plot.breakdown(tr, scope="recorded")):
        texts = [fig._suptitle.get_text()] + [t.get_text() for ax in fig.axes for t in ax.texts + [ax.title, ax._left_title]]
        assert not any("nan" in t.lower() or "None" in t for t in texts), texts
    empty = plot.breakdown(tr, scope="recorded")
    assert "no candidate pages in this scope" in empty._suptitle.get_text()
