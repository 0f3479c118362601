r"""Condition number of an operator from its extremal eigenvalues (or singular values).

Which formula applies follows the operator's tags: PSD, symmetric (through $(A + \delta I)^2$
when the shifted spectrum has both signs), or general (the Gram operator's ends).

References:
    Golub, Kahan (1965). *Calculating the Singular Values and Pseudo-Inverse of a Matrix.*
    Golub, Van Loan (2013). *Matrix Computations* (4th ed.), §2.4 and §10.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._checks import check_real
from ._primitives import _check_eig_args, _func, _gram, _nonempty_operator
from .eigensolver import eigsh


@dataclass
class CondResult:
    """Condition number, with the eigen/singular values it is made of and how far it can be trusted.

    Attributes:
        value: the condition number (``inf`` when the smallest value is zero up to rounding).
        kind: ``"psd"`` ((λ_max+δ)/(λ_min+δ)), ``"symmetric"`` (max|λ+δ| / min|λ+δ|) or
            ``"general"`` (σ_max/σ_min).
        largest, smallest: the numerator and denominator.
        damping: δ.
        method: how ``smallest`` was found (an extremal eigenvalue, or Lanczos on a squared operator).
        num_matvecs: products with A (a product with Aᵀ counts as one).
        converged: whether every eigensolve met its tolerance.
        lower_bound: the eigensolve did not converge and ``value`` is a lower bound on κ: Ritz
            values lie inside the spectrum, so the largest is underestimated and the smallest
            overestimated (PSD, general, and symmetric indefinite operators; a symmetric operator
            whose unconverged Ritz values look definite gives no bound).
        zero_threshold: values at or below this count as zero (``value = inf``): what the
            eigensolve resolves (see :func:`cond`).
    """

    value: float
    kind: str
    largest: float
    smallest: float
    damping: float
    method: str
    num_matvecs: int
    converged: bool
    lower_bound: bool = False
    zero_threshold: float = float("nan")

    @property
    def status(self) -> str:
        """``"infinite"``, ``"converged"``, ``"lower bound"`` (not converged) or ``"not converged"`` (no bound)."""
        if math.isinf(self.value):
            return "infinite"
        if self.converged:
            return "converged"
        return "lower bound" if self.lower_bound else "not converged"


def _shifted_square(A, damping: float):
    """``(A + δI)²`` for symmetric A (PSD; eigenvalues (λ+δ)²). Two products per column."""
    n = A.shape[0]

    def shifted(V):
        return A @ V + damping * V if damping else A @ V

    return _func((n, n), lambda V: shifted(shifted(V)), A, tags=("psd",))


def cond(A, damping: float = 0.0, *, tol: float = 1e-6, max_iters: int | None = None,
         generator: torch.Generator | None = None) -> CondResult:
    r"""Condition number from extremal eigenvalues (or singular values).

    .. math:: \kappa = \frac{\lambda_{\max} + \delta}{\lambda_{\min} + \delta}\ (\text{PSD}),\quad
              \frac{\max_i |\lambda_i + \delta|}{\min_i |\lambda_i + \delta|}\ (\text{symmetric}),\quad
              \frac{\sigma_{\max}}{\sigma_{\min}}\ (\text{general}).

    PSD and symmetric operators: both ends of the spectrum by Lanczos (``which="BE"``).  For a
    symmetric operator whose shifted spectrum has both signs, min|λ+δ| lies inside the
    spectrum, where Lanczos cannot reach it directly; it is found as the smallest eigenvalue
    of (A+δI)² — slower to converge (the squared operator's condition number is κ²) and two
    products per step.  General operators: σ_max and σ_min from the Gram operator (σ_min is
    the min(M, N)-th singular value).  The smallest value is treated as zero, and the result is
    ``inf``, when it is below what the eigensolve resolves: ε^(2/3)·(largest) from the
    spectrum's ends, ε^(1/3)·(largest) through a squared or Gram operator.

    **Cost**: one :func:`eigsh` with k = 2 (tens to hundreds of products, more when the small
    end is clustered), plus one on the squared operator for symmetric indefinite operators;
    products with Gram/squared operators count twice.

    Args:
        A: operator (tags decide the formula: ``psd``, ``symmetric``, or neither).
        damping: δ ≥ 0 added to the diagonal (PSD and symmetric operators only).
        tol: eigensolver tolerance, relative to each eigenvalue.
        max_iters: Lanczos steps cap per eigensolve.
        generator: random source (reproducibility).

    An eigensolve that stops before converging (``max_iters``, or a clustered small end) returns
    Ritz values from inside the spectrum: the value is then a *lower bound* on κ
    (``lower_bound``, ``status == "lower bound"``), not an estimate to quote as is.

    Returns:
        :class:`CondResult` (``kind`` says which formula applied, ``status`` how far to trust it).

    Raises:
        TypeError: an argument of the wrong kind (a string ``damping`` or ``tol``, a float
            ``max_iters``, a ``generator`` that is not None, a ``torch.Generator`` or an int seed).
        ValueError: negative or non-finite damping, damping for a non-symmetric operator, a
            negative ``tol``, ``max_iters`` < 1, an operator too small for Lanczos (n < 3: use a
            dense method), or a product returned NaN/Inf.
    """
    api = "cond"
    A = _nonempty_operator(A, api)
    damping = check_real(damping, "damping", api, minimum=0.0, expected="damping ≥ 0")
    tol, max_iters, generator = _check_eig_args(tol, max_iters, generator, A, api)
    eps23 = torch.finfo(A.torch_dtype).eps ** (2 / 3)
    kw = dict(tol=tol, max_iters=max_iters, generator=generator, return_eigenvectors=False)
    if not A.is_symmetric:
        if damping:
            raise ValueError(f"{api}: damping applies to symmetric operators; this one is not tagged symmetric "
                             f"(tag it with curvops.tag(A, 'symmetric') if it is).")
        op = _gram(A)
        _check_size(op, api)
        res = eigsh(op, k=2, which="BE", **kw)
        lo, hi = (float(v) for v in res.eigenvalues.clamp_min(0).sqrt())
        return _cond_result(hi, lo, "general", 0.0, "σ from both ends of the Gram operator's spectrum",
                            2 * res.num_matvecs, res.converged, math.sqrt(eps23), bound=True)
    _check_size(A, api)
    res = eigsh(A, k=2, which="BE", **kw)
    lmin, lmax = (float(v) + damping for v in res.eigenvalues)
    if A.is_psd:
        return _cond_result(lmax, lmin, "psd", damping, "both ends of the spectrum", res.num_matvecs,
                            res.converged, eps23, bound=True)
    if lmin > 0 or lmax < 0:  # definite after the shift: the extremes are the smallest and largest |λ|
        big, small = max(abs(lmin), abs(lmax)), min(abs(lmin), abs(lmax))
        # unconverged Ritz values of an indefinite operator may look definite: no bound then
        return _cond_result(big, small, "symmetric", damping, "both ends of the spectrum (definite)",
                            res.num_matvecs, res.converged, eps23, bound=False)
    sq = eigsh(_shifted_square(A, damping), k=1, which="SA", **kw)
    small = math.sqrt(max(float(sq.eigenvalues[0]), 0.0))
    # (A+δI)² resolves its eigenvalues to ε^(2/3)·max², hence min|λ+δ| only to ε^(1/3)·max.
    return _cond_result(max(abs(lmin), abs(lmax)), small, "symmetric", damping,
                        "max|λ+δ| from both ends; min|λ+δ| from the smallest eigenvalue of (A+δI)²",
                        res.num_matvecs + 2 * sq.num_matvecs, res.converged and sq.converged, math.sqrt(eps23),
                        bound=True)


def _check_size(op, api: str) -> None:
    if op.shape[0] < 3:
        raise ValueError(f"{api}: expected an operator of size ≥ 3 for Lanczos, got shape {tuple(op.shape)}; "
                         f"use torch.linalg.cond(A.to_dense()).")


def _cond_result(largest, smallest, kind, damping, method, mv, converged, resolution, *, bound) -> CondResult:
    """``inf`` when ``smallest`` is below what the eigensolve resolves (``resolution · largest``).

    ``bound``: an unconverged value is a lower bound on κ (the Ritz values lie inside the spectrum)."""
    threshold = resolution * abs(largest)
    value = math.inf if smallest <= threshold else largest / smallest
    return CondResult(value=value, kind=kind, largest=largest, smallest=smallest, damping=damping,
                      method=method, num_matvecs=mv, converged=converged,
                      lower_bound=bool(bound and not converged and math.isfinite(value)), zero_threshold=threshold)
