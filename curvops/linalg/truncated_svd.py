r"""svds: the k largest singular triplets of a rectangular operator (a Jacobian, a cross block).

For $A \in \mathbb{R}^{M \times N}$, $A v_i = \sigma_i u_i$ and $A^\top u_i = \sigma_i v_i$ for
the k largest $\sigma_i$, from products with ``A`` and ``A.T`` only:

* ``"lanczos"`` (default): Golub-Kahan-Lanczos bidiagonalization of $A$ itself — not Lanczos
  on $A^\top A$ — with full reorthogonalization of both bases (twice) and thick restarts
  (Baglama & Reichel 2005).  After j steps $A V_j = U_j B_j$ and
  $A^\top U_j = V_j B_j^\top + \beta_j v_{j+1} e_j^\top$ with $B_j$ small (bidiagonal, an
  "arrow" after a restart); the SVD $B_j = X \Sigma Y^\top$ gives Ritz triplets
  $(\sigma_i, U_j x_i, V_j y_i)$ with residual $\beta_j |e_j^\top x_i|$ known without another
  product.  Working on $A$ keeps the singular values' absolute accuracy at about
  $\epsilon\|A\|$; through $A^\top A$ (as :func:`curvops.linalg.rank` does) it is
  $\sqrt{\epsilon}\,\|A\|$.
* ``"randomized"``: :func:`curvops.linalg.svd.randomized_svd` (range finder with subspace
  iteration), followed by one product with ``A`` and one with ``A.T`` to measure the residuals.

References:
    Golub, Kahan (1965). *Calculating the Singular Values and Pseudo-Inverse of a Matrix.*
    Baglama, Reichel (2005). *Augmented Implicitly Restarted Lanczos Bidiagonalization Methods.*
    Halko, Martinsson, Tropp (2011). *Finding Structure with Randomness: Probabilistic
    Algorithms for Constructing Approximate Matrix Decompositions*.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..operators import LowRank
from ._checks import check_choice, check_flag, check_generator, check_int, check_optional_int, check_real
from ._primitives import (
    _breakdown_tol, _operator, _orthogonalize, _product, _random_orthonormal, _work_dtype, random_block,
)
from .svd import randomized_svd

SVDS_METHODS = ("lanczos", "randomized")


@dataclass
class SVDResult:
    """The k largest singular triplets of an operator, with diagnostics.

    Attributes:
        U: ``[M, k]`` orthonormal left singular vectors, or ``None`` when not requested.
        S: ``[k]`` singular values, ascending (the order of scipy's ``svds``, and of :func:`eigsh`).
        V: ``[N, k]`` orthonormal right singular vectors, or ``None`` when not requested.
        residuals: ``[k]`` residual norms $\\sqrt{\\|Av - \\sigma u\\|^2 + \\|A^\\top u - \\sigma v\\|^2}$
            (Lanczos: from the bidiagonalization relation; randomized: measured).
        num_matvecs: products with ``A`` and ``A.T`` together (columns).
        converged: whether every triplet met the tolerance.
        iterations: Lanczos: bidiagonalization steps (one product with ``A`` and one with
            ``A.T`` each); randomized: calls to ``A`` or ``A.T``.
        method: ``"lanczos"`` or ``"randomized"``.
    """

    U: Tensor | None
    S: Tensor
    V: Tensor | None
    residuals: Tensor
    num_matvecs: int
    converged: bool
    iterations: int
    method: str

    @property
    def operator(self) -> LowRank:
        """The truncated SVD ``U diag(S) Vᵀ`` as a :class:`curvops.LowRank` operator."""
        if self.U is None or self.V is None:
            raise ValueError("SVDResult.operator: expected singular vectors, got none. "
                             "Call svds(..., return_singular_vectors=True).")
        return LowRank(self.U, self.S, self.V)


def svds(A, k: int = 6, *, method: str = "lanczos", tol: float = 1e-8, max_iters: int | None = None,
         ncv: int | None = None, oversample: int = 10, power_iters: int = 2,
         return_singular_vectors: bool = True, generator: torch.Generator | int | None = None,
         v0: Tensor | None = None) -> SVDResult:
    r"""The k largest singular values (and vectors) of an M×N operator: $A v_i = \sigma_i u_i$.

    * ``"lanczos"``: Golub-Kahan-Lanczos bidiagonalization with full reorthogonalization and
      thick restart (see the module).  A triplet has converged when its residual satisfies
      $r_i \le \text{tol}\cdot\max(\sigma_i,\ \epsilon^{2/3}\|A\|)$; $\|A\|$ is estimated by the
      largest Ritz value and product seen.  Convergence is checked after every step.
    * ``"randomized"``: :func:`~curvops.linalg.svd.randomized_svd` with ``oversample`` and
      ``power_iters``; the residuals are then measured (2k more products) and ``converged`` says
      whether they meet the same criterion — nothing is iterated further.

    **Accuracy**: a residual $r_i$ puts a singular value within $r_i$ of $\sigma_i$, so the
    Lanczos values carry a *relative* error of about ``tol`` and an absolute floor near
    $\epsilon^{2/3}\|A\|$; singular values far below $\|A\|$ are resolved only to that floor
    (and converge slowly: Krylov methods find the large end first).  Single-vector Lanczos sees
    one copy of a repeated singular value per Krylov space; restarts after an invariant
    subspace give others their chance, but a multiplicity is not guaranteed.  The randomized
    method's error is near $\sigma_{k+p+1}$ times a factor shrinking with ``power_iters``: good
    for fast-decaying spectra, loose for flat ones (check ``converged``).

    **Cost**: Lanczos: ``2 × iterations`` products (one column each; a product with ``A.T``
    counts as one), memory $(M + N)\cdot$ ``ncv``; typically 2–5 × ``ncv`` steps.  Randomized:
    $(k + p)(2q + 2) + 2k$ products in $2q + 4$ calls.

    Args:
        A: operator (or tensor/array/scipy operator) of shape M×N with an adjoint product.
        k: number of triplets: ``1 ≤ k < min(M, N)`` (Lanczos), ``≤ min(M, N)`` (randomized).
        method: ``"lanczos"`` or ``"randomized"``.
        tol: relative residual tolerance (see above); 0 means machine precision.
        max_iters: Lanczos: step cap (default ``max(100, 20·ncv)``).
        ncv: Lanczos: basis size before a restart, ``k < ncv ≤ min(M, N)``; default
            ``min(min(M, N), max(3k, 20) + 1)``.
        oversample, power_iters: randomized: extra test vectors and subspace iterations.
        return_singular_vectors: form ``U`` and ``V``.
        generator: random source (start vector, breakdown vectors, randomized test vectors):
            ``None``, a ``torch.Generator``, or an int seed.
        v0: Lanczos: start vector ``[N]`` (default: Gaussian from ``generator``).

    Returns:
        :class:`SVDResult` with singular values ascending.

    Raises:
        ValueError: k or ncv out of range, unknown method, negative ``tol``, a bad ``v0``, a
            product that returns NaN/Inf.
        TypeError: an argument of the wrong kind (a float ``k``, a string ``tol``, a generator
            that is not None, a ``torch.Generator`` or an int seed, a flag that is not a bool).
        NotImplementedError: an operator without an adjoint product.

    Example:
        >>> J = torch.randn(300, 40, dtype=torch.float64)
        >>> res = svds(J, k=3, generator=0)
        >>> torch.allclose(res.S, torch.linalg.svdvals(J)[:3].flip(0), rtol=1e-8)
        True

    References:
        Golub, Kahan (1965). *Calculating the Singular Values and Pseudo-Inverse of a Matrix.*
        Baglama, Reichel (2005). *Augmented Implicitly Restarted Lanczos Bidiagonalization Methods.*
        Halko, Martinsson, Tropp (2011). *Finding Structure with Randomness*.
    """
    api = f"svds({method})" if isinstance(method, str) else "svds"
    check_choice(method, "method", SVDS_METHODS, "svds")
    A = _operator(A, api, square=False)
    M, N = A.shape
    small = min(M, N)
    lanczos = method == "lanczos"
    top = small - 1 if lanczos else small
    k = check_int(k, "k", api, minimum=1, maximum=top, named=True,
                  expected=f"1 ≤ k {'<' if lanczos else '≤'} min(M, N) = {small}",
                  fix="For all singular values of a small operator use torch.linalg.svdvals(A.to_dense()).")
    tol = check_real(tol, "tol", api, minimum=0.0, fix="tol=0 means machine precision.")
    max_iters = check_optional_int(max_iters, "max_iters", api, minimum=1)
    if ncv is not None:
        ncv = check_int(ncv, "ncv", api, minimum=k + 1, maximum=small,
                        expected=f"k + 1 = {k + 1} ≤ ncv ≤ min(M, N) = {small}", named=True)
    oversample = check_int(oversample, "oversample", api, minimum=0)
    power_iters = check_int(power_iters, "power_iters", api, minimum=0)
    vectors = check_flag(return_singular_vectors, "return_singular_vectors", api)
    generator = check_generator(generator, api, A.device, operator=A)
    tol = max(float(tol), torch.finfo(A.torch_dtype).eps)
    if not lanczos:
        if v0 is not None:
            raise ValueError(f"{api}: expected v0=None (a start vector is for method='lanczos'), got a tensor.")
        return _randomized(A, k, tol, oversample, power_iters, vectors, generator, api)
    m = min(small, max(3 * k, 20) + 1) if ncv is None else ncv
    max_iters = max(100, 20 * m) if max_iters is None else max_iters
    start = _start_vector(v0, N, A.torch_dtype, A.device, generator, api)
    return _bidiagonalize(A, k, tol, max_iters, m, start, vectors, generator, api)


def _start_vector(v0, N: int, dtype, device, generator, api: str) -> Tensor:
    """Unit start vector ``[N]`` from ``v0`` (checked) or Gaussian from ``generator``."""
    if v0 is None:
        v = random_block(N, 1, dtype, device, generator)[:, 0]
    else:
        if not isinstance(v0, Tensor):
            raise TypeError(f"{api}: expected v0 as a torch.Tensor, got {type(v0).__name__}.")
        if tuple(v0.shape) != (N,):
            raise ValueError(f"{api}: expected v0 of shape [{N}] (the columns of A), got {tuple(v0.shape)}.")
        v = v0.to(dtype=dtype, device=device)
    norm = v.norm()
    if not bool(torch.isfinite(norm)) or float(norm) == 0.0:
        raise ValueError(f"{api}: expected a finite, nonzero v0, got norm {float(norm)}.")
    return v / norm


def _converged(res: Tensor, sig: Tensor, anorm: float, tol: float, eps: float) -> Tensor:
    """Per triplet: ``r ≤ tol·max(σ, ε^(2/3)‖A‖)``, or σ and r both below ε^(2/3)‖A‖ (zero to working
    accuracy)."""
    zero = eps ** (2 / 3) * anorm
    return (res <= tol * sig.clamp_min(zero)) | ((sig <= zero) & (res <= zero))


def _bidiagonalize(A, k: int, tol: float, max_iters: int, m: int, start: Tensor, vectors: bool, generator,
                   api: str) -> SVDResult:
    """Thick-restart Golub-Kahan-Lanczos: ``A V = U B``, ``Aᵀ U = V Bᵀ + β v_next e_lastᵀ``."""
    M, N = A.shape
    dtype, device = A.torch_dtype, A.device
    sdtype = _work_dtype(device)
    eps = torch.finfo(dtype).eps
    brk = _breakdown_tol(dtype)
    Vt = torch.zeros(m + 1, N, dtype=dtype, device=device)  # rows v_1 … v_{cur+1}
    Ut = torch.zeros(m, M, dtype=dtype, device=device)  # rows u_1 … u_cur
    B = torch.zeros(m, m, dtype=sdtype, device=device)  # A V[:cur] = U[:cur] B[:cur, :cur]
    Vt[0] = start
    cur, it, anorm, injected, converged = 0, 0, 0.0, False, False
    X = sig = Yh = res = None
    while True:
        it += 1
        probed, injected = injected, False
        # --- A-side: u_{cur+1} from A v_{cur+1}, orthogonal to U ---------------------------------
        w = _product(A, Vt[cur][:, None], api, f"(A @ v at step {it})")
        anorm = max(anorm, float(w.norm()))
        c = Ut[:cur] @ w
        w = w - Ut[:cur].T @ c
        c2 = Ut[:cur] @ w
        w = w - Ut[:cur].T @ c2
        B[:cur, cur] = (c + c2)[:, 0].to(sdtype)
        alpha = float(w.norm())
        if alpha > brk * anorm:
            Ut[cur] = w[:, 0] / alpha
            B[cur, cur] = alpha
        else:  # A v lies in span(U): continue with a random u (B's entry 0)
            Ut[cur] = _random_orthonormal(1, Ut[:cur], M, dtype, device, generator)[:, 0]
            injected = True
        cur += 1
        # --- Aᵀ-side: v_{cur+1} from Aᵀ u_cur, orthogonal to V -----------------------------------
        z = _product(A, Ut[cur - 1][:, None], api, f"(A.T @ u at step {it})", adjoint=True)
        anorm = max(anorm, float(z.norm()))
        z = _orthogonalize(z, Vt[:cur])
        beta = float(z.norm())
        if cur >= N:  # V spans the whole space: the relation is exact
            Vt[cur], beta = 0.0, 0.0
        elif beta > brk * anorm:
            Vt[cur] = z[:, 0] / beta
        else:  # an invariant subspace: continue with a random v, and test it before declaring convergence
            Vt[cur] = _random_orthonormal(1, Vt[:cur], N, dtype, device, generator)[:, 0]
            beta, injected = 0.0, True
        blind = injected and not probed
        # --- Ritz triplets and their residuals ------------------------------------------------------
        full = cur >= m
        if cur >= k and (full or not blind or it >= max_iters):
            X, sig, Yh = torch.linalg.svd(B[:cur, :cur])  # descending
            res = beta * X[cur - 1].abs()
            anorm = max(anorm, float(sig[0]))
            converged = bool(_converged(res[:k], sig[:k], anorm, tol, eps).all()) and not blind
            if converged or it >= max_iters:
                break
        if not full:
            continue
        # --- thick restart: keep the p largest triplets; v_{cur+1} continues the basis -------------
        p = min(cur - 1, (k + cur) // 2)
        Vk = (Vt[:cur].T @ Yh[:p].T.to(dtype)).T
        Uk = (Ut[:cur].T @ X[:, :p].to(dtype)).T
        vn = Vt[cur].clone()
        Vt.zero_(), Ut.zero_(), B.zero_()
        Vt[:p], Vt[p], Ut[:p] = Vk, vn, Uk
        B[:p, :p] = torch.diag(sig[:p])
        cur = p
    idx = torch.arange(k - 1, -1, -1, device=device)  # ascending
    U = (Ut[:cur].T @ X[:, idx].to(dtype)) if vectors else None
    V = (Vt[:cur].T @ Yh[idx].T.to(dtype)) if vectors else None
    return SVDResult(U=U, S=sig[idx].to(dtype), V=V, residuals=res[idx].to(dtype), num_matvecs=2 * it,
                     converged=converged, iterations=it, method="lanczos")


def _randomized(A, k: int, tol: float, oversample: int, power_iters: int, vectors: bool, generator,
                api: str) -> SVDResult:
    """:func:`randomized_svd`, then the residuals measured with one product with ``A`` and one with ``A.T``."""
    low = randomized_svd(A, k, oversample=oversample, power_iters=power_iters, generator=generator)
    U, S, V = low.U.flip(1), low.S.flip(0), low.V.flip(1)  # ascending
    AV = _product(A, V, api, "(residual check)")
    AtU = _product(A, U, api, "(residual check)", adjoint=True)
    res = ((AV - U * S).norm(dim=0) ** 2 + (AtU - V * S).norm(dim=0) ** 2).sqrt()
    eps = torch.finfo(A.torch_dtype).eps
    ok = _converged(res.to(torch.float64), S.to(torch.float64), float(S.max()), tol, eps)
    return SVDResult(U=U if vectors else None, S=S, V=V if vectors else None, residuals=res,
                     num_matvecs=low.num_matvecs + 2 * k, converged=bool(ok.all()), iterations=2 * power_iters + 4,
                     method="randomized")
