r"""Numerical rank of an operator, with how firm the count is (a clear gap at the cutoff or not).

The magnitudes come from a dense decomposition (small operators), block Lanczos (symmetric
ones, :func:`eigsh`) or Lanczos on the Gram operator $A^\top A$ / $A A^\top$ (others).

References:
    Golub, Kahan (1965). *Calculating the Singular Values and Pseudo-Inverse of a Matrix.*
    Golub, Van Loan (2013). *Matrix Computations* (4th ed.), §2.4 and §10.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ._checks import check_int, check_real
from ._primitives import _check_eig_args, _gram, _nonempty_operator
from .eigensolver import eigsh


@dataclass
class RankResult:
    """Numerical rank: the number of eigenvalues (singular values) above ``tol``, and how firm that count is.

    A numerical rank is a fact only when the cutoff falls in a clear gap of the spectrum.  When
    eigenvalues lie close to the cutoff on either side (a smooth decay through it), another
    reasonable cutoff gives another count: the rank is *not well defined at this precision*, and
    ``well_defined`` says so.

    Attributes:
        value: the rank (a lower bound when ``lower_bound``).
        tol: the absolute threshold used.
        lower_bound: all ``k_max`` computed values exceed ``tol``: the rank is at least ``value``.
        values: the computed magnitudes |λ| (or σ), descending.
        method: how they were computed.
        num_matvecs: products with A (a product with Aᵀ counts as one).
        converged: whether the eigensolver met its tolerance (always True when dense).
        tol_rule: how ``tol`` was chosen, with its numbers (e.g. ``"λ₁·n·ε = 0.2402 · 371 · 2.22e-16"``).
        above: the smallest counted value (``values[value − 1]``); NaN when the rank is 0.
        below: the largest value not counted (``values[value]``); NaN when none was computed
            (full rank, or a lower bound).
        gap_factor: the rank is called well defined when no computed value lies within this
            factor of ``tol`` (every cutoff in [tol / gap_factor, tol · gap_factor] gives the same count).
        well_defined: that holds, and the rank is not just a lower bound.
        complete: ``values`` holds all min(M, N) magnitudes (the dense path).
        symbol: what ``values`` are: ``"λ"`` (PSD), ``"|λ|"`` (symmetric) or ``"σ"`` (singular values).
    """

    value: int
    tol: float
    lower_bound: bool
    values: Tensor
    method: str
    num_matvecs: int
    converged: bool
    tol_rule: str = ""
    above: float = float("nan")
    below: float = float("nan")
    gap_factor: float = 10.0
    well_defined: bool = True
    complete: bool = False
    symbol: str = "|λ|"

    @property
    def status(self) -> str:
        """``"lower bound"``, ``"not well defined"`` (no clear gap at the cutoff) or ``"well defined"``."""
        if self.lower_bound:
            return "lower bound"
        return "well defined" if self.well_defined else "not well defined"

    def explain(self) -> str:
        """One sentence: the cutoff, the values around it, and what that says about the count."""
        size = "" if not self.complete else f" of {self.values.numel()}"
        if self.lower_bound:
            return (f"rank ≥ {self.value}{size}: all {self.values.numel()} computed values exceed the cutoff "
                    f"{self.tol:.4g} ({self.tol_rule}); raise k_max to find the rank.")
        around = _around(self.symbol, self.value, self.above, self.below)
        if self.well_defined:
            return (f"rank {self.value}{size} at the cutoff {self.tol:.4g} ({self.tol_rule}); clear gap: {around}, "
                    f"none within a factor {self.gap_factor:g} of the cutoff.")
        near = int(((self.values > self.tol / self.gap_factor) & (self.values <= self.tol * self.gap_factor)).sum())
        return (f"rank not well defined at this precision: {self.value}{size} values exceed the cutoff {self.tol:.4g} "
                f"({self.tol_rule}), but the spectrum has no clear gap there ({around}; {near} values within a "
                f"factor {self.gap_factor:g} of the cutoff): another cutoff gives another count.")


def _around(symbol: str, r: int, above: float, below: float) -> str:
    parts = []
    if not math.isnan(above):
        parts.append(f"{symbol}{r} = {above:.4g}")
    if not math.isnan(below):
        parts.append(f"{symbol}{r + 1} = {below:.4g}")
    return " and ".join(parts) if parts else "no values"


def rank(A, tol: float | None = None, *, k_max: int = 100, block_size: int = 4, eig_tol: float = 1e-6,
         max_iters: int | None = None, generator: torch.Generator | None = None,
         gap_factor: float = 10.0) -> RankResult:
    r"""Numerical rank: how many eigenvalues (singular values) exceed a threshold, and whether that is a fact.

    .. math:: \operatorname{rank}_\tau(A) = \#\{i : |\lambda_i(A)| > \tau\}
              \quad(\text{symmetric}),\qquad \#\{i : \sigma_i(A) > \tau\}\quad(\text{otherwise}),

    with default $\tau = \max|\lambda| \cdot \max(M, N) \cdot \epsilon$ (numpy's
    ``matrix_rank`` convention, ε of ``A.torch_dtype``).

    The count is a property of the operator only when τ falls in a clear gap of the spectrum.
    The result gives the values just above and below τ (``above``, ``below``) and calls the rank
    ``well_defined`` when no computed value lies within a factor ``gap_factor`` of τ — every
    cutoff in [τ/gap_factor, τ·gap_factor] gives the same count.  A spectrum that decays smoothly
    through τ (e.g. 0.0323, 0.0301, 0.0300 around τ = 0.031) has no well-defined rank at this
    precision; :meth:`RankResult.explain` says so in words.

    Small operators (the smaller side ≤ ``k_max + 2·block_size``) are materialized with one
    block product and decomposed densely: exact.  Otherwise the ``k_max`` largest magnitudes
    come from block Lanczos (:func:`eigsh`, ``which="LM"``, residuals relative to ‖A‖); exact
    low rank shows up as an invariant subspace, which Lanczos detects, and the block finds
    eigenvalues repeated up to ``block_size`` times per Krylov sweep (more through the random
    restarts after an invariant subspace).  If all k_max exceed τ the rank is only known to be
    ≥ k_max (``lower_bound``).  Non-symmetric operators go through the Gram operator, whose
    eigenvalues σ² carry an absolute error of about ε‖A‖²: singular values below
    $\sqrt{\max(M,N)\,\epsilon}\,\sigma_{\max}$ cannot be told from zero there, and τ is raised
    to that floor (tag a symmetric operator ``symmetric`` to avoid it).

    **Cost**: dense path: min(M, N) products in one block.  Lanczos path: typically 2–4 ×
    (k_max + block_size) products (twice that for non-symmetric operators); memory about
    (3 k_max + 2 block_size) · n entries.  Cheap when the rank is low (the invariant subspace is
    found at once); when the rank exceeds k_max only a lower bound is returned.

    Args:
        A: operator, tensor, array or scipy LinearOperator (M × N).
        tol: absolute threshold τ (default: see above).
        k_max: largest rank that can be certified.
        block_size: Lanczos block size (≥ the multiplicity of repeated eigenvalues to count).
        eig_tol: eigensolver tolerance, relative to ‖A‖.
        max_iters: Lanczos steps cap (see :func:`eigsh`).
        generator: random source (reproducibility).
        gap_factor: how far (as a factor) the nearest values must stay from τ for the rank to be
            called well defined (> 1).

    Returns:
        :class:`RankResult`.

    Raises:
        TypeError: an argument of the wrong kind (a float ``k_max``/``block_size``/``max_iters``,
            a string ``tol``, a ``generator`` that is not None, a ``torch.Generator`` or an int seed).
        ValueError: ``k_max``/``block_size``/``max_iters`` < 1, ``tol`` < 0 or NaN, ``eig_tol``
            < 0, ``gap_factor`` ≤ 1 or infinite, or a product returned NaN/Inf.
    """
    api = "rank"
    A = _nonempty_operator(A, api)
    k_max = check_int(k_max, "k_max", api, minimum=1)
    if tol is not None:
        tol = check_real(tol, "tol", api, minimum=0.0, allow_inf=True, expected="tol ≥ 0")
    block_size = check_int(block_size, "block_size", api, minimum=1)
    eig_tol, max_iters, generator = _check_eig_args(eig_tol, max_iters, generator, A, api, "eig_tol")
    gap_factor = check_real(gap_factor, "gap_factor", api, minimum=1.0, strict=True,
                            expected="a finite gap_factor > 1 (e.g. 10)")
    M, N = A.shape
    eps = torch.finfo(A.torch_dtype).eps
    symmetric = A.is_symmetric
    symbol = ("λ" if A.is_psd else "|λ|") if symmetric else "σ"
    floor = 0.0
    if min(M, N) <= k_max + 2 * block_size:
        D = _dense(A, api)
        mags = torch.linalg.eigvalsh((D + D.T) / 2).abs() if symmetric else torch.linalg.svdvals(D)
        method, mv, converged = f"dense ({min(M, N)} products in one block)", min(M, N), True
    elif symmetric:
        res = eigsh(A, k=k_max, which="LM", tol=eig_tol, relative_to="norm", block_size=block_size,
                    max_iters=max_iters, generator=generator, return_eigenvectors=False)
        mags, mv, converged = res.eigenvalues.to(torch.float64).abs(), res.num_matvecs, res.converged
        method = f"block Lanczos (b={block_size}): the {k_max} largest |λ|"
    else:
        res = eigsh(_gram(A), k=k_max, which="LA", tol=eig_tol, relative_to="norm", block_size=block_size,
                    max_iters=max_iters, generator=generator, return_eigenvectors=False)
        mags, mv, converged = res.eigenvalues.to(torch.float64).clamp_min(0).sqrt(), 2 * res.num_matvecs, res.converged
        method = f"block Lanczos (b={block_size}) on the Gram operator: the {k_max} largest σ"
        floor = math.sqrt(max(M, N) * eps) * float(mags.max())
    mags = torch.sort(mags, descending=True).values
    top = float(mags[0]) if mags.numel() else 0.0
    if tol is None:
        tol = top * max(M, N) * eps
        head = {"λ": "λ₁", "|λ|": "max|λ|", "σ": "σ₁"}[symbol]
        rule = f"{head}·{'n' if M == N else 'max(M, N)'}·ε = {top:.4g} · {max(M, N)} · {eps:.3g}"
    else:
        rule = "given"
    if floor > float(tol):
        rule = (f"raised to the Gram operator's floor √(max(M, N)·ε)·σ₁ = √({max(M, N)} · {eps:.3g}) · {top:.4g} "
                f"(was {float(tol):.4g}: {rule})")
    tol = max(float(tol), floor)
    count = int((mags > tol).sum())
    lower = count == mags.numel() and mags.numel() < min(M, N)
    above = float(mags[count - 1]) if count else float("nan")
    below = float(mags[count]) if count < mags.numel() else float("nan")
    near = bool(((mags > tol / gap_factor) & (mags <= tol * gap_factor)).any())
    return RankResult(value=count, tol=tol, lower_bound=lower, values=mags, method=method,
                      num_matvecs=mv, converged=converged, tol_rule=rule, above=above, below=below,
                      gap_factor=float(gap_factor), well_defined=not lower and not near,
                      complete=mags.numel() == min(M, N), symbol=symbol)


def _dense(A, api: str) -> Tensor:
    """A as a dense float64 matrix from min(M, N) products in one block (Aᵀ when it has fewer rows)."""
    M, N = A.shape
    if N <= M:
        D = A @ torch.eye(N, dtype=A.torch_dtype, device=A.device)
    else:
        D = (A.T @ torch.eye(M, dtype=A.torch_dtype, device=A.device)).T
    if not bool(torch.isfinite(D).all()):
        raise ValueError(f"{api}: the product A @ I returned NaN or Inf.")
    return D.to(torch.float64) if D.device.type != "mps" else D
