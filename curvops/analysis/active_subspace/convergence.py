r"""Convergence of the top-k active subspace in the number of samples, against a reference."""

from __future__ import annotations

import time
from typing import Callable, Sequence

import torch
from torch import Tensor

from .distance import subspace_distances
from .eigenpairs import _decompose
from .factors import _factor_for
from .inputs import _check_common, _check_k, _covariance
from .plan import DEFAULT_MEMORY_BUDGET, _choose
from .result import ActiveSubspaceConvergence, ActiveSubspaceResult, _gaps


def active_subspace_convergence(model_or_objective, loss=None, data=None, *, sample_sizes: Sequence[int], k: int,
                                reference: ActiveSubspaceResult | None = None, g: str | Callable = "loss",
                                method: str = "auto", memory_budget: int = DEFAULT_MEMORY_BUDGET,
                                sampler: Callable | None = None, num_samples: int | None = None,
                                weights: Tensor | None = None, center: bool = False, subset=None, classes=None,
                                tol: float = 1e-6, chunk_size: int | None = None,
                                generator: torch.Generator | None = None,
                                **objective_kwargs) -> ActiveSubspaceConvergence:
    r"""Top-k active subspace from growing numbers of samples, compared with a reference.

    For each N in ``sample_sizes`` the estimate uses the first N kept samples of one random
    permutation (nested subsets, so the curves are smooth), and is compared with the reference:
    by default the estimate from the largest N; or a :class:`ActiveSubspaceResult` computed
    separately (e.g. from more samples).  Reports the relative eigenvalue errors and, for every
    r = 1 … k, the distance ‖W_rW_rᵀ − Ŵ_rŴ_rᵀ‖₂ between the leading r-dimensional subspaces.
    ``seeds/002`` found that about as many samples as parameters (N ≈ P) are needed.

    **Cost**: the snapshot path computes the per-sample gradients once (all kept samples, or
    ``max(sample_sizes)`` draws of the sampler) and one top-k decomposition per N; the operator
    path runs one matrix-free Krylov SVD per N (each product a pass over all kept samples).

    Args:
        sample_sizes: numbers of samples N (1 ≤ k ≤ N ≤ kept samples).
        k: number of leading eigenpairs compared.
        reference: ``None`` (the largest N) or a result with at least k eigenvectors of the
            same parameters.
        num_samples: with ``sampler``: how many to draw (default ``max(sample_sizes)``).
        others: as for :func:`active_subspace`.

    Returns:
        :class:`ActiveSubspaceConvergence`.

    Raises:
        ValueError: empty or out-of-range sample sizes, k > min(sample_sizes) or k > P, a
            reference without eigenvectors or of another size, and the errors of
            :func:`active_subspace`.

    Example:
        >>> conv = active_subspace_convergence(model, "mse", (X, y), k=10,
        ...                                    sample_sizes=[500, 2000, 10000])     # doctest: +SKIP
        >>> conv.eigenvalue_errors[:, 0], conv.subspace_distances[:, 4]             # doctest: +SKIP
    """
    api = "active_subspace_convergence"
    total_start = time.perf_counter()
    gen = _check_common(method, memory_budget, tol, generator, api)
    try:
        sizes = sorted({int(n) for n in sample_sizes})
    except TypeError:
        raise TypeError(f"{api}: expected sample_sizes as a sequence of integers, got {sample_sizes!r}.") from None
    if not sizes or sizes[0] < 1:
        raise ValueError(f"{api}: expected a non-empty list of positive sample sizes, got {sample_sizes!r}.")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= sizes[0]:
        raise ValueError(f"{api}: expected 1 ≤ k ≤ min(sample_sizes) = {sizes[0]}, got k={k!r}.")
    if sampler is not None and num_samples is None:
        num_samples = sizes[-1]
    cov = _covariance(model_or_objective, loss, data, g, sampler, num_samples, weights, center, subset, classes,
                      gen, objective_kwargs, api)
    w = cov.kept_weights()
    N, P = int(w.shape[0]), cov.shape[0]
    if sizes[-1] > N:
        raise ValueError(f"{api}: expected sample sizes ≤ the {N} kept samples, got {sizes[-1]}.")
    _check_k(k, sizes[0], P, api)
    if reference is not None:
        if not isinstance(reference, ActiveSubspaceResult):
            raise TypeError(f"{api}: expected reference to be an ActiveSubspaceResult or None, got "
                            f"{type(reference).__name__}.")
        if reference.eigenvectors is None or reference.k < k or reference.num_params != P:
            raise ValueError(f"{api}: expected a reference with ≥ {k} eigenvectors of {P} parameters, got "
                             f"{reference.k} eigenpairs of {reference.num_params} parameters"
                             f"{' without eigenvectors' if reference.eigenvectors is None else ''}.")
    item = torch.empty((), dtype=cov.torch_dtype).element_size()
    chunk = cov.default_chunk_size() if chunk_size is None else chunk_size
    plan = _choose(method, int(memory_budget), k, N, P, item, chunk, 0, True, api)
    timings: dict[str, float] = {}
    factor = _factor_for(plan, cov, w, chunk_size, timings)
    perm = torch.randperm(N, generator=gen).to(w.device)
    results: list[ActiveSubspaceResult] = []
    start = time.perf_counter()
    for n in sizes:
        m = torch.zeros(N, dtype=w.dtype, device=w.device)
        m[perm[:n]] = 1
        part = factor.reweight(m)
        t0 = time.perf_counter()
        dec = _decompose(part, plan.algorithm, k, tol=tol, generator=gen, vectors=True)
        gaps, ratios = _gaps(dec.eigenvalues)
        results.append(ActiveSubspaceResult(
            eigenvalues=dec.eigenvalues, eigenvectors=dec.eigenvectors, gaps=gaps, gap_ratios=ratios,
            layout=cov.objective.layout, method=plan.method, algorithm=plan.description, num_samples=n,
            total_weight=float((w * m).sum()), num_params=P, num_matvecs=part.num_matvecs,
            num_passes=part.num_passes, iterations=dec.iterations, converged=dec.converged,
            residuals=dec.residuals, timings={"decomposition": time.perf_counter() - t0}, memory_estimate=plan.memory))
    timings["decompositions"] = time.perf_counter() - start
    ref = results[-1] if reference is None else reference
    ref_lam = ref.eigenvalues[:k].to(w.dtype)
    ref_W = ref.eigenvectors[:, :k].to(w.dtype)
    lams = torch.stack([r.eigenvalues for r in results])
    denom = torch.where(ref_lam > 0, ref_lam, torch.ones_like(ref_lam))
    errors = (lams - ref_lam[None]).abs() / denom[None]
    dists = torch.stack([subspace_distances(ref_W, r.eigenvectors) for r in results])
    timings["total"] = time.perf_counter() - total_start
    return ActiveSubspaceConvergence(
        sample_sizes=torch.tensor(sizes), eigenvalues=lams, eigenvalue_errors=errors, subspace_distances=dists,
        reference_eigenvalues=ref_lam, reference_num_samples=sizes[-1] if reference is None else None,
        num_params=P, layout=cov.objective.layout, results=results, timings=timings)


__all__ = ["active_subspace_convergence"]
