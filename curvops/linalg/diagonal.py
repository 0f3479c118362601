r"""Stochastic estimation of the diagonal of a square operator: Hutchinson and XDiag.

$\operatorname{diag}(A)$ from products only.  Hutchinson's diagonal estimator averages
$\omega \odot A\omega$ over random sign vectors; XDiag first captures a randomized range
$Q$ of $A$ (exact on it) and corrects with the same vectors through leave-one-out bases,
so that every product serves both parts.

References:
    Bekas, Kokiopoulou, Saad (2007). *An Estimator for the Diagonal of a Matrix*.
    Epperly, Tropp, Webber (2024). *XTrace: Making the Most of Every Sample in Stochastic
    Trace Estimation*. SIAM J. Matrix Anal. Appl. 45(1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ._checks import check_choice, check_generator
from ._primitives import (
    DISTRIBUTIONS, _check_block_size, _check_budget, _exact_diagonal, _operator, _product,
    _safe_inverse_transpose, _work_dtype,
)
from ._probe_stream import ProbeStream, default_step

DIAGONAL_METHODS = ("hutchinson", "xdiag", "exact")


@dataclass
class DiagonalResult:
    """An estimate of ``diag(A)`` with an entrywise error estimate.

    Attributes:
        value: the estimate [n], in the operator's dtype and on its device.
        stderr: entrywise estimated standard error [n] (zeros when exact; NaN with one sample).
        num_matvecs: products spent (with ``A`` and ``A.T`` together).
        method: ``"hutchinson"``, ``"xdiag"`` or ``"exact"``.
    """

    value: Tensor
    stderr: Tensor
    num_matvecs: int
    method: str


def _mean_stderr_columns(D: Tensor) -> tuple[Tensor, Tensor]:
    k = D.shape[1]
    mean = D.mean(dim=1)
    stderr = D.std(dim=1) / math.sqrt(k) if k > 1 else torch.full_like(mean, float("nan"))
    return mean, stderr


class _RowMoments:
    """Entrywise mean and variance of columns added block by block (Chan, Golub, LeVeque's
    pairwise update): O(n) memory however many columns."""

    def __init__(self, n: int, dtype, device):
        self.count = 0
        self.mean = torch.zeros(n, dtype=dtype, device=device)
        self.m2 = torch.zeros(n, dtype=dtype, device=device)

    def add(self, D: Tensor) -> None:  # [n, b]
        b = D.shape[1]
        mean_b = D.mean(dim=1)
        m2_b = ((D - mean_b[:, None]) ** 2).sum(dim=1)
        total = self.count + b
        delta = mean_b - self.mean
        self.mean += delta * (b / total)
        self.m2 += m2_b + delta * delta * (self.count * b / total)
        self.count = total

    def mean_stderr(self) -> tuple[Tensor, Tensor]:
        k = self.count
        if k < 2:
            return self.mean, torch.full_like(self.mean, float("nan"))
        return self.mean, (self.m2 / (k - 1)).sqrt_() / math.sqrt(k)


def diagonal(A, *, method: str = "xdiag", num_matvecs: int = 100, distribution: str = "rademacher",
             generator: torch.Generator | int | None = None, block_size: int | None = None) -> DiagonalResult:
    r"""Estimate the diagonal of a square operator from ``num_matvecs`` products.

    * ``"hutchinson"``: $\hat d = \frac1m\sum_{i=1}^m \omega_i \odot A\omega_i$, unbiased; with
      Rademacher vectors the error of entry $j$ has variance $\frac1m\sum_{k\ne j} A_{jk}^2$
      (exact on diagonal matrices).
    * ``"xdiag"``: $s = m/2$ vectors, $Y = A\Omega = QR$, leave-one-out bases $Q_{(i)}$ of
      $\operatorname{range}(Y_{-i})$ and
      $\hat d_i = \operatorname{diag}(Q_{(i)}Q_{(i)}^\top A) + \omega_i \odot (I - Q_{(i)}Q_{(i)}^\top)A\omega_i$,
      $\hat d = \frac1s\sum_i \hat d_i$.  With $\hat s_i$ the normalized $i$-th column of
      $R^{-\top}$ and $Z = A^\top Q$:
      $\operatorname{diag}(Q_{(i)}Q_{(i)}^\top A) = \operatorname{diag}(QZ^\top) - (Q\hat s_i)\odot(Z\hat s_i)$,
      so all $s$ estimates cost $O(ns^2)$ flops.  Exact on operators of rank $< s$.
    * ``"exact"``: $n$ products with unit vectors (``block_size`` per call, default 256).

    When ``num_matvecs >= n`` XDiag returns the exact diagonal (``method="exact"``).  The
    error estimate is the entrywise standard error of the mean of the per-sample estimates.

    **Cost**: Hutchinson ``m`` products (``block_size`` columns per call, default all);
    XDiag ``m/2`` products with ``A`` and ``m/2`` with ``A.T`` (``A`` itself when symmetric),
    two calls; exact ``n`` products.

    Args:
        A: square operator (or tensor/array).
        method: ``"hutchinson"``, ``"xdiag"`` or ``"exact"``.
        num_matvecs: budget (Hutchinson ≥ 1, XDiag ≥ 4); ignored by ``"exact"``.
        distribution: ``"rademacher"`` (recommended), ``"gaussian"`` or ``"sphere"``.
        generator: random source for the test vectors: ``None``,
            a ``torch.Generator``, or an int seed (a new generator on the operator's device,
            seeded with it).
        block_size: columns per product for Hutchinson (default: the operator's ``max_columns``
            where it has one, else all) and the exact diagonal (default 256).  Hutchinson draws its
            probes block by block, each column from its own seed: the estimate does not depend on
            ``block_size``, and memory is one block plus O(n).

    Returns:
        :class:`DiagonalResult` (``value``, ``stderr``, ``num_matvecs``, ``method``).

    Raises:
        ValueError: non-square operator, unknown method/distribution, a budget too small, a
            product returning NaN/Inf.
        NotImplementedError: XDiag on a non-symmetric operator without an adjoint product.
        TypeError: an argument of the wrong kind: a count that is not an int (e.g. a float),
            a ``generator`` that is not None, a ``torch.Generator`` or an int seed, a flag that
            is not a bool, a tolerance that is not a real number.

    References:
        Bekas, Kokiopoulou, Saad (2007). *An Estimator for the Diagonal of a Matrix*.
        Epperly, Tropp, Webber (2024). *XTrace: Making the Most of Every Sample in Stochastic
        Trace Estimation*.
    """
    api = f"diagonal({method})" if isinstance(method, str) else "diagonal"
    check_choice(method, "method", DIAGONAL_METHODS, "diagonal")
    A = _operator(A, api)
    n = A.shape[0]
    # num_matvecs is ignored by "exact", but must still be a count (a typo there is a bug too)
    m = _check_budget(num_matvecs, {"hutchinson": 1, "xdiag": 4, "exact": 0}[method], api)
    check_choice(distribution, "distribution", DISTRIBUTIONS, api)
    generator = check_generator(generator, api, A.device, operator=A)
    block_size = _check_block_size(block_size, api)
    if method == "exact" or (method == "xdiag" and m >= n):
        d = _exact_diagonal(A, block_size or 256, api).to(A.torch_dtype)
        return DiagonalResult(d, torch.zeros_like(d), n, "exact")
    gen = dict(distribution=distribution, generator=generator, dtype=A.torch_dtype, device=A.device, api=api)
    work = _work_dtype(A.device)
    if method == "hutchinson":  # one block of probes at a time, O(n) accumulators
        moments = _RowMoments(n, work, A.device)
        for start, stop, W in ProbeStream(n, m, **gen).blocks(default_step(A, block_size, m)):
            moments.add((W * _product(A, W, api, f"(probes {start}:{stop})")).to(work))
            del W
        mean, stderr = moments.mean_stderr()
        return DiagonalResult(mean.to(A.torch_dtype), stderr.to(A.torch_dtype), m, "hutchinson")
    s = m // 2
    Omega = ProbeStream(n, s, **gen).block(0, s)
    Y = _product(A, Omega, api, "(test vectors)").to(work)
    Omega = Omega.to(work)
    Q, R = torch.linalg.qr(Y)
    Z = _product(A, Q, api, "(basis, adjoint)", adjoint=True).to(work)  # Aᵀ Q
    S = _safe_inverse_transpose(R)
    S = S / S.norm(dim=0).clamp_min(torch.finfo(work).tiny)
    QS, ZS = Q @ S, Z @ S
    QtY = Q.T @ Y
    c = (S * QtY).sum(0)  # ŝ_iᵀ Qᵀ y_i
    d0 = (Q * Z).sum(1)  # diag(Q Qᵀ A)
    D = d0[:, None] - QS * ZS + Omega * (Y - Q @ QtY + QS * c)
    mean, stderr = _mean_stderr_columns(D)
    return DiagonalResult(mean.to(A.torch_dtype), stderr.to(A.torch_dtype), 2 * s, "xdiag")
