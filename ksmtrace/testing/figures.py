"""Layout checks of a drawn figure, from the figure objects (not pixels): for tests of any figure.

>>> from ksmtrace.testing.figures import layout_problems
>>> assert not layout_problems(fig), layout_problems(fig)

:func:`layout_problems` draws the figure (on its own canvas) and reports, one line per problem:

* a legend that overlaps the data area (the axes patch) of any axes of the figure, colour bars
  included — legends belong outside the data;
* a legend, title, axis label, tick label or text that is not entirely inside the figure (clipped
  when saved);
* a text placed in an axes (labels of points, notes) that leaves its axes, overlaps another such
  text, or overlaps a legend.
"""
from __future__ import annotations

from matplotlib.transforms import Bbox

from ksmtrace.plot._common import text_box

TOL = 0.5  # display pixels: boxes that merely touch do not overlap


def _overlap(a: Bbox, b: Bbox) -> bool:
    return (min(a.x1, b.x1) - max(a.x0, b.x0) > TOL) and (min(a.y1, b.y1) - max(a.y0, b.y0) > TOL)


def _inside(a: Bbox, outer: Bbox) -> bool:
    return (a.x0 >= outer.x0 - TOL and a.y0 >= outer.y0 - TOL and a.x1 <= outer.x1 + TOL and a.y1 <= outer.y1 + TOL)


def _name(artist) -> str:
    get = getattr(artist, "get_text", None)
    text = get() if get else ""
    return f"{type(artist).__name__}({text[:40]!r})" if text else type(artist).__name__


def _legend_texts(leg) -> str:
    return ", ".join(t.get_text()[:30] for t in leg.get_texts()[:3])


def _marker_positions(ax):
    """Display positions of the points drawn as markers in ``ax`` (scatter collections, lines with a
    marker)."""
    import numpy as np
    from matplotlib.collections import PathCollection

    out = []
    for c in ax.collections:
        if isinstance(c, PathCollection) and c.get_visible() and len(c.get_offsets()):
            out.append(c.get_offset_transform().transform(np.asarray(c.get_offsets(), float)))
    for ln in ax.lines:
        if ln.get_visible() and ln.get_marker() not in (None, "None", "", " ") and len(ln.get_xydata()):
            out.append(ln.get_transform().transform(np.asarray(ln.get_xydata(), float)))
    if not out:
        return np.zeros((0, 2))
    pts = np.vstack(out)
    return pts[np.isfinite(pts).all(axis=1)]


def layout_problems(fig) -> list[str]:
    """Everything wrong with ``fig``'s layout (empty when legends are off the data and nothing
    overprints or is clipped)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if fig.canvas is None or not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    figbox = fig.bbox
    problems: list[str] = []
    axes = [ax for ax in fig.axes if ax.get_visible()]
    legends = [(ax.get_legend(), ax) for ax in axes if ax.get_legend() is not None]
    legends += [(leg, None) for leg in fig.legends]
    legend_boxes = []
    for leg, _ in legends:
        lb = leg.get_window_extent(r)
        legend_boxes.append((leg, lb))
        for ax in axes:
            if _overlap(lb, ax.bbox):
                problems.append(f"legend [{_legend_texts(leg)}] overlaps the data area of axes {ax.get_title(loc='left')[:40]!r}")
        if not _inside(lb, figbox):
            problems.append(f"legend [{_legend_texts(leg)}] is clipped by the figure edge")
    # titles, axis labels, tick labels: inside the figure
    fixed = []
    if getattr(fig, "_suptitle", None) is not None:
        fixed.append(fig._suptitle)
    for ax in axes:
        fixed += [ax.title, ax._left_title, ax._right_title]
        for axis in (ax.xaxis, ax.yaxis):  # the drawn tick labels and the axis label
            b = axis.get_tightbbox(r)
            if b is not None and not _inside(b, figbox):
                problems.append(f"the {axis.axis_name} axis labels of axes {ax.get_title(loc='left')[:40]!r} are clipped "
                                "by the figure edge")
    for t in fixed:
        if not t.get_visible() or not t.get_text():
            continue
        if not _inside(t.get_window_extent(r), figbox):
            problems.append(f"{_name(t)} is clipped by the figure edge")
    # texts placed in the axes: inside their axes, no overprinting, not under a legend
    placed = []
    for ax in axes:
        for t in ax.texts:
            if not t.get_visible() or not t.get_text():
                continue
            b = text_box(t, r)  # the text itself (an annotation's leader line may cross others)
            placed.append((t, b))
            if not _inside(b, ax.bbox):
                problems.append(f"{_name(t)} leaves its axes {ax.get_title(loc='left')[:40]!r}")
            if not _inside(b, figbox):
                problems.append(f"{_name(t)} is clipped by the figure edge")
    for ax in axes:  # a label never covers a plotted point (its own or another's)
        marks = _marker_positions(ax)
        for t in ax.texts:
            if not t.get_visible() or not t.get_text() or not len(marks):
                continue
            b = text_box(t, r)
            inside = (marks[:, 0] > b.x0 + 1) & (marks[:, 0] < b.x1 - 1) & (marks[:, 1] > b.y0 + 1) & (marks[:, 1] < b.y1 - 1)
            if inside.any():
                problems.append(f"{_name(t)} covers {int(inside.sum())} plotted point(s) of axes {ax.get_title(loc='left')[:40]!r}")
    for i in range(len(placed)):
        for j in range(i + 1, len(placed)):
            if _overlap(placed[i][1], placed[j][1]):
                problems.append(f"{_name(placed[i][0])} overprints {_name(placed[j][0])}")
        for leg, lb in legend_boxes:
            if _overlap(placed[i][1], lb):
                problems.append(f"{_name(placed[i][0])} lies under the legend [{_legend_texts(leg)}]")
    return problems
