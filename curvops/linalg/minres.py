r"""MINRES on symmetric, possibly indefinite $(A + \lambda I)X = B$, block right-hand sides.

The kernel behind :func:`curvops.linalg.solve` with ``method="minres"``: the preconditioned
Lanczos process and the QR factorization of its tridiagonal matrix, per column, side by side;
with a preconditioner (SPD) the residual is measured in its norm.

References:
    Paige, Saunders (1975). *Solution of Sparse Indefinite Systems of Linear Equations*.
"""

from __future__ import annotations

import torch

from ._primitives import _damped_product, _initial_residual, _tolerance


def _minres(A, B, X0, P, damping, rtol, atol, max_iters, api):
    X, R, matvecs = _initial_residual(A, B, X0, damping, api)
    Z = R if P is None else P @ R
    beta = (R * Z).sum(0)
    if bool((beta < 0).any()):
        raise ValueError(f"{api}: the preconditioner is not positive definite (rᵀMr < 0); MINRES needs an SPD one.")
    beta = beta.sqrt()
    bnorm = beta if X0 is None else (B * (B if P is None else P @ B)).sum(0).clamp_min(0).sqrt()
    tol = _tolerance(bnorm, rtol, atol)
    rnorm = beta.clone()
    converged = rnorm <= tol
    cols = torch.nonzero(~converged).flatten()
    history = [float(rnorm.max())]
    # per-column state of the Lanczos process and the QR factorization of its tridiagonal matrix
    Xa, r_prev, r_cur, Z = X[:, cols], R[:, cols], R[:, cols], Z[:, cols]
    beta = beta[cols]
    zeros = torch.zeros_like(beta)
    beta_old, c, s, dbar, eps_, phibar = zeros, -torch.ones_like(beta), zeros, zeros, zeros, beta.clone()
    w, w_prev = torch.zeros_like(Xa), torch.zeros_like(Xa)
    tiny = torch.finfo(B.dtype).tiny
    it = 0
    while cols.numel() and it < max_iters:
        it += 1
        v = Z / beta
        y = _damped_product(A, damping, v, api, f"at iteration {it}")
        matvecs += int(cols.numel())
        if it > 1:
            y = y - (beta / beta_old) * r_prev
        alpha = (v * y).sum(0)
        y = y - (alpha / beta) * r_cur
        r_prev, r_cur = r_cur, y
        Z = y if P is None else P @ y
        beta_old, beta = beta, (y * Z).sum(0).clamp_min(0).sqrt()
        eps_old = eps_
        delta = c * dbar + s * alpha
        gbar = s * dbar - c * alpha
        eps_, dbar = s * beta, -c * beta
        gamma = torch.hypot(gbar, beta).clamp_min(tiny)
        c, s = gbar / gamma, beta / gamma
        phi, phibar = c * phibar, s * phibar
        w_prev, w = w, (v - eps_old * w_prev - delta * w) / gamma
        Xa = Xa + phi * w
        rn = phibar.abs()
        rnorm[cols] = rn
        history.append(float(rnorm.max()))
        done = rn <= tol[cols]
        exhausted = beta <= tiny / torch.finfo(B.dtype).eps  # Krylov space exhausted: nothing left to add
        finished = done | exhausted
        if bool(finished.any()):
            X[:, cols[finished]] = Xa[:, finished]
            converged[cols[done]] = True
            keep = ~finished
            cols, Xa, r_prev, r_cur, Z, w, w_prev = (cols[keep], Xa[:, keep], r_prev[:, keep], r_cur[:, keep],
                                                      Z[:, keep], w[:, keep], w_prev[:, keep])
            beta, beta_old, c, s, dbar, eps_, phibar = (t[keep] for t in (beta, beta_old, c, s, dbar, eps_, phibar))
    if cols.numel():
        X[:, cols] = Xa
    ok = bool(converged.all())
    message = "converged" if ok else (
        f"stopped after {it} iterations (max_iters={max_iters}) with residual {float(rnorm.max()):.3e} above the "
        f"tolerance; a singular, inconsistent system has no solution (MINRES then tends to the least-squares one)")
    return X, rnorm, dict(converged=ok, num_matvecs=matvecs, iterations=it, history=history, method="minres",
                          message=message)
