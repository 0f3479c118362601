"""pytest-benchmark version of ``run.py``: one test per (workload, method).

    pytest benchmarks/ [--benchmark-only] [--benchmark-json out.json]

Not collected by a plain ``pytest`` (``testpaths = ["tests"]``).  Environment knobs:
``BENCH_SCALE`` (multiplies N, e.g. 0.1 for a smoke run), ``BENCH_ROUNDS`` (timed rounds,
default 5), ``BENCH_DEVICE`` (``cpu`` or ``cuda``).

Each test records in ``extra_info`` its median as a ratio to one full-data gradient (timed in
the same session, ``ratio``; per column for blocks), the curvops kernel that ran, and on each
curvlinops row the speed-up of the curvops rows doing the same product (``curvops_speedup``).
``run.py`` gives the same numbers as one table, with correctness checks and memory.
"""

from __future__ import annotations

import os
import statistics
import time

import pytest
import torch

import methods as M
import workloads as W

pytest.importorskip("pytest_benchmark")

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
DEVICE = torch.device(os.environ.get("BENCH_DEVICE", "cpu"))
if DEVICE.type == "cuda" and not torch.cuda.is_available():
    pytest.skip("BENCH_DEVICE=cuda but no CUDA device is available", allow_module_level=True)

_sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)
_medians: dict[tuple[str, str], float] = {}  # (workload, method key) → median seconds
# PyHessian calls backward(create_graph=True) and torch warns about the reference cycle.
pytestmark = pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")


def _synced(fn):
    def run():
        out = fn()
        _sync()
        return out

    return run


@pytest.fixture(scope="session", autouse=True)
def _threads():
    torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())


@pytest.fixture(scope="session")
def workloads():
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            w = W.build(name, device=DEVICE)
            cache[name] = (w, *M.probes(w))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def gradient_median(workloads):
    """Median time of the baseline gradient per workload, timed once per session."""
    cache: dict[str, float] = {}

    def get(name: str) -> float:
        if name not in cache:
            w, v, _ = workloads(name)
            run = _synced(M.BY_KEY["gradient"].prepare(w, v).run)
            run()  # warm-up
            times = []
            for _ in range(max(ROUNDS, 5)):
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
            cache[name] = statistics.median(times)
        return cache[name]

    return get


@pytest.mark.parametrize("method", M.METHODS, ids=lambda m: m.key)
@pytest.mark.parametrize("workload", W.NAMES)
def test_product(benchmark, workloads, gradient_median, workload, method):
    library = method.key.split(".")[0]
    if library in ("curvlinops", "pyhessian"):
        pytest.importorskip(library)
    w, v, V = workloads(workload)
    prepared = method.prepare(w, M.probe_for(method, v, V))
    benchmark.group = workload
    out = benchmark.pedantic(_synced(prepared.run), rounds=ROUNDS, warmup_rounds=1, iterations=1)
    if isinstance(out, torch.Tensor):
        assert torch.isfinite(out).all()

    benchmark.extra_info.update(prepared.info())
    benchmark.extra_info["columns"] = method.columns
    if benchmark.stats is None:  # --benchmark-disable: nothing was timed
        return
    median = benchmark.stats.stats.median
    _medians[workload, method.key] = median
    benchmark.extra_info["ratio"] = median / gradient_median(workload) / max(method.columns, 1)
    if method.target is not None:
        benchmark.extra_info["target"] = method.target
    speedups = {  # the curvops rows of the same product ran before this curvlinops row
        m.key: median / _medians[workload, m.key]
        for m in M.METHODS if m.reference == method.key and m.key.startswith("curvops.")
        and (workload, m.key) in _medians
    }
    if library == "curvlinops" and speedups:
        benchmark.extra_info["curvops_speedup"] = speedups


def test_kept_graphs_fit_at_32k(benchmark):
    """N = 32 768 in batches of 256 (views of one tensor): all 128 batches' graphs fit the 1 GiB budget."""
    if DEVICE.type != "cpu":
        pytest.skip("CPU accounting row")
    scale = float(os.environ.get("BENCH_SCALE", "1"))
    n = max(2048, int(32768 * scale))
    out = benchmark.pedantic(lambda: M.kept_at_scale(n, repeats=ROUNDS), rounds=1, iterations=1)
    benchmark.extra_info.update(out)
    assert out["kept_batches"] == out["batches"] and not out["warned"], out
