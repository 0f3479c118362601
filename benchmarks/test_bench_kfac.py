"""KFAC against curvlinops' KFACLinearOperator: factor computation and the damped inverse product.

    pytest benchmarks/test_bench_kfac.py -n 0 [--benchmark-json out.json]
    python benchmarks/test_bench_kfac.py [--rounds 5]     # interleaved rounds → a markdown table

Two workloads in the same run: the MLP-784 workload of ``workloads.py`` (784-256-256-10 tanh,
2048 samples in batches of 256, cross-entropy) and a small conv net (3×32×32 inputs,
conv(3→16, 3×3)-ReLU-maxpool-conv(16→32, 3×3)-ReLU-maxpool-linear(2048→10), 512 samples in batches
of 128, cross-entropy), float32.  Rows per workload:

* ``factors``: the Kronecker factors of the type-2 KFAC (``"expand"``, weight and bias in one block:
  curvlinops with ``separate_weight_and_bias=False``), one pass over the data;
* ``inverse``: ``(K + δI)⁻¹ @ V`` for a 16-column block V, exact damping (``use_exact_damping=True`` in
  curvlinops), eigendecompositions cached by the warm-up round.

``extra_info["ratio"]`` is the median over a full-data gradient (``.backward()`` over the batches)
timed in the same session; the curvlinops rows carry ``curvops_speedup``.  Before timing, each
workload checks that both libraries give the same matrix (products of the same probe agree to
float32 rounding).  ``BENCH_SCALE`` and ``BENCH_ROUNDS`` as in ``test_bench_products.py``.
"""

from __future__ import annotations

import os
import statistics
import time

import pytest
import torch
from torch import nn

import workloads as W

import curvops

if __name__ != "__main__":
    pytest.importorskip("pytest_benchmark")
cl = pytest.importorskip("curvlinops")

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
DAMPING = 1e-3
BLOCK = 16
_medians: dict[tuple[str, str], float] = {}


@pytest.fixture(scope="session", autouse=True)
def _threads():
    torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())


def build_conv(scale: float, seed: int = 0) -> W.Workload:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    n = max(128, int(512 * scale))
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(32 * 8 * 8, 10))
    X = torch.randn(n, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    return W.Workload("conv", model, nn.CrossEntropyLoss(), list(zip(X.split(128), y.split(128))),
                      f"conv net 3x32x32 (2 conv + linear), cross-entropy, N={n}, batches of 128")


def _gradient(w: W.Workload):
    def run():
        w.model.zero_grad(set_to_none=True)
        for X, y in w.batches:
            (w.loss(w.model(X), y) * (X.shape[0] / w.num_data)).backward()
        w.model.zero_grad(set_to_none=True)
    return run


def _median(fn, rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _setup(name: str) -> dict:
    """The workload, both operators (factors computed), their damped inverses and a 16-column block,
    checked to be the same matrix; plus the median gradient time."""
    w = W.build("mlp") if name == "mlp" else build_conv(W.scale_from_env())
    ours = curvops.KFAC(w.model, w.loss, w.batches)
    theirs = cl.KFACLinearOperator(w.model, w.loss, w.params, w.batches, fisher_type="type-2",
                                   separate_weight_and_bias=False, check_deterministic=False, num_data=w.num_data)
    V = torch.randn(w.num_params, BLOCK, generator=torch.Generator().manual_seed(0))
    ours_inv = ours.inverse(DAMPING)
    theirs_inv = cl.KFACInverseLinearOperator(theirs, damping=DAMPING, use_exact_damping=True)
    a, b = ours @ V[:, 0], theirs @ V[:, 0]  # same matrix (the check of the whole benchmark)
    assert float((a - b).norm() / b.norm()) < 1e-4
    a, b = ours_inv @ V, theirs_inv @ V
    assert float((a - b).norm() / b.norm()) < 1e-3  # damped inverse in float32: κ ≈ 1/δ
    return dict(w=w, ours=ours, theirs=theirs, V=V, ours_inv=ours_inv, theirs_inv=theirs_inv,
                gradient=_median(_gradient(w), max(ROUNDS, 5)))


@pytest.fixture(scope="session")
def setups():
    cache: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in cache:
            cache[name] = _setup(name)
        return cache[name]
    return get


ROWS = {
    "curvops.factors": lambda s: s["ours"].refresh,
    "curvlinops.factors": lambda s: s["theirs"].compute_kronecker_factors,
    "curvops.inverse": lambda s: (lambda: s["ours_inv"] @ s["V"]),
    "curvlinops.inverse": lambda s: (lambda: s["theirs_inv"] @ s["V"]),
}


@pytest.mark.parametrize("row", list(ROWS))
@pytest.mark.parametrize("workload", ["mlp", "conv"])
def test_kfac(benchmark, setups, workload, row):
    s = setups(workload)
    benchmark.group = f"kfac-{workload}"
    benchmark.pedantic(ROWS[row](s), rounds=ROUNDS, warmup_rounds=1, iterations=1)
    benchmark.extra_info["workload"] = s["w"].description
    if benchmark.stats is None:
        return
    median = benchmark.stats.stats.median
    _medians[workload, row] = median
    benchmark.extra_info["ratio"] = median / s["gradient"]
    library, what = row.split(".")
    if library == "curvlinops" and (workload, f"curvops.{what}") in _medians:
        benchmark.extra_info["curvops_speedup"] = median / _medians[workload, f"curvops.{what}"]


def main(rounds: int) -> None:
    """Interleaved rounds (each round times every row once and the gradient once), medians → a table."""
    torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    print("| workload | row | median (s) | × gradient | curvops speed-up |\n| --- | --- | --- | --- | --- |")
    for name in ("mlp", "conv"):
        s = _setup(name)
        med: dict[str, float] = {}
        # two phases: recomputing the factors invalidates curvops' eigendecompositions (the inverse
        # follows the model), so the inverse rows are timed after the factor rows, each phase interleaved
        for phase in ("factors", "inverse"):
            fns = {row: fn(s) for row, fn in ROWS.items() if row.endswith(phase)}
            fns[f"gradient ({phase} phase)"] = _gradient(s["w"])
            times: dict[str, list[float]] = {k: [] for k in fns}
            for fn in fns.values():
                fn()  # warm-up (the inverse rows: eigendecompositions)
            for _ in range(rounds):
                for k, fn in fns.items():
                    start = time.perf_counter()
                    fn()
                    times[k].append(time.perf_counter() - start)
            grad = statistics.median(times.pop(f"gradient ({phase} phase)"))
            for k, v in times.items():
                med[k] = statistics.median(v)
                med[k + "/g"] = med[k] / grad
            med[f"gradient {phase}"] = grad
        for row in ROWS:
            library, what = row.split(".")
            speed = f"{med[f'curvlinops.{what}'] / med[row]:.2f}×" if library == "curvops" else ""
            print(f"| {name} | {row} | {med[row]:.3f} | {med[row + '/g']:.2f} | {speed} |")
        print(f"| {name} | gradient | {med['gradient factors']:.3f}, {med['gradient inverse']:.3f} | 1 | |")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    main(parser.parse_args().rounds)
