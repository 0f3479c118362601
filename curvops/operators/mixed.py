r"""Derivative operators of a bilevel objective ``L(w, λ)`` (see :mod:`curvops.operators._bilevel`
for the calling convention):

* :class:`ParameterHessian` — $H_{ww} = \nabla^2_w L$ (forward-over-reverse HVPs, symmetric);
* :class:`MixedDerivative` — $M = \partial^2 L / \partial w\,\partial\lambda$ (forward-over-reverse
  product, reverse-over-reverse adjoint).

They are the two pieces of the response Jacobian $dw^*/d\lambda = -H_{ww}^{-1} M$
(:class:`curvops.analysis.response.ResponseJacobian`, which adds the solver).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from torch import Tensor
from torch.func import jvp, vjp

from . import tags as _tags
from ._bilevel import _join, _ObjectiveOperator, _Problem, _split


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

    _square_in_w = True

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
