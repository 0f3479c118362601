r"""The thick-restarted block Krylov SVD of an operator given by its products (top-k singular triplets)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor


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
