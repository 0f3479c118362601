r"""Result types of the active-subspace analysis: eigenpairs with bootstrap bands and per-layer
sensitivity (:class:`ActiveSubspaceResult`), and their convergence in the number of samples
(:class:`ActiveSubspaceConvergence`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ...layout import ParamLayout


@dataclass
class ActiveSubspaceResult:
    r"""Eigenpairs of the active-subspace matrix C, with bootstrap bands and diagnostics.

    Attributes:
        eigenvalues: ``[k]`` descending (k = min(N, P) for the full spectrum: C has rank ≤ N, the
            other P − N eigenvalues are exactly zero).
        eigenvectors: ``[P, k]`` orthonormal columns (the active directions, layout order; the
            sign of each is fixed so that its largest entry is positive), or ``None``.
        gaps: ``[k − 1]`` λ_i − λ_{i+1}.
        gap_ratios: ``[k − 1]`` λ_i / λ_{i+1} (``inf`` where λ_{i+1} = 0): a large ratio after
            λ_r suggests an r-dimensional active subspace.
        layout: the parameters (names, shapes) the eigenvectors are laid out in.
        method: ``"snapshot"`` or ``"operator"``.
        algorithm: what computed the eigenpairs (e.g. ``"block Krylov SVD of F (dense G)"``).
        num_samples: samples kept (N).
        total_weight: W = Σ w_i over the kept samples.
        num_params: P.
        num_matvecs: columns of products with F or Fᵀ (0 for dense factorizations).
        num_passes: passes over the data (gradients or operator products).
        iterations: block Krylov iterations (0 for dense factorizations).
        converged: whether every eigenpair met ``tol`` (always true for dense factorizations).
        residuals: ``[k]`` relative residuals ‖Fᵀu_i − σ_i v_i‖ / σ_i of the singular triplets
            (the relative eigenvalue error is at most about twice this), or ``None`` (dense).
        timings: seconds: ``"gradients"``, ``"decomposition"``, ``"bootstrap"``, ``"total"``, and
            ``"covariance"`` (forming C chunk by chunk, part of ``"decomposition"``) for the prior
            estimator's streamed plans.
        memory_estimate: bytes the chosen plan was estimated to need (the ``memory_budget`` check).
        bootstrap: number of bootstrap replicates (0: none, and the fields below are ``None``).
        confidence: level of the percentile intervals.
        eigenvalue_lower, eigenvalue_upper: ``[k]`` percentile interval of each eigenvalue.
        subspace_distance_mean, subspace_distance_lower, subspace_distance_upper: ``[d]`` for
            r = 1 … d (d = min(k, 100)): the bootstrap distances between the estimated r-dimensional
            subspace and the replicates', ‖W_rW_rᵀ − Ŵ_rŴ_rᵀ‖₂ (the sine of the largest principal angle).
        bootstrap_eigenvalues: ``[B, k]`` replicate eigenvalues; bootstrap_distances: ``[B, d]``.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor | None
    gaps: Tensor
    gap_ratios: Tensor
    layout: ParamLayout
    method: str
    algorithm: str
    num_samples: int
    total_weight: float
    num_params: int
    num_matvecs: int
    num_passes: int
    iterations: int
    converged: bool
    residuals: Tensor | None
    timings: dict[str, float]
    memory_estimate: int
    bootstrap: int = 0
    confidence: float = 0.95
    eigenvalue_lower: Tensor | None = None
    eigenvalue_upper: Tensor | None = None
    subspace_distance_mean: Tensor | None = None
    subspace_distance_lower: Tensor | None = None
    subspace_distance_upper: Tensor | None = None
    bootstrap_eigenvalues: Tensor | None = field(default=None, repr=False)
    bootstrap_distances: Tensor | None = field(default=None, repr=False)

    @property
    def k(self) -> int:
        return int(self.eigenvalues.shape[0])

    def subspace(self, r: int) -> Tensor:
        """The r-dimensional active subspace: the first r eigenvectors ``[P, r]``."""
        W = self._vectors("subspace")
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= W.shape[1]:
            raise ValueError(f"ActiveSubspaceResult.subspace: expected 1 ≤ r ≤ {W.shape[1]}, got {r!r}.")
        return W[:, :r]

    def layer_sensitivity(self, by_size: bool = False) -> Tensor:
        r"""Where each active direction lives: ``[num_tensors, k]``, rows in ``layout.names`` order.

        Entry (t, j) is the fraction of eigenvector j's squared norm in parameter tensor t,
        $\sum_{p \in t} W_{pj}^2$; each column sums to 1.  With ``by_size=True`` each fraction
        is divided by the tensor's share of the parameters (numel_t / P): 1 means "as much as a
        direction spread evenly over all parameters would put there", > 1 a tensor the
        direction concentrates on.

        Raises:
            ValueError: the result was computed without eigenvectors.
        """
        W = self._vectors("layer_sensitivity")
        energy = W.square()
        parts = torch.split(energy, list(self.layout.numels), dim=0)
        frac = torch.stack([p.sum(0) for p in parts])  # [T, k]
        frac = frac / frac.sum(0, keepdim=True).clamp_min(torch.finfo(frac.dtype).tiny)
        if by_size:
            share = torch.tensor(self.layout.numels, dtype=frac.dtype, device=frac.device) / self.layout.size
            frac = frac / share[:, None]
        return frac

    def _vectors(self, api: str) -> Tensor:
        if self.eigenvectors is None:
            raise ValueError(f"ActiveSubspaceResult.{api}: expected eigenvectors, got none; call active_subspace "
                             f"with return_eigenvectors=True.")
        return self.eigenvectors


@dataclass
class ActiveSubspaceConvergence:
    r"""How the estimated top-k eigenpairs approach a reference as the number of samples grows.

    Attributes:
        sample_sizes: ``[m]`` numbers of samples N, ascending.
        eigenvalues: ``[m, k]`` estimated eigenvalues (descending) for each N.
        eigenvalue_errors: ``[m, k]`` relative errors |λ̂_i − λ_i| / λ_i against the reference
            (absolute where λ_i = 0).
        subspace_distances: ``[m, k]``: column r − 1 is ‖W_rW_rᵀ − Ŵ_rŴ_rᵀ‖₂ between the
            r-dimensional estimate and the reference.
        reference_eigenvalues: ``[k]``; reference_num_samples: N of the reference (``None`` if
            it was passed in).
        num_params: P (the seed's rule of thumb: N ≳ P).
        layout: the parameter layout.
        results: the :class:`ActiveSubspaceResult` of each N.
        timings: seconds: ``"gradients"`` (once), ``"decompositions"``, ``"total"``.
    """

    sample_sizes: Tensor
    eigenvalues: Tensor
    eigenvalue_errors: Tensor
    subspace_distances: Tensor
    reference_eigenvalues: Tensor
    reference_num_samples: int | None
    num_params: int
    layout: ParamLayout
    results: list[ActiveSubspaceResult] = field(repr=False)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def samples_per_parameter(self) -> Tensor:
        """N / P for each sample size."""
        return self.sample_sizes.to(torch.float64) / self.num_params


def _gaps(lam: Tensor) -> tuple[Tensor, Tensor]:
    gaps = lam[:-1] - lam[1:]
    with torch.no_grad():
        ratios = torch.where(lam[1:] > 0, lam[:-1] / lam[1:].clamp_min(torch.finfo(lam.dtype).tiny),
                             torch.full_like(gaps, math.inf))
    return gaps, ratios


__all__ = ["ActiveSubspaceResult", "ActiveSubspaceConvergence"]
