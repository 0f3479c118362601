r"""Lanczos: the tridiagonalization primitive (the eigensolver built on it is :mod:`.eigensolver`).

For a symmetric $A \in \mathbb{R}^{n \times n}$ and a start vector $q_1$, $m$ Lanczos steps
build an orthonormal basis $Q_m = [q_1, \dots, q_m]$ of the Krylov space
$\mathcal{K}_m(A, q_1) = \operatorname{span}\{q_1, A q_1, \dots, A^{m-1} q_1\}$ and the
tridiagonal projection $T_m = Q_m^\top A Q_m$:

.. math:: A Q_m = Q_m T_m + \beta_m q_{m+1} e_m^\top .

The eigenpairs $(\theta_i, s_i)$ of $T_m$ give Ritz pairs $(\theta_i, Q_m s_i)$ whose residual
norms are known without another product: $\|A Q_m s_i - \theta_i Q_m s_i\| = \beta_m |e_m^\top s_i|$.

In floating point the three-term recurrence loses orthogonality as soon as a Ritz pair
converges, and the lost directions come back as *ghost* copies of converged eigenvalues
(Paige 1971; the anchors saw ten copies of the top Hessian eigenvalue).  Everything here
reorthogonalizes every new vector against the whole basis, twice ("twice is enough"), so
no ghosts appear; the price is O(n m) memory and O(n m) flops per step, negligible next to a
curvature product.

Everything runs on ``A.device`` in ``A.torch_dtype``; only the small projected matrices are
diagonalized (in float64 where the device has it).

References:
    Lanczos (1950). *An Iteration Method for the Solution of the Eigenvalue Problem of Linear
    Differential and Integral Operators.*
    Paige (1971). *The Computation of Eigenvalues and Eigenvectors of Very Large Sparse Matrices.*
    Parlett (1998). *The Symmetric Eigenvalue Problem.*
    Wu, Simon (2000). *Thick-Restart Lanczos Method for Large Symmetric Eigenvalue Problems.*
    Golub, Underwood (1977). *The Block Lanczos Method for Computing Eigenvalues.*
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ._checks import check_flag, check_generator, check_int
from ._primitives import _breakdown_tol, _random_orthonormal, apply, as_square_operator, random_block  # noqa: F401
from .eigensolver import EighResult, eigsh  # noqa: F401  (the eigensolver's old home: curvops.linalg.lanczos.eigsh)

__all__ = ["lanczos", "tridiagonal", "LanczosDecomposition", "eigsh", "EighResult"]


class LanczosDecomposition(NamedTuple):
    """Output of :func:`lanczos`: ``T = tridiag(betas, alphas, betas)`` and the basis ``Q``.

    For one start vector: ``alphas [m]``, ``betas [m-1]``, ``Q [n, m]``; for a block of K start
    vectors (K independent runs): ``alphas [K, m]``, ``betas [K, m-1]``, ``Q [K, n, m]``.
    """

    alphas: Tensor
    betas: Tensor
    Q: Tensor


# ---- the tridiagonalization primitive ------------------------------------------------------------
def lanczos(A, v0: Tensor, num_steps: int, *, reorthogonalize: bool = True,
            generator: torch.Generator | int | None = None) -> LanczosDecomposition:
    r"""Run ``num_steps`` Lanczos steps from ``v0``: $A Q \approx Q T$ with $T$ tridiagonal.

    .. math:: Q^\top A Q = T = \begin{pmatrix} \alpha_1 & \beta_1 \\ \beta_1 & \alpha_2 & \ddots \\
              & \ddots & \ddots \end{pmatrix}, \qquad Q^\top Q = I, \qquad Q e_1 = v_0 / \|v_0\|.

    A block ``v0 [n, K]`` runs K *independent* recurrences side by side (each with its own basis
    and T), so each step is one product ``A @ V`` with K columns — one data pass for all K
    (this is how stochastic Lanczos quadrature runs its probes).  A recurrence that reaches an
    invariant subspace (β ≈ 0) continues with a random vector orthogonal to its basis and
    β = 0, so T stays an exact projection and ``num_steps = n`` always rebuilds A:
    $A = Q T Q^\top$.

    **Cost**: ``num_steps`` products with K columns; memory K·n·num_steps; with
    ``reorthogonalize`` (default) 4·K·n·j extra flops at step j.

    Args:
        A: symmetric operator (anything :func:`curvops.as_operator` accepts), n × n.
        v0: start vector ``[n]`` or block of start vectors ``[n, K]`` (nonzero columns).
        num_steps: number of steps m, 1 ≤ m ≤ n.
        reorthogonalize: full reorthogonalization against all previous vectors (twice).
            ``False`` gives the plain three-term recurrence, which in floating point produces
            ghost copies of converged eigenvalues — kept for demonstrations and tests.
        generator: random source for the vectors that replace a breakdown: ``None``,
            a ``torch.Generator``, or an int seed (a new generator on the operator's device,
            seeded with it).

    Returns:
        :class:`LanczosDecomposition` ``(alphas, betas, Q)``.

    Raises:
        ValueError: non-square operator, bad ``num_steps``, zero or non-finite start vector, or a
            product that returned NaN/Inf (the message names the step).
        TypeError: an argument of the wrong kind: a count that is not an int (e.g. a float),
            a ``generator`` that is not None, a ``torch.Generator`` or an int seed, a flag that
            is not a bool, a tolerance that is not a real number.
    """
    api = "lanczos"
    A = as_square_operator(A, api)
    n = A.shape[0]
    num_steps = check_int(num_steps, "num_steps", api, minimum=1, maximum=n, expected=f"1 ≤ num_steps ≤ n = {n}")
    reorthogonalize = check_flag(reorthogonalize, "reorthogonalize", api)
    generator = check_generator(generator, api, A.device, operator=A)
    v0 = torch.as_tensor(v0)
    single = v0.dim() == 1
    V = v0[:, None] if single else v0
    if V.dim() != 2 or V.shape[0] != n:
        raise ValueError(f"{api}: expected v0 of shape [{n}] or [{n}, K], got {tuple(v0.shape)}.")
    V = V.to(dtype=A.torch_dtype, device=A.device)
    norms = V.norm(dim=0)
    if not bool(torch.isfinite(norms).all()) or bool((norms == 0).any()):
        raise ValueError(f"{api}: expected finite, nonzero start vectors, got norms {norms.tolist()}.")
    K, m = V.shape[1], num_steps
    Qs = torch.zeros(K, m, n, dtype=A.torch_dtype, device=A.device)  # row j of run k: q_j
    Qs[:, 0] = (V / norms).T
    alphas = torch.zeros(K, m, dtype=A.torch_dtype, device=A.device)
    betas = torch.zeros(K, max(m - 1, 0), dtype=A.torch_dtype, device=A.device)
    anorm = torch.zeros(K, dtype=A.torch_dtype, device=A.device)
    tol = _breakdown_tol(A.torch_dtype)
    for j in range(m):
        q = Qs[:, j]  # [K, n]
        W = apply(A, q.T.contiguous(), api, j + 1).T  # [K, n]
        anorm = torch.maximum(anorm, W.norm(dim=1))
        alpha = (q * W).sum(dim=1)
        alphas[:, j] = alpha
        if j == m - 1:
            break
        W = W - alpha[:, None] * q
        if j > 0:
            W = W - betas[:, j - 1, None] * Qs[:, j - 1]
        if reorthogonalize:
            basis = Qs[:, : j + 1]  # [K, j+1, n]
            for _ in range(2):
                W = W - torch.bmm(torch.bmm(basis, W[:, :, None]).transpose(1, 2), basis)[:, 0]
        beta = W.norm(dim=1)
        broken = beta <= tol * anorm
        Qs[:, j + 1] = W / torch.where(broken, torch.ones_like(beta), beta)[:, None]
        if bool(broken.any()):
            for r in torch.nonzero(broken).flatten().tolist():
                Qs[r, j + 1] = _random_orthonormal(1, Qs[r, : j + 1], n, A.torch_dtype, A.device, generator)[:, 0]
            beta = torch.where(broken, torch.zeros_like(beta), beta)
        betas[:, j] = beta
    Q = Qs.transpose(1, 2)  # [K, n, m]
    if single:
        return LanczosDecomposition(alphas[0], betas[0], Q[0])
    return LanczosDecomposition(alphas, betas, Q)


def tridiagonal(alphas: Tensor, betas: Tensor) -> Tensor:
    """The symmetric tridiagonal matrix (or batch of them) with diagonal ``alphas`` and off-diagonal ``betas``."""
    T = torch.diag_embed(alphas)
    if betas.shape[-1] > 0:
        T = T + torch.diag_embed(betas, offset=1) + torch.diag_embed(betas, offset=-1)
    return T
