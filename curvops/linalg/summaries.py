r"""One-number summaries of an operator's spectrum: rank, condition number, spectral and nuclear norm.

Each is computed matrix-free from a few extremal eigenvalues (Lanczos, :func:`eigsh`) or a
stochastic trace, and returns the value with the diagnostics that qualify it: which formula
applied, how many products it took, whether the eigensolver converged.

Which formula applies follows the operator's *tags* (promises, never guessed from numbers):
PSD operators use their eigenvalues directly; symmetric ones their eigenvalues' magnitudes;
anything else (untagged, rectangular) its singular values, through Lanczos on the Gram
operator $A^\top A$ or $A A^\top$ (whichever is smaller) — mathematically the Golub-Kahan
bidiagonalization, at two products (one with A, one with Aᵀ) per step.

References:
    Golub, Kahan (1965). *Calculating the Singular Values and Pseudo-Inverse of a Matrix.*
    Golub, Van Loan (2013). *Matrix Computations* (4th ed.), §2.4 and §10.
    Hutchinson (1989). *A Stochastic Estimator of the Trace of the Influence Matrix for Laplacian
    Smoothing Splines.*
    Ubaru, Chen, Saad (2017). *Fast Estimation of tr(f(A)) via Stochastic Lanczos Quadrature.*
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ._checks import check_choice, check_generator, check_int, check_optional_int, check_real
from .density import slq_trace
from .lanczos import eigsh, random_block

#: methods of :func:`curvops.linalg.trace.trace` for ``nuclear_norm(trace_method=...)``, with the fewest
#: products each needs (as :func:`~curvops.linalg.trace.trace` requires them)
_TRACE_BUDGETS = {"hutchinson": 1, "hutch++": 3, "xtrace": 4, "xnystrace": 2}


# ---- results ---------------------------------------------------------------------------------
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


@dataclass
class NormEstimate:
    """A norm estimate.

    Attributes:
        value: the estimate.
        method: how it was computed.
        num_matvecs: products with A (a product with Aᵀ counts as one).
        converged: the eigensolver met its tolerance (stochastic estimates: True).
        stderr: standard error of a stochastic estimate (NaN for deterministic ones).
        residual: eigen-residual of the extremal pair (NaN for stochastic estimates).
    """

    value: float
    method: str
    num_matvecs: int
    converged: bool
    stderr: float = float("nan")
    residual: float = float("nan")


# ---- helpers ---------------------------------------------------------------------------------
def _operator(A, api: str):
    from ..operators.algebra import as_operator

    A = as_operator(A)
    if min(A.shape) < 1:
        raise ValueError(f"{api}: expected a non-empty operator, got shape {tuple(A.shape)}.")
    return A


def _check_eig_args(tol, max_iters, generator, A, api: str, tol_name: str = "tol"):
    """The eigensolver's tolerance, step cap and random source, checked under the caller's name."""
    tol = check_real(tol, tol_name, api, minimum=0.0, fix=f"{tol_name}=0 means machine precision.")
    max_iters = check_optional_int(max_iters, "max_iters", api, minimum=1)
    return tol, max_iters, check_generator(generator, api, A.device)


def _func(shape, fn, A, tags=()):
    from ..operators.algebra import func_operator

    return func_operator(shape, fn, dtype=A.torch_dtype, device=A.device, tags=tags)


def _gram(A):
    """``AᵀA`` or ``AAᵀ``, whichever is smaller (PSD; its eigenvalues are σ²). Two products per column."""
    M, N = A.shape
    if N <= M:
        return _func((N, N), lambda V: A.T @ (A @ V), A, tags=("psd",))
    return _func((M, M), lambda W: A @ (A.T @ W), A, tags=("psd",))


def _shifted_square(A, damping: float):
    """``(A + δI)²`` for symmetric A (PSD; eigenvalues (λ+δ)²). Two products per column."""
    n = A.shape[0]

    def shifted(V):
        return A @ V + damping * V if damping else A @ V

    return _func((n, n), lambda V: shifted(shifted(V)), A, tags=("psd",))


# ---- rank ------------------------------------------------------------------------------------
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
    A = _operator(A, api)
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


# ---- condition number ------------------------------------------------------------------------------
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
    A = _operator(A, api)
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


# ---- norms -----------------------------------------------------------------------------------
def spectral_norm(A, *, tol: float = 1e-6, max_iters: int | None = None,
                  generator: torch.Generator | None = None) -> NormEstimate:
    r"""Spectral norm $\|A\|_2 = \sigma_{\max}(A)$ ($= \max_i |\lambda_i|$ for symmetric A).

    Symmetric (tagged) operators: the largest-magnitude eigenvalue by Lanczos.  Otherwise the
    largest eigenvalue of the Gram operator (AᵀA or AAᵀ), i.e. Golub-Kahan, and its square root.

    **Cost**: one :func:`eigsh` with k = 1: typically 10–40 products (twice that through the
    Gram operator; a product with Aᵀ counts as one).

    Args:
        A: operator, tensor, array or scipy LinearOperator.
        tol: eigensolver tolerance relative to the eigenvalue (the norm's relative accuracy is
            about ``tol`` symmetric, ``tol/2`` through the Gram operator).
        max_iters: Lanczos steps cap.
        generator: random source (reproducibility).

    Returns:
        :class:`NormEstimate`.

    Raises:
        TypeError: an argument of the wrong kind (a string ``tol``, a float ``max_iters``, a
            ``generator`` that is not None, a ``torch.Generator`` or an int seed).
        ValueError: a negative ``tol``, ``max_iters`` < 1, or a product returned NaN/Inf.
    """
    api = "spectral_norm"
    A = _operator(A, api)
    tol, max_iters, generator = _check_eig_args(tol, max_iters, generator, A, api)
    kw = dict(tol=tol, max_iters=max_iters, generator=generator, return_eigenvectors=False)
    if A.is_symmetric:
        if A.shape[0] < 2:
            return _tiny_norm(A)
        res = eigsh(A, k=1, which="LM", **kw)
        return NormEstimate(value=abs(float(res.eigenvalues[0])), method="largest |λ| (Lanczos)",
                          num_matvecs=res.num_matvecs, converged=res.converged, residual=float(res.residuals[0]))
    op = _gram(A)
    if op.shape[0] < 2:
        return _tiny_norm(A)
    res = eigsh(op, k=1, which="LA", **kw)
    return NormEstimate(value=math.sqrt(max(float(res.eigenvalues[0]), 0.0)),
                      method="sqrt of the largest eigenvalue of the Gram operator (Golub-Kahan)",
                      num_matvecs=2 * res.num_matvecs, converged=res.converged, residual=float(res.residuals[0]))


def _tiny_norm(A) -> NormEstimate:
    M = A @ torch.eye(A.shape[1], dtype=A.torch_dtype, device=A.device)
    return NormEstimate(value=float(torch.linalg.matrix_norm(M, ord=2)), method="dense (A @ I)",
                      num_matvecs=A.shape[1], converged=True)


def nuclear_norm(A, *, num_matvecs: int = 100, num_probes: int = 30, num_steps: int = 30,
                 generator: torch.Generator | None = None, trace_method: str = "xtrace",
                 probe_batch_size: int | None = None) -> NormEstimate:
    r"""Nuclear norm $\|A\|_* = \sum_i \sigma_i(A)$, estimated stochastically.

    PSD (tagged) operators: $\|A\|_* = \operatorname{tr} A$, estimated by
    :func:`curvops.linalg.trace.trace` (``trace_method``, default XTrace; exact on low-rank
    operators with enough products) with ``num_matvecs`` products.  Otherwise
    $\|A\|_* = \operatorname{tr}(A^\top A)^{1/2}$ by stochastic Lanczos quadrature on the Gram
    operator with $f(x) = \sqrt{x}$ (``num_probes`` probes × ``num_steps`` steps); √ is not
    smooth at 0, so operators with many tiny singular values need more steps.

    **Cost**: PSD: ``num_matvecs`` products.  Otherwise ``num_probes × num_steps`` Gram
    products (2 each: one with A, one with Aᵀ).

    Args:
        A: operator, tensor, array or scipy LinearOperator.
        num_matvecs: product budget of the trace estimate (PSD operators).
        num_probes: random probes of the SLQ estimate (other operators).
        num_steps: Lanczos steps per probe (other operators).
        generator: random source (reproducibility).
        trace_method: method of :func:`~curvops.linalg.trace.trace` for PSD operators.
        probe_batch_size: SLQ probes per block (default all).

    Returns:
        :class:`NormEstimate` with ``stderr``.

    Every argument is checked on every path (a PSD operator's ``num_probes``/``num_steps`` too).

    Raises:
        TypeError: a count that is not an integer (``3.0`` included), a ``generator`` that is
            not None, a ``torch.Generator`` or an int seed.
        ValueError: a count < 1 (for PSD operators, ``num_matvecs`` below what ``trace_method``
            needs), an unknown ``trace_method``, or a product returned NaN/Inf.
    """
    api = "nuclear_norm"
    A = _operator(A, api)
    num_matvecs = check_int(num_matvecs, "num_matvecs", api, minimum=1)
    num_probes = check_int(num_probes, "num_probes", api, minimum=1)
    num_steps = check_int(num_steps, "num_steps", api, minimum=1)
    probe_batch_size = check_optional_int(probe_batch_size, "probe_batch_size", api, minimum=1)
    check_choice(trace_method, "trace_method", tuple(_TRACE_BUDGETS), api)
    generator = check_generator(generator, api, A.device)
    if A.is_psd:
        need = _TRACE_BUDGETS[trace_method]
        check_int(num_matvecs, "num_matvecs", api, minimum=need, expected=f"num_matvecs ≥ {need}",
                  fix=f"trace_method={trace_method!r} needs at least {need} products.")
        try:
            from .trace import trace
        except ImportError:  # the trace module is optional here: fall back to plain Hutchinson
            return _hutchinson(A, num_matvecs, generator, probe_batch_size, api)
        res = trace(A, method=trace_method, num_matvecs=num_matvecs, generator=generator)
        return NormEstimate(value=float(res.value), method=f"trace (PSD) by {res.method}",
                            num_matvecs=res.num_matvecs, converged=True, stderr=float(res.stderr))
    op = _gram(A)

    def sqrt(x: Tensor) -> Tensor:
        return x.clamp_min(0).sqrt()

    value, stderr, _, mv = slq_trace(op, sqrt, num_probes=num_probes, num_steps=num_steps, generator=generator,
                                     probe_batch_size=probe_batch_size, api=api)
    return NormEstimate(value=value, method="SLQ of tr (AᵀA)^½ on the Gram operator", num_matvecs=2 * mv,
                        converged=True, stderr=stderr)


def _hutchinson(A, num_probes: int, generator, probe_batch_size, api: str) -> NormEstimate:
    from .lanczos import apply

    n = A.shape[0]
    batch = num_probes if probe_batch_size is None else int(probe_batch_size)
    samples = []
    for start in range(0, num_probes, batch):
        V = random_block(n, min(batch, num_probes - start), A.torch_dtype, A.device, generator, "rademacher")
        samples.append((V * apply(A, V, api, start // batch + 1)).sum(dim=0))
    s = torch.cat(samples).to(torch.float64 if A.device.type != "mps" else torch.float32)
    stderr = float(s.std() / math.sqrt(num_probes)) if num_probes > 1 else float("nan")
    return NormEstimate(value=float(s.mean()), method="trace (PSD) by Hutchinson, Rademacher probes",
                      num_matvecs=num_probes, converged=True, stderr=stderr)
