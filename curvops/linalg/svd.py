r"""Low-rank approximation from products: randomized SVD (any operator) and Nyström (PSD).

Both return a :class:`curvops.LowRank` operator (usable in compositions, e.g. as a
preconditioner or a deflation) together with its factors and the number of products spent.
The small dense factorizations run in float64 on the operator's device.

References:
    Halko, Martinsson, Tropp (2011). *Finding Structure with Randomness: Probabilistic
    Algorithms for Constructing Approximate Matrix Decompositions*. SIAM Review 53(2).
    Tropp, Yurtsever, Udell, Cevher (2017). *Fixed-Rank Approximation of a Positive-Semidefinite
    Matrix from Streaming Data*. NeurIPS.
    Frangella, Tropp, Udell (2023). *Randomized Nyström Preconditioning*. SIAM J. Matrix Anal. Appl.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..operators import LowRank
from ._checks import check_flag, check_generator, check_int
from ._primitives import _operator, _probes, _product, _work_dtype


@dataclass
class LowRankResult:
    r"""A rank-r approximation $A \approx U\,\mathrm{diag}(S)\,V^\top$ and what it cost.

    Attributes:
        operator: the approximation as a :class:`curvops.LowRank` operator (symmetric/PSD for
            Nyström: ``U diag(S) Uᵀ``).
        U: [M, r] orthonormal columns.
        S: [r] singular values (randomized SVD) or eigenvalues (Nyström), descending, ≥ 0.
        V: [N, r] orthonormal columns; ``None`` for Nyström (``V = U``).
        num_matvecs: products spent (with ``A`` and ``A.T`` together).
        shift: Nyström only: the stabilizing shift ν that was used (0 for randomized SVD).
    """

    operator: LowRank
    U: Tensor
    S: Tensor
    V: Tensor | None
    num_matvecs: int
    shift: float = 0.0


def _check_rank(rank, limit: int, api: str) -> int:
    return check_int(rank, "rank", api, minimum=1, maximum=limit,
                     expected=f"1 <= rank <= {limit} (the smaller dimension)")


def _check_nonnegative(value, name: str, api: str) -> int:
    return check_int(value, name, api, minimum=0, expected=f"a non-negative integer {name}")


def randomized_svd(A, rank: int, *, oversample: int = 10, power_iters: int = 2,
                   generator: torch.Generator | int | None = None) -> LowRankResult:
    r"""Rank-``rank`` truncated SVD $A \approx U\,\Sigma\,V^\top$ of any M×N operator.

    The randomized range finder with subspace iteration: with $\ell = r + p$ Gaussian test
    vectors $\Omega \in \mathbb{R}^{N\times\ell}$,
    $Q = \operatorname{orth}\big((AA^\top)^q A\Omega\big)$ (re-orthonormalized after every
    product), then the small SVD $Q^\top A = \tilde U \Sigma V^\top$ and $U = Q\tilde U$,
    truncated to the top $r$ triplets.  Expected error near $\sigma_{r+1}$ (up to a factor
    that shrinks quickly with $q$ and $p$).  Exact when $\operatorname{rank}(A) \le \ell$.

    **Cost**: $\ell(2q + 2)$ products, half with ``A`` and half with ``A.T``, in $2q + 2$
    calls of $\ell$ columns each (one data pass each for a curvature operator).

    Args:
        A: operator (or tensor/array) of shape M×N with an adjoint product.
        rank: number of singular triplets kept, ``1 <= rank <= min(M, N)``.
        oversample: extra test vectors $p$ (ℓ is capped at min(M, N)).
        power_iters: subspace iterations $q$ (each costs ℓ products with ``A`` and ℓ with
            ``A.T``); raise it for slowly decaying spectra.
        generator: random source for the test vectors: ``None``,
            a ``torch.Generator``, or an int seed (a new generator on the operator's device,
            seeded with it).

    Returns:
        :class:`LowRankResult` with ``operator = LowRank(U, S, V)``, the factors and the cost.

    Raises:
        ValueError: a rank outside ``[1, min(M, N)]``, negative oversampling or iterations, a
            product returning NaN/Inf.
        NotImplementedError: an operator without an adjoint product.
        TypeError: an argument of the wrong kind: a count that is not an int (e.g. a float),
            a ``generator`` that is not None, a ``torch.Generator`` or an int seed, a flag that
            is not a bool, a tolerance that is not a real number.

    Example:
        >>> J = curvops.Dense(torch.randn(300, 40, dtype=torch.float64))
        >>> res = randomized_svd(J, 5, generator=torch.Generator().manual_seed(0))
        >>> res.S.shape, res.operator.shape                      # doctest: +SKIP
        (torch.Size([5]), (300, 40))

    References:
        Halko, Martinsson, Tropp (2011). *Finding Structure with Randomness: Probabilistic
        Algorithms for Constructing Approximate Matrix Decompositions*.
    """
    api = "randomized_svd"
    A = _operator(A, api, square=False)
    M, N = A.shape
    r = _check_rank(rank, min(M, N), api)
    p = _check_nonnegative(oversample, "oversample", api)
    q = _check_nonnegative(power_iters, "power_iters", api)
    generator = check_generator(generator, api, A.device, operator=A)
    ell = min(r + p, M, N)
    work = _work_dtype(A.device)
    Omega = _probes(N, ell, "gaussian", generator, A.torch_dtype, A.device, api)
    Q, _ = torch.linalg.qr(_product(A, Omega, api, "(range sketch)").to(work))
    for it in range(q):
        P, _ = torch.linalg.qr(_product(A, Q, api, f"(power iteration {it + 1})", adjoint=True).to(work))
        Q, _ = torch.linalg.qr(_product(A, P, api, f"(power iteration {it + 1})").to(work))
    Bt = _product(A, Q, api, "(projection)", adjoint=True).to(work)  # Aᵀ Q = (Qᵀ A)ᵀ  [N, ℓ]
    Vb, S, Ubt = torch.linalg.svd(Bt, full_matrices=False)  # Bᵀ = V Σ Ũᵀ
    U = (Q @ Ubt.T)[:, :r].to(A.torch_dtype)
    V = Vb[:, :r].to(A.torch_dtype)
    S = S[:r].to(A.torch_dtype)
    return LowRankResult(LowRank(U, S, V), U, S, V, ell * (2 * q + 2))


def _stable_cholesky(C: Tensor, nu: float, api: str) -> tuple[Tensor, float]:
    """Upper Cholesky of ``C + ν I`` (C symmetric); when that fails, ν grows past ``-λ_min(C)``."""
    eye = torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    R, info = torch.linalg.cholesky_ex(C + nu * eye, upper=True)
    if int(info) == 0:
        return R, nu
    lam_min = float(torch.linalg.eigvalsh(C)[0])
    scale = float(C.diagonal().abs().max())
    for k in range(6):
        nu = nu + abs(lam_min) * 2.0 ** (k + 1) + torch.finfo(C.dtype).eps * scale * 10.0 ** k
        R, info = torch.linalg.cholesky_ex(C + nu * eye, upper=True)
        if int(info) == 0:
            return R, nu
    raise ValueError(f"{api}: the sketch ΩᵀAΩ could not be factored (shift {nu:.3g}); is the operator PSD?")


def nystrom(A, rank: int, *, oversample: int = 10, power_iters: int = 0,
            generator: torch.Generator | int | None = None, assume_psd: bool = False) -> LowRankResult:
    r"""Rank-``rank`` Nyström approximation $A \approx U\Lambda U^\top$ of a PSD operator.

    With an orthonormal sketch $\Omega \in \mathbb{R}^{n\times\ell}$ ($\ell = r + p$),
    $Y = A\Omega$ and the Nyström approximation $\hat A = Y(\Omega^\top Y)^{\dagger}Y^\top$,
    computed stably (Tropp et al. 2017): shift $Y_\nu = Y + \nu\Omega$ with
    $\nu = \sqrt n\,\epsilon\,\|Y\|_F$ ($\epsilon$ of the operator's dtype), Cholesky
    $\Omega^\top Y_\nu = R^\top R$, $B = Y_\nu R^{-1} = U\Sigma W^\top$ (thin SVD), and
    $\Lambda = \max(\Sigma^2 - \nu, 0)$, truncated to the top $r$.  Single pass, no adjoint.
    ``power_iters`` $q > 0$ replaces $\Omega$ by $\operatorname{orth}(A^q\Omega)$ first (better
    for slowly decaying spectra).  If $\Omega^\top Y$ is indefinite (an operator that is not
    PSD to working precision) the shift grows to twice its most negative eigenvalue; the result
    is then the Nyström approximation of the shifted operator, minus the shift, clamped at 0.

    **Cost**: $\ell(q + 1)$ products in $q + 1$ calls of $\ell$ columns.

    Args:
        A: square PSD operator (tag ``"psd"``), or any square operator with ``assume_psd=True``.
        rank: number of eigenpairs kept, ``1 <= rank <= n``.
        oversample: extra sketch columns $p$ (ℓ capped at n).
        power_iters: subspace iterations before the Nyström step.
        generator: random source for the sketch: ``None``,
            a ``torch.Generator``, or an int seed (a new generator on the operator's device,
            seeded with it).
        assume_psd: accept an operator without the ``"psd"`` tag.

    Returns:
        :class:`LowRankResult` with ``operator = LowRank(U, Λ)`` (symmetric, PSD),
        ``V = None`` and the shift used.

    Raises:
        ValueError: non-square or non-PSD-tagged operator, a rank outside ``[1, n]``, a
            product returning NaN/Inf.
        TypeError: an argument of the wrong kind: a count that is not an int (e.g. a float),
            a ``generator`` that is not None, a ``torch.Generator`` or an int seed, a flag that
            is not a bool, a tolerance that is not a real number.

    References:
        Tropp, Yurtsever, Udell, Cevher (2017). *Fixed-Rank Approximation of a Positive-Semidefinite
        Matrix from Streaming Data*.
        Frangella, Tropp, Udell (2023). *Randomized Nyström Preconditioning*.
    """
    api = "nystrom"
    A = _operator(A, api)
    assume_psd = check_flag(assume_psd, "assume_psd", api)
    if not (A.is_psd or assume_psd):
        raise ValueError(
            f"{api}: expected a PSD operator (tag 'psd'), got tags {sorted(A.tags)}. Use randomized_svd for other "
            f"operators, or pass assume_psd=True (or curvops.tag(A, 'psd')) if you know it is PSD."
        )
    n = A.shape[0]
    r = _check_rank(rank, n, api)
    p = _check_nonnegative(oversample, "oversample", api)
    q = _check_nonnegative(power_iters, "power_iters", api)
    generator = check_generator(generator, api, A.device, operator=A)
    ell = min(r + p, n)
    work = _work_dtype(A.device)
    Omega, _ = torch.linalg.qr(_probes(n, ell, "gaussian", generator, work, A.device, api))
    for it in range(q):
        Omega, _ = torch.linalg.qr(_product(A, Omega, api, f"(power iteration {it + 1})").to(work))
    Y = _product(A, Omega, api, "(sketch)").to(work)
    ynorm = float(Y.norm())
    nu = math.sqrt(n) * torch.finfo(A.torch_dtype).eps * ynorm
    C = Omega.T @ Y
    R, nu = _stable_cholesky((C + C.T) / 2, nu, api)
    if ynorm == 0.0:
        U = Omega[:, :r]
        lam = torch.zeros(r, dtype=work, device=A.device)
    else:
        B = torch.linalg.solve_triangular(R, Y + nu * Omega, upper=True, left=False)
        U, sig, _ = torch.linalg.svd(B, full_matrices=False)
        U, lam = U[:, :r], (sig[:r] ** 2 - nu).clamp_min(0.0)
    U, lam = U.to(A.torch_dtype), lam.to(A.torch_dtype)
    return LowRankResult(LowRank(U, lam), U, lam, None, ell * (q + 1), nu)
