r"""The bilevel objective ``L(params, **hyper)`` as pure functions of two dicts, and the machinery
shared by its derivative operators (:mod:`curvops.operators.mixed`) and the response Jacobian
(:mod:`curvops.analysis.response`).

Calling convention: ``L(params, **hyper) -> scalar tensor``, where ``params`` is what the user
passed — a dict ``{name: tensor}``, a single tensor, or an ``nn.Module`` (then L receives a dict
of its trainable parameters and typically calls ``torch.func.functional_call``); ``hyper`` is a
dict ``{name: tensor}`` whose names are keywords of L, or one tensor passed positionally as
``L(params, hyper)``.  Products use the parameters' values at the moment of the product (later
changes to the model or the tensors are followed); the differentiated hyperparameters λ are copied
at construction (they are where the derivative is taken); the module itself is never touched.  L
must be a pure torch function that ``torch.func`` can transform (no ``.item()``, no in-place
writes to its inputs).
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import grad, grad_and_value, vmap

from .base import Operator, ParamLayout

_PARAMS, _HYPER = "params", "hyper"
_STRATEGIES = ("auto", "vmap", "loop")


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

    _square_in_w = False  # True for H_ww: parameters w on both sides

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
            side = "parameters w" if (adjoint or self._square_in_w) else "hyperparameters λ"
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
