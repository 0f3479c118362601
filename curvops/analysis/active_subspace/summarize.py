"""The last steps shared by both estimators (over data samples and over parameter draws): the
eigendecomposition of a factor, the bootstrap, the timings and the result object."""

from __future__ import annotations

import time

from .bootstrap import _bootstrap
from .eigenpairs import _decompose
from .result import ActiveSubspaceResult, _gaps


def _decompose_and_summarize(factor, plan, k, *, streamed: bool, tol, generator, vectors: bool,
                             return_eigenvectors: bool, bootstrap: int, confidence, timings: dict,
                             total_start: float, **fields) -> ActiveSubspaceResult:
    """Decompose ``factor`` by ``plan``, bootstrap, time, and build the result.

    ``streamed``: the factor computed its gradients during the decomposition's passes, so their
    seconds move from "decomposition" to "gradients".  ``fields``: the result's remaining fields
    (layout, method, algorithm, num_samples, total_weight, num_params).
    """
    start = time.perf_counter()
    dec = _decompose(factor, plan.algorithm, k, tol=tol, generator=generator, vectors=vectors)
    timings["decomposition"] = time.perf_counter() - start
    if streamed:
        timings["gradients"] += factor.gradient_seconds
        timings["decomposition"] -= factor.gradient_seconds
    if getattr(factor, "covariance_seconds", 0.0):
        timings["covariance"] = factor.covariance_seconds  # forming C: part of "decomposition"
    lam, W = dec.eigenvalues, dec.eigenvectors
    boot: dict = {}
    start = time.perf_counter()
    if bootstrap:
        boot = _bootstrap(factor, plan.algorithm, k, lam, W, bootstrap, confidence, tol, generator)
    timings["bootstrap"] = time.perf_counter() - start
    timings["total"] = time.perf_counter() - total_start
    gaps, ratios = _gaps(lam)
    return ActiveSubspaceResult(
        eigenvalues=lam, eigenvectors=W if return_eigenvectors else None, gaps=gaps, gap_ratios=ratios,
        num_matvecs=factor.num_matvecs, num_passes=factor.num_passes, iterations=dec.iterations,
        converged=dec.converged, residuals=dec.residuals, timings=timings, memory_estimate=plan.memory,
        bootstrap=bootstrap, confidence=float(confidence), **fields, **boot)
