r"""Response Jacobians of an optimum by the implicit function theorem, matrix-free.

For an objective $L(w, \lambda)$ with parameters $w \in \mathbb{R}^P$ and hyperparameters
$\lambda \in \mathbb{R}^Q$ (a weight-decay coefficient, per-sample weights, the inputs
themselves, …), an optimum $w^*(\lambda)$ satisfies $\nabla_w L(w^*(\lambda), \lambda) = 0$.
Differentiating this identity in $\lambda$ (implicit function theorem; $H_{ww}$ invertible):

.. math::
    \frac{dw^*}{d\lambda} = -H_{ww}^{-1} M, \qquad
    H_{ww} = \nabla^2_{w} L \in \mathbb{R}^{P\times P}, \quad
    M = \frac{\partial^2 L}{\partial w\,\partial\lambda} \in \mathbb{R}^{P\times Q}.

Operators here:

* :class:`ParameterHessian` — $H_{ww}$ (forward-over-reverse HVPs, symmetric).
* :class:`MixedDerivative` — $M$ (forward-over-reverse product, reverse-over-reverse adjoint).
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

import inspect
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import grad, grad_and_value, jvp, vjp, vmap

from . import tags as _tags
from .base import Operator, ParamLayout

_PARAMS, _HYPER = "params", "hyper"
_STRATEGIES = ("auto", "vmap", "loop")
_METHODS = ("auto", "cg", "minres")


class StationarityWarning(UserWarning):
    """The point given to :class:`ResponseJacobian` is not (close to) stationary in w, so the
    implicit-function-theorem response describes it only approximately."""


# ---- the objective as a pure function of (w, λ) ----------------------------------------------
def _as_scalar(out: Any, api: str) -> Tensor:
    if not isinstance(out, Tensor):
        raise TypeError(f"{api}: expected the objective to return a scalar tensor, got {type(out).__name__}.")
    if out.numel() != 1:
        raise ValueError(
            f"{api}: expected the objective to return a scalar tensor, got shape {tuple(out.shape)}. "
            f"Reduce it (e.g. .sum() or .mean()) inside the objective.")
    return out.reshape(())


def _signature(fn: Callable) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):  # builtins and some C callables: nothing to check
        return None


def _accepts(sig: inspect.Signature, names: Sequence[str]) -> tuple[list[str], str | None, int]:
    """(names L does not accept as keywords, the name of its first positional, #positionals)."""
    P = inspect.Parameter
    ps = list(sig.parameters.values())
    positional = [p for p in ps if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)]
    n_pos = math.inf if any(p.kind == P.VAR_POSITIONAL for p in ps) else len(positional)
    first = positional[0].name if positional else None
    if any(p.kind == P.VAR_KEYWORD for p in ps):
        return [], first, n_pos
    keywords = {p.name for p in ps if p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY)} - {first}
    return [n for n in names if n not in keywords], first, n_pos


def _check_signature(L: Callable, hyper_kind: str, names: Sequence[str], api: str) -> None:
    """Raise before any evaluation when L cannot take the hyperparameters as promised."""
    sig = _signature(L)
    if sig is None:
        return
    missing, first, n_pos = _accepts(sig, names)
    if n_pos == 0:
        raise ValueError(f"{api}: expected the objective to take the parameters as its first positional "
                         f"argument, L(params, ...), got L{sig}.")
    if hyper_kind == "tensor":
        if n_pos < 2:
            raise ValueError(
                f"{api}: a tensor hyper is passed as the second positional argument L(params, hyper), but the "
                f"objective L{sig} takes one positional argument. Pass hyper as a dict {{name: tensor}} naming "
                f"keywords of L, or give L a second argument.")
        return
    if missing:
        raise ValueError(
            f"{api}: hyperparameter name(s) {missing} not in the objective's signature L{sig}; expected every key "
            f"of hyper to be a keyword argument of L (or L to take **kwargs). Rename the keys or add them to L.")
    if first in names:
        raise ValueError(f"{api}: hyper key {first!r} clashes with the objective's parameter argument in L{sig}; "
                         f"rename it.")
    P = inspect.Parameter
    required = [p.name for p in list(sig.parameters.values())[1:]
                if p.default is P.empty and p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY) and p.name not in names]
    if required:
        raise ValueError(f"{api}: the objective L{sig} requires argument(s) {required} that hyper does not supply; "
                         f"add them to hyper (use wrt= to keep them fixed) or give them defaults.")


def _params_dict(params: Any, api: str) -> tuple[str, dict[str, Tensor]]:
    """('dict' | 'tensor' | 'module', detached views {name: tensor} of the current values)."""
    if isinstance(params, nn.Module):
        named = {n: p for n, p in params.named_parameters() if p.requires_grad}
        if not named:
            raise ValueError(f"{api}: expected a module with trainable parameters, got none with requires_grad=True.")
        kind = "module"
    elif isinstance(params, Tensor):
        named, kind = {_PARAMS: params}, "tensor"
    elif isinstance(params, Mapping):
        if not params:
            raise ValueError(f"{api}: expected a non-empty parameter dict.")
        named, kind = dict(params), "dict"
    else:
        raise TypeError(f"{api}: expected params as a dict {{name: tensor}}, a tensor or an nn.Module, "
                        f"got {type(params).__name__}.")
    for n, t in named.items():
        if not isinstance(n, str):
            raise TypeError(f"{api}: expected string parameter names, got {n!r}.")
        if not isinstance(t, Tensor) or not t.is_floating_point():
            what = type(t).__name__ if not isinstance(t, Tensor) else f"dtype {t.dtype}"
            raise TypeError(f"{api}: expected floating tensors as parameters, got {what} for {n!r}.")
    dtypes = {t.dtype for t in named.values()}
    devices = {t.device for t in named.values()}
    if len(dtypes) > 1 or len(devices) > 1:
        raise TypeError(f"{api}: expected parameters of one dtype on one device, got dtypes "
                        f"{sorted(map(str, dtypes))} on {sorted(map(str, devices))}. Convert them first.")
    return kind, {n: t.detach() for n, t in named.items()}


class _Problem:
    """L(w, λ) as a pure function of two dicts, with the user's calling convention inside.

    ``w``: {name: tensor} (the parameters: re-read from the user's module, dict or tensor at every
    access, so operators follow later changes, contract rule 9); ``h``: {name: tensor} (the hyperparameters
    we differentiate in, copied); ``fixed``: the other hyperparameters, passed unchanged.
    """

    def __init__(self, L: Callable, params: Any, hyper: Any, wrt: Sequence[str] | str | None, api: str,
                 need_hyper: bool = True):
        if not callable(L):
            raise TypeError(f"{api}: expected a callable objective L(params, **hyper), got {type(L).__name__}.")
        if hyper is None:
            if need_hyper:
                raise TypeError(f"{api}: expected hyper as a dict {{name: tensor}} or a tensor, got None.")
            kind_h, names = "none", []
        elif isinstance(hyper, Tensor) or (not isinstance(hyper, Mapping) and isinstance(hyper, (int, float))):
            kind_h, names = "tensor", [_HYPER]
        elif isinstance(hyper, Mapping):
            if not hyper:
                raise ValueError(f"{api}: expected a non-empty hyper dict.")
            bad = [n for n in hyper if not isinstance(n, str)]
            if bad:
                raise TypeError(f"{api}: expected string hyper names, got {bad}.")
            kind_h, names = "dict", list(hyper)
        else:
            raise TypeError(f"{api}: expected hyper as a dict {{name: tensor}} or a tensor, "
                            f"got {type(hyper).__name__}.")
        # the signature check comes first: no evaluation happens before it
        _check_signature(L, kind_h, names, api)
        self.kind_w, w0 = _params_dict(params, api)
        self._source, self._w_names, self.layout_w = params, list(w0), None
        first = next(iter(w0.values()))
        self.dtype, self.device = first.dtype, first.device
        self.L, self.kind_h, self.api = L, kind_h, api
        hyper_d = {} if hyper is None else ({_HYPER: hyper} if kind_h == "tensor" else dict(hyper))
        if wrt is not None and kind_h != "dict":
            raise ValueError(f"{api}: wrt= selects names of a hyper dict; got wrt={wrt!r} with a {kind_h} hyper.")
        wrt = names if wrt is None else ([wrt] if isinstance(wrt, str) else list(wrt))
        unknown = [n for n in wrt if n not in hyper_d]
        if unknown or (need_hyper and not wrt):
            raise ValueError(f"{api}: expected wrt to name some of the hyper keys {names}, got {list(wrt)}.")
        self.h: dict[str, Tensor] = {}
        for n in wrt:
            v = hyper_d[n]
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                v = torch.tensor(float(v), dtype=self.dtype, device=self.device)
            if not isinstance(v, Tensor):
                raise TypeError(f"{api}: expected hyper[{n!r}] as a tensor or a number, got {type(v).__name__}.")
            if v.dtype != self.dtype or v.device != self.device:
                raise TypeError(f"{api}: expected hyper[{n!r}] of dtype {self.dtype} on {self.device} (as the "
                                f"parameters), got {v.dtype} on {v.device}. Convert it with .to().")
            self.h[n] = v.detach().clone()
        self.fixed = {n: v for n, v in hyper_d.items() if n not in self.h}
        self.layout_w, self.layout_h = _layout(w0), _layout(self.h)

    @property
    def w(self) -> dict[str, Tensor]:
        """The parameters' current values (detached views of the user's tensors)."""
        src = self._source
        if self.kind_w == "tensor":
            cur = {_PARAMS: src.detach()}
        else:
            named = dict(src.named_parameters()) if self.kind_w == "module" else src
            missing = [n for n in self._w_names if n not in named]
            if missing:
                raise ValueError(f"{self.api}: parameter(s) {missing} are gone from the params given at construction; "
                                 f"build a new operator.")
            cur = {n: named[n].detach() for n in self._w_names}
        if self.layout_w is not None:
            for n, shape in zip(self.layout_w.names, self.layout_w.shapes):
                t = cur[n]
                if t.shape != shape or t.dtype != self.dtype or t.device != self.device:
                    raise ValueError(f"{self.api}: parameter {n!r} changed shape, dtype or device since the operator "
                                     f"was built ({tuple(shape)} → {tuple(t.shape)}); build a new operator.")
        return cur

    # user-side layouts: parameter dicts in/out where the user gave dicts
    @property
    def user_layout_w(self) -> ParamLayout | None:
        return None if self.kind_w == "tensor" else self.layout_w

    @property
    def user_layout_h(self) -> ParamLayout | None:
        return self.layout_h if self.kind_h == "dict" else None

    def call(self, fn: Callable, w: dict, h: dict, with_hyper: bool = True) -> Any:
        wu = w[_PARAMS] if self.kind_w == "tensor" else w
        if self.kind_h == "none" or not with_hyper:
            return fn(wu)
        if self.kind_h == "tensor":
            return fn(wu, h[_HYPER])
        return fn(wu, **self.fixed, **h)

    def objective(self, w: dict, h: dict) -> Tensor:
        return _as_scalar(self.call(self.L, w, h), self.api)

    def grad_w(self, w: dict, h: dict) -> dict:
        return grad(self.objective, argnums=0)(w, h)

    def gradient_and_value(self) -> tuple[Tensor, float]:
        """(∇_w L flat [P], L) at the stored point: one reverse pass."""
        try:
            g, value = grad_and_value(self.objective, argnums=0)(self.w, self.h)
        except RuntimeError as err:
            raise RuntimeError(f"{self.api}: evaluating ∇_w L failed; the objective must be a pure torch function "
                               f"that torch.func can transform (no .item(), no in-place writes to inputs): "
                               f"{err}") from err
        return torch.cat([g[n].reshape(-1) for n in self.layout_w.names]), float(value)

    def to_user(self, flat: Tensor, side: str) -> Any:
        """Flat vector → the structure the user gave (dict, or tensor shaped like the original)."""
        layout, kind = (self.layout_h, self.kind_h) if side == "h" else (self.layout_w, self.kind_w)
        parts = layout.unflatten(flat, as_dict=True)
        return parts[_HYPER if side == "h" else _PARAMS] if kind == "tensor" else parts


def _layout(named: Mapping[str, Tensor]) -> ParamLayout:
    """The layout of a dict of tensors."""
    return ParamLayout(tuple(named), tuple(t.shape for t in named.values()))


def _split(V: Tensor, layout: ParamLayout) -> dict[str, Tensor]:
    """[N, K] → {name: [K, *shape]}."""
    K = V.shape[1]
    parts = torch.split(V, list(layout.numels), dim=0)
    return {n: p.T.reshape(K, *s) for n, p, s in zip(layout.names, parts, layout.shapes)}


def _join(D: dict[str, Tensor], layout: ParamLayout, K: int) -> Tensor:
    """{name: [K, *shape]} → [N, K]."""
    return torch.cat([D[n].reshape(K, -1) for n in layout.names], dim=1).T


def _flat(D: dict[str, Tensor], layout: ParamLayout) -> Tensor:
    return torch.cat([D[n].reshape(-1) for n in layout.names])


class _ObjectiveOperator(Operator):
    """Common machinery: the problem, and columns by vmap with a loop fallback."""

    def _setup(self, problem: _Problem, shape, tags, domain, range_, column_strategy: str) -> None:
        if column_strategy not in _STRATEGIES:
            raise ValueError(f"{type(self).__name__}: expected column_strategy in {_STRATEGIES}, "
                             f"got {column_strategy!r}.")
        Operator.__init__(self, shape, problem.dtype, problem.device, tags=tags, domain=domain, range=range_)
        self.problem = problem
        self.column_strategy = column_strategy
        self._vmap_ok = column_strategy != "loop"
        self.last_path: str | None = None

    def _check_torch(self, V: Tensor, n: int, api: str) -> None:
        if V.dim() in (1, 2) and V.shape[0] != n:  # name the side: w or λ
            adjoint = ".T @" in api  # products take λ, adjoint products w (the Hessian: w both ways)
            side = "parameters w" if (adjoint or isinstance(self, ParameterHessian)) else "hyperparameters λ"
            raise ValueError(f"{api}: expected a vector of length {n} ({side}), got shape {tuple(V.shape)}.")
        super()._check_torch(V, n, api)

    def _columns(self, fn: Callable[[dict], dict], X: dict[str, Tensor], K: int) -> dict[str, Tensor]:
        """Apply ``fn`` (one column as a dict → a dict) to K columns ``{name: [K, ...]}``."""
        if K > 1 and self._vmap_ok:
            try:
                out = vmap(fn)(X)
                self.last_path = "vmap"
                return out
            except (RuntimeError, NotImplementedError):
                if self.column_strategy == "vmap":
                    raise
                self._vmap_ok = False  # an operation without a batching rule: loop from now on
        cols = [fn({n: x[k] for n, x in X.items()}) for k in range(K)]
        self.last_path = "loop" if K > 1 else "single"
        return {n: torch.stack([c[n] for c in cols]) for n in cols[0]}


class ParameterHessian(_ObjectiveOperator):
    r"""The Hessian of an objective in its parameters, $H_{ww} = \nabla^2_w L(w, \lambda)$, matrix-free.

    .. math:: H_{ww} v = \frac{d}{dt}\,\nabla_w L(w + t v, \lambda)\Big|_{t=0}

    **Cost**: per column one forward-over-reverse HVP (``torch.func.jvp`` of ``grad``), the
    columns vmapped (``column_strategy="auto"``: vmap, falling back to a loop for an operation
    without a batching rule; ``last_path`` says which ran).  Construction evaluates nothing.

    **Tags**: symmetric.

    Args:
        L: objective ``L(params, **hyper) -> scalar`` (see the module docstring).
        params: dict ``{name: tensor}``, a tensor, or an ``nn.Module`` (its trainable parameters).
        hyper: dict ``{name: tensor}`` of keywords of L, a tensor passed as ``L(params, hyper)``,
            or None for ``L(params)``; held fixed.
        column_strategy: ``"auto"``, ``"vmap"`` or ``"loop"``.

    Raises:
        ValueError: hyper names not in L's signature, a non-scalar L (at the first product).
        TypeError: params or hyper of the wrong kind or dtype.

    Example:
        >>> L = lambda w, lam: (w ** 4).sum() + lam * (w ** 2).sum()  # doctest: +SKIP
        >>> H = ParameterHessian(L, w, {"lam": lam})                  # doctest: +SKIP
        >>> H @ v                                                                                   # doctest: +SKIP
    """

    def __init__(self, L: Callable, params: Any, hyper: Any = None, *, column_strategy: str = "auto"):
        problem = _Problem(L, params, hyper, None, "ParameterHessian", need_hyper=False)
        self._init(problem, column_strategy)

    @classmethod
    def _of(cls, problem: _Problem, column_strategy: str) -> "ParameterHessian":
        self = cls.__new__(cls)
        self._init(problem, column_strategy)
        return self

    def _init(self, problem: _Problem, column_strategy: str) -> None:
        P = problem.layout_w.size
        lay = problem.user_layout_w
        self._setup(problem, (P, P), (_tags.SYMMETRIC,), lay, lay, column_strategy)

    def _matmat_torch(self, V: Tensor) -> Tensor:
        pb, K = self.problem, V.shape[1]
        g = lambda w: pb.grad_w(w, pb.h)  # noqa: E731
        out = self._columns(lambda v: jvp(g, (pb.w,), (v,))[1], _split(V, pb.layout_w), K)
        return _join(out, pb.layout_w, K)


class MixedDerivative(_ObjectiveOperator):
    r"""The mixed second derivative $M = \partial^2 L / \partial w\,\partial\lambda \in \mathbb{R}^{P\times Q}$.

    .. math::
        M v = \frac{d}{dt}\,\nabla_w L(w, \lambda + t v)\Big|_{t=0}, \qquad
        M^\top u = \nabla_\lambda \big\langle \nabla_w L(w, \lambda),\, u \big\rangle

    **Cost**: a product is one forward-over-reverse JVP per column (``jvp`` in λ of
    ``grad`` in w); an adjoint product one reverse pass through ∇_w L (a VJP, recorded once
    per call) plus one VJP per column.  Columns are vmapped, with a loop fallback
    (``column_strategy``).  Construction evaluates nothing.

    **Tags**: none (rectangular).  Domain: the hyper dict's layout (when hyper is a dict);
    range: the parameters' layout (dict or module parameters), so dicts go in and come out.

    Args:
        L: objective ``L(params, **hyper) -> scalar``.
        params: dict ``{name: tensor}``, a tensor, or an ``nn.Module``.
        hyper: dict ``{name: tensor or number}`` of keywords of L, or a tensor passed as
            ``L(params, hyper)``; flat vectors on the λ side follow the dict's order.
        wrt: the hyper names to differentiate in (default: all); the others are passed fixed.
        column_strategy: ``"auto"``, ``"vmap"`` or ``"loop"``.

    Raises:
        ValueError: hyper names not in L's signature (before any evaluation); unknown ``wrt``;
            a non-scalar L (at the first product).
        TypeError: params or hyper of the wrong kind, dtype or device.

    Example:
        >>> L = lambda w, lam: 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * lam * (w ** 2).sum()  # doctest: +SKIP
        >>> M = MixedDerivative(L, w, {"lam": torch.tensor(0.1)})                          # doctest: +SKIP
        >>> M @ torch.ones(1)            # = w                                              # doctest: +SKIP
    """

    def __init__(self, L: Callable, params: Any, hyper: Any, *, wrt: Sequence[str] | str | None = None,
                 column_strategy: str = "auto"):
        problem = _Problem(L, params, hyper, wrt, "MixedDerivative")
        self._init(problem, column_strategy)

    @classmethod
    def _of(cls, problem: _Problem, column_strategy: str) -> "MixedDerivative":
        self = cls.__new__(cls)
        self._init(problem, column_strategy)
        return self

    def _init(self, problem: _Problem, column_strategy: str) -> None:
        shape = (problem.layout_w.size, problem.layout_h.size)
        self._setup(problem, shape, (), problem.user_layout_h, problem.user_layout_w, column_strategy)

    def _gw_of_h(self) -> Callable[[dict], dict]:
        pb = self.problem
        return lambda h: pb.grad_w(pb.w, h)

    def _matmat_torch(self, V: Tensor) -> Tensor:  # [Q, K] -> [P, K]
        pb, K, g = self.problem, V.shape[1], self._gw_of_h()
        out = self._columns(lambda v: jvp(g, (pb.h,), (v,))[1], _split(V, pb.layout_h), K)
        # torch.func's jvp promotes `python float * 0-dim float32` tangents to float64: back to ours
        return _join(out, pb.layout_w, K).to(self.torch_dtype)

    def _rmatmat_torch(self, W: Tensor) -> Tensor:  # [P, K] -> [Q, K]
        pb, K = self.problem, W.shape[1]
        _, vjp_fn = vjp(self._gw_of_h(), pb.h)
        out = self._columns(lambda u: vjp_fn(u)[0], _split(W, pb.layout_w), K)
        return _join(out, pb.layout_h, K).to(self.torch_dtype)


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
        from ..linalg.solve import ConvergenceError, ConvergenceWarning, solve  # linalg builds on operators

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
