"""pytest-benchmark version of ``bench_trace.py``: one timed trace estimate per method, errors in extra_info.

    pytest benchmarks/test_bench_trace.py [--benchmark-json out.json]
    BENCH_SCALE=0.1 pytest benchmarks/test_bench_trace.py      # CI smoke run (N = 1000)

Both networks of ``bench_trace.py`` (``seed002`` as workloads.py builds it, ``seed002-fit``
trained further into the anchors' regime).  The exact traces (float64) are read from
``benchmarks/.cache`` or computed once (5146 products each; ≈9 min on 2 CPU cores at full
scale).  Each test records ``rel_err`` (flat spectra: ``ratio_to_hutchinson``) in
``extra_info``.  Asserted (regression guards at the measured level, see the README table):
XTrace at 100 products on ``seed002-fit`` median over 3 seeds ≤ 2e-6 (target 1e-6: met in the
median over 10 seeds, 1.0e-6, not in the worst seed, 2.1e-6); on flat spectra XNysTrace within
20 % of Hutchinson, XTrace within √2·1.2 (it behaves like Hutchinson with half the vectors
there, ≈1.4×: the issue's 20 % target is missed by XTrace).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import bench_trace as B

pytest.importorskip("pytest_benchmark")


@pytest.fixture(scope="session")
def networks():
    cache = {}

    def get(name):
        if name not in cache:
            w = B.build_workload(name)
            H, _, _ = B.hessian64(w)
            cache[name] = (w, H, B.exact_diagonal(w)["trace"])
        return cache[name]

    return get


@pytest.mark.parametrize("method", B.METHODS)
@pytest.mark.parametrize("name", B.WORKLOADS)
def test_trace_seed002(benchmark, networks, name, method):
    _, H, exact = networks(name)
    seeds = (0, 1, 2)
    results = benchmark.pedantic(
        lambda: [B.trace(H, method=method, num_matvecs=100, generator=torch.Generator().manual_seed(s)) for s in seeds],
        rounds=1, iterations=1)
    rel = sorted(abs(r.value - exact) / abs(exact) for r in results)
    benchmark.group = f"trace {name} (100 products, 3 seeds)"
    benchmark.extra_info.update(rel_err=rel, median_rel_err=rel[1], exact=exact, target=B.TARGET_XTRACE)
    if method == "xtrace" and name == "seed002-fit":
        assert rel[1] <= 2 * B.TARGET_XTRACE
    if method == "hutchinson":
        assert all(abs(r.value - exact) <= 6 * r.stderr for r in results)


@pytest.mark.parametrize("name, m", [("hutchpp_trace", 99), ("xtrace", 100)])
def test_trace_seed002_curvlinops(benchmark, networks, name, m):
    curvlinops = pytest.importorskip("curvlinops")
    w, _, exact = networks("seed002-fit")
    _, model, batches = B.hessian64(w)
    H = curvlinops.HessianLinearOperator(model, w.loss, [p for p in model.parameters()], batches,
                                         check_deterministic=False, num_data=w.num_data)
    fn = getattr(curvlinops, name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        value = float(benchmark.pedantic(lambda: fn(H, num_matvecs=m), rounds=1, iterations=1))
    benchmark.group = "trace seed002-fit (100 products, 3 seeds)"
    benchmark.extra_info.update(rel_err=abs(value - exact) / abs(exact), num_matvecs=m, exact=exact)


def test_trace_flat_spectrum(benchmark):
    rows = benchmark.pedantic(lambda: B.run_flat(repeats=100, n=1000), rounds=1, iterations=1)
    ratio = {(r["spectrum"], r["method"], r["distribution"]): r["ratio_to_hutchinson"] for r in rows}
    benchmark.extra_info["ratio_to_hutchinson"] = {"/".join(k): v for k, v in ratio.items()}
    assert ratio["psd", "xnystrace", "sphere"] <= B.TARGET_FLAT
    for kind in ("psd", "indefinite"):
        assert ratio[kind, "xtrace", "sphere"] <= math.sqrt(2) * B.TARGET_FLAT


def test_hutchinson_memory_does_not_grow_with_the_budget(benchmark):
    """Probes are drawn one block at a time (issue 15): the peak of 400 products is that of 100."""
    import subprocess
    import sys

    import bench_memory

    def peak(row):
        proc = subprocess.run([sys.executable, bench_memory.__file__, "--child", row], capture_output=True,
                              text=True, check=True)
        return json.loads(proc.stdout.strip().splitlines()[-1])

    rows = benchmark.pedantic(lambda: [peak("trace-hutchinson-100"), peak("trace-hutchinson-400")],
                              rounds=1, iterations=1)
    benchmark.extra_info.update({r["row"]: r["extra_peak_mb"] for r in rows})
    assert rows[1]["extra_peak_mb"] <= 1.3 * rows[0]["extra_peak_mb"] + 20
