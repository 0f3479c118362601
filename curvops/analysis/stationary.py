r"""Classify a point of a loss landscape from its gradient and the extremal Hessian eigenvalues.

At a stationary point $w_*$ ($\nabla L(w_*) = 0$) the second-order Taylor expansion
$L(w_* + \Delta) \approx L(w_*) + \tfrac12 \Delta^\top H \Delta$ decides (``seeds/001``):

* $H$ positive definite ($\lambda_{\min} > 0$): a strict local **minimum**;
* $H$ negative definite ($\lambda_{\max} < 0$): a strict local **maximum**;
* eigenvalues of both signs: a **saddle** (zero eigenvalues do not change that);
* otherwise some eigenvalue is zero and the others share one sign: **degenerate** — the
  quadratic model cannot decide, the higher-order terms do (as in the toy model's flat
  directions $a_j = 0$).

Only the two extremal eigenvalues are needed, so the cost is one Lanczos solve for both ends of
the spectrum.  Ritz values bracket the spectrum from inside — $\lambda_{\min} \le \theta_{\min}$
and $\theta_{\max} \le \lambda_{\max}$ — so a negative $\theta_{\min}$ or a positive
$\theta_{\max}$ is certain even before convergence; a positive $\lambda_{\min}$ (or negative
$\lambda_{\max}$) is accepted only when it exceeds the zero threshold by more than its residual.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..linalg.lanczos import EighResult, as_square_operator, eigsh

KINDS = ("minimum", "maximum", "saddle", "degenerate", "not_stationary")


@dataclass
class StationaryPointResult:
    """The verdict and its evidence.

    Attributes:
        kind: ``"minimum"``, ``"maximum"``, ``"saddle"``, ``"degenerate"`` or ``"not_stationary"``.
        curvature: what the Hessian alone says (the kind if the point were stationary), one of
            the first four kinds — informative when ``kind == "not_stationary"``.
        lambda_min, lambda_max: the extremal Ritz values θ_min ≥ λ_min and θ_max ≤ λ_max.
        residual_min, residual_max: their eigen-residual norms (each θ is within this of an eigenvalue).
        grad_norm: ‖∇L‖₂ at the point.
        grad_tol: the stationarity threshold on ``grad_norm``.
        tol: the relative eigenvalue tolerance.
        zero_threshold: the absolute threshold ``tol · max(|θ_min|, |θ_max|)`` below which (plus
            the residual) an eigenvalue counts as zero.
        num_matvecs: Hessian products spent.
        converged: whether the eigensolver met its tolerance.
        explanation: one sentence saying why.
        eigh: the raw :class:`~curvops.linalg.lanczos.EighResult`.
    """

    kind: str
    curvature: str
    lambda_min: float
    lambda_max: float
    residual_min: float
    residual_max: float
    grad_norm: float
    grad_tol: float
    tol: float
    zero_threshold: float
    num_matvecs: int
    converged: bool
    explanation: str
    eigh: EighResult


def _grad_norm(grad, n: int, api: str) -> float:
    """‖grad‖₂ for a flat tensor/array, or a dict / list of parameter-shaped tensors."""
    if isinstance(grad, dict):
        parts = list(grad.values())
    elif isinstance(grad, (list, tuple)):
        parts = list(grad)
    else:
        parts = [grad]
    tensors = [torch.as_tensor(np.asarray(p) if not isinstance(p, Tensor) else p) for p in parts]
    size = sum(t.numel() for t in tensors)
    if size != n:
        raise ValueError(f"{api}: expected a gradient with {n} entries (the Hessian's size), got {size}.")
    sq = sum(float((t.detach().to(torch.float64) ** 2).sum()) for t in tensors)
    if not math.isfinite(sq):
        raise ValueError(f"{api}: the gradient is not finite.")
    return math.sqrt(sq)


def classify_stationary_point(H, grad, *, tol: float = 1e-6, grad_tol: float = 1e-6,
                              max_iters: int | None = None, generator: torch.Generator | None = None,
                              v0: Tensor | None = None) -> StationaryPointResult:
    r"""Minimum, maximum, saddle or degenerate point — from the gradient and extremal eigenvalues.

    With $\theta_{\min} \ge \lambda_{\min}$, $\theta_{\max} \le \lambda_{\max}$ the extremal Ritz
    values, $r$ their residuals and $z = \text{tol}\cdot\max(|\theta_{\min}|, |\theta_{\max}|)$:

    * an end is *negative* if $\theta < -z$ (for λ_min, certain) — resp. $\theta + r < -z$ for λ_max;
    * *positive* if $\theta > z$ (for λ_max, certain) — resp. $\theta - r > z$ for λ_min;
    * *zero* otherwise.

    Then: λ_min positive → ``"minimum"``; λ_max negative → ``"maximum"``; λ_min negative and
    λ_max positive → ``"saddle"``; anything else (an extremal eigenvalue zero) →
    ``"degenerate"``.  If $\|\nabla L\|_2 >$ ``grad_tol`` the kind is ``"not_stationary"``
    (``curvature`` still says what the Hessian alone indicates).

    **Cost**: one :func:`~curvops.linalg.lanczos.eigsh` with ``k=2, which="BE"`` and residuals
    relative to ‖H‖: typically 20–200 Hessian products (one data pass each).

    Args:
        H: the Hessian (a symmetric operator, tensor or scipy LinearOperator), P × P.
        grad: the gradient at the same point: a tensor/array [P], or a dict / list of
            parameter-shaped tensors (only its norm is used).
        tol: relative tolerance: eigenvalues within ``tol · ‖H‖`` (plus their residual) of 0
            count as zero; also the eigensolver's tolerance relative to ‖H‖.
        grad_tol: absolute threshold on ‖grad‖₂ for stationarity (in the loss's units per
            parameter unit: set it for your problem's scale).
        max_iters: Lanczos steps cap.
        generator: random source of the Lanczos start (reproducibility).
        v0: Lanczos start vector (default random).

    Returns:
        :class:`StationaryPointResult`.

    Raises:
        ValueError: non-square H (or smaller than 3 × 3), a gradient of the wrong size or not
            finite, bad tolerances, or a Hessian product that returned NaN/Inf.

    Example:
        >>> H = curvops.Hessian(model, loss, (X, y))                         # doctest: +SKIP
        >>> g = curvops.Objective(model, loss, (X, y)).gradient()             # doctest: +SKIP
        >>> classify_stationary_point(H, g, grad_tol=1e-5).kind               # doctest: +SKIP
        'saddle'

    References:
        Nocedal, Wright (2006). *Numerical Optimization* (2nd ed.), §2.1 (second-order conditions).
        Dauphin et al. (2014). *Identifying and Attacking the Saddle Point Problem in
        High-Dimensional Non-Convex Optimization.*
    """
    api = "classify_stationary_point"
    H = as_square_operator(H, api)
    n = H.shape[0]
    if n < 3:
        raise ValueError(f"{api}: expected a Hessian of size ≥ 3 for Lanczos, got {n}; use "
                         f"torch.linalg.eigvalsh on the dense matrix.")
    if not (0 < tol < 1):
        raise ValueError(f"{api}: expected 0 < tol < 1, got {tol!r}.")
    if not grad_tol >= 0:
        raise ValueError(f"{api}: expected grad_tol ≥ 0, got {grad_tol!r}.")
    gnorm = _grad_norm(grad, n, api)
    res = eigsh(H, k=2, which="BE", tol=tol, relative_to="norm", max_iters=max_iters, generator=generator,
                v0=v0, return_eigenvectors=False)
    lmin, lmax = (float(v) for v in res.eigenvalues)
    rmin, rmax = (float(r) for r in res.residuals)
    z = tol * max(abs(lmin), abs(lmax))
    low = "negative" if lmin < -z else ("positive" if lmin - rmin > z else "zero")
    high = "positive" if lmax > z else ("negative" if lmax + rmax < -z else "zero")
    if low == "positive":
        curvature, why = "minimum", f"λ_min ≈ {lmin:.4g} > 0: H is positive definite"
    elif high == "negative":
        curvature, why = "maximum", f"λ_max ≈ {lmax:.4g} < 0: H is negative definite"
    elif low == "negative" and high == "positive":
        curvature, why = "saddle", f"λ_min ≈ {lmin:.4g} < 0 < λ_max ≈ {lmax:.4g}: H is indefinite"
    else:
        which = "λ_min" if low == "zero" else "λ_max"
        value = lmin if low == "zero" else lmax
        curvature = "degenerate"
        why = (f"{which} ≈ {value:.3g} is zero within {z:.2g} (+ residual): H is singular at the "
               f"end of its spectrum, so the quadratic model cannot decide (higher-order terms do)")
    if gnorm > grad_tol:
        kind = "not_stationary"
        why = (f"‖∇L‖ = {gnorm:.3g} > grad_tol = {grad_tol:.3g}: not a stationary point "
               f"(the curvature says {curvature}: {why})")
    else:
        kind = curvature
        why = f"‖∇L‖ = {gnorm:.3g} ≤ grad_tol; {why}"
    if not res.converged:
        why += " (the eigensolver did not converge; raise max_iters)"
    return StationaryPointResult(
        kind=kind, curvature=curvature, lambda_min=lmin, lambda_max=lmax, residual_min=rmin, residual_max=rmax,
        grad_norm=gnorm, grad_tol=grad_tol, tol=tol, zero_threshold=z, num_matvecs=res.num_matvecs,
        converged=res.converged, explanation=why, eigh=res,
    )
