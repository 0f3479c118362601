r"""Convergence of the top-k active subspace in the number of samples, against a reference."""

from __future__ import annotations

import time
from typing import Callable, Sequence

import torch
from torch import Tensor

from ...objective import Objective
from .distance import subspace_distances
from .eigenpairs import _decompose
from .factors import _factor_for
from .inputs import _check_common, _check_k, _covariance
from .plan import DEFAULT_MEMORY_BUDGET, _choose
from .prior import PriorGradientCovariance, _check_chunk, _parse_prior
from .prior_estimate import _prior_factor, _reject
from .result import ActiveSubspaceConvergence, ActiveSubspaceResult, _gaps


def active_subspace_convergence(model_or_objective, loss=None, data=None, *, sample_sizes: Sequence[int], k: int,
                                reference: ActiveSubspaceResult | None = None, g: str | Callable = "loss",
                                method: str = "auto", memory_budget: int = DEFAULT_MEMORY_BUDGET,
                                sampler: Callable | None = None, num_samples: int | None = None,
                                weights: Tensor | None = None, center: bool = False, subset=None, classes=None,
                                tol: float = 1e-6, chunk_size: int | None = None,
                                generator: torch.Generator | None = None, prior=None,
                                **objective_kwargs) -> ActiveSubspaceConvergence:
    r"""Top-k active subspace from growing numbers of samples, compared with a reference.

    For each N in ``sample_sizes`` the estimate uses the first N kept samples of one random
    permutation (nested subsets, so the curves are smooth), and is compared with the reference:
    by default the estimate from the largest N; or a :class:`ActiveSubspaceResult` computed
    separately (e.g. from more samples).  Reports the relative eigenvalue errors and, for every
    r = 1 … k, the distance ‖W_rW_rᵀ − Ŵ_rŴ_rᵀ‖₂ between the leading r-dimensional subspaces.
    ``seeds/002`` found that about as many samples as parameters (N ≈ P) are needed.

    With ``prior=`` (the matrix over parameter draws θ ∼ ρ, :mod:`.prior`) the samples are
    parameter draws: ``num_samples`` of them (default ``max(sample_sizes)``) are drawn once, and
    the estimate for each N uses the *first* N draws (they are i.i.d., so this is a random
    subset; ``prior_gradients`` with the same ``prior``, ``num_samples`` and ``generator``
    returns the same draws in the same order).

    **Cost**: the snapshot path computes the per-sample gradients once (all kept samples, or
    ``max(sample_sizes)`` draws of the sampler) and one top-k decomposition per N; the operator
    path runs one matrix-free Krylov SVD per N (each product a pass over all kept samples).

    Args:
        sample_sizes: numbers of samples N (1 ≤ k ≤ N ≤ kept samples).
        k: number of leading eigenpairs compared.
        reference: ``None`` (the largest N) or a result with at least k eigenvectors of the
            same parameters.
        num_samples: with ``sampler`` or ``prior``: how many to draw (default ``max(sample_sizes)``).
        prior: ``None`` (samples are data points) or a parameter prior as for
            :func:`active_subspace` (``"standard_normal"``, ``("around", sigma)``, a callable).
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
    if (sampler is not None or prior is not None) and num_samples is None:
        num_samples = sizes[-1]
    if prior is not None:
        _reject(api, sampler, weights, center, subset, classes, g,
                data is not None or isinstance(model_or_objective, Objective))
        _check_chunk(chunk_size, api)
        cov = PriorGradientCovariance(model_or_objective, loss, data, prior=_parse_prior(prior, api),
                                      num_samples=num_samples, generator=gen, chunk_size=chunk_size,
                                      **objective_kwargs)
        w = torch.ones(cov.num_samples, dtype=cov.torch_dtype, device=cov.device)
    else:
        cov = _covariance(model_or_objective, loss, data, g, sampler, num_samples, weights, center, subset, classes,
                          gen, objective_kwargs, api)
        w = cov.kept_weights()
    N, P = int(w.shape[0]), cov.shape[0]
    if sizes[-1] > N:
        what = "parameter draws (num_samples)" if prior is not None else "kept samples"
        raise ValueError(f"{api}: expected sample sizes ≤ the {N} {what}, got {sizes[-1]}.")
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
    chunk_bytes = None
    if prior is not None:
        chunk = cov.resolve_chunk_size(memory_budget)
        chunk_bytes = chunk * cov.workspace_per_draw()
    else:
        chunk = cov.default_chunk_size() if chunk_size is None else chunk_size
    plan = _choose(method, int(memory_budget), k, N, P, item, chunk, 0, True, api, chunk_bytes=chunk_bytes)
    timings: dict[str, float] = {}
    if prior is not None:
        factor, perm = _prior_factor(plan, cov, timings), torch.arange(N, device=w.device)
    else:
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
            layout=cov.objective.layout, method=plan.method, algorithm=_algorithm(plan, cov), num_samples=n,
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


def _algorithm(plan, cov) -> str:
    if isinstance(cov, PriorGradientCovariance):
        return f"{plan.description}; prior {cov.prior.description}"
    return plan.description


__all__ = ["active_subspace_convergence"]
