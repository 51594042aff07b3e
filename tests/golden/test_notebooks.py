"""The notebooks in notebooks/ are committed with their outputs (made by `python -m
ksmtrace.testing.notebooks --update`), run from a fresh kernel, top to bottom, within a time limit,
and use only ksmtrace's public API."""
import json
import re
import time
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))
TIMEOUT_PER_CELL = 300
PUBLIC = {"ksmtrace", "ksmtrace.plot", "ksmtrace.samples", "ksmtrace.sweep", "ksmtrace.replay", "ksmtrace.results",
          "ksmtrace.analysis.breakdown", "ksmtrace.analysis.frontier", "ksmtrace.fidelity", "ksmtrace.fidelity.plot",
          "ksmtrace.trace.reader", "ksmtrace.policies.pksm.delay", "ksmtrace.testing.collisions"}
UNDEFINED = re.compile(r"\b(None|nan|NaN|null)\b")


def test_the_notebooks_are_there():
    names = {p.name for p in NOTEBOOKS}
    assert {"delay-tradeoff.ipynb", "vm-policy-comparison.ipynb"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_uses_only_the_public_api(path):
    nb = json.loads(path.read_text())
    code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    for mod in re.findall(r"^\s*(?:from|import)\s+(ksmtrace[\w.]*)", code, re.M):
        assert mod in PUBLIC, f"{path.name} imports {mod}, not a public module"
    assert not re.search(r"ksmtrace[\w.]*\._(?!_)", code), "no private names"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_with_its_outputs(path):
    """A reader sees the answers without running anything: every code cell was executed in order
    (by `python -m ksmtrace.testing.notebooks --update`), no cell failed, the figures and the
    generated conclusions are there, and nothing undefined is printed."""
    nb = json.loads(path.read_text())
    cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    counts = [c.get("execution_count") for c in cells]
    assert all(isinstance(n, int) for n in counts), f"{path.name}: run `python -m ksmtrace.testing.notebooks --update`"
    assert counts == sorted(counts) and len(set(counts)) == len(counts), f"{path.name}: cells were not run top to bottom"
    outs = [o for c in cells for o in c.get("outputs", [])]
    assert not [o for o in outs if o.get("output_type") == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outs) >= 2
    assert any("text/markdown" in o.get("data", {}) for o in outs), "the conclusions are generated as Markdown"
    for o in outs:
        text = "".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", "")) + \
            "".join(o.get("data", {}).get("text/markdown", ""))
        assert not UNDEFINED.search(text), f"{path.name}: undefined value printed: {text[:300]}"


def _execute(path: Path, workdir: Path):
    """Run one notebook from a fresh kernel in ``workdir``; (executed notebook, seconds)."""
    import nbclient
    import nbformat

    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=TIMEOUT_PER_CELL, kernel_name="python3",
                                     resources={"metadata": {"path": str(workdir)}})
    t0 = time.monotonic()
    client.execute()
    return nb, time.monotonic() - t0


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """Every notebook executed once, two kernels at a time (each is one busy process; the suite
    itself waits): path -> (notebook, seconds) or the exception its execution raised."""
    pytest.importorskip("nbformat")
    pytest.importorskip("nbclient")
    from concurrent.futures import ThreadPoolExecutor

    order = sorted(NOTEBOOKS, key=lambda p: -p.stat().st_size)  # the longest first
    with ThreadPoolExecutor(max_workers=2) as pool:
        futs = {p: pool.submit(_execute, p, tmp_path_factory.mktemp(p.stem)) for p in order}
    out = {}
    for p, f in futs.items():
        try:
            out[p] = f.result()
        except Exception as exc:  # reported by that notebook's test
            out[p] = exc
    return out


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path, executed, tmp_path):
    import nbformat

    got = executed[path]
    if isinstance(got, BaseException):
        raise got
    nb, elapsed = got
    print(f"{path.name}: executed in {elapsed:.1f} s")
    (tmp_path / path.name).write_text(nbformat.writes(nb))  # the executed copy, for a look after a failure
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    md_out = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "text/markdown" in o.get("data", {})]
    assert md_out, "the conclusions are generated as Markdown"
