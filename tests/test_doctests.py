"""The docstring examples run: doctest over the public modules of the lower layers.

Covers ``curvops.objective``, the data/loss/parameter/mode modules under it and every module of
``curvops.operators`` and ``curvops.interop``.  Examples that need a large model or an optional
dependency stay marked ``# doctest: +SKIP``; the main operators (Hessian, GGN, Fisher,
EmpiricalFisher, Jacobian, NTK, GradientCovariance) and the Objective have runnable ones, checked
below so they cannot silently turn into skips.
"""

import doctest
import importlib
import pkgutil

import pytest
import torch

import curvops.interop
import curvops.operators

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
MODULES = sorted(
    ["curvops.objective", "curvops._losses", "curvops._data", "curvops._params", "curvops._modes"]
    + [f"curvops.operators.{m.name}" for m in pkgutil.iter_modules(curvops.operators.__path__)]
    + [f"curvops.interop.{m.name}" for m in pkgutil.iter_modules(curvops.interop.__path__)]
)
MUST_RUN = ["Hessian", "GGN", "Fisher", "EmpiricalFisher", "Jacobian", "NTK", "GradientCovariance", "Objective",
            "Operator"]


def _run(name: str) -> doctest.TestResults:
    if name == "curvops.interop.gpytorch":
        pytest.importorskip("gpytorch")
    if name == "curvops.interop.laplace":
        pytest.importorskip("laplace")  # the optional laplace-torch extra (CI installs it)
    module = importlib.import_module(name)
    with torch.random.fork_rng():  # the examples seed the global RNG; leave it as found
        return doctest.testmod(module, optionflags=FLAGS, report=True, verbose=False)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = _run(name)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} docstring examples failed (see above)"


@pytest.mark.parametrize("name", MUST_RUN)
def test_main_api_has_a_runnable_example(name):
    obj = getattr(curvops, name)
    tests = doctest.DocTestFinder(recurse=False).find(obj, name, globs={})
    runnable = [ex for t in tests for ex in t.examples if not ex.options.get(doctest.SKIP)]
    assert len(runnable) >= 3, f"{name}: its docstring example is skipped or missing"
