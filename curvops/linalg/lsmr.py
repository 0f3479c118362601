r"""LSMR on $\min_x \|Ax - b\|^2 + \lambda\|x\|^2$ for any rectangular $A$, block right-hand sides.

The kernel behind :func:`curvops.linalg.solve` with ``method="lsmr"``: Golub-Kahan
bidiagonalization with the two rotations of LSMR and the recurrences for ``‖r‖`` (section 3
of the paper), one product with ``A`` and one with ``A.T`` per step.

References:
    Fong, Saunders (2011). *LSMR: An Iterative Algorithm for Sparse Least-Squares Problems*.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._primitives import _product, _tolerance


def _givens(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(c, s, r) with [c s; −s c] [a; b] = [r; 0], r ≥ 0 (c = 1, s = 0 when a = b = 0)."""
    r = torch.hypot(a, b)
    safe = torch.where(r > 0, r, torch.ones_like(r))
    return torch.where(r > 0, a / safe, torch.ones_like(r)), b / safe, r


def _normalize(V: Tensor) -> tuple[Tensor, Tensor]:
    n = V.norm(dim=0)
    return V / torch.where(n > 0, n, torch.ones_like(n)), n


def _lsmr(A, B, X0, damping, rtol, atol, max_iters, api):
    """LSMR (Fong & Saunders 2011) on ``min ‖Ax − b‖² + λ‖x‖²`` for every column of B."""
    K = B.shape[1]
    N = A.shape[1]
    lam = math.sqrt(damping)
    X = B.new_zeros(N, K) if X0 is None else X0.clone()
    matvecs = 0
    R0 = B if X0 is None else B - _product(A, X, api, "(initial residual)")
    matvecs += 0 if X0 is None else K
    U, beta = _normalize(R0)
    V, alpha = _normalize(_product(A, U, api, "(initial Aᵀu)", adjoint=True))
    matvecs += K
    bnorm = B.norm(dim=0)
    tol = _tolerance(bnorm, rtol, atol)
    ones, zeros = torch.ones_like(beta), torch.zeros_like(beta)
    # bidiagonalization + the two rotations of LSMR, and the recurrences for ‖r‖ (section 3 of the paper)
    st = dict(alpha=alpha, zetabar=alpha * beta, alphabar=alpha, rho=ones, rhobar=ones, cbar=ones, sbar=zeros,
              betadd=beta, betad=zeros, rhodold=ones, tautildeold=zeros, thetatilde=zeros, zeta=zeros, d=zeros,
              normA2=alpha ** 2)
    H, Hbar = V.clone(), torch.zeros_like(V)
    rnorm, arnorm = beta.clone(), (alpha * beta).abs()
    converged = (rnorm <= tol) | (arnorm == 0)
    normA = alpha.clone()
    cols = torch.nonzero(~converged).flatten()
    keep_state = lambda m: {k: t[m] for k, t in st.items()}  # noqa: E731
    st = keep_state(cols)
    Xa, U, V, H, Hbar = X[:, cols], U[:, cols], V[:, cols], H[:, cols], Hbar[:, cols]
    history = [float(rnorm.max())]
    it = 0
    while cols.numel() and it < max_iters:
        it += 1
        U, beta = _normalize(_product(A, V, api, f"at iteration {it}") - st["alpha"] * U)
        V, alpha = _normalize(_product(A, U, api, f"at iteration {it}", adjoint=True) - beta * V)
        matvecs += 2 * int(cols.numel())
        chat, shat, alphahat = _givens(st["alphabar"], torch.full_like(beta, lam))
        rho_old = st["rho"]
        c, s, rho = _givens(alphahat, beta)
        thetanew = s * alpha
        alphabar = c * alpha
        rhobar_old, zeta_old = st["rhobar"], st["zeta"]
        thetabar = st["sbar"] * rho
        cbar, sbar, rhobar = _givens(st["cbar"] * rho, thetanew)
        zeta = cbar * st["zetabar"]
        zetabar = -sbar * st["zetabar"]
        Hbar = H - (thetabar * rho / (rho_old * rhobar_old)) * Hbar
        Xa = Xa + (zeta / (rho * rhobar)) * Hbar
        H = V - (thetanew / rho) * H
        # ‖r_k‖ from the recurrences
        betaacute = chat * st["betadd"]
        betacheck = -shat * st["betadd"]
        betahat = c * betaacute
        betadd = -s * betaacute
        thetatilde_old = st["thetatilde"]
        ctildeold, stildeold, rhotildeold = _givens(st["rhodold"], thetabar)
        thetatilde = stildeold * rhobar
        rhodold = ctildeold * rhobar
        betad = -stildeold * st["betad"] + ctildeold * betahat
        tautildeold = (zeta_old - thetatilde_old * st["tautildeold"]) / rhotildeold
        taud = (zeta - thetatilde * tautildeold) / rhodold
        d = st["d"] + betacheck ** 2
        rn = (d + (betad - taud) ** 2 + betadd ** 2).clamp_min(0).sqrt()
        normA2 = st["normA2"] + beta ** 2
        nA = normA2.sqrt()
        normA2 = normA2 + alpha ** 2
        arn = zetabar.abs()
        st = dict(alpha=alpha, zetabar=zetabar, alphabar=alphabar, rho=rho, rhobar=rhobar, cbar=cbar, sbar=sbar,
                  betadd=betadd, betad=betad, rhodold=rhodold, tautildeold=tautildeold, thetatilde=thetatilde,
                  zeta=zeta, d=d, normA2=normA2)
        rnorm[cols], arnorm[cols], normA[cols] = rn, arn, nA
        history.append(float(rnorm.max()))
        consistent = rn <= tol[cols]
        least_squares = arn <= rtol * nA * rn
        finished = consistent | least_squares | (alpha == 0) | (beta == 0)
        if bool(finished.any()):
            X[:, cols[finished]] = Xa[:, finished]
            converged[cols[consistent | least_squares]] = True
            keep = ~finished
            cols, Xa, U, V, H, Hbar = cols[keep], Xa[:, keep], U[:, keep], V[:, keep], H[:, keep], Hbar[:, keep]
            st = keep_state(keep)
    if cols.numel():
        X[:, cols] = Xa
    ok = bool(converged.all())
    message = "converged" if ok else (
        f"reached max_iters={max_iters}: residual {float(rnorm.max()):.3e}, normal-equation residual "
        f"{float(arnorm.max()):.3e}")
    info = dict(normal_residual_norm=arnorm.detach().cpu(), norm_A=normA.detach().cpu())
    return X, rnorm, dict(converged=ok, num_matvecs=matvecs, iterations=it, history=history, method="lsmr",
                          message=message, info=info)
