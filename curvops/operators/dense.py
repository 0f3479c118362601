"""Small helper operators: Dense, Diagonal, Identity, LowRank (U S Vᵀ)."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

from . import tags as _tags
from .base import Operator


def _as_float_tensor(x, api: str, dtype=None, device=None) -> Tensor:
    t = torch.as_tensor(x, dtype=dtype, device=device)
    if not t.is_floating_point():
        t = t.to(torch.get_default_dtype())
    return t


class Dense(Operator):
    """An explicit matrix as an operator.  Tags are whatever the caller promises."""

    def __init__(self, A, tags: Iterable[str] = ()):
        A = _as_float_tensor(A, "Dense")
        if A.dim() != 2:
            raise ValueError(f"Dense: expected a 2-D matrix, got shape {tuple(A.shape)}.")
        super().__init__(tuple(A.shape), A.dtype, A.device, tags=tags)
        self.A = A

    def _matmat_torch(self, V):
        return self.A @ V

    def _rmatmat_torch(self, W):
        return self.A.T @ W


class Diagonal(Operator):
    """``diag(d)``; symmetric, and PSD when the caller says so or every entry is ≥ 0 at construction."""

    def __init__(self, d):
        d = _as_float_tensor(d, "Diagonal")
        if d.dim() != 1:
            raise ValueError(f"Diagonal: expected a 1-D vector of diagonal entries, got shape {tuple(d.shape)}.")
        # The values are known exactly here, so PSD is a fact, not a guess.
        tags = {_tags.SYMMETRIC} | ({_tags.PSD} if bool((d >= 0).all()) else set())
        super().__init__((d.numel(), d.numel()), d.dtype, d.device, tags=tags)
        self.d = d

    def _matmat_torch(self, V):
        return self.d[:, None] * V


class Identity(Operator):
    """The n×n identity."""

    def __init__(self, n: int, *, dtype=torch.float64, device="cpu"):
        super().__init__((n, n), dtype, device, tags={_tags.PSD})

    def _matmat_torch(self, V):
        return V.clone()


class LowRank(Operator):
    """``U diag(S) Vᵀ`` with U [M, r], S [r], V [N, r]; ``V=None`` means ``U diag(S) Uᵀ`` (symmetric).

    Tags: symmetric when ``V is None``; PSD when in addition all S ≥ 0.
    """

    def __init__(self, U, S, V=None):
        U = _as_float_tensor(U, "LowRank")
        S = torch.as_tensor(S, dtype=U.dtype, device=U.device)
        if U.dim() != 2 or S.dim() != 1 or S.numel() != U.shape[1]:
            raise ValueError(
                f"LowRank: expected U [M, r] and S [r], got U {tuple(U.shape)} and S {tuple(S.shape)}."
            )
        if V is not None:
            V = torch.as_tensor(V, dtype=U.dtype, device=U.device)
            if V.dim() != 2 or V.shape[1] != U.shape[1]:
                raise ValueError(f"LowRank: expected V [N, {U.shape[1]}], got {tuple(V.shape)}.")
            tags, N = set(), V.shape[0]
        else:
            tags = {_tags.SYMMETRIC} | ({_tags.PSD} if bool((S >= 0).all()) else set())
            N = U.shape[0]
        super().__init__((U.shape[0], N), U.dtype, U.device, tags=tags)
        self.U, self.S, self.V = U, S, V

    def _matmat_torch(self, X):
        right = self.U if self.V is None else self.V
        return self.U @ (self.S[:, None] * (right.T @ X))

    def _rmatmat_torch(self, W):
        right = self.U if self.V is None else self.V
        return right @ (self.S[:, None] * (self.U.T @ W))
