r"""Linear solves and lazy inverses from products: the front end of CG, MINRES, LSMR.

* ``"cg"``: conjugate gradients for $(A + \lambda I)x = b$ with $A + \lambda I$ positive
  definite (a GGN, a Fisher, a damped PSD operator); optional preconditioner.
* ``"minres"``: MINRES for symmetric, possibly indefinite $(A + \lambda I)$ (a Hessian away
  from a minimum); optional SPD preconditioner.
* ``"lsmr"``: LSMR for least squares $\min_x \|Ax - b\|^2 + \lambda\|x\|^2$ with any
  rectangular $A$ (a Jacobian); uses ``A @ v`` and ``A.T @ w``.

Block right-hand sides ``b [M, K]`` run the K recurrences side by side: one product with the
columns still iterating per step (one data pass for a curvature operator), and columns leave
the block as they converge.  :func:`inverse` wraps a solve as a lazy operator.

Errors follow the library's rule: bad input raises (``ValueError``/``TypeError``);
non-convergence is reported in :class:`SolveResult` (``converged``, ``message``), raised as
:class:`ConvergenceError` only when ``strict=True``, and warned about by :func:`inverse`.

References:
    Hestenes, Stiefel (1952). *Methods of Conjugate Gradients for Solving Linear Systems*.
    Paige, Saunders (1975). *Solution of Sparse Indefinite Systems of Linear Equations*.
    Fong, Saunders (2011). *LSMR: An Iterative Algorithm for Sparse Least-Squares Problems*.
    Frangella, Tropp, Udell (2023). *Randomized Nyström Preconditioning*. SIAM J. Matrix Anal. Appl.

The method kernels live in :mod:`.cg`, :mod:`.minres` and :mod:`.lsmr`, the Nyström
preconditioner in :mod:`.preconditioners`, the result and error types in :mod:`.solve_result`;
this module checks the input, picks the method, runs it, and wraps it as a lazy inverse.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ..operators import Operator
from ._checks import check_flag, check_generator, check_int, check_optional_int, check_real
from ._primitives import _operator
from .cg import _cg
from .lsmr import _lsmr
from .minres import _minres
from .preconditioners import NystromPreconditioner, _make_preconditioner, nystrom_preconditioner  # noqa: F401
from .solve_result import ConvergenceError, ConvergenceWarning, SolveResult

SOLVE_METHODS = ("auto", "cg", "minres", "lsmr")

__all__ = ["solve", "inverse", "InverseOperator", "SolveResult", "ConvergenceError", "ConvergenceWarning",
           "nystrom_preconditioner", "NystromPreconditioner"]


# ---- input checks ----------------------------------------------------------------------------
def _resolve_method(A, method: str, assume_psd: bool, assume_symmetric: bool, api: str) -> str:
    if method not in SOLVE_METHODS:
        raise ValueError(f"{api}: expected method in {SOLVE_METHODS}, got {method!r}.")
    square = A.shape[0] == A.shape[1]
    if method == "auto":
        if square and (A.is_psd or assume_psd):
            return "cg"
        if square and (A.is_symmetric or assume_symmetric):
            return "minres"
        return "lsmr"
    if method in ("cg", "minres") and not square:
        raise ValueError(
            f"{api}: expected a square operator for method={method!r}, got shape {tuple(A.shape)}. "
            f"Use method='lsmr' for least squares with a rectangular operator."
        )
    if method == "cg" and not (A.is_psd or assume_psd):
        raise ValueError(
            f"{api}: CG needs a positive (semi)definite operator, but this one is tagged "
            f"{sorted(A.tags) or 'with no tags'} (not 'psd'). Use method='minres' for symmetric indefinite operators (e.g. a Hessian), or pass "
            f"assume_psd=True if you know A + damping·I is positive definite."
        )
    if method == "minres" and not (A.is_symmetric or assume_symmetric or assume_psd):
        raise ValueError(
            f"{api}: MINRES needs a symmetric operator, but this one has tags {sorted(A.tags)}. Use method='lsmr' "
            f"for non-symmetric operators, or pass assume_symmetric=True if you know it is symmetric."
        )
    return method


def _check_rhs(A, b, api: str) -> tuple[Tensor, bool]:
    if not isinstance(b, Tensor):
        raise TypeError(f"{api}: expected b as a torch.Tensor, got {type(b).__name__}.")
    M = A.shape[0]
    if b.dim() not in (1, 2) or b.shape[0] != M:
        raise ValueError(f"{api}: expected b of shape [{M}] or [{M}, K] (the rows of A), got {tuple(b.shape)}.")
    if b.dtype != A.torch_dtype:
        raise TypeError(
            f"{api}: expected b of dtype {A.torch_dtype}, got {b.dtype}. Convert with b.to({A.torch_dtype}).")
    if b.device != A.device:
        raise ValueError(f"{api}: expected b on {A.device}, got it on {b.device}. Move it with b.to('{A.device}').")
    if not bool(torch.isfinite(b).all()):
        raise ValueError(f"{api}: expected a finite right-hand side b, got NaN or Inf entries.")
    vector = b.dim() == 1
    return (b[:, None] if vector else b), vector


def _check_x0(A, x0, K: int, vector: bool, api: str) -> Tensor | None:
    if x0 is None:
        return None
    N = A.shape[1]
    if not isinstance(x0, Tensor):
        raise TypeError(f"{api}: expected x0 as a torch.Tensor, got {type(x0).__name__}.")
    expected = (N,) if vector else (N, K)
    if tuple(x0.shape) != expected:
        raise ValueError(f"{api}: expected x0 of shape {list(expected)}, got {tuple(x0.shape)}.")
    if x0.is_complex() or x0.dtype == torch.bool:
        raise TypeError(f"{api}: expected a real x0, got dtype {x0.dtype}. Convert with x0.to({A.torch_dtype}).")
    if x0.is_floating_point() and not bool(torch.isfinite(x0).all()):
        raise ValueError(f"{api}: expected a finite initial guess x0, got NaN or Inf entries. Pass x0=None to "
                         f"start from zero.")
    x0 = x0.to(dtype=A.torch_dtype, device=A.device)
    return x0[:, None] if vector else x0


def _finish(x: Tensor, vector: bool, rnorm: Tensor, **kw) -> SolveResult:
    rn = rnorm.detach().cpu()
    return SolveResult(x=x[:, 0] if vector else x, residual_norm=float(rn[0]) if vector else rn, **kw)


# ---- the public entry points -----------------------------------------------------------------
def _check_options(A, method: str, damping, rtol, atol, max_iters, preconditioner_rank, generator, flags: dict,
                   api: str):
    """The settings :func:`solve` and :func:`inverse` share, checked before any product.

    Returns ``(damping, rtol, atol, max_iters, preconditioner_rank, generator)`` normalized;
    ``flags`` (``assume_psd=…``) are checked to be bools.
    """
    for name, value in flags.items():
        check_flag(value, name, api)
    damping = check_real(damping, "damping", api, expected="a finite float damping")
    if method in ("cg", "lsmr") and damping < 0:
        raise ValueError(f"{api}: expected damping >= 0, got {damping}. Use method='minres' for a negative shift.")
    rtol = check_real(rtol, "rtol", api, minimum=0.0, expected="rtol >= 0")
    atol = check_real(atol, "atol", api, minimum=0.0, expected="atol >= 0")
    max_iters = check_optional_int(max_iters, "max_iters", api, minimum=0, expected="max_iters >= 0",
                                   fix="Pass None for the default min(10n, 1000).")
    preconditioner_rank = check_int(preconditioner_rank, "preconditioner_rank", api, minimum=1)
    generator = check_generator(generator, api, A.device, operator=A)
    return damping, rtol, atol, max_iters, preconditioner_rank, generator


def solve(A, b: Tensor, *, method: str = "auto", damping: float = 0.0, preconditioner=None,
          rtol: float = 1e-6, atol: float = 0.0, max_iters: int | None = None, x0: Tensor | None = None,
          assume_psd: bool = False, assume_symmetric: bool = False, preconditioner_rank: int = 50,
          generator: torch.Generator | int | None = None, strict: bool = False) -> SolveResult:
    r"""Solve $(A + \lambda I)x = b$ (CG, MINRES) or $\min_x\|Ax - b\|^2 + \lambda\|x\|^2$ (LSMR).

    * ``"cg"``: $A + \lambda I$ symmetric positive definite.  Iterations
      $O(\sqrt{\kappa}\log(1/\epsilon))$; stops a column when $\|r_k\| \le
      \max(\mathrm{rtol}\|b\|, \mathrm{atol})$.  Each step checks the curvature
      $p_k^\top(A + \lambda I)p_k$: if it is $\le 0$ the operator is not positive definite,
      the column stops at the previous iterate and ``negative_curvature`` is set.
    * ``"minres"``: $A + \lambda I$ symmetric, possibly indefinite or singular; minimizes
      $\|r_k\|$ over the Krylov space.  A preconditioner must be SPD (then the residual is
      measured in its norm).
    * ``"lsmr"``: any M×N operator; equivalent to MINRES on the normal equations
      $(A^\top A + \lambda I)x = A^\top b$ without forming them.  Stops when
      $\|r\| \le \max(\mathrm{rtol}\|b\|, \mathrm{atol})$ (consistent system) or
      $\|A^\top r - \lambda x\| \le \mathrm{rtol}\,\|A\|\,\|r\|$ (least-squares optimum).
    * ``"auto"``: CG for a PSD-tagged operator, MINRES for a symmetric one, LSMR otherwise.

    ``preconditioner`` is an operator $P \approx (A + \lambda I)^{-1}$ (PSD) or ``"nystrom"``
    (CG only: :func:`nystrom_preconditioner` of rank ``preconditioner_rank``, built first).

    **Cost**: per iteration one product with the columns still iterating (CG, MINRES), or
    one with ``A`` and one with ``A.T`` (LSMR); plus K for an ``x0`` and ``rank + 10`` for a
    Nyström preconditioner.

    Args:
        A: the operator (or a tensor/array).
        b: right-hand side [M] or [M, K] (K solved together), on A's device, in A's dtype.
        method: ``"auto"``, ``"cg"``, ``"minres"`` or ``"lsmr"``.
        damping: λ (CG and LSMR: ≥ 0; MINRES: any real shift).
        preconditioner: None, an operator, or ``"nystrom"``.
        rtol, atol: relative and absolute residual tolerances.
        max_iters: iteration cap (default ``min(10n, 1000)``, n the number of unknowns).
        x0: initial guess shaped like the solution.
        assume_psd: let CG run on an operator without the ``"psd"`` tag.
        assume_symmetric: let MINRES run on an operator without the ``"symmetric"`` tag.
        preconditioner_rank: rank of the ``"nystrom"`` preconditioner.
        generator: random source for the Nyström sketch: ``None``,
            a ``torch.Generator``, or an int seed (a new generator on the operator's device,
            seeded with it).
        strict: raise :class:`ConvergenceError` instead of returning an unconverged result.

    Returns:
        :class:`SolveResult` (``x``, ``converged``, ``num_matvecs``, ``residual_norm``,
        ``iterations``, ``history``, ``method``, ``negative_curvature``, ``message``).

    Raises:
        ValueError: non-square operator to CG/MINRES, an operator not tagged PSD to CG (or
            not symmetric to MINRES) without ``assume_…``, shapes of ``b``/``x0`` that do not
            match, non-finite ``b``, negative damping for CG/LSMR, a product that returns NaN or
            Inf (the message names the iteration).
        TypeError: ``b`` not a tensor or of another dtype; an argument of the wrong kind (a float
            ``max_iters``, a ``generator`` that is not None, a ``torch.Generator`` or an int seed).
        ConvergenceError: with ``strict=True``, when a column did not converge.

    Example:
        >>> G = curvops.Dense(torch.eye(3, dtype=torch.float64) * 2, tags=("psd",))
        >>> solve(G, torch.ones(3, dtype=torch.float64), method="cg").x        # doctest: +SKIP
        tensor([0.5000, 0.5000, 0.5000], dtype=torch.float64)

    References:
        Hestenes, Stiefel (1952). *Methods of Conjugate Gradients for Solving Linear Systems*.
        Paige, Saunders (1975). *Solution of Sparse Indefinite Systems of Linear Equations*.
        Fong, Saunders (2011). *LSMR: An Iterative Algorithm for Sparse Least-Squares Problems*.
        Frangella, Tropp, Udell (2023). *Randomized Nyström Preconditioning*.
    """
    api = f"solve({method})" if isinstance(method, str) else "solve"
    A = _operator(A, api, square=False)
    flags = dict(assume_psd=assume_psd, assume_symmetric=assume_symmetric, strict=strict)
    for name, value in flags.items():
        check_flag(value, name, api)
    method = _resolve_method(A, method, assume_psd, assume_symmetric, api)
    api = f"solve({method})"
    damping, rtol, atol, max_iters, preconditioner_rank, generator = _check_options(
        A, method, damping, rtol, atol, max_iters, preconditioner_rank, generator, flags, api)
    B, vector = _check_rhs(A, b, api)
    X0 = _check_x0(A, x0, B.shape[1], vector, api)
    n = A.shape[1]
    max_iters = min(10 * n, 1000) if max_iters is None else max_iters
    P, pre_cost = _make_preconditioner(A, preconditioner, method, damping, preconditioner_rank, generator,
                                       assume_psd, api)
    if method == "cg":
        X, rnorm, kw = _cg(A, B, X0, P, float(damping), rtol, atol, max_iters, api)
    elif method == "minres":
        X, rnorm, kw = _minres(A, B, X0, P, float(damping), rtol, atol, max_iters, api)
    else:
        X, rnorm, kw = _lsmr(A, B, X0, float(damping), rtol, atol, max_iters, api)
    kw["num_matvecs"] += pre_cost
    kw.setdefault("info", {})
    if pre_cost:
        kw["info"]["preconditioner_matvecs"] = pre_cost
    result = _finish(X, vector, rnorm, **kw)
    if strict and not result.converged:
        raise ConvergenceError(f"{api}: did not converge: {result.message}.", result)
    return result


# ---- lazy inverse ----------------------------------------------------------------------------
class InverseOperator(Operator):
    r"""Lazy $(A + \lambda I)^{-1}$ (CG/MINRES) or damped pseudo-inverse $(A^\top A + \lambda I)^{-1}A^\top$ (LSMR).

    Every product is a :func:`solve` with the product's columns as a block right-hand side.
    The last solve's :class:`SolveResult` is kept in ``last_result`` (and the one of the last
    adjoint product in ``last_adjoint_result``); ``num_matvecs`` counts the products with
    ``A`` over all solves so far.  Build it with :func:`inverse`.
    """

    def __init__(self, A, method: str, options: dict, strict: bool, warn: bool):
        M, N = A.shape
        if method == "lsmr":
            shape, tags = (N, M), ()
        else:
            shape, tags = (N, M), (("psd",) if method == "cg" else ("symmetric",))
        super().__init__(shape, A.torch_dtype, A.device, tags=tags, domain=A.range, range=A.domain)
        self.A, self.method, self.options, self.strict, self.warn = A, method, options, strict, warn
        self.damping = options["damping"]
        self.last_result: SolveResult | None = None
        self.last_adjoint_result: SolveResult | None = None
        self.num_matvecs = 0
        self._preconditioner = options.pop("preconditioner")

    def _preconditioner_op(self):
        if isinstance(self._preconditioner, str):  # built on first use (a pass over the data), then kept
            rank = min(int(self.options["preconditioner_rank"]), self.A.shape[0])
            self._preconditioner = nystrom_preconditioner(
                self.A, rank, self.damping, generator=self.options["generator"], assume_psd=self.options["assume_psd"])
            self.num_matvecs += self._preconditioner.num_matvecs
        return self._preconditioner

    def _report(self, result: SolveResult, what: str) -> None:
        self.num_matvecs += result.num_matvecs
        if result.converged:
            return
        msg = (f"inverse({self.method}) {what}: the solve did not converge ({result.message}); "
               f"see .last_result for diagnostics, or raise rtol/max_iters or the damping.")
        if self.strict:
            raise ConvergenceError(msg, result)
        if self.warn:
            warnings.warn(msg, ConvergenceWarning, stacklevel=7)  # the caller of `Ainv @ V`

    def _matmat_torch(self, V: Tensor) -> Tensor:
        opts = {k: v for k, v in self.options.items() if k != "preconditioner_rank"}
        res = solve(self.A, V, method=self.method, preconditioner=self._preconditioner_op(), **opts)
        self.last_result = res
        self._report(res, "@ V")
        return res.x

    def _rmatmat_torch(self, W: Tensor) -> Tensor:
        if self.method != "lsmr":
            return self._matmat_torch(W)
        opts = {k: v for k, v in self.options.items() if k not in ("preconditioner_rank",)}
        res = solve(self.A.T, W, method="lsmr", **opts)  # (A⁺_λ)ᵀ = (Aᵀ)⁺_λ
        self.last_adjoint_result = res
        self._report(res, ".T @ W")
        return res.x


def inverse(A, *, damping: float = 0.0, method: str = "auto", rtol: float = 1e-6, atol: float = 0.0,
            max_iters: int | None = None, preconditioner=None, preconditioner_rank: int = 50,
            assume_psd: bool = False, assume_symmetric: bool = False, generator: torch.Generator | int | None = None,
            strict: bool = False, warn: bool = True) -> InverseOperator:
    r"""The lazy inverse $(A + \lambda I)^{-1}$ as an operator (products are solves).

    * ``"cg"``/``"minres"`` (square A): $X = (A + \lambda I)^{-1}V$; tags: symmetric, and PSD
      for CG ($A + \lambda I$ positive definite).
    * ``"lsmr"`` (any A, M×N): the damped pseudo-inverse $A^+_\lambda = (A^\top A + \lambda I)^{-1}A^\top$
      (N×M; $A^{-1}$ for square invertible A and λ = 0); its adjoint solves with ``A.T``.
    * ``"auto"``: CG for PSD-tagged A, MINRES for symmetric A, LSMR otherwise.

    Usable anywhere an operator is: ``G_inv @ v``, ``J @ G_inv @ J.T``, ``eigsh(G_inv, …)``.
    Nothing runs at construction; a ``"nystrom"`` preconditioner is built at the first
    product and kept.  A solve that does not converge warns (:class:`ConvergenceWarning`) or,
    with ``strict=True``, raises :class:`ConvergenceError`; it is never silent.  The last
    solve's diagnostics are in ``.last_result``.

    **Cost** of a product with K columns: one solve with K right-hand sides, i.e. a few to a
    few hundred products with A (one call per iteration); see :func:`solve`.

    Args:
        A: the operator.
        damping: λ (see :func:`solve`).
        method: ``"auto"``, ``"cg"``, ``"minres"`` or ``"lsmr"``.
        rtol, atol, max_iters: per-solve tolerances and iteration cap.
        preconditioner: None, an operator or ``"nystrom"`` (CG).
        preconditioner_rank: rank of the Nyström preconditioner.
        assume_psd, assume_symmetric: promises for operators without tags (see :func:`solve`).
        generator: random source for the Nyström sketch: ``None``,
            a ``torch.Generator``, or an int seed (a new generator on the operator's device,
            seeded with it).
        strict: raise :class:`ConvergenceError` when a solve does not converge.
        warn: warn when a solve does not converge (ignored when ``strict``).

    Returns:
        :class:`InverseOperator`.

    Raises:
        ValueError: as :func:`solve` for a method that does not fit the operator.
        TypeError: an argument of the wrong kind: a count that is not an int (e.g. a float),
            a ``generator`` that is not None, a ``torch.Generator`` or an int seed, a flag that
            is not a bool, a tolerance that is not a real number.

    Example:
        >>> Ginv = inverse(GGN(model, loss, data), damping=1e-3)        # doctest: +SKIP
        >>> x = Ginv @ g                                                 # doctest: +SKIP
        >>> Ginv.last_result.converged, Ginv.last_result.iterations     # doctest: +SKIP
    """
    api = f"inverse({method})" if isinstance(method, str) else "inverse"
    A = _operator(A, api, square=False)
    flags = dict(assume_psd=assume_psd, assume_symmetric=assume_symmetric, strict=strict, warn=warn)
    for name, value in flags.items():
        check_flag(value, name, api)
    method = _resolve_method(A, method, assume_psd, assume_symmetric, api)
    api = f"inverse({method})"
    damping, rtol, atol, max_iters, preconditioner_rank, generator = _check_options(
        A, method, damping, rtol, atol, max_iters, preconditioner_rank, generator, flags, api)
    if preconditioner is not None and not isinstance(preconditioner, str):
        preconditioner, _ = _make_preconditioner(A, preconditioner, method, damping, preconditioner_rank,
                                                 generator, assume_psd, api)
    elif preconditioner is not None:
        if preconditioner != "nystrom" or method != "cg":
            raise ValueError(
                f"{api}: preconditioner='nystrom' needs method='cg', got {preconditioner!r} with {method!r}.")
    options = dict(damping=float(damping), rtol=rtol, atol=atol, max_iters=max_iters, assume_psd=assume_psd,
                   assume_symmetric=assume_symmetric, generator=generator, preconditioner=preconditioner,
                   preconditioner_rank=preconditioner_rank)
    return InverseOperator(A, method, options, strict, warn)
