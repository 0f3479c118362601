r"""Eigenpairs of the active-subspace matrix C from a factor F (FᵀF = C): thin SVD of F, eigh of C,
eigh of the sample Gram matrix FFᵀ, the block Krylov SVD of F, or block Krylov on C formed densely
(``gram-krylov``: one pass, P² memory; eigenvalues to about ε·λ₁ absolutely)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .krylov import _block_krylov_svd, _orthonormalize


def _fix_signs(W: Tensor) -> Tensor:
    """Flip columns so that each one's largest-magnitude entry is positive (deterministic signs)."""
    if W.numel() == 0:
        return W
    idx = W.abs().argmax(dim=0)
    s = torch.sign(W[idx, torch.arange(W.shape[1], device=W.device)])
    s[s == 0] = 1
    return W * s[None]


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
    if algorithm == "gram-krylov":  # C formed (one pass); the top-k of the symmetric PSD C by block Krylov
        C = factor.covariance()
        P_ = C.shape[0]
        out = _block_krylov_svd(C.__matmul__, C.__matmul__, P_, P_, k, tol=tol, dtype=C.dtype, device=C.device,
                                generator=generator, v0=v0)
        return _Decomp(out.S, _fix_signs(out.V), out.residuals, out.iterations, out.converged)
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
