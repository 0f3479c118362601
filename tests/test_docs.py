"""The API reference covers every public name, and its pages point only at names that exist.

The site itself is built in strict mode by ``.ci/run`` (``mkdocs build --strict``); this test needs
no mkdocs and checks coverage: every name in ``curvops.__all__``, ``curvops.linalg.__all__``,
``curvops.analysis.__all__`` and ``curvops.plotting.__all__`` has a ``::: <path>`` directive in
``docs/reference/``, and every directive's path imports.
"""

import importlib
import pathlib
import re

import pytest

import curvops
import curvops.analysis
import curvops.linalg
import curvops.plotting

ROOT = pathlib.Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "docs" / "reference"
PUBLIC = {mod.__name__: list(mod.__all__) for mod in (curvops, curvops.linalg, curvops.analysis, curvops.plotting)}


def _directives() -> list[str]:
    found = []
    for page in sorted(REFERENCE.glob("*.md")):
        found += re.findall(r"^:::\s+([\w.]+)\s*$", page.read_text(), re.M)
    return found


def _resolve(path: str):
    """The object mkdocstrings documents: attributes first (``curvops.linalg.trace`` is the function,
    not the module of that name), a submodule only where no attribute has the name."""
    parts = path.split(".")
    obj = importlib.import_module(parts[0])
    for i, attr in enumerate(parts[1:], 1):
        if hasattr(obj, attr):
            obj = getattr(obj, attr)
        else:
            obj = importlib.import_module(".".join(parts[: i + 1]))
    return obj


def _documented(module: str, name: str, directives: list[str]) -> bool:
    obj = getattr(importlib.import_module(module), name)
    for d in directives:
        if d == f"{module}.{name}" or d == f"curvops.{name}":
            return True
        if d.rsplit(".", 1)[-1] == name and _resolve(d) is obj:
            return True
    return False


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_every_public_name_has_a_reference_entry(module):
    directives = _directives()
    # the package page documents the module itself, which covers __version__ (its attribute)
    missing = [n for n in PUBLIC[module] if n != "__version__" and not _documented(module, n, directives)]
    assert not missing, f"docs/reference/*.md: add '::: {module}.<name>' for {missing}"
    if module == "curvops":
        assert "curvops" in directives and "__version__" in (REFERENCE / "package.md").read_text()


def test_every_reference_directive_resolves():
    bad = []
    for d in _directives():
        try:
            _resolve(d)
        except (ImportError, AttributeError):
            bad.append(d)
    assert not bad, f"docs/reference/*.md point at names that do not exist: {bad}"


def test_the_coverage_check_can_fail():
    """A name absent from the pages is reported (the check is not vacuous)."""
    assert not _documented("curvops", "Hessian", ["curvops.GGN", "curvops.linalg.eigsh"])
    assert _documented("curvops", "eigsh", ["curvops.linalg.eigsh"])


def test_nav_lists_every_page():
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = [p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")]
    assert pages and [p for p in pages if p not in nav] == []
