r"""Lanczos: the tridiagonalization primitive and a thick-restart (block) eigensolver.

For a symmetric $A \in \mathbb{R}^{n \times n}$ and a start vector $q_1$, $m$ Lanczos steps
build an orthonormal basis $Q_m = [q_1, \dots, q_m]$ of the Krylov space
$\mathcal{K}_m(A, q_1) = \operatorname{span}\{q_1, A q_1, \dots, A^{m-1} q_1\}$ and the
tridiagonal projection $T_m = Q_m^\top A Q_m$:

.. math:: A Q_m = Q_m T_m + \beta_m q_{m+1} e_m^\top .

The eigenpairs $(\theta_i, s_i)$ of $T_m$ give Ritz pairs $(\theta_i, Q_m s_i)$ whose residual
norms are known without another product: $\|A Q_m s_i - \theta_i Q_m s_i\| = \beta_m |e_m^\top s_i|$.

In floating point the three-term recurrence loses orthogonality as soon as a Ritz pair
converges, and the lost directions come back as *ghost* copies of converged eigenvalues
(Paige 1971; the anchors saw ten copies of the top Hessian eigenvalue).  Everything here
reorthogonalizes every new vector against the whole basis, twice ("twice is enough"), so
no ghosts appear; the price is O(n m) memory and O(n m) flops per step, negligible next to a
curvature product.

Everything runs on ``A.device`` in ``A.torch_dtype``; only the small projected matrices are
diagonalized (in float64 where the device has it).

References:
    Lanczos (1950). *An Iteration Method for the Solution of the Eigenvalue Problem of Linear
    Differential and Integral Operators.*
    Paige (1971). *The Computation of Eigenvalues and Eigenvectors of Very Large Sparse Matrices.*
    Parlett (1998). *The Symmetric Eigenvalue Problem.*
    Wu, Simon (2000). *Thick-Restart Lanczos Method for Large Symmetric Eigenvalue Problems.*
    Golub, Underwood (1977). *The Block Lanczos Method for Computing Eigenvalues.*
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ._checks import check_choice, check_flag, check_generator, check_int, check_optional_int, check_real

WHICH = ("LA", "SA", "LM", "BE")


# ---- results ---------------------------------------------------------------------------------
@dataclass
class EighResult:
    """Eigenpairs of a symmetric operator, with diagnostics.

    Attributes:
        eigenvalues: ``[k]``, ascending (the order of scipy's ``eigsh`` and numpy's ``eigvalsh``).
        eigenvectors: ``[n, k]`` orthonormal columns matching ``eigenvalues``, or ``None`` when
            not requested.
        residuals: ``[k]`` residual norms ``‖A x − λ x‖`` (absolute, from the Lanczos relation).
        num_matvecs: products with A (columns: a block of b columns counts b).
        converged: whether every requested pair met the tolerance.
        iterations: Lanczos steps, i.e. calls ``A @ V`` (one data pass each).
    """

    eigenvalues: Tensor
    eigenvectors: Tensor | None
    residuals: Tensor
    num_matvecs: int
    converged: bool
    iterations: int


class LanczosDecomposition(NamedTuple):
    """Output of :func:`lanczos`: ``T = tridiag(betas, alphas, betas)`` and the basis ``Q``.

    For one start vector: ``alphas [m]``, ``betas [m-1]``, ``Q [n, m]``; for a block of K start
    vectors (K independent runs): ``alphas [K, m]``, ``betas [K, m-1]``, ``Q [K, n, m]``.
    """

    alphas: Tensor
    betas: Tensor
    Q: Tensor


# ---- shared helpers (also used by density.py and summaries.py) ---------------------------------
def as_square_operator(A, api: str):
    """``A`` through the operator protocol (tensors, arrays and scipy operators are wrapped)."""
    from ..operators.algebra import as_operator

    A = as_operator(A)
    if len(A.shape) != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"{api}: expected a square operator, got shape {tuple(A.shape)}.")
    return A


def small_dtype(device: torch.device) -> torch.dtype:
    """dtype for the small projected problems: float64 except where the device lacks it."""
    return torch.float32 if device.type == "mps" else torch.float64


def random_block(n: int, k: int, dtype, device, generator: torch.Generator | None,
                 distribution: str = "normal") -> Tensor:
    """``[n, k]`` Gaussian (or Rademacher) entries from ``generator`` (on its own device), moved to ``device``."""
    gdev = generator.device if generator is not None else device
    if distribution == "normal":
        X = torch.randn(n, k, generator=generator, dtype=dtype, device=gdev)
    elif distribution == "rademacher":
        X = torch.randint(0, 2, (n, k), generator=generator, device=gdev).to(dtype).mul_(2).sub_(1)
    else:
        raise ValueError(f"expected distribution 'rademacher' or 'normal', got {distribution!r}.")
    return X.to(device)


def apply(A, V: Tensor, api: str, step: int) -> Tensor:
    """``A @ V`` with the checks every algorithm needs: a tensor of the right shape, finite."""
    W = A @ V
    if not isinstance(W, Tensor):
        raise TypeError(f"{api}: A @ V returned {type(W).__name__}, expected a torch.Tensor.")
    expected = (A.shape[0],) + tuple(V.shape[1:])
    if tuple(W.shape) != expected:
        raise ValueError(f"{api}: A @ V returned shape {tuple(W.shape)} at iteration {step}, expected {expected}.")
    if not bool(torch.isfinite(W).all()):
        bad = int((~torch.isfinite(W)).sum())
        raise ValueError(
            f"{api}: the product A @ V at iteration {step} returned NaN or Inf ({bad} non-finite "
            f"entries). The operator is not finite here: check the model's loss and parameters "
            f"(e.g. a diverged checkpoint), or the operator's own code."
        )
    return W


def _breakdown_tol(dtype: torch.dtype) -> float:
    """Relative size (to ‖A‖) below which a new Lanczos direction counts as zero (invariant subspace)."""
    return torch.finfo(dtype).eps ** 0.75


def _orthogonalize(W: Tensor, basis: Tensor) -> Tensor:
    """``W − basisᵀ (basis W)`` twice (classical Gram-Schmidt, "twice is enough"); basis rows orthonormal."""
    if basis.shape[0] == 0:
        return W
    for _ in range(2):
        W = W - basis.T @ (basis @ W)
    return W


def _random_orthonormal(count: int, basis: Tensor, n: int, dtype, device, generator) -> Tensor:
    """``count`` random unit columns ``[n, count]`` orthogonal to the rows of ``basis`` and to each other."""
    R = _orthogonalize(random_block(n, count, dtype, device, generator), basis)
    R, _ = torch.linalg.qr(R)
    return _orthogonalize(R, basis)


def _next_block(W: Tensor, basis: Tensor, anorm: float, generator) -> tuple[Tensor, Tensor]:
    """Orthonormalize ``W [n, b]`` (already orthogonal to ``basis``): ``W ≈ Qn B`` with ``B [b, b]``.

    Directions of ``W`` below the breakdown tolerance are dropped (their rows of ``B`` set to
    zero: the Krylov space is invariant there) and replaced by random unit vectors orthogonal to
    everything so far, so the basis keeps growing (and can find further copies of a multiple
    eigenvalue).
    """
    n, b = W.shape
    tol = _breakdown_tol(W.dtype) * anorm
    if b == 1:
        beta = W.norm()
        if float(beta) > tol:
            return W / beta, beta.reshape(1, 1)
        return _random_orthonormal(1, basis, n, W.dtype, W.device, generator), W.new_zeros(1, 1)
    Qr, R = torch.linalg.qr(W)
    U, s, Vh = torch.linalg.svd(R)
    Qn = Qr @ U
    B = s[:, None] * Vh
    small = s <= tol
    if bool(small.any()):
        keep = Qn[:, ~small]
        full_basis = torch.cat([basis, keep.T], dim=0)
        Qn = Qn.clone()
        Qn[:, small] = _random_orthonormal(int(small.sum()), full_basis, n, W.dtype, W.device, generator)
        B = B.clone()
        B[small] = 0
    return Qn, B


# ---- the tridiagonalization primitive ------------------------------------------------------------
def lanczos(A, v0: Tensor, num_steps: int, *, reorthogonalize: bool = True,
            generator: torch.Generator | int | None = None) -> LanczosDecomposition:
    r"""Run ``num_steps`` Lanczos steps from ``v0``: $A Q \approx Q T$ with $T$ tridiagonal.

    .. math:: Q^\top A Q = T = \begin{pmatrix} \alpha_1 & \beta_1 \\ \beta_1 & \alpha_2 & \ddots \\
              & \ddots & \ddots \end{pmatrix}, \qquad Q^\top Q = I, \qquad Q e_1 = v_0 / \|v_0\|.

    A block ``v0 [n, K]`` runs K *independent* recurrences side by side (each with its own basis
    and T), so each step is one product ``A @ V`` with K columns — one data pass for all K
    (this is how stochastic Lanczos quadrature runs its probes).  A recurrence that reaches an
    invariant subspace (β ≈ 0) continues with a random vector orthogonal to its basis and
    β = 0, so T stays an exact projection and ``num_steps = n`` always rebuilds A:
    $A = Q T Q^\top$.

    **Cost**: ``num_steps`` products with K columns; memory K·n·num_steps; with
    ``reorthogonalize`` (default) 4·K·n·j extra flops at step j.

    Args:
        A: symmetric operator (anything :func:`curvops.as_operator` accepts), n × n.
        v0: start vector ``[n]`` or block of start vectors ``[n, K]`` (nonzero columns).
        num_steps: number of steps m, 1 ≤ m ≤ n.
        reorthogonalize: full reorthogonalization against all previous vectors (twice).
            ``False`` gives the plain three-term recurrence, which in floating point produces
            ghost copies of converged eigenvalues — kept for demonstrations and tests.
        generator: random source for the vectors that replace a breakdown: ``None``,
            a ``torch.Generator``, or an int seed (a new generator on the operator's device,
            seeded with it).

    Returns:
        :class:`LanczosDecomposition` ``(alphas, betas, Q)``.

    Raises:
        ValueError: non-square operator, bad ``num_steps``, zero or non-finite start vector, or a
            product that returned NaN/Inf (the message names the step).
        TypeError: an argument of the wrong kind: a count that is not an int (e.g. a float),
            a ``generator`` that is not None, a ``torch.Generator`` or an int seed, a flag that
            is not a bool, a tolerance that is not a real number.
    """
    api = "lanczos"
    A = as_square_operator(A, api)
    n = A.shape[0]
    num_steps = check_int(num_steps, "num_steps", api, minimum=1, maximum=n, expected=f"1 ≤ num_steps ≤ n = {n}")
    reorthogonalize = check_flag(reorthogonalize, "reorthogonalize", api)
    generator = check_generator(generator, api, A.device)
    v0 = torch.as_tensor(v0)
    single = v0.dim() == 1
    V = v0[:, None] if single else v0
    if V.dim() != 2 or V.shape[0] != n:
        raise ValueError(f"{api}: expected v0 of shape [{n}] or [{n}, K], got {tuple(v0.shape)}.")
    V = V.to(dtype=A.torch_dtype, device=A.device)
    norms = V.norm(dim=0)
    if not bool(torch.isfinite(norms).all()) or bool((norms == 0).any()):
        raise ValueError(f"{api}: expected finite, nonzero start vectors, got norms {norms.tolist()}.")
    K, m = V.shape[1], num_steps
    Qs = torch.zeros(K, m, n, dtype=A.torch_dtype, device=A.device)  # row j of run k: q_j
    Qs[:, 0] = (V / norms).T
    alphas = torch.zeros(K, m, dtype=A.torch_dtype, device=A.device)
    betas = torch.zeros(K, max(m - 1, 0), dtype=A.torch_dtype, device=A.device)
    anorm = torch.zeros(K, dtype=A.torch_dtype, device=A.device)
    tol = _breakdown_tol(A.torch_dtype)
    for j in range(m):
        q = Qs[:, j]  # [K, n]
        W = apply(A, q.T.contiguous(), api, j + 1).T  # [K, n]
        anorm = torch.maximum(anorm, W.norm(dim=1))
        alpha = (q * W).sum(dim=1)
        alphas[:, j] = alpha
        if j == m - 1:
            break
        W = W - alpha[:, None] * q
        if j > 0:
            W = W - betas[:, j - 1, None] * Qs[:, j - 1]
        if reorthogonalize:
            basis = Qs[:, : j + 1]  # [K, j+1, n]
            for _ in range(2):
                W = W - torch.bmm(torch.bmm(basis, W[:, :, None]).transpose(1, 2), basis)[:, 0]
        beta = W.norm(dim=1)
        broken = beta <= tol * anorm
        Qs[:, j + 1] = W / torch.where(broken, torch.ones_like(beta), beta)[:, None]
        if bool(broken.any()):
            for r in torch.nonzero(broken).flatten().tolist():
                Qs[r, j + 1] = _random_orthonormal(1, Qs[r, : j + 1], n, A.torch_dtype, A.device, generator)[:, 0]
            beta = torch.where(broken, torch.zeros_like(beta), beta)
        betas[:, j] = beta
    Q = Qs.transpose(1, 2)  # [K, n, m]
    if single:
        return LanczosDecomposition(alphas[0], betas[0], Q[0])
    return LanczosDecomposition(alphas, betas, Q)


def tridiagonal(alphas: Tensor, betas: Tensor) -> Tensor:
    """The symmetric tridiagonal matrix (or batch of them) with diagonal ``alphas`` and off-diagonal ``betas``."""
    T = torch.diag_embed(alphas)
    if betas.shape[-1] > 0:
        T = T + torch.diag_embed(betas, offset=1) + torch.diag_embed(betas, offset=-1)
    return T


# ---- the eigensolver ---------------------------------------------------------------------------
def _order(theta: Tensor, which: str) -> Tensor:
    """Indices of ``theta`` from most to least wanted."""
    if which == "LA":
        return torch.argsort(theta, descending=True)
    if which == "SA":
        return torch.argsort(theta)
    if which == "LM":
        return torch.argsort(theta.abs(), descending=True)
    asc = torch.argsort(theta).tolist()  # "BE": alternate between the top and the bottom, top first
    out, lo, hi = [], 0, len(asc) - 1
    while lo <= hi:
        out.append(asc[hi])
        hi -= 1
        if lo <= hi:
            out.append(asc[lo])
            lo += 1
    return torch.tensor(out, dtype=torch.long, device=theta.device)


def _default_ncv(n: int, k: int, b: int) -> int:
    """3k (at least 2k + 2b and 20) plus one block: a larger basis than ARPACK's 2k + 1 costs
    memory but saves products on clustered spectra (measured: 174 vs 202 products for the top
    10 of the MLP anchor's Hessian)."""
    cap = n if b == 1 else n - b
    return min(cap, max(3 * k, 2 * k + 2 * b, 20) + b)


def eigsh(A, k: int = 6, *, which: str = "LA", tol: float = 1e-6, relative_to: str = "eigenvalue",
          max_iters: int | None = None, ncv: int | None = None, block_size: int = 1,
          return_eigenvectors: bool = True, generator: torch.Generator | int | None = None,
          v0: Tensor | None = None) -> EighResult:
    r"""k eigenpairs of a symmetric operator by thick-restart (block) Lanczos.

    Finds $A x_i = \lambda_i x_i$ for the k eigenvalues selected by ``which``: ``"LA"`` largest
    algebraic, ``"SA"`` smallest algebraic, ``"LM"`` largest magnitude, ``"BE"`` both ends
    (⌈k/2⌉ from the top, ⌊k/2⌋ from the bottom, as scipy does).

    The Krylov basis grows by one block of ``block_size`` vectors per step (one product
    ``A @ V`` with b columns: one data pass for a curvature operator), each new block fully
    reorthogonalized against the basis, so no ghost eigenvalues appear.  When the basis holds
    ``ncv`` vectors it is compressed to the most wanted Ritz vectors (thick restart, Wu & Simon
    2000): the projected matrix becomes the diagonal of kept Ritz values bordered by their
    couplings to the last residual block, and the expansion continues from that block — no
    product is repeated.  A pair has converged when its residual satisfies

    .. math:: \|A x_i - \theta_i x_i\| \le \text{tol} \cdot \max(|\theta_i|,\ \epsilon^{2/3} \|A\|)
              \quad(\text{relative\_to="eigenvalue"}),\qquad
              \|A x_i - \theta_i x_i\| \le \text{tol}\,\|A\|\quad(\text{"norm"}),

    with $\|A\|$ estimated by the largest Ritz value and product column seen, and $\epsilon$ the
    machine epsilon of ``A.torch_dtype`` (ARPACK's rule, made scale-free).  A Ritz value with
    $|\theta_i| \le \epsilon^{2/3}\|A\|$ is also accepted once its residual is below
    $\epsilon^{2/3}\|A\|$: it is zero to working accuracy (a relative accuracy would never be
    reached), and is returned with that absolute accuracy.  Since a
    residual ‖r‖ puts an eigenvalue within ‖r‖ of θ (and within ‖r‖²/gap), ``tol`` bounds the
    relative eigenvalue error.  Convergence is checked after every step, so the solve stops
    as soon as all k pairs are converged.

    When the basis reaches an invariant subspace (a new direction below ε^(3/4)‖A‖) the
    expansion continues with random vectors orthogonal to it, and convergence is not declared
    before one such vector has been multiplied: further copies of a wanted eigenvalue outside
    the subspace (exact low rank, repeated eigenvalues) get their chance to show.

    Limits, as for any Krylov solver (ARPACK included): single-vector Lanczos (b = 1) sees one
    copy of each distinct eigenvalue in exact arithmetic, so use ``block_size ≥`` the
    multiplicity you expect among the wanted eigenvalues; and a loose ``tol`` on a clustered
    spectrum can stop before every wanted eigenvalue has entered the Krylov space — the pairs
    returned are then accurate eigenpairs, but one may be the (k+1)-th.  Measured on the
    MLP anchor's Hessian (its top 10 lie within 6 % of each other): ``tol=1e-3`` missed one for one start vector
    in three, ``tol=1e-4`` never.  A is *assumed* symmetric, as by scipy: tags are not
    required (a plain tensor is fine).

    **Cost**: ``iterations × block_size`` products (``num_matvecs``); memory
    (ncv + b)·n entries for the basis; each step O(n·ncv·b) flops of reorthogonalization and
    an eigendecomposition of the ncv × ncv projection.  Typically 2–5 × ncv products for
    well-separated eigenvalues, more for clustered ones.

    Args:
        A: symmetric operator, tensor, array or scipy LinearOperator (n × n).
        k: number of eigenpairs, 1 ≤ k < n.
        which: ``"LA"``, ``"SA"``, ``"LM"`` or ``"BE"``.
        tol: relative residual tolerance (see above); 0 means machine precision.
        relative_to: ``"eigenvalue"`` (default) or ``"norm"`` (residual relative to ‖A‖: the
            right measure when wanted eigenvalues may be zero).
        max_iters: maximum Lanczos steps (products of a block); default ``max(100, 20·ncv/b)``.
        ncv: basis size before a restart, k + b ≤ ncv ≤ n (≤ n − b for blocks); default
            ``min(n, max(3k, 2k + 2b, 20) + b)``.  Larger saves products on clustered spectra.
        block_size: columns per product (b); b > 1 for clustered or multiple eigenvalues, and
            to use operators whose block products cost less per column.
        return_eigenvectors: form the eigenvectors (``[n, k]``, one n × ncv × k product).
        generator: random source for the start block and breakdown vectors (reproducibility): ``None``,
            a ``torch.Generator``, or an int seed (a new generator on the operator's device,
            seeded with it).
        v0: start vector ``[n]`` or block ``[n, b]`` (default: Gaussian from ``generator``).

    Returns:
        :class:`EighResult` with eigenvalues ascending.

    Raises:
        ValueError: non-square operator, k out of range, unknown ``which``, bad ``ncv`` /
            ``block_size`` / ``v0``, or a product returned NaN/Inf (the message names the
            iteration).
        TypeError: an argument of the wrong kind: a count that is not an int (e.g. a float),
            a ``generator`` that is not None, a ``torch.Generator`` or an int seed, a flag that
            is not a bool, a tolerance that is not a real number.

    Example:
        >>> H = curvops.Hessian(model, loss, (X, y))            # doctest: +SKIP
        >>> res = eigsh(H, k=10, which="LA", tol=1e-4)          # doctest: +SKIP
        >>> res.eigenvalues, res.converged, res.num_matvecs      # doctest: +SKIP

    References:
        Lanczos (1950). *An Iteration Method for the Solution of the Eigenvalue Problem of Linear
        Differential and Integral Operators.*
        Wu, Simon (2000). *Thick-Restart Lanczos Method for Large Symmetric Eigenvalue Problems.*
        Golub, Underwood (1977). *The Block Lanczos Method for Computing Eigenvalues.*
        Stewart (2001). *A Krylov-Schur Algorithm for Large Eigenproblems.*
    """
    api = "eigsh"
    A = as_square_operator(A, api)
    n = A.shape[0]
    check_choice(which, "which", WHICH, api)
    check_choice(relative_to, "relative_to", ("eigenvalue", "norm"), api)
    k = check_int(
        k, "k", api, minimum=1, maximum=n - 1, expected=f"1 ≤ k < n = {n}", named=True,
        fix="For all eigenvalues of a small operator use torch.linalg.eigvalsh(A.to_dense()).",
    )
    b = check_int(block_size, "block_size", api, minimum=1, expected="1 ≤ block_size")
    if b > 1 and k + 2 * b > n:
        raise ValueError(f"{api}: expected 1 ≤ block_size with k + 2·block_size ≤ n = {n} (or 1), got {b!r}.")
    cap = n if b == 1 else n - b
    m = _default_ncv(n, k, b) if ncv is None else check_int(ncv, "ncv", api)
    if not k + b <= m <= cap:
        raise ValueError(f"{api}: expected k + block_size = {k + b} ≤ ncv ≤ {cap}, got ncv={m!r}.")
    tol = check_real(tol, "tol", api, minimum=0.0, fix="tol=0 means machine precision.")
    max_iters = check_optional_int(max_iters, "max_iters", api, minimum=1)
    return_eigenvectors = check_flag(return_eigenvectors, "return_eigenvectors", api)
    generator = check_generator(generator, api, A.device)
    max_iters = max(100, 20 * m // b) if max_iters is None else max_iters

    dtype, device = A.torch_dtype, A.device
    sdtype = small_dtype(device)
    eps = torch.finfo(dtype).eps
    tol = max(float(tol), eps)
    Qt = torch.zeros(m + b, n, dtype=dtype, device=device)  # rows: basis vectors (+ the residual block)
    T = torch.zeros(m, m, dtype=sdtype, device=device)  # column relation A Q = Q T + Qn B E_lastᵀ
    Qt[:b] = _start_block(v0, n, b, dtype, device, generator, api).T

    anorm = 0.0
    injected = False
    cur = 0  # basis vectors whose products are known
    B_last = None
    it = 0
    wanted = theta = S = res = None
    converged = False
    while True:
        # --- expand by one block -------------------------------------------------------------
        c = cur + b
        W = apply(A, Qt[cur:c].T.contiguous(), api, it + 1)
        it += 1
        anorm = max(anorm, float(W.norm(dim=0).max()))
        H = Qt[:c] @ W
        W = W - Qt[:c].T @ H
        H2 = Qt[:c] @ W
        W = W - Qt[:c].T @ H2
        T[:c, cur:c] = (H + H2).to(sdtype)
        probed, injected = injected, False  # probed: the block just multiplied was (partly) random
        if c >= n:  # the basis spans the whole space: A Q = Q T exactly
            Qn, B_last = W.new_zeros(n, b), W.new_zeros(b, b)
        else:
            Qn, B_last = _next_block(W, Qt[:c], anorm, generator)
            # An invariant subspace was reached and random vectors continue the basis.  Further
            # copies of a wanted eigenvalue may hide outside it: they show only once a random
            # vector's product has been taken, so convergence waits for that.
            injected = bool((B_last == 0).all(dim=1).any())
        blind = injected and not probed
        Qt[c:c + b] = Qn.T
        if c + b <= m:
            T[c:c + b, cur:c] = B_last.to(sdtype)
        cur = c

        # --- Ritz pairs and their residuals ------------------------------------------------------
        full = cur + b > m
        if cur >= k and (full or not blind or it >= max_iters):
            Tc = T[:cur, :cur]
            theta, S = torch.linalg.eigh((Tc + Tc.T) / 2)
            res = (B_last.to(sdtype) @ S[cur - b:cur]).norm(dim=0)
            anorm = max(anorm, float(theta.abs().max()))
            order = _order(theta, which)
            wanted = order[:k]
            lam, r = theta[wanted].abs(), res[wanted]
            if relative_to == "eigenvalue":
                zero = eps ** (2 / 3) * anorm  # |θ| and ‖r‖ below this: zero to working accuracy
                ok = (r <= tol * lam.clamp_min(zero)) | ((lam <= zero) & (r <= zero))
            else:
                ok = r <= tol * anorm
            converged = bool(ok.all()) and not blind
            if converged or it >= max_iters:
                break
        if not full:
            continue

        # --- thick restart: keep the p most wanted Ritz vectors ----------------------------------
        p = min(cur - b, (k + cur) // 2)
        keep = order[:p]
        Y = (Qt[:cur].T @ S[:, keep].to(dtype)).T  # [p, n]
        Qn = Qt[cur:cur + b].clone()
        C = B_last.to(sdtype) @ S[cur - b:cur, keep]  # [b, p]
        Qt[:p] = Y
        Qt[p:p + b] = Qn
        Qt[p + b:] = 0
        T.zero_()
        T[:p, :p] = torch.diag(theta[keep])
        T[p:p + b, :p] = C
        cur = p  # the residual block, now rows p:p+b, is the next block to expand

    idx = wanted[torch.argsort(theta[wanted])]
    vectors = (Qt[:cur].T @ S[:, idx].to(dtype)) if return_eigenvectors else None
    return EighResult(
        eigenvalues=theta[idx].to(dtype), eigenvectors=vectors, residuals=res[idx].to(dtype),
        num_matvecs=it * b, converged=converged, iterations=it,
    )


def _start_block(v0, n: int, b: int, dtype, device, generator, api: str) -> Tensor:
    """Orthonormal start block ``[n, b]`` from ``v0`` (``[n]`` or ``[n, b]``), completed at random."""
    if v0 is None:
        V = random_block(n, b, dtype, device, generator)
    else:
        V = torch.as_tensor(v0).to(dtype=dtype, device=device)
        if V.dim() == 1:
            V = V[:, None]
        if V.dim() != 2 or V.shape[0] != n or V.shape[1] > b:
            shape = tuple(torch.as_tensor(v0).shape)
            raise ValueError(f"{api}: expected v0 of shape [{n}] or [{n}, {b}], got {shape}.")
        norms = V.norm(dim=0)
        if not bool(torch.isfinite(norms).all()) or bool((norms == 0).any()):
            raise ValueError(f"{api}: expected a finite, nonzero v0, got column norms {norms.tolist()}.")
        if V.shape[1] < b:
            V = torch.cat([V, random_block(n, b - V.shape[1], dtype, device, generator)], dim=1)
    Qn, _ = _next_block(V, V.new_zeros(0, n), float(V.norm(dim=0).max()), generator)
    return Qn
