r"""Stochastic trace and Frobenius-norm estimation from products only.

The trace $\operatorname{tr}(A) = \sum_i A_{ii}$ of a square operator is estimated from
products $A\Omega$ with random test vectors $\Omega = [\omega_1, \dots, \omega_s]$,
$\mathbb{E}[\omega\omega^\top] = I$:

* ``"hutchinson"``: $\frac1m \sum_i \omega_i^\top A \omega_i$ (unbiased, no structure used).
* ``"hutch++"``: project out a randomized range $Q$ of $A$, take $\operatorname{tr}(Q^\top A Q)$
  exactly and Hutchinson on the rest $(I - QQ^\top) A (I - QQ^\top)$.
* ``"xtrace"``: the exchangeable version of Hutch++: every test vector serves both the
  low-rank part and the correction, through leave-one-out bases $Q_{(i)}$.
* ``"xnystrace"``: the same idea for PSD operators with a Nyström approximation; a single pass.

Test vectors are processed as blocks: one ``A @ V`` call per block (one data pass for a
curvature operator), however many columns it has.  The small dense post-processing runs in
float64 on the operator's device.

References:
    Hutchinson (1989). *A Stochastic Estimator of the Trace of the Influence Matrix for
    Laplacian Smoothing Splines*.
    Meyer, Musco, Musco, Woodruff (2021). *Hutch++: Optimal Stochastic Trace Estimation*.
    Epperly, Tropp, Webber (2024). *XTrace: Making the Most of Every Sample in Stochastic
    Trace Estimation*. SIAM J. Matrix Anal. Appl. 45(1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ._checks import check_choice, check_flag, check_generator
from ._primitives import (
    DISTRIBUTIONS, _blocks, _check_block_size, _check_budget, _exact_diagonal, _operator, _product,
    _safe_inverse_transpose, _unit_block, _work_dtype,
)
from ._probe_stream import ProbeStream, default_step

TRACE_METHODS = ("hutchinson", "hutch++", "xtrace", "xnystrace")
FROBENIUS_METHODS = ("hutchinson", "hutch++")


@dataclass
class TraceResult:
    """An estimate of a trace (or a squared norm) with its error estimate.

    Attributes:
        value: the estimate.
        stderr: estimated standard error of ``value`` (0 when the value is exact; NaN when
            there are too few samples to tell).
        num_matvecs: products with the operator spent (columns, over all blocks).
        method: the method that produced it (``"exact"`` when the budget reached the
            dimension and the trace was computed from unit vectors).
        samples: the per-sample estimates whose mean (plus the deflated part, for Hutch++)
            is ``value``, float64 on the operator's device; ``None`` for exact results.
    """

    value: float
    stderr: float
    num_matvecs: int
    method: str
    samples: Tensor | None = None


@dataclass
class NormResult:
    """An estimate of a norm with its error estimate.

    Attributes:
        value: the norm estimate $\\sqrt{\\widehat{\\|A\\|_F^2}}$.
        stderr: its estimated standard error (delta method from the squared norm's).
        num_matvecs: products spent (with ``A`` and ``A.T`` together).
        method: the method used.
        squared: the estimate of the squared norm, with its own error estimate.
    """

    value: float
    stderr: float
    num_matvecs: int
    method: str
    squared: TraceResult


def _mean_stderr(samples: Tensor) -> tuple[float, float]:
    k = samples.numel()
    mean = float(samples.mean())
    return mean, (float(samples.std() / math.sqrt(k)) if k > 1 else float("nan"))


# ---- trace --------------------------------------------------------------------------------
def trace(A, *, method: str = "xtrace", num_matvecs: int = 100, distribution: str | None = None,
          generator: torch.Generator | int | None = None, block_size: int | None = None,
          assume_psd: bool = False) -> TraceResult:
    r"""Estimate $\operatorname{tr}(A)$ of a square operator from ``num_matvecs`` products.

    With test vectors $\omega_i$ ($\mathbb{E}[\omega\omega^\top] = I$):

    * ``"hutchinson"``: $\hat t = \frac1m\sum_{i=1}^m \omega_i^\top A\omega_i$; variance
      $\frac{2}{m}\|A\|_F^2$ for Gaussian vectors, $\frac{2}{m}\sum_{i\ne j}A_{ij}^2$ for
      Rademacher ones (exact on diagonal matrices).
    * ``"hutch++"``: $S$ with $m/3$ columns, $Q = \operatorname{orth}(AS)$, then
      $\hat t = \operatorname{tr}(Q^\top A Q) + \frac{1}{g}\sum_i g_i^\top (I-QQ^\top)A(I-QQ^\top) g_i$
      with the remaining $g = m - 2m/3$ vectors.  Two passes after the sketch (the
      deflated products and the residual probes share one block).
    * ``"xtrace"``: $s = m/2$ test vectors, $Y = A\Omega = QR$, and for each $i$ the basis
      $Q_{(i)}$ of $\operatorname{range}(Y_{-i})$ (the sketch without $\omega_i$):
      $\hat t_i = \operatorname{tr}(Q_{(i)}^\top A Q_{(i)}) + \omega_i^\top (I - Q_{(i)}Q_{(i)}^\top) A
      (I - Q_{(i)}Q_{(i)}^\top)\omega_i$, $\hat t = \frac1s\sum_i \hat t_i$.  The downdates
      come from $R^{-\top}$: with $\hat s_i$ its normalized $i$-th column,
      $Q_{(i)}Q_{(i)}^\top = Q(I - \hat s_i\hat s_i^\top)Q^\top$, so all $s$ estimates cost
      $O(ns^2)$ flops besides the $2s$ products ($A\Omega$, then $AQ$).
    * ``"xnystrace"`` (PSD only, one pass): with the Nyström approximations
      $\hat A_{(i)} = Y_{-i}(\Omega_{-i}^\top Y_{-i})^{-1}Y_{-i}^\top$,
      $\hat t_i = \operatorname{tr}\hat A_{(i)} + \omega_i^\top(A - \hat A_{(i)})\omega_i$; computed
      on the shifted $A + \nu I$ ($\nu \approx \sqrt n\,\epsilon\,\|Y\|_F$) for stability, and
      $n\nu$ subtracted.

    The error estimate is the standard error of the mean of the per-sample estimates (for
    Hutch++, of the residual Hutchinson part; the deflated part is exact given $Q$).  It is
    calibrated for Hutchinson and Hutch++; the leave-one-out estimates of XTrace and
    XNysTrace are positively correlated, so there it is a heuristic on the low side: in our
    tests the actual error was 1–1.5× it for XTrace and up to 3.5× for XNysTrace on
    fast-decaying spectra (where both are tiny).  With
    ``distribution="sphere"`` XTrace and XNysTrace also rescale each correction term by
    $(n - s + 1)/\|P_i\omega_i\|^2$, where $P_i\omega_i$ is the part of $\omega_i$ outside the
    leave-one-out subspace: given that subspace, $P_i\omega_i$ is uniform on a sphere of
    dimension $n-s+1$, and the rescaling removes the variance of its length.

    When ``num_matvecs >= n`` the methods other than Hutchinson return the exact trace from
    $n$ products with unit vectors (``method="exact"``, ``stderr=0``): no estimator can do
    better with that budget.

    **Cost**: ``num_matvecs`` products (XTrace: the even part of it), in 1 block (Hutchinson
    with ``block_size=None``, XNysTrace), 2 blocks (XTrace) or 3 blocks (Hutch++: the sketch,
    then ``AQ`` and the residual probes together as two blocks of one call each).  No
    adjoint products.  Memory $O(ns)$ for the sketching methods; Hutchinson holds one block of
    probes at a time (in the operator's dtype), so its memory does not grow with ``num_matvecs``.

    Args:
        A: square operator (or a tensor/array/scipy operator, wrapped with ``as_operator``).
        method: ``"hutchinson"``, ``"hutch++"``, ``"xtrace"`` or ``"xnystrace"`` (PSD only).
        num_matvecs: budget of products; at least 1 (Hutchinson), 3 (Hutch++), 4 (XTrace),
            2 (XNysTrace).
        distribution: ``"rademacher"``, ``"gaussian"`` or ``"sphere"`` (Gaussian scaled to
            norm $\sqrt n$).  Default: ``"sphere"`` for XTrace/XNysTrace (the normalized
            estimator; with Rademacher vectors XTrace is several times worse on flat
            spectra), ``"rademacher"`` for Hutchinson and Hutch++.
        generator: random source for the test vectors (reproducible results): a
            ``torch.Generator``, an int seed (a new generator on the operator's device seeded
            with it), or None for the default generator.
        block_size: Hutchinson only: columns per product (default: the operator's ``max_columns``
            where it has one, else all in one block).  The probes are drawn block by block
            (each column from its own seed, so the estimate does not depend on ``block_size``).
        assume_psd: XNysTrace only: treat ``A`` as PSD although it has no ``"psd"`` tag.

    Returns:
        :class:`TraceResult` with ``value``, ``stderr``, ``num_matvecs``, ``method``.

    Raises:
        ValueError: non-square operator, unknown method or distribution, a budget below the
            method's minimum, XNysTrace on an operator not tagged PSD (or not PSD to working
            precision), a product that returns NaN/Inf.
        TypeError: an argument of the wrong kind: a count that is not an int (e.g. a float),
            a ``generator`` that is not None, a ``torch.Generator`` or an int seed, a flag that
            is not a bool, a tolerance that is not a real number.

    Example:
        >>> U = torch.randn(1000, 3, dtype=torch.float64)
        >>> A = curvops.LowRank(U, torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
        >>> res = trace(A, method="xtrace", num_matvecs=8)  # rank 3 ≤ s − 1 = 3: exact
        >>> abs(res.value - float(A.to_dense().trace())) < 1e-8 * res.value
        True

    References:
        Hutchinson (1989). *A Stochastic Estimator of the Trace of the Influence Matrix for
        Laplacian Smoothing Splines*.
        Meyer, Musco, Musco, Woodruff (2021). *Hutch++: Optimal Stochastic Trace Estimation*.
        Epperly, Tropp, Webber (2024). *XTrace: Making the Most of Every Sample in Stochastic
        Trace Estimation*.
    """
    api = f"trace({method})" if isinstance(method, str) else "trace"
    check_choice(method, "method", TRACE_METHODS, "trace")
    A = _operator(A, api)
    m = _check_budget(num_matvecs, {"hutchinson": 1, "hutch++": 3, "xtrace": 4, "xnystrace": 2}[method], api)
    if distribution is None:
        distribution = "sphere" if method in ("xtrace", "xnystrace") else "rademacher"
    check_choice(distribution, "distribution", DISTRIBUTIONS, api)
    generator = check_generator(generator, api, A.device, operator=A)
    block_size = _check_block_size(block_size, api)
    assume_psd = check_flag(assume_psd, "assume_psd", api)
    n = A.shape[0]
    if method == "xnystrace" and not (A.is_psd or assume_psd):
        raise ValueError(
            f"{api}: expected a PSD operator (tag 'psd'), got tags {sorted(A.tags)}. Use method='xtrace' for "
            f"other operators, or pass assume_psd=True (or curvops.tag(A, 'psd')) if you know it is PSD."
        )
    if method != "hutchinson" and m >= n:
        d = _exact_diagonal(A, block_size or 256, api)
        return TraceResult(float(d.sum()), 0.0, n, "exact")
    gen = dict(distribution=distribution, generator=generator, dtype=A.torch_dtype, device=A.device, api=api)
    if method == "hutchinson":
        return _hutchinson(A, m, block_size, gen, api)
    if method == "hutch++":
        return _hutchpp(A, m, gen, api)
    if method == "xtrace":
        return _xtrace(A, m // 2, gen, api)
    return _xnystrace(A, m, gen, api)


def _hutchinson(A, m: int, block_size, gen: dict, api: str) -> TraceResult:
    n = A.shape[0]
    work = _work_dtype(A.device)
    samples = torch.empty(m, dtype=work, device=A.device)
    for start, stop, W in ProbeStream(n, m, **gen).blocks(default_step(A, block_size, m)):  # one block held
        Y = _product(A, W, api, f"(probes {start}:{stop})")
        samples[start:stop] = (W * Y).sum(0, dtype=work)  # one slice-sized temporary, summed in `work`
        del W, Y
    value, stderr = _mean_stderr(samples)
    return TraceResult(value, stderr, m, "hutchinson", samples)


def _hutchpp(A, m: int, gen: dict, api: str) -> TraceResult:
    n = A.shape[0]
    work = _work_dtype(A.device)
    k = m // 3
    g = m - 2 * k
    probes = ProbeStream(n, k + g, **gen)  # columns 0:k sketch, k:k+g residual probes
    Q, _ = torch.linalg.qr(_product(A, probes.block(0, k), api, "(sketch)").to(work))
    G = probes.block(k, k + g).to(work)
    G -= Q @ (Q.T @ G)
    Z = _product(A, torch.cat([Q, G], dim=1), api, "(deflation and residual probes)").to(work)
    low = float((Q * Z[:, :k]).sum())
    samples = (G * Z[:, k:]).sum(0)
    mean, stderr = _mean_stderr(samples)
    return TraceResult(low + mean, stderr, m, "hutch++", low + samples)


def _xtrace(A, s: int, gen: dict, api: str) -> TraceResult:
    n = A.shape[0]
    work = _work_dtype(A.device)
    Omega = ProbeStream(n, s, **gen).block(0, s)
    Y = _product(A, Omega, api, "(test vectors)").to(work)
    Omega = Omega.to(work)
    Q, R = torch.linalg.qr(Y)
    Z = _product(A, Q, api, "(basis)").to(work)  # A Q
    S = _safe_inverse_transpose(R)
    S = S / S.norm(dim=0).clamp_min(torch.finfo(work).tiny)  # ŝ_i: Q ŝ_i ⟂ range(Y_{-i})
    H = Q.T @ Z  # Qᵀ A Q
    W = Q.T @ Omega
    c = (S * W).sum(0)  # ŝ_iᵀ Qᵀ ω_i
    low = H.diagonal().sum() - (S * (H @ S)).sum(0)  # tr(Q_(i)ᵀ A Q_(i))
    M = W - S * c  # column i: Qᵀ ω_i − c_i ŝ_i, so that P_i ω_i = ω_i − Q M_i
    U = Omega.addmm_(Q, M, alpha=-1)  # P_i ω_i (in place: Ω is not needed any more)
    V = Y.addmm_(Z, M, alpha=-1)  # A P_i ω_i (in place)
    del Z
    resid = U.mul_(V).sum(0)
    if gen["distribution"] == "sphere":
        resid = resid * ((n - s + 1) / (n - (W * W).sum(0) + c * c).clamp_min(torch.finfo(work).tiny))
    samples = low + resid
    value, stderr = _mean_stderr(samples)
    return TraceResult(value, stderr, 2 * s, "xtrace", samples)


def _shifted_cholesky(C: Tensor, Gram: Tensor, nu: float, api: str) -> tuple[Tensor, float]:
    """Upper Cholesky factor of ``C + ν Gram``, raising ν tenfold until it succeeds (at most 12 times)."""
    scale = float(C.diagonal().abs().max()) if C.numel() else 0.0
    for _ in range(12):
        R, info = torch.linalg.cholesky_ex(C + nu * Gram, upper=True)
        if int(info) == 0:
            return R, nu
        nu = max(10 * nu, torch.finfo(C.dtype).eps * scale)
    raise ValueError(
        f"{api}: ΩᵀAΩ is not positive definite even after a shift of {nu:.3g}; the operator is not PSD to "
        f"working precision. Use method='xtrace' (any square operator)."
    )


def _xnystrace(A, s: int, gen: dict, api: str) -> TraceResult:
    n = A.shape[0]
    work = _work_dtype(A.device)
    Omega = ProbeStream(n, s, **gen).block(0, s)
    Y = _product(A, Omega, api, "(test vectors)").to(work)
    Omega = Omega.to(work)
    ynorm = float(Y.norm())
    if ynorm == 0.0:
        return TraceResult(0.0, 0.0, s, "xnystrace", torch.zeros(s, dtype=work, device=A.device))
    Gram = Omega.T @ Omega
    C = Omega.T @ Y
    C = (C + C.T) / 2
    nu0 = math.sqrt(n) * torch.finfo(A.torch_dtype).eps * ynorm
    R, nu = _shifted_cholesky(C, Gram, nu0, api)
    Ynu = Y + nu * Omega
    B = torch.linalg.solve_triangular(R, Ynu, upper=True, left=False)  # Y_ν R⁻¹
    T = torch.linalg.solve_triangular(R, torch.eye(s, dtype=work, device=A.device), upper=True).T  # R⁻ᵀ
    g = (T * T).sum(0)  # diag of (ΩᵀY_ν)⁻¹
    BT = B @ T
    low = (B * B).sum() - (BT * BT).sum(0) / g  # tr Â_(i)
    resid = 1.0 / g  # ω_iᵀ (A_ν − Â_(i)) ω_i
    if gen["distribution"] == "sphere":
        Ro = torch.linalg.cholesky_ex(Gram, upper=True)[0]
        To = _safe_inverse_transpose(Ro)
        outside = 1.0 / (To * To).sum(0)  # ‖P_i ω_i‖²: distance of ω_i from span(Ω_{-i})
        resid = resid * ((n - s + 1) / outside.clamp_min(torch.finfo(work).tiny))
    samples = low + resid - n * nu
    value, stderr = _mean_stderr(samples)
    return TraceResult(value, stderr, s, "xnystrace", samples)


# ---- Frobenius norm -----------------------------------------------------------------------
def frobenius_norm(A, *, method: str = "hutch++", num_matvecs: int = 100, distribution: str = "rademacher",
                   generator: torch.Generator | int | None = None, block_size: int | None = None) -> NormResult:
    r"""Estimate $\|A\|_F = \sqrt{\operatorname{tr}(A^\top A)}$ of any (rectangular) operator.

    * ``"hutchinson"``: $\|A\|_F^2 \approx \frac1m\sum_i \|A\omega_i\|^2$ (one product per probe).
    * ``"hutch++"``: a sketch of the row space $Q = \operatorname{orth}(A^\top W)$ with $m/3$
      adjoint products ($W$ random), then $\|A\|_F^2 = \|AQ\|_F^2 + \|A(I - QQ^\top)\|_F^2$, the
      first exact, the second by Hutchinson with the remaining probes.  Exact when
      $\operatorname{rank}(A) \le m/3$; for symmetric operators the adjoint is ``A`` itself.

    The error estimate of the norm comes from that of the squared norm by the delta method,
    $\mathrm{se}(\|A\|_F) \approx \mathrm{se}(\|A\|_F^2) / (2\|A\|_F)$.  When ``num_matvecs``
    reaches the number of columns N the norm is computed exactly from N unit vectors
    (``"hutch++"`` only).

    **Cost**: ``num_matvecs`` products: Hutchinson, ``m`` with ``A`` (``block_size`` columns
    per call); Hutch++, ``m/3`` with ``A.T`` then the rest with ``A`` in one block.

    Args:
        A: operator (or tensor/array), any shape M×N.
        method: ``"hutchinson"`` or ``"hutch++"``.
        num_matvecs: budget of products (≥ 1, Hutch++ ≥ 3).
        distribution: ``"rademacher"``, ``"gaussian"`` or ``"sphere"``.
        generator: random source for the probes: ``None``,
            a ``torch.Generator``, or an int seed (a new generator on the operator's device,
            seeded with it).
        block_size: Hutchinson only: columns per product.

    Returns:
        :class:`NormResult` (``value``, ``stderr``, ``num_matvecs``, ``method``, ``squared``).

    Raises:
        ValueError: unknown method or distribution, a budget too small, NaN/Inf from a product.
        NotImplementedError: Hutch++ on a non-symmetric operator without an adjoint product.
        TypeError: an argument of the wrong kind: a count that is not an int (e.g. a float),
            a ``generator`` that is not None, a ``torch.Generator`` or an int seed, a flag that
            is not a bool, a tolerance that is not a real number.

    References:
        Meyer, Musco, Musco, Woodruff (2021). *Hutch++: Optimal Stochastic Trace Estimation*.
    """
    api = f"frobenius_norm({method})" if isinstance(method, str) else "frobenius_norm"
    check_choice(method, "method", FROBENIUS_METHODS, "frobenius_norm")
    A = _operator(A, api, square=False)
    m = _check_budget(num_matvecs, 1 if method == "hutchinson" else 3, api)
    check_choice(distribution, "distribution", DISTRIBUTIONS, api)
    generator = check_generator(generator, api, A.device, operator=A)
    block_size = _check_block_size(block_size, api)
    M, N = A.shape
    work = _work_dtype(A.device)
    gen = dict(distribution=distribution, generator=generator, dtype=A.torch_dtype, device=A.device, api=api)
    if method == "hutch++" and m >= N:
        total = 0.0
        for start, stop in _blocks(N, block_size or 256):
            Y = _product(A, _unit_block(N, start, stop, A.torch_dtype, A.device), api, f"(unit vectors {start}:{stop})")
            total += float((Y.to(work) ** 2).sum())
        sq = TraceResult(total, 0.0, N, "exact")
    elif method == "hutchinson":
        samples = torch.empty(m, dtype=work, device=A.device)
        for start, stop, W in ProbeStream(N, m, **gen).blocks(default_step(A, block_size, m)):
            Y = _product(A, W, api, f"(probes {start}:{stop})")
            samples[start:stop] = (Y * Y).sum(0, dtype=work)
            del W, Y
        sq = TraceResult(*_mean_stderr(samples), m, "hutchinson", samples)
    else:
        k = m // 3
        g = m - k - k
        Wr = ProbeStream(M, k, **gen).block(0, k)
        Q, _ = torch.linalg.qr(_product(A, Wr, api, "(row-space sketch)", adjoint=True).to(work))
        del Wr
        G = ProbeStream(N, g, **gen).block(0, g).to(work)
        G -= Q @ (Q.T @ G)
        Z = _product(A, torch.cat([Q, G], dim=1), api, "(deflation and residual probes)").to(work)
        low = float((Z[:, :k] ** 2).sum())
        samples = (Z[:, k:] ** 2).sum(0)
        mean, stderr = _mean_stderr(samples)
        sq = TraceResult(low + mean, stderr, m, "hutch++", low + samples)
    value = math.sqrt(max(sq.value, 0.0))
    stderr = 0.0 if sq.stderr == 0.0 else (sq.stderr / (2 * value) if value > 0 else float("nan"))
    return NormResult(value, stderr, sq.num_matvecs, sq.method, sq)
