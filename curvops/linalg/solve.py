r"""Linear solves and lazy inverses from products: CG, MINRES, LSMR, Nyström preconditioning.

* ``"cg"``: conjugate gradients for $(A + \lambda I)x = b$ with $A + \lambda I$ positive
  definite (a GGN, a Fisher, a damped PSD operator); optional preconditioner.
* ``"minres"``: MINRES for symmetric, possibly indefinite $(A + \lambda I)$ (a Hessian away
  from a minimum); optional SPD preconditioner.
* ``"lsmr"``: LSMR for least squares $\min_x \|Ax - b\|^2 + \lambda\|x\|^2$ with any
  rectangular $A$ (a Jacobian); uses ``A @ v`` and ``A.T @ w``.

Block right-hand sides ``b [M, K]`` run the K recurrences side by side: one product with the
columns still iterating per step (one data pass for a curvature operator), and columns leave
the block as they converge.  :func:`inverse` wraps a solve as a lazy operator.

Errors follow the library's rule: bad input raises (``ValueError``/``TypeError``);
non-convergence is reported in :class:`SolveResult` (``converged``, ``message``), raised as
:class:`ConvergenceError` only when ``strict=True``, and warned about by :func:`inverse`.

References:
    Hestenes, Stiefel (1952). *Methods of Conjugate Gradients for Solving Linear Systems*.
    Paige, Saunders (1975). *Solution of Sparse Indefinite Systems of Linear Equations*.
    Fong, Saunders (2011). *LSMR: An Iterative Algorithm for Sparse Least-Squares Problems*.
    Frangella, Tropp, Udell (2023). *Randomized Nyström Preconditioning*. SIAM J. Matrix Anal. Appl.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..operators import Operator
from ._checks import check_flag, check_generator, check_int, check_optional_int, check_real
from .svd import nystrom
from .trace import _operator, _product

SOLVE_METHODS = ("auto", "cg", "minres", "lsmr")


class ConvergenceError(RuntimeError):
    """An iterative solve did not reach its tolerance and the caller asked for ``strict=True``.

    The :class:`SolveResult` is attached as ``.result``.
    """

    def __init__(self, message: str, result: "SolveResult | None" = None):
        super().__init__(message)
        self.result = result


class ConvergenceWarning(UserWarning):
    """A solve inside a lazy :func:`inverse` did not converge (the product is still returned)."""


@dataclass
class SolveResult:
    """The outcome of :func:`solve`, with diagnostics.

    Attributes:
        x: the solution, shaped like ``b`` ([N] or [N, K]), on the operator's device.
        converged: True when every column reached its tolerance.
        num_matvecs: products spent (columns, with ``A`` and ``A.T`` together; the
            preconditioner's construction included, its applications not).
        residual_norm: the final residual norm per column (a float for a vector ``b``, a CPU
            tensor [K] for a block): CG ``‖b − (A+λI)x‖`` and LSMR
            ``‖[b; 0] − [A; √λ I]x‖``, both from the recurrences; MINRES the same in the
            preconditioner's norm ``‖r‖_M`` (the 2-norm without one).
        iterations: iterations of the (block) recurrence.
        history: the residual norm before the first and after each iteration (for blocks,
            the largest over the columns).
        method: ``"cg"``, ``"minres"`` or ``"lsmr"``.
        negative_curvature: CG only: some column met $p^\\top(A + \\lambda I)p \\le 0$ (the
            operator is not positive definite); that column stopped at the previous iterate.
        message: why the iteration stopped, in words.
        info: method-specific extras (LSMR: ``normal_residual_norm`` ``‖Aᵀr − λx‖`` and
            ``norm_A`` estimate; a preconditioner's cost ``preconditioner_matvecs``).
    """

    x: Tensor
    converged: bool
    num_matvecs: int
    residual_norm: float | Tensor
    iterations: int
    history: list[float]
    method: str
    negative_curvature: bool = False
    message: str = ""
    info: dict = field(default_factory=dict)


# ---- Nyström preconditioner ------------------------------------------------------------------
class NystromPreconditioner(Operator):
    r"""$P^{-1} = (\hat\lambda_\ell + \mu)\,U(\hat\Lambda + \mu I)^{-1}U^\top + (I - UU^\top)$.

    The inverse Nyström preconditioner of Frangella, Tropp, Udell (2023) for $A + \mu I$,
    from a rank-ℓ Nyström approximation $\hat A = U\hat\Lambda U^\top$ ($\hat\lambda_\ell$ its
    smallest kept eigenvalue).  It approximates $(\hat\lambda_\ell + \mu)(A + \mu I)^{-1}$;
    the scale is immaterial to CG.  Once ℓ exceeds the effective dimension of A at μ, the
    preconditioned condition number is O(1).

    **Cost** of a product: two thin products with U (no products with A).  **Tags**: symmetric, PSD.

    Attributes:
        U, eigenvalues: the Nyström factors; ``damping``: μ; ``num_matvecs``: the products
        with A that building it took.
    """

    def __init__(self, U: Tensor, eigenvalues: Tensor, damping: float, num_matvecs: int):
        super().__init__((U.shape[0], U.shape[0]), U.dtype, U.device, tags=("psd",))
        self.U, self.eigenvalues, self.damping, self.num_matvecs = U, eigenvalues, float(damping), num_matvecs
        self._scale = (eigenvalues[-1] + damping) / (eigenvalues + damping) - 1.0  # [ℓ]

    def _matmat_torch(self, V: Tensor) -> Tensor:
        return V + self.U @ (self._scale[:, None] * (self.U.T @ V))


def nystrom_preconditioner(A, rank: int, damping: float = 0.0, *, oversample: int = 10,
                           generator: torch.Generator | int | None = None,
                           assume_psd: bool = False) -> NystromPreconditioner:
    r"""The Nyström preconditioner for CG on $A + \mu I$ (``damping`` = μ), A PSD.

    Builds a rank-``rank`` Nyström approximation (:func:`curvops.linalg.svd.nystrom`) and
    returns :class:`NystromPreconditioner`, an operator approximating $(A + \mu I)^{-1}$ up to
    a scale.  Choose ``rank`` near the effective dimension
    $d_\mathrm{eff}(\mu) = \operatorname{tr}(A(A + \mu I)^{-1})$.

    **Cost**: ``rank + oversample`` products with A, in one call.

    Args:
        A: square PSD operator (tag ``"psd"``, or ``assume_psd=True``).
        rank: rank ℓ of the approximation.
        damping: μ ≥ 0.
        oversample: extra sketch columns.
        generator: random source for the sketch: ``None``,
            a ``torch.Generator``, or an int seed (a new generator on the operator's device,
            seeded with it).
        assume_psd: accept an operator without the ``"psd"`` tag.

    Returns:
        :class:`NystromPreconditioner` (symmetric, PSD).

    Raises:
        ValueError: non-PSD operator, negative damping, or ``damping == 0`` while the
            smallest kept eigenvalue is 0 to working precision (rank above the numerical rank
            of A: lower it or damp).
        TypeError: an argument of the wrong kind: a count that is not an int (e.g. a float),
            a ``generator`` that is not None, a ``torch.Generator`` or an int seed, a flag that
            is not a bool, a tolerance that is not a real number.

    References:
        Frangella, Tropp, Udell (2023). *Randomized Nyström Preconditioning*.
    """
    api = "nystrom_preconditioner"
    damping = check_real(damping, "damping", api, minimum=0.0, expected="a finite damping >= 0")
    rank = check_int(rank, "rank", api, minimum=1, expected="1 <= rank", fix="Pass the rank of the approximation.")
    assume_psd = check_flag(assume_psd, "assume_psd", api)
    approx = nystrom(A, rank, oversample=oversample, generator=generator, assume_psd=assume_psd)
    lam = approx.S
    floor = 10 * torch.finfo(lam.dtype).eps * max(float(lam[0]), damping)
    if float(lam[-1]) + damping <= floor:
        raise ValueError(
            f"{api}: the smallest of the {rank} kept eigenvalues is {float(lam[-1]):.3g} and damping is "
            f"{damping}; the preconditioner would be singular. Lower the rank or pass damping > 0."
        )
    return NystromPreconditioner(approx.U, lam, damping, approx.num_matvecs)


# ---- input checks ----------------------------------------------------------------------------
def _resolve_method(A, method: str, assume_psd: bool, assume_symmetric: bool, api: str) -> str:
    if method not in SOLVE_METHODS:
        raise ValueError(f"{api}: expected method in {SOLVE_METHODS}, got {method!r}.")
    square = A.shape[0] == A.shape[1]
    if method == "auto":
        if square and (A.is_psd or assume_psd):
            return "cg"
        if square and (A.is_symmetric or assume_symmetric):
            return "minres"
        return "lsmr"
    if method in ("cg", "minres") and not square:
        raise ValueError(
            f"{api}: expected a square operator for method={method!r}, got shape {tuple(A.shape)}. "
            f"Use method='lsmr' for least squares with a rectangular operator."
        )
    if method == "cg" and not (A.is_psd or assume_psd):
        raise ValueError(
            f"{api}: CG needs a positive (semi)definite operator, but this one is tagged "
            f"{sorted(A.tags) or 'with no tags'} (not 'psd'). Use method='minres' for symmetric indefinite operators (e.g. a Hessian), or pass "
            f"assume_psd=True if you know A + damping·I is positive definite."
        )
    if method == "minres" and not (A.is_symmetric or assume_symmetric or assume_psd):
        raise ValueError(
            f"{api}: MINRES needs a symmetric operator, but this one has tags {sorted(A.tags)}. Use method='lsmr' "
            f"for non-symmetric operators, or pass assume_symmetric=True if you know it is symmetric."
        )
    return method


def _check_rhs(A, b, api: str) -> tuple[Tensor, bool]:
    if not isinstance(b, Tensor):
        raise TypeError(f"{api}: expected b as a torch.Tensor, got {type(b).__name__}.")
    M = A.shape[0]
    if b.dim() not in (1, 2) or b.shape[0] != M:
        raise ValueError(f"{api}: expected b of shape [{M}] or [{M}, K] (the rows of A), got {tuple(b.shape)}.")
    if b.dtype != A.torch_dtype:
        raise TypeError(
            f"{api}: expected b of dtype {A.torch_dtype}, got {b.dtype}. Convert with b.to({A.torch_dtype}).")
    if b.device != A.device:
        raise ValueError(f"{api}: expected b on {A.device}, got it on {b.device}. Move it with b.to('{A.device}').")
    if not bool(torch.isfinite(b).all()):
        raise ValueError(f"{api}: expected a finite right-hand side b, got NaN or Inf entries.")
    vector = b.dim() == 1
    return (b[:, None] if vector else b), vector


def _check_x0(A, x0, K: int, vector: bool, api: str) -> Tensor | None:
    if x0 is None:
        return None
    N = A.shape[1]
    if not isinstance(x0, Tensor):
        raise TypeError(f"{api}: expected x0 as a torch.Tensor, got {type(x0).__name__}.")
    expected = (N,) if vector else (N, K)
    if tuple(x0.shape) != expected:
        raise ValueError(f"{api}: expected x0 of shape {list(expected)}, got {tuple(x0.shape)}.")
    if x0.is_complex() or x0.dtype == torch.bool:
        raise TypeError(f"{api}: expected a real x0, got dtype {x0.dtype}. Convert with x0.to({A.torch_dtype}).")
    if x0.is_floating_point() and not bool(torch.isfinite(x0).all()):
        raise ValueError(f"{api}: expected a finite initial guess x0, got NaN or Inf entries. Pass x0=None to "
                         f"start from zero.")
    x0 = x0.to(dtype=A.torch_dtype, device=A.device)
    return x0[:, None] if vector else x0


def _apply(A, damping: float, V: Tensor, api: str, where: str) -> Tensor:
    """``(A + λI) V`` with the product checked for NaN/Inf."""
    out = _product(A, V, api, where)
    return out + damping * V if damping else out


def _tolerance(bnorm: Tensor, rtol: float, atol: float) -> Tensor:
    return torch.clamp(rtol * bnorm, min=atol)


def _finish(x: Tensor, vector: bool, rnorm: Tensor, **kw) -> SolveResult:
    rn = rnorm.detach().cpu()
    return SolveResult(x=x[:, 0] if vector else x, residual_norm=float(rn[0]) if vector else rn, **kw)


def _initial_residual(A, B, X0, damping, api):
    """(X, R = B − (A + δI) X, products used): no product when starting from zero."""
    if X0 is None:
        return torch.zeros_like(B), B.clone(), 0
    X = X0.clone()
    return X, B - _apply(A, damping, X, api, "(initial residual)"), B.shape[1]


# ---- CG ------------------------------------------------------------------------------------
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
        AP = _apply(A, damping, Pd, api, f"at iteration {it}")
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


# ---- MINRES ----------------------------------------------------------------------------------
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
        y = _apply(A, damping, v, api, f"at iteration {it}")
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


# ---- LSMR ------------------------------------------------------------------------------------
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


# ---- the public entry points -----------------------------------------------------------------
def _make_preconditioner(A, preconditioner, method, damping, rank, generator, assume_psd, api):
    if preconditioner is None:
        return None, 0
    if method == "lsmr":
        raise ValueError(f"{api}: LSMR takes no preconditioner here; pass preconditioner=None.")
    if isinstance(preconditioner, str):
        if preconditioner != "nystrom":
            raise ValueError(f"{api}: expected preconditioner None, an operator or 'nystrom', got {preconditioner!r}.")
        if method != "cg":
            raise ValueError(
                f"{api}: the Nyström preconditioner needs a PSD operator and method='cg', got {method!r}.")
        rank = min(int(rank), A.shape[0])
        P = nystrom_preconditioner(A, rank, damping, generator=generator, assume_psd=assume_psd)
        return P, P.num_matvecs
    P = _operator(preconditioner, f"{api} (preconditioner)")
    if P.shape != A.shape or P.torch_dtype != A.torch_dtype or P.device != A.device:
        raise ValueError(
            f"{api}: expected a preconditioner of shape {tuple(A.shape)}, dtype {A.torch_dtype} on {A.device}, "
            f"got shape {tuple(P.shape)}, dtype {P.torch_dtype} on {P.device}."
        )
    return P, 0


def _check_options(A, method: str, damping, rtol, atol, max_iters, preconditioner_rank, generator, flags: dict,
                   api: str):
    """The settings :func:`solve` and :func:`inverse` share, checked before any product.

    Returns ``(damping, rtol, atol, max_iters, preconditioner_rank, generator)`` normalized;
    ``flags`` (``assume_psd=…``) are checked to be bools.
    """
    for name, value in flags.items():
        check_flag(value, name, api)
    damping = check_real(damping, "damping", api, expected="a finite float damping")
    if method in ("cg", "lsmr") and damping < 0:
        raise ValueError(f"{api}: expected damping >= 0, got {damping}. Use method='minres' for a negative shift.")
    rtol = check_real(rtol, "rtol", api, minimum=0.0, expected="rtol >= 0")
    atol = check_real(atol, "atol", api, minimum=0.0, expected="atol >= 0")
    max_iters = check_optional_int(max_iters, "max_iters", api, minimum=0, expected="max_iters >= 0",
                                   fix="Pass None for the default min(10n, 1000).")
    preconditioner_rank = check_int(preconditioner_rank, "preconditioner_rank", api, minimum=1)
    generator = check_generator(generator, api, A.device)
    return damping, rtol, atol, max_iters, preconditioner_rank, generator


def solve(A, b: Tensor, *, method: str = "auto", damping: float = 0.0, preconditioner=None,
          rtol: float = 1e-6, atol: float = 0.0, max_iters: int | None = None, x0: Tensor | None = None,
          assume_psd: bool = False, assume_symmetric: bool = False, preconditioner_rank: int = 50,
          generator: torch.Generator | int | None = None, strict: bool = False) -> SolveResult:
    r"""Solve $(A + \lambda I)x = b$ (CG, MINRES) or $\min_x\|Ax - b\|^2 + \lambda\|x\|^2$ (LSMR).

    * ``"cg"``: $A + \lambda I$ symmetric positive definite.  Iterations
      $O(\sqrt{\kappa}\log(1/\epsilon))$; stops a column when $\|r_k\| \le
      \max(\mathrm{rtol}\|b\|, \mathrm{atol})$.  Each step checks the curvature
      $p_k^\top(A + \lambda I)p_k$: if it is $\le 0$ the operator is not positive definite,
      the column stops at the previous iterate and ``negative_curvature`` is set.
    * ``"minres"``: $A + \lambda I$ symmetric, possibly indefinite or singular; minimizes
      $\|r_k\|$ over the Krylov space.  A preconditioner must be SPD (then the residual is
      measured in its norm).
    * ``"lsmr"``: any M×N operator; equivalent to MINRES on the normal equations
      $(A^\top A + \lambda I)x = A^\top b$ without forming them.  Stops when
      $\|r\| \le \max(\mathrm{rtol}\|b\|, \mathrm{atol})$ (consistent system) or
      $\|A^\top r - \lambda x\| \le \mathrm{rtol}\,\|A\|\,\|r\|$ (least-squares optimum).
    * ``"auto"``: CG for a PSD-tagged operator, MINRES for a symmetric one, LSMR otherwise.

    ``preconditioner`` is an operator $P \approx (A + \lambda I)^{-1}$ (PSD) or ``"nystrom"``
    (CG only: :func:`nystrom_preconditioner` of rank ``preconditioner_rank``, built first).

    **Cost**: per iteration one product with the columns still iterating (CG, MINRES), or
    one with ``A`` and one with ``A.T`` (LSMR); plus K for an ``x0`` and ``rank + 10`` for a
    Nyström preconditioner.

    Args:
        A: the operator (or a tensor/array).
        b: right-hand side [M] or [M, K] (K solved together), on A's device, in A's dtype.
        method: ``"auto"``, ``"cg"``, ``"minres"`` or ``"lsmr"``.
        damping: λ (CG and LSMR: ≥ 0; MINRES: any real shift).
        preconditioner: None, an operator, or ``"nystrom"``.
        rtol, atol: relative and absolute residual tolerances.
        max_iters: iteration cap (default ``min(10n, 1000)``, n the number of unknowns).
        x0: initial guess shaped like the solution.
        assume_psd: let CG run on an operator without the ``"psd"`` tag.
        assume_symmetric: let MINRES run on an operator without the ``"symmetric"`` tag.
        preconditioner_rank: rank of the ``"nystrom"`` preconditioner.
        generator: random source for the Nyström sketch: ``None``,
            a ``torch.Generator``, or an int seed (a new generator on the operator's device,
            seeded with it).
        strict: raise :class:`ConvergenceError` instead of returning an unconverged result.

    Returns:
        :class:`SolveResult` (``x``, ``converged``, ``num_matvecs``, ``residual_norm``,
        ``iterations``, ``history``, ``method``, ``negative_curvature``, ``message``).

    Raises:
        ValueError: non-square operator to CG/MINRES, an operator not tagged PSD to CG (or
            not symmetric to MINRES) without ``assume_…``, shapes of ``b``/``x0`` that do not
            match, non-finite ``b``, negative damping for CG/LSMR, a product that returns NaN or
            Inf (the message names the iteration).
        TypeError: ``b`` not a tensor or of another dtype; an argument of the wrong kind (a float
            ``max_iters``, a ``generator`` that is not None, a ``torch.Generator`` or an int seed).
        ConvergenceError: with ``strict=True``, when a column did not converge.

    Example:
        >>> G = curvops.Dense(torch.eye(3, dtype=torch.float64) * 2, tags=("psd",))
        >>> solve(G, torch.ones(3, dtype=torch.float64), method="cg").x        # doctest: +SKIP
        tensor([0.5000, 0.5000, 0.5000], dtype=torch.float64)

    References:
        Hestenes, Stiefel (1952). *Methods of Conjugate Gradients for Solving Linear Systems*.
        Paige, Saunders (1975). *Solution of Sparse Indefinite Systems of Linear Equations*.
        Fong, Saunders (2011). *LSMR: An Iterative Algorithm for Sparse Least-Squares Problems*.
        Frangella, Tropp, Udell (2023). *Randomized Nyström Preconditioning*.
    """
    api = f"solve({method})" if isinstance(method, str) else "solve"
    A = _operator(A, api, square=False)
    flags = dict(assume_psd=assume_psd, assume_symmetric=assume_symmetric, strict=strict)
    for name, value in flags.items():
        check_flag(value, name, api)
    method = _resolve_method(A, method, assume_psd, assume_symmetric, api)
    api = f"solve({method})"
    damping, rtol, atol, max_iters, preconditioner_rank, generator = _check_options(
        A, method, damping, rtol, atol, max_iters, preconditioner_rank, generator, flags, api)
    B, vector = _check_rhs(A, b, api)
    X0 = _check_x0(A, x0, B.shape[1], vector, api)
    n = A.shape[1]
    max_iters = min(10 * n, 1000) if max_iters is None else max_iters
    P, pre_cost = _make_preconditioner(A, preconditioner, method, damping, preconditioner_rank, generator,
                                       assume_psd, api)
    if method == "cg":
        X, rnorm, kw = _cg(A, B, X0, P, float(damping), rtol, atol, max_iters, api)
    elif method == "minres":
        X, rnorm, kw = _minres(A, B, X0, P, float(damping), rtol, atol, max_iters, api)
    else:
        X, rnorm, kw = _lsmr(A, B, X0, float(damping), rtol, atol, max_iters, api)
    kw["num_matvecs"] += pre_cost
    kw.setdefault("info", {})
    if pre_cost:
        kw["info"]["preconditioner_matvecs"] = pre_cost
    result = _finish(X, vector, rnorm, **kw)
    if strict and not result.converged:
        raise ConvergenceError(f"{api}: did not converge: {result.message}.", result)
    return result


# ---- lazy inverse ----------------------------------------------------------------------------
class InverseOperator(Operator):
    r"""Lazy $(A + \lambda I)^{-1}$ (CG/MINRES) or damped pseudo-inverse $(A^\top A + \lambda I)^{-1}A^\top$ (LSMR).

    Every product is a :func:`solve` with the product's columns as a block right-hand side.
    The last solve's :class:`SolveResult` is kept in ``last_result`` (and the one of the last
    adjoint product in ``last_adjoint_result``); ``num_matvecs`` counts the products with
    ``A`` over all solves so far.  Build it with :func:`inverse`.
    """

    def __init__(self, A, method: str, options: dict, strict: bool, warn: bool):
        M, N = A.shape
        if method == "lsmr":
            shape, tags = (N, M), ()
        else:
            shape, tags = (N, M), (("psd",) if method == "cg" else ("symmetric",))
        super().__init__(shape, A.torch_dtype, A.device, tags=tags, domain=A.range, range=A.domain)
        self.A, self.method, self.options, self.strict, self.warn = A, method, options, strict, warn
        self.damping = options["damping"]
        self.last_result: SolveResult | None = None
        self.last_adjoint_result: SolveResult | None = None
        self.num_matvecs = 0
        self._preconditioner = options.pop("preconditioner")

    def _preconditioner_op(self):
        if isinstance(self._preconditioner, str):  # built on first use (a pass over the data), then kept
            rank = min(int(self.options["preconditioner_rank"]), self.A.shape[0])
            self._preconditioner = nystrom_preconditioner(
                self.A, rank, self.damping, generator=self.options["generator"], assume_psd=self.options["assume_psd"])
            self.num_matvecs += self._preconditioner.num_matvecs
        return self._preconditioner

    def _report(self, result: SolveResult, what: str) -> None:
        self.num_matvecs += result.num_matvecs
        if result.converged:
            return
        msg = (f"inverse({self.method}) {what}: the solve did not converge ({result.message}); "
               f"see .last_result for diagnostics, or raise rtol/max_iters or the damping.")
        if self.strict:
            raise ConvergenceError(msg, result)
        if self.warn:
            warnings.warn(msg, ConvergenceWarning, stacklevel=7)  # the caller of `Ainv @ V`

    def _matmat_torch(self, V: Tensor) -> Tensor:
        opts = {k: v for k, v in self.options.items() if k != "preconditioner_rank"}
        res = solve(self.A, V, method=self.method, preconditioner=self._preconditioner_op(), **opts)
        self.last_result = res
        self._report(res, "@ V")
        return res.x

    def _rmatmat_torch(self, W: Tensor) -> Tensor:
        if self.method != "lsmr":
            return self._matmat_torch(W)
        opts = {k: v for k, v in self.options.items() if k not in ("preconditioner_rank",)}
        res = solve(self.A.T, W, method="lsmr", **opts)  # (A⁺_λ)ᵀ = (Aᵀ)⁺_λ
        self.last_adjoint_result = res
        self._report(res, ".T @ W")
        return res.x


def inverse(A, *, damping: float = 0.0, method: str = "auto", rtol: float = 1e-6, atol: float = 0.0,
            max_iters: int | None = None, preconditioner=None, preconditioner_rank: int = 50,
            assume_psd: bool = False, assume_symmetric: bool = False, generator: torch.Generator | int | None = None,
            strict: bool = False, warn: bool = True) -> InverseOperator:
    r"""The lazy inverse $(A + \lambda I)^{-1}$ as an operator (products are solves).

    * ``"cg"``/``"minres"`` (square A): $X = (A + \lambda I)^{-1}V$; tags: symmetric, and PSD
      for CG ($A + \lambda I$ positive definite).
    * ``"lsmr"`` (any A, M×N): the damped pseudo-inverse $A^+_\lambda = (A^\top A + \lambda I)^{-1}A^\top$
      (N×M; $A^{-1}$ for square invertible A and λ = 0); its adjoint solves with ``A.T``.
    * ``"auto"``: CG for PSD-tagged A, MINRES for symmetric A, LSMR otherwise.

    Usable anywhere an operator is: ``G_inv @ v``, ``J @ G_inv @ J.T``, ``eigsh(G_inv, …)``.
    Nothing runs at construction; a ``"nystrom"`` preconditioner is built at the first
    product and kept.  A solve that does not converge warns (:class:`ConvergenceWarning`) or,
    with ``strict=True``, raises :class:`ConvergenceError`; it is never silent.  The last
    solve's diagnostics are in ``.last_result``.

    **Cost** of a product with K columns: one solve with K right-hand sides, i.e. a few to a
    few hundred products with A (one call per iteration); see :func:`solve`.

    Args:
        A: the operator.
        damping: λ (see :func:`solve`).
        method: ``"auto"``, ``"cg"``, ``"minres"`` or ``"lsmr"``.
        rtol, atol, max_iters: per-solve tolerances and iteration cap.
        preconditioner: None, an operator or ``"nystrom"`` (CG).
        preconditioner_rank: rank of the Nyström preconditioner.
        assume_psd, assume_symmetric: promises for operators without tags (see :func:`solve`).
        generator: random source for the Nyström sketch: ``None``,
            a ``torch.Generator``, or an int seed (a new generator on the operator's device,
            seeded with it).
        strict: raise :class:`ConvergenceError` when a solve does not converge.
        warn: warn when a solve does not converge (ignored when ``strict``).

    Returns:
        :class:`InverseOperator`.

    Raises:
        ValueError: as :func:`solve` for a method that does not fit the operator.
        TypeError: an argument of the wrong kind: a count that is not an int (e.g. a float),
            a ``generator`` that is not None, a ``torch.Generator`` or an int seed, a flag that
            is not a bool, a tolerance that is not a real number.

    Example:
        >>> Ginv = inverse(GGN(model, loss, data), damping=1e-3)        # doctest: +SKIP
        >>> x = Ginv @ g                                                 # doctest: +SKIP
        >>> Ginv.last_result.converged, Ginv.last_result.iterations     # doctest: +SKIP
    """
    api = f"inverse({method})" if isinstance(method, str) else "inverse"
    A = _operator(A, api, square=False)
    flags = dict(assume_psd=assume_psd, assume_symmetric=assume_symmetric, strict=strict, warn=warn)
    for name, value in flags.items():
        check_flag(value, name, api)
    method = _resolve_method(A, method, assume_psd, assume_symmetric, api)
    api = f"inverse({method})"
    damping, rtol, atol, max_iters, preconditioner_rank, generator = _check_options(
        A, method, damping, rtol, atol, max_iters, preconditioner_rank, generator, flags, api)
    if preconditioner is not None and not isinstance(preconditioner, str):
        preconditioner, _ = _make_preconditioner(A, preconditioner, method, damping, preconditioner_rank,
                                                 generator, assume_psd, api)
    elif preconditioner is not None:
        if preconditioner != "nystrom" or method != "cg":
            raise ValueError(
                f"{api}: preconditioner='nystrom' needs method='cg', got {preconditioner!r} with {method!r}.")
    options = dict(damping=float(damping), rtol=rtol, atol=atol, max_iters=max_iters, assume_psd=assume_psd,
                   assume_symmetric=assume_symmetric, generator=generator, preconditioner=preconditioner,
                   preconditioner_rank=preconditioner_rank)
    return InverseOperator(A, method, options, strict, warn)
