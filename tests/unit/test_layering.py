"""The package's layering, held by tests (read from the source, every import including the ones
inside functions):

* the tree reads as the pipeline: ``trace`` imports neither the engine nor the policies; the
  ``engine`` never imports a policy; nothing below the CLI imports the CLI;
* the live-host wing (``ksmtrace.lab``: workloads, KSM sysfs control, real programs, validate,
  microbenchmarks) is imported only by the CLI (and by live tests and scripts outside the package);
* the offline library never imports the capture backends (``ksmtrace_tracers``); the live-host
  wing may (the one KSM sysfs reader and /proc parser live with the capture code);
* no import cycle between modules (top-level imports).
"""
from __future__ import annotations

import ast
from pathlib import Path

import ksmtrace

ROOT = Path(ksmtrace.__file__).parent


def _module_name(f: Path) -> str:
    rel = f.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(f: Path, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(f.read_text(), str(f))
    mod = _module_name(f)
    pkg = mod if f.name == "__init__.py" else mod.rsplit(".", 1)[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = pkg.rsplit(".", node.level - 1)[0] if node.level > 1 else pkg
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            # "from ksmtrace.fidelity import metrics" imports the submodule (the package is only its
            # parent, initialised first as for any submodule); other names come from the module
            subs = [f"{name}.{a.name}" for a in node.names if (ROOT.parent / f"{name}.{a.name}".replace(".", "/")).with_suffix(".py").exists()
                    or (ROOT.parent / f"{name}.{a.name}".replace(".", "/") / "__init__.py").exists()]
            out.update(subs)
            if len(subs) < len(node.names):
                out.add(name)
    return out


MODULES = {_module_name(f): f for f in ROOT.rglob("*.py")}
IMPORTS = {m: _imports(f) for m, f in MODULES.items()}


def _under(name: str, pkg: str) -> bool:
    return name == pkg or name.startswith(pkg + ".")


def _violations(importer_pkg: str, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(f"{m} imports {i}" for m, imps in IMPORTS.items() if _under(m, importer_pkg)
                  for i in imps if any(_under(i, f) for f in forbidden))


def test_trace_imports_neither_engine_nor_policies():
    assert _violations("ksmtrace.trace", ("ksmtrace.engine", "ksmtrace.policies", "ksmtrace.replay",
                                          "ksmtrace.analysis", "ksmtrace.lab", "ksmtrace.cli")) == []


def test_engine_never_imports_policies():
    assert _violations("ksmtrace.engine", ("ksmtrace.policies", "ksmtrace.replay", "ksmtrace.analysis",
                                           "ksmtrace.lab", "ksmtrace.cli")) == []


def test_nothing_below_the_cli_imports_the_cli():
    bad = sorted(f"{m} imports {i}" for m, imps in IMPORTS.items() if not _under(m, "ksmtrace.cli")
                 and m not in ("ksmtrace.__main__", "ksmtrace._entry")  # the program's entry points
                 for i in imps if _under(i, "ksmtrace.cli"))
    assert bad == []


def test_the_lab_is_imported_only_by_the_cli():
    bad = sorted(f"{m} imports {i}" for m, imps in IMPORTS.items()
                 if not (_under(m, "ksmtrace.cli") or _under(m, "ksmtrace.lab"))
                 for i in imps if _under(i, "ksmtrace.lab"))
    assert bad == []


def test_the_library_never_imports_capture_backends():
    bad = sorted(f"{m} imports {i}" for m, imps in IMPORTS.items() if not _under(m, "ksmtrace.lab")
                 for i in imps if _under(i, "ksmtrace_tracers"))
    assert bad == []
    # the rule sees the imports it exempts: the lab reads KSM and /proc through the tracers package
    assert any(_under(i, "ksmtrace_tracers") for i in IMPORTS["ksmtrace.lab.kernelksm"])


def test_no_import_cycles():
    graph = {m: {i for i in _imports(f, top_level_only=True) if i in MODULES and i != m} for m, f in MODULES.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert cycles == []


def test_the_rules_see_imports():
    """The checker itself: it finds a known import, including one inside a function."""
    assert "ksmtrace.engine.api" in IMPORTS["ksmtrace.replay"]
    assert any(_under(i, "ksmtrace.lab") for i in IMPORTS["ksmtrace.cli.validate"])
