r"""Distances between subspaces: ‖WWᵀ − ŴŴᵀ‖₂, the sine of the largest principal angle."""

from __future__ import annotations

import torch
from torch import Tensor


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


__all__ = ["subspace_distance", "subspace_distances"]
