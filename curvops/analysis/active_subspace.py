r"""Active subspaces: the parameter directions a scalar function of a network is most sensitive to.

The active-subspace matrix of a scalar ``g(θ; x)`` (by default the loss of one sample) is

.. math:: C = \mathbb{E}_{x \sim \rho}\big[\nabla_\theta g\, \nabla_\theta g^\top\big]
          \approx \frac{1}{W}\sum_i w_i\, \nabla g_i \nabla g_i^\top = \hat W \hat\Lambda \hat W^\top,

with x from the data (optionally a subset or some classes, weighted) or drawn from a sampler ρ,
optionally centred (Constantine 2015).  Its leading eigenvectors are the directions along which
g changes most on average; the eigenvalue decay says how many there are, and the bootstrap
says how well N samples determine them (``seeds/002``: for the 1-35-35-35-35-35-1 MLP about
as many samples as parameters are needed).

Every decomposition works on a *factor* F with FᵀF = C,

.. math:: F = D\,(G - \mathbf{1}\mu^\top),\qquad D = \operatorname{diag}\big(\sqrt{w_i / W}\big),

where the rows of G are the per-sample gradients ∇g_i: the singular values σ of F give the
eigenvalues σ² of C without squaring the condition number, so small eigenvalues keep their
relative accuracy (products with C lose everything below ε·λ₁).  Two ways to get at F:

* **snapshot**: G in memory (chunked ``vmap(grad)``, one pass), then a thin SVD of F (small
  problems, or all eigenpairs), an eigendecomposition of C accumulated chunk by chunk without
  keeping G (all eigenpairs of a large problem), or a block Krylov SVD of F from dense products
  (top-k: a few block products with G instead of a P×P eigendecomposition);
* **operator**: the matrix-free :class:`~curvops.operators.covariance.GradientFactor` (a
  forward-mode pass for F V, a reverse-mode pass for Fᵀ U) with the same block Krylov SVD: memory
  O((N + P)·basis), no N×P matrix.

``method="auto"`` takes the snapshot path when its memory estimate fits ``memory_budget``.

References:
    Constantine (2015). *Active Subspaces: Emerging Ideas for Dimension Reduction in Parameter Studies*. SIAM.
    Constantine, Gleich (2014). *Computing Active Subspaces with Monte Carlo*. arXiv:1408.0545.
    Halko, Martinsson, Tropp (2011). *Finding Structure with Randomness*. SIAM Review 53(2).
    Golub, Kahan (1965). *Calculating the Singular Values and Pseudo-Inverse of a Matrix*.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..layout import ParamLayout
from ..objective import Objective, _tree_leaves
from ..operators.covariance import GradientCovariance

#: default ``memory_budget`` in bytes (1 GiB)
DEFAULT_MEMORY_BUDGET = 2**30
#: all eigenpairs: thin SVD of F (accurate to ε·σ₁ in σ) when min(N, P) is at most this
DENSE_SVD_MAX = 2048
#: top-k eigenpairs: dense SVD instead of the block Krylov SVD when min(N, P) is at most this
DENSE_TOPK_MAX = 256
#: bootstrap subspace distances are computed for r = 1 … min(k, this)
MAX_DISTANCE_DIMS = 100

METHODS = ("auto", "snapshot", "operator")


# ---- results ---------------------------------------------------------------------------------------
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
        timings: seconds: ``"gradients"``, ``"decomposition"``, ``"bootstrap"``, ``"total"``.
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


# ---- subspace distances -------------------------------------------------------------------------------
def subspace_distance(W: Tensor, W_hat: Tensor) -> Tensor:
    r"""Distance between the subspaces spanned by two orthonormal bases of equal size.

    .. math:: \operatorname{dist}(W, \hat W) = \|WW^\top - \hat W\hat W^\top\|_2
              = \|(I - WW^\top)\hat W\|_2 = \sin\theta_{\max}

    (θ_max the largest principal angle): 0 for the same subspace, 1 when some direction of one
    is orthogonal to the other.  Computed from the projection residual, so small distances keep
    their accuracy (no 1 − cos² cancellation).

    **Cost**: O(P r²).

    Args:
        W, W_hat: ``[P, r]`` matrices with orthonormal columns.

    Returns:
        A 0-dim tensor in [0, 1].

    Raises:
        ValueError: shapes that differ or are not 2-D.

    Example:
        >>> float(subspace_distance(torch.eye(3)[:, :1], torch.eye(3)[:, 1:2]))
        1.0
    """
    return subspace_distances(W, W_hat)[-1]


def subspace_distances(W: Tensor, W_hat: Tensor) -> Tensor:
    r"""``[r]``: :func:`subspace_distance` of the leading j columns of both bases, for j = 1 … r.

    With X = Ŵ − W(WᵀŴ) (the part of Ŵ outside span W) and M = WᵀŴ, the residual of the first j
    columns is $E_j = X_{:, :j} + W_{:, j:} M_{j:, :j}$, whose Gram matrix is a sum of positive
    semi-definite terms, $E_j^\top E_j = (X^\top X)_{:j, :j} + M_{j:, :j}^\top M_{j:, :j}$: one
    O(P r²) step, then r small eigenvalue problems.
    """
    api = "subspace_distances"
    if W.dim() != 2 or W_hat.dim() != 2 or W.shape != W_hat.shape or W.shape[1] == 0:
        raise ValueError(f"{api}: expected two bases of the same shape [P, r] (r ≥ 1), got {tuple(W.shape)} and "
                         f"{tuple(W_hat.shape)}.")
    dtype = torch.promote_types(W.dtype, torch.float64) if W.device.type != "mps" else W.dtype
    W, W_hat = W.to(dtype), W_hat.to(dtype=dtype, device=W.device)
    M = W.T @ W_hat
    X = W_hat - W @ M
    XtX = X.T @ X
    r = W.shape[1]
    out = torch.empty(r, dtype=dtype, device=W.device)
    for j in range(1, r + 1):
        S = XtX[:j, :j] + M[j:, :j].T @ M[j:, :j]
        out[j - 1] = torch.linalg.eigvalsh((S + S.T) / 2)[-1].clamp_min(0).sqrt()
    return out.clamp_max(1.0)


# ---- factors: F with FᵀF = C ----------------------------------------------------------------------------
class _DenseRows:
    """F = D (G − 1μᵀ) from per-sample gradients G held in memory (never copied for products)."""

    def __init__(self, G: Tensor, w: Tensor, center: bool, multipliers: Tensor | None = None):
        self.G, self.w, self.center = G, w, center
        ww = w if multipliers is None else w * multipliers
        self.total = float(ww.sum())
        self.p = ww / self.total
        self.d = self.p.sqrt()
        self.mu = (self.p @ G) if center else None
        self.shape = tuple(G.shape)
        self.dtype, self.device = G.dtype, G.device
        self.num_matvecs = 0
        self.num_passes = 0

    def reweight(self, multipliers: Tensor) -> "_DenseRows":
        return _DenseRows(self.G, self.w, self.center, multipliers)

    def matmat(self, V: Tensor) -> Tensor:  # [P, b] -> [N, b]
        self.num_matvecs += V.shape[1]
        Y = (V.T @ self.G.T).T  # measured ~1.8× faster than G @ V for a tall row-major G (MKL)
        if self.mu is not None:
            Y -= (self.mu @ V)[None]
        return Y.mul_(self.d[:, None])

    def rmatmat(self, U: Tensor) -> Tensor:  # [N, b] -> [P, b]
        self.num_matvecs += U.shape[1]
        Us = U * self.d[:, None]
        Z = (Us.T @ self.G).T  # row-major G: faster than G.T @ Us
        if self.mu is not None:
            Z = Z - self.mu[:, None] * Us.sum(0)[None]
        return Z

    def dense(self) -> Tensor:
        """F explicitly, without its zero rows (a copy)."""
        nz = self.d > 0
        G, d = (self.G, self.d) if bool(nz.all()) else (self.G[nz], self.d[nz])
        F = G - self.mu[None] if self.mu is not None else G.clone()
        return F.mul_(d[:, None])

    def covariance(self) -> Tensor:
        C = torch.zeros(self.shape[1], self.shape[1], dtype=self.G.dtype, device=self.G.device)
        step = max(1, 2**22 // max(1, self.shape[1]))
        for s in range(0, self.shape[0], step):
            _add_gram(C, self.G[s:s + step] * self.d[s:s + step, None])
        return _finish_gram(C, self.mu)


class _Streamed:
    """C accumulated from chunks of per-sample gradients, recomputed on every call (G never held)."""

    def __init__(self, cov: GradientCovariance, w: Tensor, chunk_size: int | None,
                 multipliers: Tensor | None = None):
        self.cov, self.w, self.chunk_size, self.multipliers = cov, w, chunk_size, multipliers
        ww = w if multipliers is None else w * multipliers
        self.total = float(ww.sum())
        self.p = ww / self.total
        self.shape = (int(w.shape[0]), cov.shape[1])
        self.dtype, self.device = cov.torch_dtype, cov.device
        self.num_matvecs = 0
        self.num_passes = 0
        self.gradient_seconds = 0.0  # of the passes, the time not spent accumulating C

    def reweight(self, multipliers: Tensor) -> "_Streamed":
        return _Streamed(self.cov, self.w, self.chunk_size, multipliers)

    def covariance(self) -> Tensor:
        P = self.shape[1]
        C = torch.zeros(P, P, dtype=self.cov.torch_dtype, device=self.cov.device)
        mu = torch.zeros(P, dtype=C.dtype, device=C.device) if self.cov.center else None
        row, gram = [0], [0.0]

        def consume(G, _w):
            start = time.perf_counter()
            p = self.p[row[0]:row[0] + G.shape[0]]
            row[0] += G.shape[0]
            _add_gram(C, G * p.sqrt()[:, None])
            if mu is not None:
                mu.add_(p @ G)
            gram[0] += time.perf_counter() - start

        start = time.perf_counter()
        self.cov.sample_gradient_pass(consume, self.chunk_size)
        self.gradient_seconds += time.perf_counter() - start - gram[0]
        self.num_passes += 1
        return _finish_gram(C, mu)


class _Matfree:
    """F matrix-free: :class:`~curvops.operators.covariance.GradientFactor` products (one pass each)."""

    def __init__(self, cov: GradientCovariance, w: Tensor, multipliers: Tensor | None = None):
        self.cov, self.w, self.multipliers = cov, w, multipliers
        self.F = cov.factor(multipliers, kept_weights=w)
        self.shape = tuple(self.F.shape)
        self.dtype, self.device = cov.torch_dtype, cov.device
        self.total = self.F.total_weight
        self.num_matvecs = 0
        self.num_passes = 0

    def reweight(self, multipliers: Tensor) -> "_Matfree":
        return _Matfree(self.cov, self.w, multipliers)

    def _mean_passes(self) -> None:
        if self.cov.center and self.F._mu is None:
            self.num_passes += 1

    def matmat(self, V: Tensor) -> Tensor:
        self._mean_passes()
        self.num_matvecs += V.shape[1]
        self.num_passes += 1
        return self.F @ V

    def rmatmat(self, U: Tensor) -> Tensor:
        self._mean_passes()
        self.num_matvecs += U.shape[1]
        self.num_passes += 1
        return self.F.T @ U

    def covariance(self) -> Tensor:
        """C densely from products: ``C @ I`` in blocks (P columns; one pass per block of the
        covariance operator, or two with the factor when reweighted)."""
        P, step = self.shape[1], self.cov.max_columns
        C = torch.empty(P, P, dtype=self.cov.torch_dtype, device=self.cov.device)
        for s in range(0, P, step):
            E = torch.zeros(P, min(step, P - s), dtype=C.dtype, device=C.device)
            E[torch.arange(s, s + E.shape[1]), torch.arange(E.shape[1])] = 1
            if self.multipliers is None:
                C[:, s:s + E.shape[1]] = self.cov @ E
                self.num_passes += 1
                self.num_matvecs += 2 * E.shape[1]
            else:
                C[:, s:s + E.shape[1]] = self.rmatmat(self.matmat(E))
        if self.cov.center and self.multipliers is None:
            self.num_passes += 1  # μ
        return C  # symmetric to rounding; eigh reads one triangle


def _gram_edges(P: int, blocks: int = 4) -> list[int]:
    return [0, P] if P < 512 else [round(P * i / blocks) for i in range(blocks + 1)]


def _add_gram(C: Tensor, A: Tensor) -> None:
    """C += AᵀA on the diagonal blocks and the blocks above them (about 5/8 of a full product)."""
    edges = _gram_edges(C.shape[0])
    for a, b in zip(edges[:-1], edges[1:]):
        C[a:b, a:].addmm_(A[:, a:b].T, A[:, a:])


def _finish_gram(C: Tensor, mu: Tensor | None) -> Tensor:
    """Mirror the blocks above the diagonal blocks (in place); subtract μμᵀ for a centred C."""
    edges = _gram_edges(C.shape[0])
    for a, b in zip(edges[:-1], edges[1:]):
        C[b:, a:b] = C[a:b, b:].T
    if mu is not None:
        C.addr_(mu, mu, alpha=-1)
    return C


# ---- the block Krylov SVD ------------------------------------------------------------------------------
@dataclass
class _SVD:
    S: Tensor  # [k] descending
    U: Tensor  # [M, k] left singular vectors (A's range side)
    V: Tensor  # [N, k] right singular vectors (the Krylov side)
    residuals: Tensor | None  # [k] relative ‖Aᵀu − σv‖ / σ
    iterations: int
    converged: bool


def _orthonormalize(Z: Tensor, basis: Tensor | None, generator, rel_floor: float = 1e-6) -> Tensor:
    """Columns of Z made orthonormal and orthogonal to ``basis`` (twice); dependent ones dropped."""
    Z = Z / Z.norm(dim=0, keepdim=True).clamp_min(torch.finfo(Z.dtype).tiny)
    for _ in range(2):
        if basis is not None and basis.shape[1]:
            Z = Z - basis @ (basis.T @ Z)
        Q, R = torch.linalg.qr(Z)
        keep = R.diagonal().abs() > rel_floor
        Z = Q[:, keep]
    return Z


def _block_krylov_svd(matmat: Callable[[Tensor], Tensor], rmatmat: Callable[[Tensor], Tensor], M: int, N: int,
                      k: int, *, tol: float, dtype, device, generator, v0: Tensor | None = None,
                      block_size: int | None = None, max_basis: int | None = None,
                      max_iters: int = 200) -> _SVD:
    r"""Top-k singular triplets of an M×N operator A by a thick-restarted block Krylov method.

    The basis K ⊂ ℝᴺ is expanded by the residuals $A^\top u_i - \sigma_i v_i$ of the wanted Ritz
    triplets — the next block of the Krylov space of AᵀA — and the triplets are taken from the
    thin SVD of Y = A K (kept column by column, no product repeated): σ comes from A itself,
    accurate to about ε·σ₁ absolutely.  The residuals are true products (one Aᵀ block per
    iteration), so a triplet is accepted when ‖Aᵀu − σv‖ ≤ tol·σ/2 (σ² then has relative error
    ≲ tol) or the residual is at rounding level (64·√N·ε·σ₁).  Thick restart keeps the best Ritz
    vectors when the basis is full.  Cost per iteration: one A product and one Aᵀ product of b
    columns; memory (M + 3N)·(basis size).
    """
    eps = torch.finfo(dtype).eps
    b = block_size or min(N, k + max(4, math.ceil(k / 2)))
    m_max = max_basis or min(N, max(4 * b, k + 2 * b))
    floor_factor = 64 * math.sqrt(max(M, N)) * eps
    start = torch.randn(N, b, generator=generator, dtype=dtype).to(device)
    if v0 is not None:
        j = min(b, v0.shape[1])
        start[:, :j] = v0[:, :j].to(dtype=dtype, device=device)
    K = _orthonormalize(start, None, generator)
    while K.shape[1] < b:  # a v0 with dependent columns: complete the block at random
        extra = torch.randn(N, b - K.shape[1], generator=generator, dtype=dtype).to(device)
        K = torch.cat([K, _orthonormalize(extra, K, generator)], dim=1)
    Y = _checked(matmat(K), "A @ V", 0)
    it = 0
    while True:
        it += 1
        Ub, S, Wh = torch.linalg.svd(Y, full_matrices=False)
        V = K @ Wh.T
        t = min(b, S.shape[0])
        Z = _checked(rmatmat(Ub[:, :t].contiguous()), "A.T @ U", it)
        R = Z - V[:, :t] * S[:t]
        res = R.norm(dim=0)
        floor = floor_factor * float(S[0])
        ok = (res <= 0.5 * tol * S[:t]) | (res <= floor)
        kk = min(k, t)
        full = K.shape[1] >= N
        if bool(ok[:kk].all()) or full or it >= max_iters:
            converged = bool(ok[:kk].all()) or full
            rel = res[:kk] / S[:kk].clamp_min(torch.finfo(dtype).tiny)
            return _SVD(S[:kk], Ub[:, :kk], V[:, :kk], rel, it, converged)
        room = N - K.shape[1]
        Q = _orthonormalize(R[:, ~ok][:, :room], K, generator)
        if Q.shape[1] == 0:  # an invariant subspace: continue with random directions
            Q = _orthonormalize(torch.randn(N, min(b, room), generator=generator, dtype=dtype).to(device), K,
                                generator)
        if K.shape[1] + Q.shape[1] > m_max:  # thick restart: keep the best Ritz vectors
            keep = max(k, m_max - Q.shape[1])
            K, Y = V[:, :keep], Ub[:, :keep] * S[:keep]
        K = torch.cat([K, Q], dim=1)
        Y = torch.cat([Y, _checked(matmat(Q), "A @ V", it)], dim=1)


def _checked(X: Tensor, what: str, it: int) -> Tensor:
    if not bool(torch.isfinite(X).all()):
        raise ValueError(f"active_subspace: the product {what} at iteration {it} returned NaN or Inf; check the "
                         f"model's gradients at these parameters (e.g. a diverged checkpoint).")
    return X


def _fix_signs(W: Tensor) -> Tensor:
    """Flip columns so that each one's largest-magnitude entry is positive (deterministic signs)."""
    if W.numel() == 0:
        return W
    idx = W.abs().argmax(dim=0)
    s = torch.sign(W[idx, torch.arange(W.shape[1], device=W.device)])
    s[s == 0] = 1
    return W * s[None]


# ---- decompositions -------------------------------------------------------------------------------------
@dataclass
class _Decomp:
    eigenvalues: Tensor
    eigenvectors: Tensor | None
    residuals: Tensor | None = None
    iterations: int = 0
    converged: bool = True


def _decompose(factor, algorithm: str, k: int | None, *, tol: float, generator, vectors: bool,
               v0: Tensor | None = None) -> _Decomp:
    N, P = factor.shape
    r = min(N, P)
    if algorithm == "svd":
        F = factor.dense()
        if not vectors and k is None:
            lam = torch.linalg.svdvals(F).square()
            return _Decomp(_pad(lam, r), None)
        _, S, Vh = torch.linalg.svd(F, full_matrices=False)
        kk = r if k is None else k
        return _Decomp(_pad(S.square(), r)[:kk], _fix_signs(_complete(Vh.T[:, :kk], kk, generator)))
    if algorithm in ("eigh", "operator-eigh"):
        C = factor.covariance()
        kk = r if k is None else k
        if not vectors:  # C is PSD: negative values are rounding
            return _Decomp(torch.linalg.eigvalsh(C).flip(0)[:kk].clamp_min(0), None)
        lam, W = torch.linalg.eigh(C)
        return _Decomp(lam.flip(0)[:kk].clamp_min(0), _fix_signs(W.flip(1)[:, :kk]))
    if algorithm == "gram":
        F = factor.dense()
        lam, U = torch.linalg.eigh(F @ F.T)
        lam, U = lam.flip(0), U.flip(1)
        kk = r if k is None else k
        lam = _pad(lam, r)[:kk]
        if not vectors:
            return _Decomp(lam, None)
        W = F.T @ U[:, :kk]  # fewer columns than kk when F has fewer (nonzero) rows
        s = lam[:W.shape[1]].sqrt()
        W = W / s.clamp_min(torch.finfo(s.dtype).tiny)[None]
        Q, R = torch.linalg.qr(W)  # re-orthonormalize; keeps the leading (accurate) directions
        Q = Q * torch.sign(R.diagonal()).masked_fill(R.diagonal() == 0, 1)[None]
        return _Decomp(lam, _fix_signs(_complete(Q, kk, generator)))
    if algorithm == "krylov":
        if N >= P:  # Krylov on the parameter side: A = F
            out = _block_krylov_svd(factor.matmat, factor.rmatmat, N, P, k, tol=tol, dtype=factor.dtype,
                                    device=factor.device, generator=generator, v0=v0)
            W = out.V
        else:  # fewer samples than parameters: Krylov on the sample side, A = Fᵀ
            v0s = None if v0 is None else factor.matmat(v0[:, :min(v0.shape[1], k + 4)])
            out = _block_krylov_svd(factor.rmatmat, factor.matmat, P, N, k, tol=tol, dtype=factor.dtype,
                                    device=factor.device, generator=generator, v0=v0s)
            W = out.U
        return _Decomp(out.S.square(), _fix_signs(W), out.residuals, out.iterations, out.converged)
    raise AssertionError(algorithm)


def _pad(lam: Tensor, r: int) -> Tensor:
    lam = lam.clamp_min(0) if lam.numel() else lam
    if lam.shape[0] >= r:
        return lam[:r]
    return torch.cat([lam, lam.new_zeros(r - lam.shape[0])])


def _complete(W: Tensor, k: int, generator) -> Tensor:
    """``W [P, j]`` (orthonormal) completed to k orthonormal columns with random directions orthogonal to it
    (eigenvectors of the eigenvalue 0 when the factor has fewer than k nonzero rows)."""
    if W.shape[1] >= k:
        return W
    extra = torch.randn(W.shape[0], k - W.shape[1], generator=generator, dtype=W.dtype).to(W.device)
    return torch.cat([W, _orthonormalize(extra, W, generator)], dim=1)


# ---- planning: which path and algorithm, and the memory it needs -----------------------------------------
@dataclass
class _Plan:
    path: str  # "stored" | "streamed" | "matfree"
    algorithm: str  # "svd" | "eigh" | "gram" | "krylov" | "operator-eigh"
    memory: int

    @property
    def method(self) -> str:
        return "operator" if self.path == "matfree" else "snapshot"

    @property
    def description(self) -> str:
        return {
            ("stored", "svd"): "thin SVD of F (G in memory)",
            ("stored", "krylov"): "block Krylov SVD of F (G in memory)",
            ("stored", "eigh"): "eigh of C = FᵀF (G in memory)",
            ("stored", "gram"): "eigh of the sample Gram matrix FFᵀ (G in memory)",
            ("streamed", "eigh"): "eigh of C accumulated chunk by chunk (G not kept)",
            ("matfree", "krylov"): "block Krylov SVD of the matrix-free factor F",
            ("matfree", "operator-eigh"): "eigh of C formed from GradientCovariance products",
        }[(self.path, self.algorithm)]


def _krylov_basis(k: int, n: int) -> int:
    b = min(n, k + max(4, math.ceil(k / 2)))
    return min(n, max(4 * b, k + 2 * b))


def _candidates(k: int | None, N: int, P: int, item: int, chunk: int, bootstrap: int, vectors: bool):
    """Plans in order of preference, with their memory estimates (bytes)."""
    r, big = min(N, P), max(N, P)
    chunk = min(chunk, N)
    G = N * P * item
    grads = 3 * chunk * P * item  # one vmapped chunk and its workspace
    eig = (4 if vectors else 2) * P * P * item
    snap, oper = [], []
    if k is None:
        if r <= DENSE_SVD_MAX:
            snap.append(_Plan("stored", "svd", G + grads + (N * P + N * r + r * P + 2 * r * r) * item))
        if N >= P or r > DENSE_SVD_MAX:
            if bootstrap:
                snap.append(_Plan("stored", "eigh", G + grads + eig))
            if N < P:
                snap.append(_Plan("stored", "gram", G + grads + (N * P + 4 * N * N + (P * N if vectors else 0)) * item))
            snap.append(_Plan("streamed", "eigh", grads + eig))
        oper.append(_Plan("matfree", "operator-eigh", eig + 3 * P * 64 * item))
    else:
        m = _krylov_basis(k, r)
        work = (2 * big + 4 * r) * m * item
        if r <= DENSE_TOPK_MAX:
            snap.append(_Plan("stored", "svd", G + grads + (N * P + N * r + r * P + 2 * r * r) * item))
        snap.append(_Plan("stored", "krylov", G + grads + work))
        oper.append(_Plan("matfree", "krylov", work))
    return snap, oper


def _choose(method: str, budget: int, k, N, P, item, chunk, bootstrap, vectors, api: str) -> _Plan:
    snap, oper = _candidates(k, N, P, item, chunk, bootstrap, vectors)
    pool = {"auto": snap + oper, "snapshot": snap, "operator": oper}[method]
    for plan in pool:
        if plan.memory <= budget:
            return plan
    need = min(p.memory for p in pool)
    hint = ("pass k= for the top eigenpairs" if k is None else
            "use method='operator' (matrix-free)" if method == "snapshot" else "reduce the number of samples")
    raise ValueError(f"{api}: expected the {method} path to fit memory_budget={budget:,} bytes, but it "
                     f"needs about {need:,} bytes (N={N}, P={P}, k={k}). Raise memory_budget or {hint}.")


# ---- inputs: data or a sampler --------------------------------------------------------------------------
def _leading(X, api: str, what: str) -> int:
    leaves = _tree_leaves(X)
    if not leaves:
        raise TypeError(f"{api}: expected the sampler's {what} to be a tensor (or a dict/tuple of tensors), got "
                        f"{type(X).__name__}.")
    dims = {int(t.shape[0]) if t.dim() else -1 for t in leaves}
    return dims.pop() if len(dims) == 1 else -1


def _draw(sampler: Callable, n: int, generator: torch.Generator, api: str):
    out = sampler(n, generator)
    if isinstance(out, tuple) and len(out) == 2:  # (inputs, targets)
        X, y = out
    else:
        X, y = out, None
    for what, T in (("inputs", X), ("targets", y)):
        if T is None:
            continue
        lead = _leading(T, api, what)
        if lead != n:
            got = "tensors with different leading dimensions" if lead == -1 else f"leading dimension {lead}"
            raise ValueError(f"{api}: expected sampler(n, generator) to return n samples (leading dimension n); "
                             f"sampler({n}, generator) returned {what} with {got}. Return X of shape [n, ...] "
                             f"(or (X, y)).")
    return X, y


def _sampled_data(model, loss, g, sampler, num_samples, generator, kwargs, api: str):
    if isinstance(model, Objective):
        raise TypeError(f"{api}: sampler= needs a model (an nn.Module or f(params, x)), got an Objective, whose data "
                        f"is fixed. Pass the model and loss instead.")
    if not callable(sampler):
        raise TypeError(f"{api}: expected sampler to be a callable sampler(n, generator) -> X or (X, y), got "
                        f"{type(sampler).__name__}.")
    if num_samples is None:
        raise ValueError(f"{api}: sampler= needs num_samples (how many inputs to draw from ρ), got None.")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"{api}: expected num_samples to be a positive integer, got {num_samples!r}.")
    probe_gen = torch.Generator(device=generator.device)
    probe_gen.set_state(generator.get_state())
    n0 = min(2, num_samples)
    X0, y0 = _draw(sampler, n0, probe_gen, api)
    if y0 is None and isinstance(g, str):
        raise ValueError(f"{api}: g='loss' needs targets, but the sampler returns inputs only. Return (X, y) from "
                         f"the sampler, or pass a callable g(outputs, targets) -> [n] (e.g. a model output).")
    probe = GradientCovariance(model, loss, X0 if y0 is None else (X0, y0), g=g, **kwargs)
    obj = probe.objective
    try:
        with obj.session(), torch.no_grad():
            for batch in obj.batches():
                probe._per_sample(batch)(*obj.theta())
    except (RuntimeError, ValueError, TypeError, IndexError, KeyError) as err:
        shapes = [tuple(t.shape) for t in _tree_leaves(X0)]
        raise ValueError(f"{api}: the model (or g) failed on a small draw of the sampler: sampler({n0}, generator) "
                         f"returned inputs of shape {shapes[0] if len(shapes) == 1 else shapes}; the error was: "
                         f"{err}. Make the sampler return inputs the model accepts.") from err
    X, y = _draw(sampler, num_samples, generator, api)
    return X if y is None else (X, y)


# ---- the shared set-up -----------------------------------------------------------------------------------
def _check_common(method, memory_budget, tol, generator, api: str) -> torch.Generator:
    if method not in METHODS:
        raise ValueError(f"{api}: expected method in {METHODS}, got {method!r}.")
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float)):
        raise TypeError(f"{api}: expected memory_budget as a number of bytes, got {type(memory_budget).__name__}.")
    if not (memory_budget > 0 and math.isfinite(memory_budget)):
        raise ValueError(f"{api}: expected a positive, finite memory_budget (bytes), got {memory_budget!r}.")
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"{api}: expected tol > 0, got {tol!r}.")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{api}: expected a torch.Generator, got {type(generator).__name__}.")
    return generator if generator is not None else torch.Generator().manual_seed(0)


def _covariance(model_or_objective, loss, data, g, sampler, num_samples, weights, center, subset, classes,
                gen, kwargs, api: str) -> GradientCovariance:
    if sampler is not None:
        if data is not None:
            raise TypeError(f"{api}: pass either data or sampler=, not both.")
        data = _sampled_data(model_or_objective, loss, g, sampler, num_samples, gen, kwargs, api)
    elif num_samples is not None:
        raise ValueError(f"{api}: num_samples applies to sampler= draws only; to use part of the data pass "
                         f"subset= (got num_samples={num_samples!r} without a sampler).")
    return GradientCovariance(model_or_objective, loss, data, g=g, weights=weights, center=center, subset=subset,
                              classes=classes, **kwargs)


def _check_k(k, N: int, P: int, api: str) -> None:
    r = min(N, P)
    if k is None:
        return
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= r:
        raise ValueError(f"{api}: expected 1 ≤ k ≤ min(N, P) = {r} (N = {N} kept samples, P = {P} parameters), "
                         f"got k={k!r}. Pass k=None for all eigenpairs.")


def _factor_for(plan: _Plan, cov: GradientCovariance, w: Tensor, chunk_size, timings: dict):
    start = time.perf_counter()
    if plan.path == "stored":
        G = torch.empty(w.shape[0], cov.shape[1], dtype=cov.torch_dtype, device=cov.device)
        row = [0]

        changed = ValueError("active_subspace: the number of kept samples changed between passes over the data; "
                             "the data must be the same on every pass (no shuffling).")

        def write(Gc, _w):  # in place: no second copy of G
            if row[0] + Gc.shape[0] > G.shape[0]:
                raise changed
            G[row[0]:row[0] + Gc.shape[0]] = Gc
            row[0] += Gc.shape[0]

        if cov.sample_gradient_pass(write, chunk_size) != G.shape[0]:
            raise changed
        factor = _DenseRows(G, w, cov.center)
        factor.num_passes = 1
    elif plan.path == "streamed":
        factor = _Streamed(cov, w, chunk_size)
    else:
        factor = _Matfree(cov, w)
    timings["gradients"] = time.perf_counter() - start
    return factor


def _gaps(lam: Tensor) -> tuple[Tensor, Tensor]:
    gaps = lam[:-1] - lam[1:]
    with torch.no_grad():
        ratios = torch.where(lam[1:] > 0, lam[:-1] / lam[1:].clamp_min(torch.finfo(lam.dtype).tiny),
                             torch.full_like(gaps, math.inf))
    return gaps, ratios


# ---- public API --------------------------------------------------------------------------------------------
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
                    generator: torch.Generator | None = None, **objective_kwargs) -> ActiveSubspaceResult:
    r"""Eigendecomposition of the active-subspace matrix of g, with optional bootstrap intervals.

    .. math:: C = \frac{1}{W}\sum_i w_i\,(\nabla g_i - \mu)(\nabla g_i - \mu)^\top
              = \hat W \hat\Lambda \hat W^\top \qquad(\mu = 0 \text{ unless } \texttt{center})

    over the kept samples i (all, ``subset``, ``classes``) of the data, or over ``num_samples``
    inputs drawn from ``sampler``.  ``k=None`` gives all min(N, P) eigenpairs; ``k`` the largest
    k.  The decomposition runs on the factor F = D(G − 1μᵀ) (module docstring): σ(F)² = λ(C).

    Paths (``method``): ``"snapshot"`` computes G (one pass of chunked ``vmap(grad)``) and then
    a thin SVD of F (min(N, P) ≤ 2048 for all eigenpairs, ≤ 256 for top-k), the eigendecomposition
    of C accumulated chunk by chunk without keeping G (all eigenpairs, larger problems), the
    eigendecomposition of the sample Gram matrix FFᵀ (all eigenpairs, N < P), or a block Krylov
    SVD of F from dense products (top-k).  ``"operator"`` never forms G: a block Krylov SVD of the
    matrix-free factor (top-k), or C densified from P products (all eigenpairs).  ``"auto"`` takes
    the first snapshot plan whose memory estimate fits ``memory_budget``, else the operator path.
    Both paths give the same eigenpairs (to ``tol``).

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
    start = time.perf_counter()
    dec = _decompose(factor, plan.algorithm, k, tol=tol, generator=gen, vectors=vectors)
    timings["decomposition"] = time.perf_counter() - start
    if isinstance(factor, _Streamed):  # the gradients were computed while accumulating C
        timings["gradients"] += factor.gradient_seconds
        timings["decomposition"] -= factor.gradient_seconds
    lam, W = dec.eigenvalues, dec.eigenvectors

    boot: dict = {}
    start = time.perf_counter()
    if bootstrap:
        boot = _bootstrap(factor, plan.algorithm, k, lam, W, bootstrap, confidence, tol, gen)
    timings["bootstrap"] = time.perf_counter() - start
    timings["total"] = time.perf_counter() - total_start
    gaps, ratios = _gaps(lam)
    return ActiveSubspaceResult(
        eigenvalues=lam, eigenvectors=W if return_eigenvectors else None, gaps=gaps, gap_ratios=ratios,
        layout=cov.objective.layout, method=plan.method, algorithm=plan.description, num_samples=N,
        total_weight=float(w.sum()), num_params=P, num_matvecs=factor.num_matvecs, num_passes=factor.num_passes,
        iterations=dec.iterations, converged=dec.converged, residuals=dec.residuals, timings=timings,
        memory_estimate=plan.memory, bootstrap=bootstrap, confidence=float(confidence), **boot,
    )


def _bootstrap(factor, algorithm: str, k, lam: Tensor, W: Tensor, B: int, confidence: float, tol: float,
               gen: torch.Generator) -> dict:
    N = factor.shape[0]
    kk = lam.shape[0]
    d = min(kk, MAX_DISTANCE_DIMS)
    lams, dists = [], []
    # every resample drawn before any decomposition: the resamples do not depend on how many random
    # numbers a decomposition takes (rank-deficient replicates complete their bases at random, and
    # how many directions that takes depends on the dtype's rounding)
    draws = torch.randint(0, N, (B, N), generator=gen)
    for idx in draws:
        counts = torch.bincount(idx, minlength=N).to(dtype=lam.dtype, device=lam.device)
        rep = factor.reweight(counts)
        dec = _decompose(rep, algorithm, k, tol=tol, generator=gen, vectors=True, v0=W)
        lams.append(_pad(dec.eigenvalues, kk))
        dists.append(subspace_distances(W[:, :d], dec.eigenvectors[:, :d]))
        factor.num_matvecs += rep.num_matvecs
        factor.num_passes += rep.num_passes
    L, D = torch.stack(lams), torch.stack(dists)
    levels = ((1 - confidence) / 2, (1 + confidence) / 2)
    # each in its own dtype: the eigenvalues follow the model's (float32 too), the distances are float64
    lq, dq = _quantiles(L, levels), _quantiles(D, levels)
    return dict(eigenvalue_lower=lq[0], eigenvalue_upper=lq[1], subspace_distance_mean=D.mean(0),
                subspace_distance_lower=dq[0], subspace_distance_upper=dq[1], bootstrap_eigenvalues=L,
                bootstrap_distances=D)


def _quantiles(T: Tensor, levels: tuple[float, float]) -> Tensor:
    """``[2, ...]``: the ``levels`` quantiles of T over its first dimension (torch.quantile wants q in T's dtype)."""
    q = torch.tensor(levels, dtype=T.dtype, device=T.device)
    return torch.quantile(T, q, dim=0)


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


__all__ = ["ActiveSubspaceResult", "ActiveSubspaceConvergence", "active_subspace", "active_subspace_convergence",
           "per_sample_gradients", "subspace_distance", "subspace_distances", "DEFAULT_MEMORY_BUDGET"]
