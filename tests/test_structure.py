"""The architecture, checked: imports only point down the layers, no cycle inside a package, nothing
imports the top-level package from inside it, and no module grows past 500 lines (issue 12).

Layers, bottom to top (docs/design.md):

    core (objective, layout, _data, _losses, _params, _modes, _version)
      → operators → linalg → interop, analysis → plotting → report → cli

``testing`` (oracles, zoo, contract checks) sits beside the top: it may import any layer but the
report and the command line, and nothing in the library imports it.  Every import counts, also
one made inside a function (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "curvops"
RANK = {"core": 0, "operators": 1, "linalg": 2, "interop": 3, "analysis": 3, "plotting": 4, "testing": 4,
        "report": 5, "cli": 6, "__main__": 6}
MAX_LINES = 500


def layer(module: str) -> str:
    """'curvops.linalg.trace' → 'linalg'; top-level modules (objective, _data, …) are the core."""
    parts = module.split(".")
    if len(parts) == 1:
        return "top"
    head = parts[1]
    if (ROOT / head).is_dir() or head in ("cli", "__main__"):
        return head
    return "core"


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = modules()


def imports(name: str, path: Path) -> set[str]:
    """Every curvops module that ``name`` imports (resolved: `from . import x` → the submodule x)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "curvops")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "curvops":
                continue
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in MODULES else target)
    found.discard(name)
    return {m for m in found if m in MODULES or m == "curvops"}


GRAPH = {name: imports(name, path) for name, path in MODULES.items()}


def test_nothing_imports_the_top_level_package():
    bad = sorted(f"{m} imports the top-level curvops package" for m, deps in GRAPH.items()
                 if m not in ("curvops", "curvops.__main__") and "curvops" in deps)
    assert not bad, "\n".join(bad)


def test_imports_only_point_down_the_layers():
    bad = []
    for m, deps in GRAPH.items():
        if m in ("curvops",):
            continue
        here = layer(m)
        for d in deps:
            there = layer(d)
            if there == "top" or there == here:
                continue
            if RANK[there] > RANK[here] or (there == "testing" and here != "testing"):
                bad.append(f"{m} ({here}) imports {d} ({there})")
    assert not bad, "upward imports:\n" + "\n".join(sorted(bad))


def _cycles(nodes: set[str]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in GRAPH[v] & nodes:
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
                out.append(sorted(comp))

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


@pytest.mark.parametrize("package", sorted({layer(m) for m in MODULES} - {"top"}))
def test_no_import_cycle_inside_a_package(package):
    # a package's __init__ re-exports its modules; the cycles that matter are between the modules
    nodes = {m for m in MODULES if layer(m) == package and m != f"curvops.{package}"}
    assert not _cycles(nodes), f"import cycles in {package}: {_cycles(nodes)}"


def test_no_module_over_500_lines():
    big = sorted(f"{p.relative_to(ROOT.parent)}: {n} lines" for p in MODULES.values()
                 if (n := len(p.read_text().splitlines())) > MAX_LINES)
    assert not big, "split these by responsibility:\n" + "\n".join(big)


def test_the_checker_sees_a_violation():
    """The check itself can fail: an upward import and a cycle planted in a copy of the graph."""
    saved = {k: set(v) for k, v in GRAPH.items()}
    try:
        GRAPH["curvops.operators.base"].add("curvops.analysis.landscape")
        with pytest.raises(AssertionError, match="operators.base .operators. imports curvops.analysis.landscape"):
            test_imports_only_point_down_the_layers()
        GRAPH["curvops.linalg.eigsh" if "curvops.linalg.eigsh" in GRAPH else "curvops.linalg.lanczos"].add(
            "curvops.linalg.density")
        GRAPH["curvops.linalg.density"].add("curvops.linalg.eigsh" if "curvops.linalg.eigsh" in GRAPH
                                            else "curvops.linalg.lanczos")
        with pytest.raises(AssertionError, match="import cycles in linalg"):
            test_no_import_cycle_inside_a_package("linalg")
    finally:
        GRAPH.clear()
        GRAPH.update(saved)
