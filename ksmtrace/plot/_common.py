"""What every ksmtrace figure shares: a fixed style, run labels, units, titles and saving.

Figures are :class:`matplotlib.figure.Figure` objects drawn on an Agg canvas; pyplot is never
imported, so plotting changes no global matplotlib state (and works with no display).  Output is
deterministic: fixed sizes and DPI, no dates in the file metadata, a fixed SVG hash salt.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Sequence

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text

from ksmtrace._version import __version__
from ksmtrace.errors import KsmtraceError
from ksmtrace.outputs import open_output_dir
from ksmtrace.plot import palette

PAGE_SIZE = 4096
MIB = 1024 * 1024
DPI = 100
UNITS = ("MiB", "frames")
FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}

STYLE: dict[str, Any] = {
    "svg.hashsalt": "ksmtrace",
    "svg.fonttype": "path",
    "font.family": "DejaVu Sans",
    "font.size": 9.0,
    "axes.titlesize": 10.0,
    "axes.labelsize": 9.0,
    "legend.fontsize": 7.5,
    "xtick.labelsize": 8.0,
    "ytick.labelsize": 8.0,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "lines.linewidth": 1.4,
    "figure.dpi": DPI,
    "savefig.dpi": DPI,
    "path.simplify": True,
    "axes.prop_cycle": matplotlib.cycler(color=[
        "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf",
        "#bcbd22", "#7f7f7f",
    ]),
    "image.cmap": "viridis",
}
COLORS: list[str] = list(STYLE["axes.prop_cycle"].by_key()["color"])
ORACLE_COLOR = palette.ORACLE_COLOR
NAIVE_COLOR = palette.HASH_ONLY_COLOR


@contextmanager
def style():
    """The fixed style every figure is built and saved under."""
    with matplotlib.rc_context(STYLE):
        yield


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def color(i: int) -> str:
    """The i-th colour of the cycle: for series that are not policies (a policy's colour comes from
    :mod:`ksmtrace.plot.palette`, the same in every figure)."""
    return COLORS[i % len(COLORS)]


def legend_outside(ax, *, ncol: int = 1, fontsize: float | None = None, title: str | None = None, where: str = "right"):
    """A legend beside the axes (``where='right'``) or below it (``'below'``), never over the data.
    Constrained layout makes room for it."""
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return None
    kw: dict[str, Any] = {"ncol": ncol, "title": title, "borderaxespad": 0.0, "frameon": False}
    if fontsize is not None:
        kw["fontsize"] = fontsize
    if where == "below":
        return ax.legend(loc="upper left", bbox_to_anchor=(0.0, -0.16), **kw)
    return ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), **kw)


def cap_to(ax, series_max: float, ref_max: float, pad: float = 1.08) -> None:
    """A linear y range from 0 that the policies set: ``series_max`` (the runs, and the oracle as
    their ceiling).  A reference line above it (``ref_max``, e.g. the naive hash-only count) does
    not stretch the axis; the caller marks it as off scale."""
    top = series_max if series_max > 0 else (ref_max if ref_max > 0 else 1.0)
    ax.set_ylim(0, top * pad)


_OFFSETS = [(dx, dy) for r in (6, 14, 24, 36) for dx, dy in
            ((r, r * 0.6), (r, -r), (-r, r * 0.6), (-r, -r), (0, r), (0, -r - 4), (r, 0), (-r, 0))]


def text_box(t, renderer):
    """The box of a text's own glyphs: for an annotation, without its leader line."""
    if hasattr(t, "update_positions"):  # an Annotation: its text is placed relative to its point
        t.update_positions(renderer)
    return Text.get_window_extent(t, renderer)


def place_labels(ax, xs, ys, texts, *, fontsize: float = 6.5, gids=None, avoid_points=True, others=None,
                 lines=()) -> list[int]:
    """Label the points (xs[i], ys[i]) with texts[i], each where it overprints nothing: no other
    label, no labelled point, none of the ``others`` points (``(xs, ys)``: the rest of the data
    drawn), no segment of the ``lines`` (``[(xs, ys), ...]`` polylines as drawn, e.g. a front),
    inside the axes.  Tries offsets in eight directions at growing distances; a label moved
    further than the nearest ring gets a thin leader line to its point, so that it is never read
    as another point's.  A label that fits nowhere is left out.  Returns the indices left out.
    Call it after everything else is drawn and the axes limits are final (it lays the figure out
    to measure)."""
    import numpy as np
    from matplotlib.transforms import Bbox

    fig = ax.figure
    if fig.canvas is None or not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    axbox = ax.bbox
    pts = ax.transData.transform(np.column_stack([np.asarray(xs, float), np.asarray(ys, float)]))
    rad = 4.0
    blocked: list[Bbox] = []
    if avoid_points:
        every = pts
        if others is not None and len(others[0]):
            every = np.vstack([pts, ax.transData.transform(np.column_stack([np.asarray(others[0], float),
                                                                            np.asarray(others[1], float)]))])
        blocked = [Bbox.from_extents(px - rad, py - rad, px + rad, py + rad) for px, py in every if np.isfinite([px, py]).all()]
    for lx, ly in lines:  # a polyline: small boxes every few pixels along each segment
        v = ax.transData.transform(np.column_stack([np.asarray(lx, float), np.asarray(ly, float)]))
        for (ax0, ay0), (ax1, ay1) in zip(v[:-1], v[1:]):
            if not np.isfinite([ax0, ay0, ax1, ay1]).all():
                continue
            n = max(2, int(np.hypot(ax1 - ax0, ay1 - ay0) / 3) + 1)
            blocked += [Bbox.from_extents(x - 1.5, y - 1.5, x + 1.5, y + 1.5)
                        for x, y in zip(np.linspace(ax0, ax1, n), np.linspace(ay0, ay1, n))]
    placed: list[Bbox] = []
    left_out = []

    def free(b: Bbox) -> bool:
        if b.x0 < axbox.x0 + 1 or b.x1 > axbox.x1 - 1 or b.y0 < axbox.y0 + 1 or b.y1 > axbox.y1 - 1:
            return False
        for o in placed + blocked:
            if min(b.x1, o.x1) - max(b.x0, o.x0) > 0 and min(b.y1, o.y1) - max(b.y0, o.y0) > 0:
                return False
        return True

    for i, text in enumerate(texts):
        if not np.isfinite(pts[i]).all():
            left_out.append(i)
            continue
        ann = ax.annotate(text, (xs[i], ys[i]), xytext=(0, 0), textcoords="offset points", fontsize=fontsize,
                          gid=None if gids is None else gids[i])
        ann.set_in_layout(False)
        for dx, dy in _OFFSETS:
            ann.set_position((dx, dy))
            ann.set_horizontalalignment("left" if dx > 0 else "right" if dx < 0 else "center")
            ann.set_verticalalignment("bottom" if dy > 0 else "top" if dy < 0 else "center")
            b = text_box(ann, r)  # the text alone (a leader line may cross others)
            if free(b):
                placed.append(b)
                if max(abs(dx), abs(dy)) > _OFFSETS[0][0]:  # far from its point: drawn again with a leader line
                    ha, va = ann.get_horizontalalignment(), ann.get_verticalalignment()
                    ann.remove()
                    ann = ax.annotate(text, (xs[i], ys[i]), xytext=(dx, dy), textcoords="offset points",
                                      fontsize=fontsize, ha=ha, va=va, gid=None if gids is None else gids[i],
                                      arrowprops=dict(arrowstyle="-", linewidth=0.5, color="0.35", shrinkA=1, shrinkB=4))
                    ann.set_in_layout(False)
                break
        else:
            ann.remove()
            left_out.append(i)
    return left_out


# --- units ---------------------------------------------------------------------------------------
def check_units(units: str) -> str:
    if units not in UNITS:
        raise KsmtraceError(f"unknown units {units!r} (units: {', '.join(UNITS)})")
    return units


def frames_to(values, units: str):
    """Frame counts in ``units`` (``MiB``: 4 KiB frames × 4096 / 2**20)."""
    if units == "MiB":
        return values * (PAGE_SIZE / MIB)
    return values


def unit_label(units: str) -> str:
    return "MiB" if units == "MiB" else "4 KiB frames"


# --- labels ------------------------------------------------------------------------------------
def _defaults(policy: str) -> dict[str, Any] | None:
    try:
        from ksmtrace.policies.registry import get_policy

        return {p["name"]: p["default"] for p in get_policy(policy).parameter_table()}
    except Exception:  # a policy this installation does not have: show every parameter
        return None


def changed_params(spec: dict[str, Any]) -> dict[str, Any]:
    """The run's parameters that differ from the policy's defaults (all of them if unknown)."""
    params = dict(spec.get("params") or {})
    defaults = _defaults(spec.get("policy", ""))
    if defaults is None:
        return params
    return {k: v for k, v in params.items() if k not in defaults or defaults[k] != v}


def _fmt_value(v: Any) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def params_text(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={_fmt_value(v)}" for k, v in params.items())


_DISAMBIGUATE = ("trace_name", "scope", "engine", "seed", "start_ns", "timing_cost_name")


def run_labels(results: Sequence, with_policy: bool = True) -> list[str]:
    """One short, unique legend label per run: the policy and its parameters that are not at their
    defaults or that differ between the runs of that policy (so a sweep's axes are always named)."""
    varying: dict[str, set[str]] = {}
    by_policy: dict[str, list] = {}
    for r in results:
        by_policy.setdefault(r.spec.get("policy", "?"), []).append(r)
    for pol, rs in by_policy.items():
        keys: set[str] = set()
        for k in {k for r in rs for k in (r.spec.get("params") or {})}:
            if len({repr((r.spec.get("params") or {}).get(k)) for r in rs}) > 1:
                keys.add(k)
        varying[pol] = keys
    labels = []
    for r in results:
        pol = r.spec.get("policy", "?")
        shown = changed_params(r.spec)
        params = dict(r.spec.get("params") or {})
        for k in varying.get(pol, ()):
            shown.setdefault(k, params.get(k))
        shown = {k: params[k] for k in params if k in shown}  # the policy's own parameter order
        p = params_text(shown)
        if with_policy:
            labels.append(f"{pol} {p}".strip() if p else f"{pol} (defaults)")
        else:
            labels.append(p or f"{pol} (defaults)")
    groups: dict[str, list[int]] = {}
    for i, lab in enumerate(labels):
        groups.setdefault(lab, []).append(i)
    for lab, idx in groups.items():
        if len(idx) < 2:
            continue
        extra_keys = [k for k in _DISAMBIGUATE if len({str(results[i].spec.get(k)) for i in idx}) > 1]
        for i in idx:
            extra = " ".join(f"{k.replace('_name', '')}={results[i].spec.get(k)}" for k in extra_keys)
            labels[i] = f"{lab} [{extra}]" if extra else labels[i]
    seen: dict[str, int] = {}
    out = []
    for lab in labels:  # identical runs given twice: number them
        n = seen.get(lab, 0)
        seen[lab] = n + 1
        out.append(lab if n == 0 else f"{lab} #{n + 1}")
    return out


def _joined(values: Iterable[Any]) -> str:
    vals = []
    for v in values:
        if v is not None and str(v) not in vals:
            vals.append(str(v))
    return ", ".join(vals) if vals else "?"


def runs_subtitle(results: Sequence, cost_name: str | None = None, extra: str | None = None) -> str:
    """Which trace(s), scope(s), engine(s) and cost model a figure shows."""
    parts = [
        ("trace " if len({r.spec.get("trace_name") for r in results}) == 1 else "traces ")
        + _joined(r.spec.get("trace_name") for r in results),
        "scope " + _joined(r.spec.get("scope") for r in results),
        "engine " + _joined(r.spec.get("engine") for r in results),
        f"{len(results)} run{'s' if len(results) != 1 else ''}",
    ]
    if cost_name:
        parts.append(f"CPU from cost model {cost_name!r}")
    parts.append("parameters not named are at their defaults")
    text = " · ".join(parts)
    if extra:
        text += "\n" + extra
    return text


def titles(fig: Figure, title: str, subtitle: str) -> None:
    fig.suptitle(f"{title}\n{subtitle}", fontsize=9.5, linespacing=1.5)


def require(results: Sequence, what: str) -> None:
    if not results:
        raise KsmtraceError(f"{what}: no results to plot")


# --- saving --------------------------------------------------------------------------------------
def save(fig: Figure, path: str | os.PathLike) -> Path:
    """Write ``fig`` to ``path`` (PNG, SVG or PDF by suffix), deterministically and atomically."""
    p = Path(path)
    fmt = FORMATS.get(p.suffix.lower())
    if fmt is None:
        raise KsmtraceError(f"{p}: unsupported image suffix {p.suffix!r} (use .png, .svg or .pdf)")
    creator = f"ksmtrace {__version__} (matplotlib {matplotlib.__version__})"
    if fmt == "png":
        metadata: dict[str, Any] = {"Software": creator}
    elif fmt == "svg":
        metadata = {"Creator": creator, "Date": None}
    else:
        metadata = {"Creator": creator, "Producer": creator, "CreationDate": None, "ModDate": None}

    def draw(fh) -> None:
        with style():
            if fig.canvas is None or not isinstance(fig.canvas, FigureCanvasAgg):
                FigureCanvasAgg(fig)
            fig.savefig(fh, format=fmt, dpi=DPI, metadata=metadata)

    # the directory must be the user's own and not writable by others; the image is written
    # atomically relative to it (ksmtrace.outputs)
    with open_output_dir(p.parent) as d:
        d.write_atomic(p.name, draw)
    return p
