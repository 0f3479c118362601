r"""The primitives every algorithm in :mod:`curvops.linalg` is built from (private).

One home for what the algorithm modules share, so that none of them imports another's
internals:

* **operators**: anything the user passes (operator, tensor, array, scipy operator) as a
  curvops operator, with the shape the algorithm needs (:func:`_operator`,
  :func:`as_square_operator`, :func:`_nonempty_operator`), and the Gram operator of a
  rectangular one (:func:`_gram`);
* **checked products**: ``A @ V`` / ``A.T @ V`` with the output checked for kind, shape and
  finiteness, the message naming the algorithm and the step (:func:`_product`, :func:`apply`,
  :func:`_damped_product`);
* **random test vectors** on the generator's device (:func:`_probes`, :func:`random_block`)
  and the working dtype of the small dense post-processing (:func:`_work_dtype`);
* **budgets** checked in the algorithms' words (:func:`_check_budget`, :func:`_check_block_size`,
  :func:`_check_eig_args`), and products with blocks of unit vectors (:func:`_exact_diagonal`);
* **Krylov bases**: reorthogonalization and breakdown handling shared by :func:`lanczos`,
  :func:`eigsh` and :func:`svds` (:func:`_orthogonalize`, :func:`_random_orthonormal`,
  :func:`_next_block`);
* **solver residuals** shared by CG, MINRES and LSMR (:func:`_tolerance`, :func:`_initial_residual`).

Argument validators live in :mod:`curvops.linalg._checks`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..operators import as_operator, func_operator
from ._checks import check_generator, check_int, check_optional_int, check_real

#: distributions of random test vectors (:func:`_probes`)
DISTRIBUTIONS = ("rademacher", "gaussian", "sphere")


# ---- operators -------------------------------------------------------------------------------
def _operator(A, api: str, *, square: bool = True):
    """``A`` as a curvops operator (tensors, arrays, scipy operators are wrapped)."""
    try:
        A = as_operator(A)
    except TypeError as err:
        raise TypeError(f"{api}: expected an operator, tensor or array, got {type(A).__name__}.") from err
    if square and A.shape[0] != A.shape[1]:
        raise ValueError(f"{api}: expected a square operator, got shape {tuple(A.shape)}.")
    return A

def as_square_operator(A, api: str):
    """``A`` through the operator protocol (tensors, arrays and scipy operators are wrapped)."""
    A = as_operator(A)
    if len(A.shape) != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"{api}: expected a square operator, got shape {tuple(A.shape)}.")
    return A

def _nonempty_operator(A, api: str):
    """``A`` as an operator of any shape with at least one row and column."""
    A = as_operator(A)
    if min(A.shape) < 1:
        raise ValueError(f"{api}: expected a non-empty operator, got shape {tuple(A.shape)}.")
    return A


def _func(shape, fn, A, tags=()):
    return func_operator(shape, fn, dtype=A.torch_dtype, device=A.device, tags=tags)


def _gram(A):
    """``AᵀA`` or ``AAᵀ``, whichever is smaller (PSD; its eigenvalues are σ²). Two products per column."""
    M, N = A.shape
    if N <= M:
        return _func((N, N), lambda V: A.T @ (A @ V), A, tags=("psd",))
    return _func((M, M), lambda W: A @ (A.T @ W), A, tags=("psd",))


# ---- checked products ------------------------------------------------------------------------
def _product(A, V: Tensor, api: str, where: str = "", *, adjoint: bool = False) -> Tensor:
    """``A @ V`` (or ``A.T @ V``) with the output checked for shape and finiteness."""
    V = V.to(dtype=A.torch_dtype, device=A.device)
    out = (A.T @ V) if adjoint else (A @ V)
    if not isinstance(out, Tensor):
        raise TypeError(f"{api}: the operator returned {type(out).__name__} for a torch input; expected a Tensor.")
    rows = A.shape[1] if adjoint else A.shape[0]
    if tuple(out.shape) != (rows, *V.shape[1:]):
        raise ValueError(f"{api}: the product returned shape {tuple(out.shape)}, expected {(rows, *V.shape[1:])}.")
    if not bool(torch.isfinite(out).all()):
        at = f" {where}" if where else ""
        raise ValueError(
            f"{api}: the product {'A.T @ V' if adjoint else 'A @ V'}{at} returned non-finite values (NaN or Inf). "
            f"Check the operator (e.g. the model's loss at these parameters) and its inputs."
        )
    return out


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


def _damped_product(A, damping: float, V: Tensor, api: str, where: str) -> Tensor:
    """``(A + λI) V`` with the product checked for NaN/Inf."""
    out = _product(A, V, api, where)
    return out + damping * V if damping else out


# ---- random test vectors and the working dtype -------------------------------------------------
def _work_dtype(device: torch.device) -> torch.dtype:
    """Dtype of the small dense post-processing: float64 wherever the device has it."""
    return torch.float32 if device.type == "mps" else torch.float64


def _probes(n: int, k: int, distribution: str, generator: torch.Generator | None,
            dtype: torch.dtype, device: torch.device, api: str) -> Tensor:
    r"""k random test vectors [n, k] with $\mathbb{E}[\omega\omega^\top] = I$.

    Drawn on the generator's device (the default generator's when ``generator`` is None),
    then moved to ``device``.  ``"sphere"``: Gaussian columns scaled to norm $\sqrt{n}$.
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"{api}: expected distribution in {DISTRIBUTIONS}, got {distribution!r}.")
    if generator is not None and not isinstance(generator, torch.Generator):  # public callers convert seeds
        generator = check_generator(generator, api, device)
    where = generator.device if generator is not None else torch.device("cpu")
    if distribution == "rademacher":
        V = torch.randint(0, 2, (n, k), generator=generator, device=where).to(dtype) * 2 - 1
    else:
        V = torch.randn(n, k, generator=generator, device=where, dtype=dtype)
        if distribution == "sphere":
            V = V * (math.sqrt(n) / V.norm(dim=0).clamp_min(torch.finfo(dtype).tiny))
    return V.to(device)


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


# ---- budgets and blocks of unit vectors --------------------------------------------------------
def _check_budget(num_matvecs, minimum: int, api: str) -> int:
    return check_int(num_matvecs, "num_matvecs", api, minimum=minimum, expected=f"num_matvecs >= {minimum}",
                     fix=f"{api.split('(')[0]} needs at least {minimum} products with this method.")


def _check_block_size(block_size, api: str) -> int | None:
    return check_optional_int(block_size, "block_size", api, minimum=1,
                              fix="Pass a positive number of columns per product, or None.")


def _check_eig_args(tol, max_iters, generator, A, api: str, tol_name: str = "tol"):
    """The eigensolver's tolerance, step cap and random source, checked under the caller's name."""
    tol = check_real(tol, tol_name, api, minimum=0.0, fix=f"{tol_name}=0 means machine precision.")
    max_iters = check_optional_int(max_iters, "max_iters", api, minimum=1)
    return tol, max_iters, check_generator(generator, api, A.device, operator=A)


def _unit_block(n: int, start: int, stop: int, dtype, device) -> Tensor:
    """Columns ``start:stop`` of the n×n identity."""
    E = torch.zeros(n, stop - start, dtype=dtype, device=device)
    E[torch.arange(start, stop, device=device), torch.arange(stop - start, device=device)] = 1
    return E


def _exact_diagonal(A, block_size: int, api: str) -> Tensor:
    """diag(A) from products with unit vectors, ``block_size`` columns per product (float64)."""
    n = A.shape[0]
    out = torch.empty(n, dtype=_work_dtype(A.device), device=A.device)
    for start in range(0, n, block_size):
        stop = min(start + block_size, n)
        Y = _product(A, _unit_block(n, start, stop, A.torch_dtype, A.device), api, f"(unit vectors {start}:{stop})")
        out[start:stop] = Y[start:stop].diagonal().to(out.dtype)
    return out


def _blocks(m: int, block_size: int | None):
    step = m if block_size is None else int(block_size)
    if step < 1:
        raise ValueError(f"block_size: expected a positive integer, got {block_size}.")
    for start in range(0, m, step):
        yield start, min(start + step, m)


def _safe_inverse_transpose(R: Tensor) -> Tensor:
    r"""$R^{-\top}$ of an upper-triangular R whose tiny pivots are raised to $\epsilon\max|R_{ii}|$.

    A numerically rank-deficient sketch (an operator of rank below the sketch size) has
    pivots at rounding level; raising them keeps the leave-one-out directions finite, and
    the directions they stand for are rounding noise outside the operator's range.
    """
    d = R.diagonal()
    scale = float(d.abs().max()) if d.numel() else 0.0
    floor = torch.finfo(R.dtype).eps * scale if scale > 0 else 1.0
    fixed = torch.where(d.abs() < floor, torch.full_like(d, floor) * torch.where(d < 0, -1.0, 1.0), d)
    R = R - torch.diag_embed(d) + torch.diag_embed(fixed)
    eye = torch.eye(R.shape[0], dtype=R.dtype, device=R.device)
    return torch.linalg.solve_triangular(R, eye, upper=True).T


# ---- Krylov bases (Lanczos, eigsh, svds) -------------------------------------------------------
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


# ---- solver residuals (CG, MINRES, LSMR) -------------------------------------------------------
def _tolerance(bnorm: Tensor, rtol: float, atol: float) -> Tensor:
    return torch.clamp(rtol * bnorm, min=atol)


def _initial_residual(A, B, X0, damping, api):
    """(X, R = B − (A + δI) X, products used): no product when starting from zero."""
    if X0 is None:
        return torch.zeros_like(B), B.clone(), 0
    X = X0.clone()
    return X, B - _damped_product(A, damping, X, api, "(initial residual)"), B.shape[1]
