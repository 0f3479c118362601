r"""The active-subspace estimate: per-sample gradients and the eigendecomposition of C, by the
snapshot or the operator path (see :mod:`curvops.analysis.active_subspace`)."""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import Tensor

from ...operators.covariance import GradientCovariance
from .factors import _factor_for, _Streamed
from .inputs import _check_common, _check_k, _covariance
from .plan import DEFAULT_MEMORY_BUDGET, _choose
from .prior_estimate import _prior_active_subspace
from .result import ActiveSubspaceResult
from .summarize import _decompose_and_summarize


def per_sample_gradients(model_or_objective, loss=None, data=None, *, g: str | Callable = "loss",
                         chunk_size: int | None = None, **objective_kwargs) -> Tensor:
    r"""All per-sample gradients as rows: ``G [N, P]``, row i = ∇_θ g_i (layout order).

    ``g_i`` is the loss of sample i alone (``g="loss"``) or ``g(outputs, targets)[i]`` for a
    callable ``g`` that acts sample by sample.  Then the (uncentred) active-subspace matrix is
    ``G.T @ G / N``.

    **Cost**: one pass over the data; per chunk of ``chunk_size`` samples one
    ``vmap(grad(g_i))`` (each sample evaluated alone, as a batch of one); memory N·P entries
    for G plus one chunk's workspace.  The model is left as found.

    Args:
        model_or_objective, loss, data, **objective_kwargs: as for :class:`~curvops.Hessian`
            (``loss`` may be omitted for a callable ``g``).
        g: ``"loss"`` or a callable ``g(outputs, targets) -> [n]``.
        chunk_size: samples per vmapped chunk (default: about 4M gradient entries, 16–1024 samples).

    Returns:
        ``[N, P]`` tensor in the parameters' dtype and device.

    Raises:
        ValueError: a ``g`` that does not return one value per sample, a bad ``chunk_size``.

    Example:
        >>> G = per_sample_gradients(model, "mse", (X, y))                    # doctest: +SKIP
        >>> C = G.T @ G / G.shape[0]                                          # doctest: +SKIP
    """
    cov = GradientCovariance(model_or_objective, loss, data, g=g, **objective_kwargs)
    G, _ = cov.sample_gradients(chunk_size)
    return G


def active_subspace(model_or_objective, loss=None, data=None, *, g: str | Callable = "loss", k: int | None = None,
                    method: str = "auto", memory_budget: int = DEFAULT_MEMORY_BUDGET, sampler: Callable | None = None,
                    num_samples: int | None = None, weights: Tensor | None = None, center: bool = False,
                    subset=None, classes=None, bootstrap: int = 0, confidence: float = 0.95, tol: float = 1e-6,
                    return_eigenvectors: bool = True, chunk_size: int | None = None,
                    generator: torch.Generator | None = None, prior=None,
                    **objective_kwargs) -> ActiveSubspaceResult:
    r"""Eigendecomposition of the active-subspace matrix of g, with optional bootstrap intervals.

    .. math:: C = \frac{1}{W}\sum_i w_i\,(\nabla g_i - \mu)(\nabla g_i - \mu)^\top
              = \hat W \hat\Lambda \hat W^\top \qquad(\mu = 0 \text{ unless } \texttt{center})

    over the kept samples i (all, ``subset``, ``classes``) of the data, or over ``num_samples``
    inputs drawn from ``sampler``.  ``k=None`` gives all min(N, P) eigenpairs; ``k`` the largest
    k.  The decomposition runs on the factor F = D(G − 1μᵀ) (package docstring): σ(F)² = λ(C).

    Paths (``method``): ``"snapshot"`` computes G (one pass of chunked ``vmap(grad)``) and then
    a thin SVD of F (min(N, P) ≤ 2048 for all eigenpairs, ≤ 256 for top-k), the eigendecomposition
    of C accumulated chunk by chunk without keeping G (all eigenpairs, larger problems), the
    eigendecomposition of the sample Gram matrix FFᵀ (all eigenpairs, N < P), or a block Krylov
    method on the G in memory (top-k: block Lanczos on C = FᵀF whose products read G once, for
    N ≥ P and a small k; the block Krylov SVD of F otherwise).  ``"operator"`` never forms G: a block Krylov SVD of the
    matrix-free factor (top-k), or C densified from P products (all eigenpairs).  ``"auto"`` takes
    the first snapshot plan whose memory estimate fits ``memory_budget``, else the operator path.
    Both paths give the same eigenpairs (to ``tol``).

    With ``prior=`` (``seeds/002`` as written) the average runs over ``num_samples`` *parameter*
    draws θ_j ∼ ρ at the fixed data set instead: C = (1/N) Σ_j ∇L(θ_j)∇L(θ_j)ᵀ with L the
    whole-data loss (:mod:`.prior`); ``sampler=`` (inputs x ∼ ρ) and ``prior=`` (parameters θ ∼ ρ)
    exclude each other.  The same plans, bootstrap (over the draws) and result, plus one more
    top-k snapshot plan, taken when G (N·P) does not fit ``memory_budget``: C accumulated chunk by
    chunk in one pass and block Krylov on it (memory P² + one chunk; :mod:`.prior_estimate`);
    ``"operator"`` recomputes the gradients in chunks on every product (memory chunk·P, not N·P).

    Bootstrap (``bootstrap=B``): B resamples of the kept samples with replacement (multinomial
    counts as weights), each decomposed the same way (Krylov warm-started from the estimate); the
    percentile intervals at ``confidence`` of every eigenvalue and of the subspace distance
    between the estimate's leading r eigenvectors and each replicate's, r = 1 … min(k, 100)
    (Constantine 2015, §3.3).  The B resamples are drawn before any replicate is decomposed, so
    a float32 and a float64 model given the same generator resample the same way.

    **Cost**: snapshot: one gradient pass (≈ N per-sample gradients) + the decomposition: a thin
    SVD O(N·P·min(N, P)), an eigendecomposition O(P³) after O(N·P²) to accumulate C, or a few
    block products with G (O(N·P·b) each); memory N·P (G) + the decomposition's workspace.
    Operator: per Krylov iteration one forward-mode and one reverse-mode pass with b ≈ 1.5k
    columns.  Bootstrap: B more decompositions (and, where G is not kept, B more gradient passes).

    Args:
        model_or_objective, loss, data, **objective_kwargs: as for :class:`~curvops.Hessian`.
            ``loss`` may be omitted for a callable ``g``; ``data`` must be omitted with ``sampler``.
        g: ``"loss"`` (the loss of each sample alone) or a callable ``g(outputs, targets) -> [n]``
            acting sample by sample (e.g. ``lambda out, y: out[:, 0]``; ``targets`` is ``None``
            when the sampler returns inputs only).
        k: number of leading eigenpairs (1 ≤ k ≤ min(N, P)), or ``None`` for all.
        method: ``"auto"``, ``"snapshot"`` or ``"operator"``.
        memory_budget: bytes the snapshot path may use (G and the decomposition's workspace).
        sampler: ``sampler(n, generator) -> X`` or ``(X, y)`` drawing n inputs from ρ (a 2-tuple
            is read as inputs and targets: return ``((x1, x2), None)`` for tuple inputs); it is
            first called with n = 2 (on a copy of the generator) to check shapes and that the
            model runs.
        num_samples: how many inputs to draw (required with ``sampler``).
        weights: per-sample weights ``[N]`` (data order, or draw order), ≥ 0.
        center: use the covariance (subtract the weighted mean gradient).
        subset: sample indices or a boolean mask ``[N]`` (data order).
        classes: integer class(es); keeps samples whose integer target is among them.
        bootstrap: number of bootstrap replicates B (0 for none).
        confidence: level of the percentile intervals, in (0, 1).
        tol: relative eigenvalue accuracy of the Krylov SVD (dense factorizations are exact to rounding).
        return_eigenvectors: keep the eigenvectors (``False`` saves memory and, for all
            eigenpairs, time: eigenvalues only).
        chunk_size: samples per ``vmap(grad)`` chunk of the snapshot path.
        generator: random source for the sampler, the Krylov start block and the bootstrap
            (default ``torch.Generator().manual_seed(0)``: reproducible, global RNG untouched).
        prior: ``None`` (average over data samples), or a prior over the flat selected parameters:
            ``"standard_normal"`` (θ ∼ N(0, I)), ``("around", sigma)`` (θ ∼ N(θ₀, σ²I), θ₀ the
            model's parameters) or a callable ``prior(n, generator) -> Tensor[n, P]``; needs
            ``num_samples`` (draws) and ``g="loss"``; excludes sampler/weights/subset/classes/center.

    Returns:
        :class:`ActiveSubspaceResult`.

    Raises:
        ValueError: k out of range; a bad method, memory_budget, tol, bootstrap or confidence; a
            plan that does not fit ``memory_budget`` with ``method="snapshot"`` (or at all); a
            sampler that returns the wrong number of samples or inputs the model rejects;
            ``g="loss"`` with a sampler that returns no targets; ``num_samples`` without a sampler
            or missing with one; bad weights/subset/classes (as for GradientCovariance).
        TypeError: data and a sampler together; a sampler with an Objective; wrong kinds.

    Example:
        >>> res = active_subspace(model, "mse", (X, y), k=20, bootstrap=100)      # doctest: +SKIP
        >>> res.eigenvalues, res.eigenvalue_lower, res.layer_sensitivity()        # doctest: +SKIP

    References:
        Constantine (2015). *Active Subspaces: Emerging Ideas for Dimension Reduction in Parameter Studies*.
    """
    api = "active_subspace"
    total_start = time.perf_counter()
    gen = _check_common(method, memory_budget, tol, generator, api)
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 0:
        raise ValueError(f"{api}: expected bootstrap to be a non-negative integer (number of replicates), got "
                         f"{bootstrap!r}.")
    if not (isinstance(confidence, (int, float)) and 0 < confidence < 1):
        raise ValueError(f"{api}: expected 0 < confidence < 1, got {confidence!r}.")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"{api}: expected k to be a positive integer or None, got {k!r}.")
    if prior is not None:
        return _prior_active_subspace(
            model_or_objective, loss, data, prior=prior, num_samples=num_samples, g=g, k=k, method=method,
            memory_budget=memory_budget, sampler=sampler, weights=weights, center=center, subset=subset,
            classes=classes, bootstrap=bootstrap, confidence=confidence, tol=tol,
            return_eigenvectors=return_eigenvectors, chunk_size=chunk_size, generator=gen,
            objective_kwargs=objective_kwargs)
    cov = _covariance(model_or_objective, loss, data, g, sampler, num_samples, weights, center, subset, classes,
                      gen, objective_kwargs, api)
    w = cov.kept_weights()
    N, P = int(w.shape[0]), cov.shape[0]
    _check_k(k, N, P, api)
    item = torch.empty((), dtype=cov.torch_dtype).element_size()
    chunk = cov.default_chunk_size() if chunk_size is None else chunk_size
    vectors = bool(return_eigenvectors) or bootstrap > 0
    plan = _choose(method, int(memory_budget), k, N, P, item, chunk, bootstrap, vectors, api)

    timings: dict[str, float] = {}
    factor = _factor_for(plan, cov, w, chunk_size, timings)
    return _decompose_and_summarize(
        factor, plan, k, streamed=isinstance(factor, _Streamed), tol=tol, generator=gen, vectors=vectors,
        return_eigenvectors=return_eigenvectors, bootstrap=bootstrap, confidence=confidence, timings=timings,
        total_start=total_start, layout=cov.objective.layout, method=plan.method, algorithm=plan.description,
        num_samples=N, total_weight=float(w.sum()), num_params=P)


__all__ = ["per_sample_gradients", "active_subspace"]
