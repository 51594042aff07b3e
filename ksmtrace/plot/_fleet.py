"""The fleet's sharing matrix: how much each pair of hosts shares, and each host within itself."""
from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from ksmtrace.plot._common import check_units, frames_to, new_figure, style, unit_label

MAX_ANNOTATED = 12


def fleet_matrix(result, *, units: str = "MiB") -> Figure:
    """Heatmap of a :class:`~ksmtrace.analysis.fleet.FleetResult`'s host sharing matrix (mean over
    its aligned snapshots).  Off the diagonal: what two hosts share (distinct non-zero contents
    both hold = frames putting them on one machine frees beyond each alone); on the diagonal,
    outlined: what each host frees by itself (its oracle saving).  Cells are annotated with their
    value for fleets of up to 12 hosts."""
    check_units(units)
    mat = frames_to(np.asarray(result.host_matrix_mean, dtype=float), units)
    n = mat.shape[0]
    labels = [h.name for h in result.hosts]
    with style():
        side = min(3.2 + 0.55 * n, 12.0)
        fig = new_figure(side + 1.6, side + 0.6)
        ax = fig.add_subplot(1, 1, 1)
        im = ax.imshow(mat, cmap=colormaps["viridis"], vmin=0.0, vmax=float(mat.max()) if mat.size and mat.max() > 0 else 1.0,
                       interpolation="nearest")
        ax.grid(False)
        ax.set_xticks(range(n), labels, rotation=45 if n > 3 else 0, ha="right" if n > 3 else "center")
        ax.set_yticks(range(n), labels)
        ax.set_xlabel("host (trace)")
        ax.set_ylabel("host (trace)")
        for i in range(n):
            ax.add_patch(_outline(ax, i))
        if n <= MAX_ANNOTATED:
            hi = float(mat.max()) if mat.size else 0.0
            for i in range(n):
                for j in range(n):
                    v = mat[i, j]
                    ax.text(j, i, f"{v:,.1f}" if units == "MiB" else f"{v:,.0f}", ha="center", va="center", fontsize=8,
                            color="black" if v > 0.6 * hi else "white")
        cb = fig.colorbar(im, ax=ax, shrink=0.85)
        cb.set_label(f"shared ({unit_label(units)}, mean over {len(result.host_matrix)} aligned snapshots)")
        method = "exact" if result.method == "exact" else f"HyperLogLog sketches, p={result.precision}"
        ax.set_title(f"fleet sharing matrix: {n} hosts, scope {result.scope}, {method}\n"
                     "off-diagonal: contents two hosts share; diagonal (outlined): a host's own saving", fontsize=9)
    return fig


def _outline(ax, i: int):
    from matplotlib.patches import Rectangle

    return Rectangle((i - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="white", linewidth=1.5)
