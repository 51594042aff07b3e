"""Shared CLI options and output helpers (results to stdout, progress and messages to stderr)."""
from __future__ import annotations

import json
import math
from typing import Any, Iterable, Sequence

import click

json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON on stdout.")
quiet_option = click.option("-q", "--quiet", is_flag=True, help="No progress and no messages on stderr.")


def emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=1, default=_default))


def _default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.integer):
            return int(o)
        if isinstance(o, np.floating):
            f = float(o)
            return None if math.isnan(f) else f
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    return str(o)


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
            return f"{v:.3g}"
        return f"{v:,.3f}".rstrip("0").rstrip(".") if abs(v) < 1000 else f"{v:,.1f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, headers: dict[str, str] | None = None) -> str:
    """A plain aligned text table (numbers right-aligned)."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())
    headers = headers or {}
    cells = [[headers.get(c, c) for c in columns]] + [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    numeric = [all(isinstance(r.get(c), (int, float)) or r.get(c) is None for r in rows) for c in columns]
    out = []
    for j, row in enumerate(cells):
        parts = [cell.rjust(widths[i]) if numeric[i] and j > 0 else cell.ljust(widths[i]) for i, cell in enumerate(row)]
        out.append("  ".join(parts).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def echo_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, headers: dict[str, str] | None = None) -> None:
    click.echo(table(rows, columns, headers))


def note(msg: str, quiet: bool = False) -> None:
    """An informational line on stderr (suppressed by --quiet)."""
    if not quiet:
        click.echo(msg, err=True)


def kv_lines(pairs: Iterable[tuple[str, Any]]) -> str:
    pairs = list(pairs)
    w = max((len(k) for k, _ in pairs), default=0)
    return "\n".join(f"{k.ljust(w)}  {fmt(v)}" for k, v in pairs)
