"""Plain-text and JSON rendering shared by the library's reports and the CLI (no click here).

* :func:`fmt` — one value as text (``-`` for missing values, never ``None`` or ``nan``);
* :func:`table` — an aligned text table, numbers right-aligned;
* :func:`kv_lines` — ``key  value`` lines;
* :func:`dumps` — strict JSON (NaN and infinities become ``null``; numpy scalars and arrays are
  plain numbers and lists).
"""
from __future__ import annotations

import json
import math
from typing import Any, Iterable, Sequence


def _plain(o: Any) -> Any:
    """``o`` with every float that JSON cannot hold (NaN, ±inf) replaced by ``None``."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {str(k): _plain(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_plain(v) for v in o]
    return o


def _default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.integer):
            return int(o)
        if isinstance(o, np.floating):
            f = float(o)
            return f if math.isfinite(f) else None
        if isinstance(o, np.bool_):
            return bool(o)
        if isinstance(o, np.ndarray):
            return _plain(o.tolist())
    except ImportError:  # pragma: no cover
        pass
    return str(o)


def dumps(obj: Any, indent: int | None = 1) -> str:
    """Strict JSON text of ``obj`` (``allow_nan=False``: a NaN can never reach the output)."""
    return json.dumps(_plain(obj), indent=indent, default=_default, allow_nan=False)


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


def kv_lines(pairs: Iterable[tuple[str, Any]]) -> str:
    pairs = list(pairs)
    w = max((len(k) for k, _ in pairs), default=0)
    return "\n".join(f"{k.ljust(w)}  {fmt(v)}" for k, v in pairs)
