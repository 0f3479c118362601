"""Seeded test matrices with designed spectra (shared by the linear-algebra tests)."""

from __future__ import annotations

import torch
from torch import Tensor


def gen(seed: int = 0) -> torch.Generator:
    """A CPU generator with a fixed seed (tests never touch the global RNG)."""
    return torch.Generator().manual_seed(seed)


def with_spectrum(eigenvalues, seed: int = 0, dtype: torch.dtype = torch.float64) -> Tensor:
    """Q diag(λ) Qᵀ with a seeded random orthogonal Q, symmetrized exactly."""
    lam = torch.as_tensor(eigenvalues, dtype=dtype)
    Q, _ = torch.linalg.qr(torch.randn(lam.numel(), lam.numel(), generator=gen(seed), dtype=dtype))
    A = (Q * lam) @ Q.T
    return (A + A.T) / 2
