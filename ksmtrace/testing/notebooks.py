"""The notebooks in notebooks/: run them and commit them with their outputs.

    python -m ksmtrace.testing.notebooks --update                 # re-run every notebook, write the outputs in
    python -m ksmtrace.testing.notebooks --update vm-policy-comparison
    python -m ksmtrace.testing.notebooks --list

The notebooks ship executed, so a reader sees the answers without running anything;
``tests/golden/test_notebooks.py`` still executes each one from a fresh kernel (the committed
outputs must come from this command, not from hand edits).  Execution runs in a temporary working
directory, with the notebook's own directory on ``sys.path``; volatile metadata (execution times,
kernel ids) is dropped so that a re-run changes only what the numbers change.  Needs the ``test``
extra (nbformat, nbclient, ipykernel).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

TIMEOUT_PER_CELL = 300
KERNEL = "python3"


def notebooks_dir() -> Path:
    """notebooks/ of the source tree this package lives in."""
    return Path(__file__).resolve().parents[2] / "notebooks"


def notebook_paths(names: list[str] | None = None) -> list[Path]:
    paths = sorted(notebooks_dir().glob("*.ipynb"))
    if names:
        want = {n.removesuffix(".ipynb") for n in names}
        unknown = want - {p.stem for p in paths}
        if unknown:
            raise SystemExit(f"no notebook named {sorted(unknown)[0]!r} in {notebooks_dir()}")
        paths = [p for p in paths if p.stem in want]
    return paths


def execute(path: Path, workdir: Path | None = None):
    """Run ``path`` top to bottom in a fresh kernel; returns the executed notebook (nbformat node)."""
    import nbclient
    import nbformat

    nb = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory(prefix="ksmtrace-nb-") as tmp:
        client = nbclient.NotebookClient(nb, timeout=TIMEOUT_PER_CELL, kernel_name=KERNEL,
                                         resources={"metadata": {"path": str(workdir or tmp)}})
        client.execute()
    return nb


def scrub(nb) -> None:
    """Drop what changes from run to run without the numbers changing."""
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            for out in cell.get("outputs", []):
                out.get("metadata", {}).pop("execution", None)


def update(paths: list[Path]) -> None:
    import nbformat

    for p in paths:
        t0 = time.monotonic()
        nb = execute(p)
        scrub(nb)
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                  if o.get("output_type") == "error"]
        if errors:
            raise SystemExit(f"{p.name}: a cell failed: {errors[0].get('ename')}: {errors[0].get('evalue')}")
        nbformat.write(nb, p)
        print(f"{p.name}: executed in {time.monotonic() - t0:.0f} s, outputs written", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ksmtrace.testing.notebooks", description=__doc__.splitlines()[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--update", action="store_true", help="execute the notebooks and write their outputs in")
    g.add_argument("--list", action="store_true", help="list the notebooks")
    ap.add_argument("names", nargs="*", help="notebook names (default: all)")
    args = ap.parse_args(argv)
    paths = notebook_paths(args.names)
    if args.list:
        for p in paths:
            print(p.name)
        return 0
    update(paths)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
