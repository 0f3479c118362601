r"""Response Jacobians of an optimum by the implicit function theorem, matrix-free.

For an objective $L(w, \lambda)$ with parameters $w \in \mathbb{R}^P$ and hyperparameters
$\lambda \in \mathbb{R}^Q$ (a weight-decay coefficient, per-sample weights, the inputs
themselves, …), an optimum $w^*(\lambda)$ satisfies $\nabla_w L(w^*(\lambda), \lambda) = 0$.
Differentiating this identity in $\lambda$ (implicit function theorem; $H_{ww}$ invertible):

.. math::
    \frac{dw^*}{d\lambda} = -H_{ww}^{-1} M, \qquad
    H_{ww} = \nabla^2_{w} L \in \mathbb{R}^{P\times P}, \quad
    M = \frac{\partial^2 L}{\partial w\,\partial\lambda} \in \mathbb{R}^{P\times Q}.

Here (an analysis: an operator *and* a solver; the two derivative operators live in
:mod:`curvops.operators.mixed`):

* :class:`ResponseJacobian` — $dw^*/d\lambda$; each product is one inner solve with
  $H_{ww} + \delta I$ (CG or MINRES through :func:`curvops.solve`).
* :func:`hypergradient` — $dV/d\lambda$ of a validation objective through $w^*(\lambda)$
  (one adjoint solve).

Calling convention (shared by all of them): ``L(params, **hyper) -> scalar tensor``, where
``params`` is what the user passed — a dict ``{name: tensor}``, a single tensor, or an
``nn.Module`` (then L receives a dict of its trainable parameters and typically calls
``torch.func.functional_call``); ``hyper`` is a dict ``{name: tensor}`` whose names are
keywords of L, or one tensor passed positionally as ``L(params, hyper)``.  Products use
the parameters' values at the moment of the product (later changes to the model or the
tensors are followed, and the stationarity check of :class:`ResponseJacobian` runs again when
they moved); the differentiated hyperparameters λ are copied at construction (they are where the
derivative is taken); the module itself is never touched.  L must be a pure torch function that
``torch.func`` can transform (no ``.item()``, no in-place writes to its inputs).

References:
    Blondel, Berthet, Cuturi, Frostig, Hoyer, Llinares-López, Pedregosa, Vert (2022).
    *Efficient and Modular Implicit Differentiation*.
    Lorraine, Vicol, Duvenaud (2020). *Optimizing Millions of Hyperparameters by Implicit
    Differentiation*.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from torch.func import grad_and_value

from ..linalg.solve import ConvergenceError, ConvergenceWarning, solve
from ..operators._bilevel import _accepts, _as_scalar, _flat, _ObjectiveOperator, _Problem, _signature
from ..operators.mixed import MixedDerivative, ParameterHessian

_METHODS = ("auto", "cg", "minres")


class StationarityWarning(UserWarning):
    """The point given to :class:`ResponseJacobian` is not (close to) stationary in w, so the
    implicit-function-theorem response describes it only approximately."""


# ---- the objective as a pure function of (w, λ) ----------------------------------------------


class ResponseJacobian(_ObjectiveOperator):
    r"""The response Jacobian $dw^*/d\lambda$ of an optimum, by the implicit function theorem.

    .. math::
        J = \frac{dw^*}{d\lambda} = -(H_{ww} + \delta I)^{-1} M,\qquad
        J v = -(H_{ww} + \delta I)^{-1}(M v),\qquad
        J^\top u = -M^\top (H_{ww} + \delta I)^{-1} u

    with $H_{ww}$ (:class:`ParameterHessian`), $M$ (:class:`MixedDerivative`) at the given
    point and δ = ``damping`` (0 for the exact response).  Exact when $\nabla_w L(w, \lambda)
    = 0$ and $H_{ww} + \delta I$ is invertible; it need not be PSD (a saddle's response is
    defined too): MINRES by default, CG when the caller promises ``assume_psd=True``.

    **Stationarity check** (at construction, one gradient): with $g = \nabla_w L(w, \lambda)$,
    the point counts as stationary when

    .. math:: \|g\|_2 \le \texttt{grad\_tol}\cdot\max(1, |L(w, \lambda)|)

    (relative to the objective's magnitude, absolute below 1; ``stationarity`` holds
    $\|g\|_2 / \max(1, |L|)$).  Otherwise a :class:`StationarityWarning` is issued, or with
    ``strict=True`` a ValueError is raised before any solve.

    **Cost**: construction one gradient of L.  A product with K columns: K mixed JVPs and
    one block solve with K right-hand sides (a few to a few hundred vmapped HVPs per column,
    see :func:`curvops.solve`); an adjoint product: one block solve then one mixed VJP per
    column.  ``to_dense()`` is one solve with Q right-hand sides.

    **Tags**: none.  Domain: the hyper dict's layout; range: the parameters' layout (dicts of
    the parameters come out where params was a dict or a module).

    Args:
        L: objective ``L(params, **hyper) -> scalar`` (see the module docstring).
        params: the optimum w: dict ``{name: tensor}``, tensor, or ``nn.Module`` (trainable
            parameters; the module is left untouched).
        hyper: dict ``{name: tensor or number}`` of keywords of L, or a tensor passed as
            ``L(params, hyper)``.
        wrt: hyper names to differentiate in (default: all).
        method: ``"auto"`` (CG when ``assume_psd`` else MINRES), ``"cg"`` or ``"minres"``.
        damping: δ ≥ 0 for CG, any real for MINRES.
        rtol, atol, max_iters: inner-solve tolerances (relative to ‖M v‖ or ‖u‖) and cap.
        assume_psd: promise that $H_{ww} + \delta I$ is positive definite (enables CG).
        grad_tol: the stationarity tolerance above.
        strict: raise (ValueError) at a non-stationary point and (``ConvergenceError``) when an
            inner solve does not converge, instead of warning.
        column_strategy: ``"auto"``, ``"vmap"`` or ``"loop"`` for the HVPs and mixed products.

    Attributes:
        hessian, mixed: the :class:`ParameterHessian` and :class:`MixedDerivative` used.
        grad_norm, value, stationarity, is_stationary: the check above.
        last_solve: the :class:`~curvops.linalg.solve.SolveResult` of the last inner solve.
        num_matvecs: Hessian products over all inner solves; ``num_mixed_products``: mixed
            JVP/VJP columns; ``num_solves``: inner solves.

    Raises:
        ValueError: hyper names not in L's signature (before any evaluation); a non-scalar L; a
            bad method, damping, tolerance or ``wrt``; ``method="cg"`` without
            ``assume_psd=True``; with ``strict``, a non-stationary point.  Products raise it for
            vectors of the wrong length.
        TypeError: params or hyper of the wrong kind, dtype or device.
        ConvergenceError: with ``strict``, an inner solve that does not converge (otherwise a
            ``ConvergenceWarning``).

    Example:
        >>> L = lambda w, lam: 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * lam * (w ** 2).sum()  # doctest: +SKIP
        >>> J = ResponseJacobian(L, w_star, {"lam": torch.tensor(0.1)}, assume_psd=True)    # doctest: +SKIP
        >>> dw = J @ torch.ones(1)       # = -(XᵀX + 0.1 I)⁻¹ w*                              # doctest: +SKIP
        >>> J.last_solve.converged, J.num_matvecs                                           # doctest: +SKIP

    References:
        Blondel et al. (2022). *Efficient and Modular Implicit Differentiation*.
    """

    def __init__(self, L: Callable, params: Any, hyper: Any, *, wrt: Sequence[str] | str | None = None,
                 method: str = "auto", damping: float = 0.0, rtol: float = 1e-8, atol: float = 0.0,
                 max_iters: int | None = None, assume_psd: bool = False, grad_tol: float = 1e-6,
                 strict: bool = False, column_strategy: str = "auto"):
        api = "ResponseJacobian"
        problem = _Problem(L, params, hyper, wrt, api)
        if method not in _METHODS:
            raise ValueError(f"{api}: expected method in {_METHODS}, got {method!r}.")
        if method == "cg" and not assume_psd:
            raise ValueError(f"{api}: method='cg' needs a positive definite H_ww + δI; pass assume_psd=True if you "
                             f"know it is (e.g. a strict minimum), or use method='minres'.")
        if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not math.isfinite(damping):
            raise ValueError(f"{api}: expected a finite float damping, got {damping!r}.")
        if assume_psd and damping < 0:
            raise ValueError(f"{api}: expected damping >= 0 with assume_psd=True, got {damping}.")
        for name, val in (("rtol", rtol), ("atol", atol), ("grad_tol", grad_tol)):
            if not (isinstance(val, (int, float)) and math.isfinite(val) and val >= 0):
                raise ValueError(f"{api}: expected a finite {name} >= 0, got {val!r}.")
        if max_iters is not None and (not isinstance(max_iters, int) or max_iters < 0):
            raise ValueError(f"{api}: expected max_iters None or an integer >= 0, got {max_iters!r}.")
        shape = (problem.layout_w.size, problem.layout_h.size)
        self._setup(problem, shape, (), problem.user_layout_h, problem.user_layout_w, column_strategy)
        self.hessian = ParameterHessian._of(problem, column_strategy)
        self.mixed = MixedDerivative._of(problem, column_strategy)
        self.method = "cg" if (method == "auto" and assume_psd) else ("minres" if method == "auto" else method)
        self.damping, self.rtol, self.atol, self.max_iters = float(damping), rtol, atol, max_iters
        self.assume_psd, self.grad_tol, self.strict = assume_psd, grad_tol, strict
        self.last_solve = None
        self.num_matvecs = self.num_mixed_products = self.num_solves = 0
        self._point = None
        self._check_point(stacklevel=3)

    def _check_point(self, stacklevel: int = 7) -> None:
        """The stationarity check, at construction and again whenever the parameters changed since.

        The operator follows the user's parameters (a product uses their values at that moment);
        when they moved, ∇_w L is evaluated again (one gradient) and the check repeats.
        """
        w = self.problem.w
        if self._point is not None and all(torch.equal(a, w[n]) for n, a in self._point.items()):
            return
        self._point = {n: t.clone() for n, t in w.items()}
        g, value = self.problem.gradient_and_value()
        self.value = value
        self.grad_norm = float(torch.linalg.vector_norm(g))
        self.stationarity = self.grad_norm / max(1.0, abs(value))
        self.is_stationary = self.stationarity <= self.grad_tol
        if not self.is_stationary:
            msg = (f"ResponseJacobian: the point is not stationary: ‖∇_w L‖ = {self.grad_norm:.3e}, i.e. "
                   f"‖∇_w L‖ / max(1, |L|) = {self.stationarity:.3e} > grad_tol = {self.grad_tol:g}. The "
                   f"implicit-function response describes an optimum only; optimise w further, or raise "
                   f"grad_tol to accept an approximate response.")
            if self.strict:
                raise ValueError(msg)
            warnings.warn(msg, StationarityWarning, stacklevel=stacklevel)

    def _solve(self, B: Tensor, what: str) -> Tensor:
        res = solve(self.hessian, B, method=self.method, damping=self.damping, rtol=self.rtol, atol=self.atol,
                    max_iters=self.max_iters, assume_psd=self.assume_psd, assume_symmetric=True)
        self.last_solve = res
        self.num_matvecs += res.num_matvecs
        self.num_solves += 1
        if not res.converged:
            msg = (f"ResponseJacobian {what}: the inner {res.method} solve with H_ww did not converge "
                   f"({res.message}); see .last_solve, raise max_iters or rtol, or add damping.")
            if self.strict:
                raise ConvergenceError(msg, res)
            warnings.warn(msg, ConvergenceWarning, stacklevel=7)
        return res.x

    def _matmat_torch(self, V: Tensor) -> Tensor:  # [Q, K] -> [P, K]
        self._check_point()
        B = self.mixed._matmat_torch(V)
        self.num_mixed_products += V.shape[1]
        return -self._solve(B, "@ v")

    def _rmatmat_torch(self, W: Tensor) -> Tensor:  # [P, K] -> [Q, K]
        self._check_point()
        Y = self._solve(W, ".T @ u")
        self.num_mixed_products += W.shape[1]
        return -self.mixed._rmatmat_torch(Y)


# ---- hypergradient ---------------------------------------------------------------------------
@dataclass
class HypergradientResult:
    r"""The outcome of :func:`hypergradient`, with diagnostics.

    Attributes:
        gradient: $dV/d\lambda$, in the hyper's structure (a dict ``{name: tensor}`` over the
            ``wrt`` names, or a tensor shaped like hyper).
        direct: $\partial_\lambda V$ (zero when V does not take the hyperparameters).
        indirect: $(dw^*/d\lambda)^\top \nabla_w V$, through the optimum.
        value: $V(w, \lambda)$.
        converged: whether the adjoint solve converged.
        num_matvecs: Hessian products spent by the adjoint solve.
        solve: the :class:`~curvops.linalg.solve.SolveResult` of the adjoint solve.
        grad_norm, stationarity: $\|\nabla_w L\|$ and the relative measure of
            :class:`ResponseJacobian` at the given point.
    """

    gradient: Any
    direct: Any
    indirect: Any
    value: float
    converged: bool
    num_matvecs: int
    solve: Any
    grad_norm: float
    stationarity: float


def _validation_takes_hyper(V: Callable, problem: _Problem, api: str) -> bool:
    sig = _signature(V)
    if sig is None:
        return True
    names = list(problem.fixed) + list(problem.h)
    missing, _, n_pos = _accepts(sig, names)
    if n_pos == 0:
        raise ValueError(f"{api}: expected the validation objective to take the parameters as its first "
                         f"positional argument, V(params, ...), got V{sig}.")
    if problem.kind_h == "tensor":
        return n_pos >= 2
    if not missing:
        return True
    if len(missing) == len(names):
        return False
    raise ValueError(f"{api}: the validation objective V{sig} takes some hyper names but not {missing}; expected "
                     f"V(params) or V(params, **hyper) accepting every key of hyper (or **kwargs).")


def hypergradient(V: Callable, L: Callable, params: Any, hyper: Any, *, wrt: Sequence[str] | str | None = None,
                  **options) -> HypergradientResult:
    r"""The total derivative of a validation objective through the optimum $w^*(\lambda)$.

    .. math::
        \frac{dV}{d\lambda} = \partial_\lambda V + \Big(\frac{dw^*}{d\lambda}\Big)^{\!\top}\nabla_w V
        = \partial_\lambda V - M^\top (H_{ww} + \delta I)^{-1} \nabla_w V

    at the point ``params`` (an optimum of ``L`` for ``hyper``), with the notation of
    :class:`ResponseJacobian`.  ``V`` is called as ``V(params, **hyper)`` (or
    ``V(params, hyper)`` for a tensor hyper) when its signature takes the hyperparameters, else
    as ``V(params)``.

    **Cost**: one gradient of L (the stationarity check), one gradient of V in (w, λ), one
    adjoint solve with one right-hand side (HVPs), and one mixed VJP.

    Args:
        V: validation objective ``V(params[, **hyper]) -> scalar``.
        L, params, hyper, wrt: as for :class:`ResponseJacobian`.
        **options: the other :class:`ResponseJacobian` keywords (``method``, ``damping``,
            ``rtol``, ``atol``, ``max_iters``, ``assume_psd``, ``grad_tol``, ``strict``,
            ``column_strategy``).

    Returns:
        :class:`HypergradientResult` (``gradient`` in the hyper's structure, ``direct``,
        ``indirect``, ``value``, ``converged``, ``num_matvecs``, ``solve``, ``grad_norm``).

    Raises:
        ValueError, TypeError: as :class:`ResponseJacobian`; also a V whose signature takes only
            some of the hyper names, or a non-scalar V.
        ConvergenceError: with ``strict=True`` when the adjoint solve does not converge.

    Example:
        >>> L = lambda w, lam: 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * lam * (w ** 2).sum()  # doctest: +SKIP
        >>> Vval = lambda w: 0.5 * ((Xv @ w - yv) ** 2).sum()                               # doctest: +SKIP
        >>> hypergradient(Vval, L, w_star, {"lam": torch.tensor(0.1)}).gradient["lam"]      # doctest: +SKIP
    """
    api = "hypergradient"
    if not callable(V):
        raise TypeError(f"{api}: expected a callable validation objective V(params[, **hyper]), "
                        f"got {type(V).__name__}.")
    J = ResponseJacobian(L, params, hyper, wrt=wrt, **options)
    pb = J.problem
    takes_hyper = _validation_takes_hyper(V, pb, api)
    fn = lambda w, h: _as_scalar(pb.call(V, w, h, with_hyper=takes_hyper), api)  # noqa: E731
    (gw, gh), value = grad_and_value(fn, argnums=(0, 1))(pb.w, pb.h)
    direct = _flat(gh, pb.layout_h)
    indirect = J.rmatmat_torch(_flat(gw, pb.layout_w))
    res = J.last_solve
    return HypergradientResult(
        gradient=pb.to_user(direct + indirect, "h"), direct=pb.to_user(direct, "h"),
        indirect=pb.to_user(indirect, "h"), value=float(value), converged=bool(res.converged),
        num_matvecs=int(res.num_matvecs), solve=res, grad_norm=J.grad_norm, stationarity=J.stationarity)
