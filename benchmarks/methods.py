"""What the benchmarks time: one registry shared by ``run.py`` and the pytest-benchmark file.

A :class:`Method` turns a workload and a probe (a vector ``[P]`` or a block ``[P, K]``, on the
workload's device) into a zero-argument callable whose cost is what we time.  Everything that
is set-up and not part of a product (building operators, warming caches) happens in
``prepare``, outside the timer.  Each callable returns its result as a flat tensor, so the
same probe through curvops, curvlinops and PyHessian can be compared entry by entry.

Every library gets the same model, loss module (``reduction="mean"``) and list of batches, and
all of them define the operator over the whole data set with weights ``n_b / N`` per batch,
so their products are the same matrix times the same vector.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

import curvops
from workloads import Workload

#: number of columns of the block rows
BLOCK = 16


@dataclass
class Prepared:
    """A ready-to-time product and, after it ran, anything worth reporting about it."""

    run: Callable[[], object]
    info: Callable[[], dict] = dict


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    columns: int  # columns per product (1 or BLOCK); 0 for rows that are not products
    prepare: Callable[[Workload, Tensor], Prepared] = field(repr=False)
    #: the issue's target for curvops rows, as a ratio to one gradient (per column for blocks)
    target: float | None = None
    #: key of the row whose result this row must reproduce (checked by run.py); for curvops
    #: products, curvlinops' row for the same product, which is also the one to beat
    reference: str | None = None


# ---- baselines -------------------------------------------------------------------------------
def _gradient_loop(w: Workload, v: Tensor) -> Prepared:
    """What a user writes: backward over the batches, each weighted n_b / N."""
    params, N = w.params, w.num_data

    def run() -> Tensor:
        w.model.zero_grad(set_to_none=True)
        for X, y in w.batches:
            (w.loss(w.model(X), y) * (X.shape[0] / N)).backward()
        return torch.cat([p.grad.reshape(-1) for p in params])

    return Prepared(run)


def _curvops_gradient(w: Workload, v: Tensor) -> Prepared:
    obj = curvops.Objective(w.model, w.loss, w.batches)
    return Prepared(obj.gradient)


# ---- curvops ---------------------------------------------------------------------------------
def _curvops(cls, **kwargs) -> Callable[[Workload, Tensor], Prepared]:
    def prepare(w: Workload, V: Tensor) -> Prepared:
        op = cls(w.model, w.loss, w.batches, **kwargs)
        op @ V  # fill the graph cache (kept by default): the rows measure products with a warm cache

        def info() -> dict:
            out = {"path": op.last_path}
            if getattr(op, "kept_batches", 0):
                out["cache_mb"] = op.cache_bytes / 2**20
                out["kept_batches"] = op.kept_batches
            return out

        return Prepared(lambda: op @ V, info)

    return prepare


def _curvops_first(cls, **kwargs) -> Callable[[Workload, Tensor], Prepared]:
    """A fresh operator per product: the first product, which also builds the kept graphs."""
    def prepare(w: Workload, V: Tensor) -> Prepared:
        return Prepared(lambda: cls(w.model, w.loss, w.batches, **kwargs) @ V)

    return prepare


def _curvops_construction(w: Workload, V: Tensor) -> Prepared:
    return Prepared(lambda: curvops.Hessian(w.model, w.loss, w.batches))


# ---- curvlinops ------------------------------------------------------------------------------
def _curvlinops(name: str) -> Callable[[Workload, Tensor], Prepared]:
    def prepare(w: Workload, V: Tensor) -> Prepared:
        import curvlinops

        # No determinism check and N given: construction then does no pass over the data,
        # like curvops' (the check is timed on its own row).
        op = getattr(curvlinops, name)(w.model, w.loss, w.params, w.batches,
                                       check_deterministic=False, num_data=w.num_data)
        return Prepared(lambda: op @ V)

    return prepare


def _curvlinops_construction(w: Workload, V: Tensor) -> Prepared:
    import curvlinops

    # Defaults: one pass to count N, then the determinism check (several gradients and products).
    return Prepared(lambda: curvlinops.HessianLinearOperator(w.model, w.loss, w.params, w.batches))


# ---- PyHessian -------------------------------------------------------------------------------
def _pyhessian(w: Workload, v: Tensor) -> Prepared:
    from pyhessian import hessian

    h = hessian(w.model, w.loss, dataloader=w.batches, cuda=v.is_cuda)
    params = w.params
    vs = [t.view_as(p) for t, p in zip(v.split([p.numel() for p in params]), params)]

    def run() -> Tensor:
        _, Hv = h.dataloader_hv_product(vs)  # also returns vᵀHv, which costs nothing extra
        return torch.cat([t.reshape(-1) for t in Hv])

    return Prepared(run)


# ---- the registry ----------------------------------------------------------------------------
H, G, EF = curvops.Hessian, curvops.GGN, curvops.EmpiricalFisher
B = BLOCK

NOKEEP = {"keep_graphs": False}

METHODS: list[Method] = [
    Method("gradient", "gradient: loop of loss.backward() (baseline)", 1, _gradient_loop),
    Method("curvops.gradient", "curvops Objective.gradient()", 1, _curvops_gradient, reference="gradient"),
    # defaults (graphs kept automatically within the memory budget), then the recompute path
    Method("curvops.H", "curvops Hessian @ v", 1, _curvops(H), 2.0, "curvlinops.H"),
    Method("curvops.H.keep", "curvops Hessian(keep_graphs=True) @ v", 1, _curvops(H, keep_graphs=True),
           1.3, "curvlinops.H"),
    Method("curvops.H.nokeep", "curvops Hessian(keep_graphs=False) @ v", 1, _curvops(H, **NOKEEP), None,
           "curvlinops.H"),
    Method("curvops.H.first", "curvops Hessian @ v, first product (builds the graphs)", 1, _curvops_first(H),
           None, "curvlinops.H"),
    Method("curvops.GGN", "curvops GGN @ v", 1, _curvops(G), 1.2, "curvlinops.GGN"),
    Method("curvops.GGN.nokeep", "curvops GGN(keep_graphs=False) @ v", 1, _curvops(G, **NOKEEP), None,
           "curvlinops.GGN"),
    Method("curvops.EF", "curvops EmpiricalFisher @ v", 1, _curvops(EF), 1.2, "curvlinops.EF"),
    Method("curvops.EF.nokeep", "curvops EmpiricalFisher(keep_graphs=False) @ v", 1, _curvops(EF, **NOKEEP), None,
           "curvlinops.EF"),
    Method("curvops.H.16", f"curvops Hessian @ V[P,{B}], per column", B, _curvops(H), 1.0,
           "curvlinops.H.16"),
    Method("curvops.H.keep.16", f"curvops Hessian(keep_graphs=True) @ V[P,{B}], per column", B,
           _curvops(H, keep_graphs=True), 1.0, "curvlinops.H.16"),
    Method("curvops.H.nokeep.16", f"curvops Hessian(keep_graphs=False) @ V[P,{B}], per column", B,
           _curvops(H, **NOKEEP), None, "curvlinops.H.16"),
    Method("curvops.GGN.16", f"curvops GGN @ V[P,{B}], per column", B, _curvops(G), 0.8,
           "curvlinops.GGN.16"),
    Method("curvops.GGN.nokeep.16", f"curvops GGN(keep_graphs=False) @ V[P,{B}], per column", B,
           _curvops(G, **NOKEEP), None, "curvlinops.GGN.16"),
    Method("curvops.EF.16", f"curvops EmpiricalFisher @ V[P,{B}], per column", B, _curvops(EF), 0.8,
           "curvlinops.EF.16"),
    Method("curvlinops.H", "curvlinops HessianLinearOperator @ v", 1, _curvlinops("HessianLinearOperator")),
    Method("curvlinops.GGN", "curvlinops GGNLinearOperator @ v", 1, _curvlinops("GGNLinearOperator")),
    Method("curvlinops.EF", "curvlinops EFLinearOperator @ v", 1, _curvlinops("EFLinearOperator")),
    Method("curvlinops.H.16", f"curvlinops HessianLinearOperator @ V[P,{B}], per column", B,
           _curvlinops("HessianLinearOperator")),
    Method("curvlinops.GGN.16", f"curvlinops GGNLinearOperator @ V[P,{B}], per column", B,
           _curvlinops("GGNLinearOperator")),
    Method("curvlinops.EF.16", f"curvlinops EFLinearOperator @ V[P,{B}], per column", B,
           _curvlinops("EFLinearOperator")),
    Method("pyhessian.H", "PyHessian dataloader_hv_product(v)", 1, _pyhessian, reference="curvlinops.H"),
    Method("curvops.H.construct", "curvops Hessian(...) construction", 0, _curvops_construction),
    Method("curvlinops.H.construct", "curvlinops HessianLinearOperator(...) construction, defaults", 0,
           _curvlinops_construction),
]

BY_KEY = {m.key: m for m in METHODS}


def probes(w: Workload, seed: int = 0) -> tuple[Tensor, Tensor]:
    """The probe vector [P] and block [P, BLOCK] shared by every method (the vector is column 0)."""
    gen = torch.Generator().manual_seed(seed)
    V = torch.randn(w.num_params, BLOCK, generator=gen).to(next(w.model.parameters()))
    return V[:, 0].contiguous(), V


def probe_for(method: Method, v: Tensor, V: Tensor) -> Tensor:
    return V if method.columns == BLOCK else v


def median_seconds(fn: Callable[[], object], repeats: int = 3) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def kept_at_scale(n: int = 32768, batch_size: int = 256, budget: int = 2**30, repeats: int = 3) -> dict:
    """Issue 15, cost problem 1: the MLP workload at N = ``n`` split into views of one input tensor.

    Kept-graph accounting must charge each batch its own slice (not the whole input storage), so
    all ``n / batch_size`` batches fit ``budget`` (the old 1 GiB default) when their real size does.
    Returns the batches kept, the counted bytes, whether a budget warning fired, and the Hessian
    product with kept graphs as a ratio to one gradient (medians over ``repeats``, same process).
    """
    import warnings

    import workloads as W

    w = W.build_mlp(scale=n / 2048)
    w.batches = list(zip(torch.cat([X for X, _ in w.batches]).split(batch_size),
                         torch.cat([y for _, y in w.batches]).split(batch_size)))
    v = probes(w)[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        op = curvops.Hessian(w.model, w.loss, w.batches, max_graph_bytes=budget)
        op @ v
    grad = _gradient_loop(w, v).run
    grad()

    def median(fn) -> float:
        return median_seconds(fn, repeats)

    g = median(grad)
    return {"batches": len(w.batches), "kept_batches": op.kept_batches, "cache_mb": op.cache_bytes / 2**20,
            "warned": any("kept graphs" in str(c.message) for c in caught),
            "gradient_s": g, "ratio": median(lambda: op @ v) / g}
