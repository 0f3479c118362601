r"""Eigenpairs of the active-subspace matrix C from a factor F (FᵀF = C): thin SVD of F, eigh of C,
eigh of the sample Gram matrix FFᵀ, the block Krylov SVD of F (or, for G in memory with N ≥ P and a
small k, block Lanczos on C = FᵀF whose products read G once), or block Krylov on C formed densely
(``gram-krylov``: one pass, P² memory; eigenvalues to about ε·λ₁ absolutely)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ...linalg.eigensolver import eigsh
from ...operators.base import Operator
from .krylov import _block_krylov_svd, _orthonormalize

#: block size of the Lanczos run on C = FᵀF for G held in memory (measured fastest at k = 20 on
#: the seed's 10 000 × 5146 G: 24 → 0.83 s, 8 → 1.5 s, 1 → 2.2 s)
_GRAM_BLOCK = 24


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
        gram = getattr(factor, "gram_matmat", None)
        if gram is not None and N >= P and k is not None and 2 * (k + _GRAM_BLOCK) <= P:
            return _gram_lanczos(gram, P, k, tol=tol, dtype=factor.dtype, device=factor.device,
                                 generator=generator, v0=v0,
                                 diagonal=factor.gram_diagonal() if v0 is None else None)
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


class _Gram(Operator):
    """C = FᵀF as an operator whose product reads G once (:meth:`_DenseRows.gram_matmat`)."""

    def __init__(self, gram, P: int, dtype, device):
        super().__init__((P, P), dtype, device, tags=("symmetric", "psd"))
        self._gram = gram

    def _matmat_torch(self, X: Tensor) -> Tensor:
        return self._gram(X)


def _gram_lanczos(gram, P: int, k: int, *, tol: float, dtype, device, generator, v0,
                  diagonal: Tensor | None = None) -> _Decomp:
    """Top-k of C = FᵀF by block Lanczos (``curvops.eigsh``) on fused products (one read of G each).

    ``tol`` means what it means for the Krylov SVD of F (‖Fᵀu − σv‖ ≤ tol·σ/2): in terms of C,
    ‖C v − λ v‖ ≈ σ‖Fᵀu − σv‖ ≤ (tol/2)·λ, so eigsh runs with tol/2 relative to the eigenvalue.

    Start block: the warm start ``v0`` (bootstrap), else Gaussian columns scaled by ``diagonal``
    = diag(C) (floored at 10⁻³ of its largest entry, so every direction keeps a share): a free
    diagonal stand-in for one power step, enriched in the coordinates the gradients move most.  At
    the seed's size it saves 2 of 11 block iterations (0.93 s against 1.12 s), same residuals.
    """
    b = _GRAM_BLOCK
    start = None
    if v0 is not None:  # a warm start (bootstrap): the previous eigenvectors, completed to the block
        start = torch.randn(P, b, generator=generator, dtype=dtype).to(device)
        j = min(b, v0.shape[1])
        start[:, :j] = v0[:, :j].to(dtype=dtype, device=device)
    elif diagonal is not None and float(diagonal.max()) > 0:
        scale = diagonal.clamp_min(1e-3 * float(diagonal.max()))
        start = torch.randn(P, b, generator=generator, dtype=dtype).to(device) * scale[:, None]
    res = eigsh(_Gram(gram, P, dtype, device), k=k, which="LA", tol=0.5 * tol, block_size=b,
                generator=generator, v0=start)
    lam = res.eigenvalues.flip(0)
    W = res.eigenvectors.flip(1)
    rel = res.residuals.flip(0) / lam.abs().clamp_min(torch.finfo(dtype).tiny)
    return _Decomp(lam.clamp_min(0), _fix_signs(W), rel, res.iterations, bool(res.converged))


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
