r"""Conjugate gradients on $(A + \lambda I)X = B$, $A + \lambda I$ positive definite, block right-hand sides.

The kernel behind :func:`curvops.linalg.solve` with ``method="cg"``: the K columns run side by
side (one product with the columns still iterating per step), a column leaves the block when
it converges or meets non-positive curvature $p^\top(A + \lambda I)p \le 0$.

References:
    Hestenes, Stiefel (1952). *Methods of Conjugate Gradients for Solving Linear Systems*.
"""

from __future__ import annotations

import torch

from ._primitives import _damped_product, _initial_residual, _tolerance


def _cg(A, B, X0, P, damping, rtol, atol, max_iters, api):
    K = B.shape[1]
    X, R, matvecs = _initial_residual(A, B, X0, damping, api)
    tol = _tolerance(B.norm(dim=0), rtol, atol)
    rnorm = R.norm(dim=0)
    converged = rnorm <= tol
    negative = torch.zeros(K, dtype=torch.bool, device=B.device)
    cols = torch.nonzero(~converged).flatten()
    history, message = [float(rnorm.max())], ""
    Xa, Ra = X[:, cols], R[:, cols]
    Z = Ra if P is None else P @ Ra
    Pd, rz = Z.clone(), (Ra * Z).sum(0)
    it = 0
    while cols.numel() and it < max_iters:
        it += 1
        AP = _damped_product(A, damping, Pd, api, f"at iteration {it}")
        matvecs += int(cols.numel())
        curv = (Pd * AP).sum(0)
        bad = ~(curv > 0)
        alpha = torch.where(bad, torch.zeros_like(curv), rz / torch.where(bad, torch.ones_like(curv), curv))
        Xa = Xa + alpha * Pd
        Ra = Ra - alpha * AP
        rn = Ra.norm(dim=0)
        rnorm[cols] = rn
        history.append(float(rnorm.max()))
        done = (rn <= tol[cols]) & ~bad
        if bool(bad.any()):
            j = int(torch.nonzero(bad).flatten()[0])
            negative[cols[bad]] = True
            message = message or (
                f"negative curvature pᵀ(A + λI)p = {float(curv[j]):.3e} <= 0 at iteration {it} "
                f"(column {int(cols[j])}): A + λI is not positive definite; add damping or use method='minres'."
            )
        finished = done | bad
        if bool(finished.any()):
            X[:, cols[finished]] = Xa[:, finished]
            converged[cols[done]] = True
            keep = ~finished
            cols, Xa, Ra, Pd, rz = cols[keep], Xa[:, keep], Ra[:, keep], Pd[:, keep], rz[keep]
            if not cols.numel():
                break
        Z = Ra if P is None else P @ Ra
        rz_new = (Ra * Z).sum(0)
        Pd = Z + (rz_new / rz) * Pd
        rz = rz_new
    if cols.numel():
        X[:, cols] = Xa
    ok = bool(converged.all())
    if not message:
        message = "converged" if ok else f"reached max_iters={max_iters} with residual {float(rnorm.max()):.3e}"
    return X, rnorm, dict(converged=ok, num_matvecs=matvecs, iterations=it, history=history, method="cg",
                          negative_curvature=bool(negative.any()), message=message)
