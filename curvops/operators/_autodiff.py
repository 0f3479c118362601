r"""Forward- and reverse-mode products with exact fallbacks (contract rule 10).

The fast kernels use ``torch.func`` (``vjp``, ``jvp``, ``vmap``).  Two kinds of models break them:

* layers without a forward-mode formula (fused kernels, custom ``autograd.Function``\ s without
  ``jvp``): forward mode fails, and ``J v`` is computed instead by the **double-VJP trick**,
  ``J v = ∂/∂u ⟨Jᵀ u, v⟩`` — two reverse passes, exact;
* legacy ``autograd.Function``\ s (``forward(ctx, …)`` without ``setup_context``), which every
  ``torch.func`` transform refuses: then everything runs on plain ``torch.autograd`` (the double-VJP
  trick for ``J v``, ``torch.autograd.grad`` column by column for ``Jᵀ u``).

The choice is made once per objective (per model) on the first failure and remembered in
``objective.autodiff`` (``"functorch"`` and ``"forward_mode"``: ``True`` / ``False`` / ``None`` =
not tried yet); operators report the path that ran in ``last_path``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor


def _modes(objective) -> dict:
    modes = getattr(objective, "autodiff", None)
    if modes is None:
        modes = objective.autodiff = {"functorch": None, "forward_mode": None}
    return modes


def refuses_functorch(err: BaseException) -> bool:
    """Whether a torch.func transform refused the model (a legacy autograd.Function inside)."""
    return isinstance(err, RuntimeError) and "setup_context" in str(err)


def lacks_forward_mode(err: BaseException) -> bool:
    """Whether forward-mode AD is missing for some operation of the model."""
    if isinstance(err, NotImplementedError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("forward AD" in text or "jvp" in text or "forward-mode" in text
                                              or "setup_context" in text)


def functorch_ok(objective) -> bool:
    return _modes(objective)["functorch"] is not False


def forward_ok(objective) -> bool:
    return _modes(objective)["forward_mode"] is not False


def note(objective, key: str, value: bool) -> None:
    _modes(objective)[key] = value


class Pullback:
    """``Jᵀ u`` of ``f`` at ``primals``: torch.func's vjp, or plain autograd on a recorded graph."""

    def __init__(self, objective, f: Callable, primals: Sequence[Tensor]):
        self.objective, self.f = objective, f
        self.functorch = functorch_ok(objective)
        if self.functorch:
            try:
                self.out, self._fn = torch.func.vjp(f, *primals)
                note(objective, "functorch", True)
                return
            except RuntimeError as err:
                if not refuses_functorch(err):
                    raise
                note(objective, "functorch", False)
                self.functorch = False
        self._primals = [p.detach().requires_grad_() for p in primals]
        with torch.enable_grad():
            self._out = f(*self._primals)
        self.out = self._out.detach()

    def __call__(self, u: Tensor) -> tuple[Tensor, ...]:
        if self.functorch:
            return self._fn(u)
        if not self._out.requires_grad:
            return tuple(torch.zeros_like(p) for p in self._primals)
        grads = torch.autograd.grad(self._out, self._primals, u, retain_graph=True, allow_unused=True)
        return tuple(torch.zeros_like(p) if g is None else g for g, p in zip(grads, self._primals))

    def columns(self, U: Tensor) -> list[Tensor]:
        """``Jᵀ U`` for K stacked cotangents ``U [K, *out]`` → per primal ``[K, *shape]``."""
        if U.shape[0] == 1:
            return [r[None] for r in self(U[0])]
        if self.functorch:
            try:
                return list(torch.func.vmap(self._fn)(U))
            except RuntimeError as err:  # an op without a vmap rule: one column at a time
                if "vmap" not in str(err):
                    raise
        cols = [self(U[k]) for k in range(U.shape[0])]
        return [torch.stack(parts) for parts in zip(*cols)]


def jvp_columns(objective, f: Callable, primals: Sequence[Tensor], tangents: Sequence[Tensor]) -> tuple[Tensor, str]:
    """``J V`` for K stacked tangents (per primal ``[K, *shape]``) → (``[K, *out]``, the path that ran)."""
    K = tangents[0].shape[0]
    if functorch_ok(objective) and forward_ok(objective):
        try:
            if K == 1:
                res = torch.func.jvp(f, tuple(primals), tuple(t[0] for t in tangents))[1][None]
            else:
                res = torch.func.vmap(lambda *t: torch.func.jvp(f, tuple(primals), t)[1])(*tangents)
            note(objective, "forward_mode", True)
            return res, "forward-mode (torch.func.jvp)"
        except (RuntimeError, NotImplementedError) as err:
            # no forward-mode formula, no vmap rule, or a legacy Function: the reverse-mode path
            # below is exact (a genuine error of the model raises again there)
            note(objective, "functorch" if refuses_functorch(err) else "forward_mode", False)
    return jvp_by_double_vjp(f, primals, tangents), "double-VJP (reverse mode twice, torch.autograd)"


def jvp_by_double_vjp(f: Callable, primals: Sequence[Tensor], tangents: Sequence[Tensor]) -> Tensor:
    """J V = ∂/∂u ⟨Jᵀu, V⟩: a VJP with a dummy cotangent u, then a VJP of that w.r.t. u, per column."""
    th = [t.detach().requires_grad_() for t in primals]
    with torch.enable_grad():
        out = f(*th)
        if not out.requires_grad:
            return out.new_zeros(tangents[0].shape[0], *out.shape)
        u = torch.zeros_like(out, requires_grad=True)
        g = torch.autograd.grad(out, th, u, create_graph=True, allow_unused=True)
        pairs = [(gi, v) for gi, v in zip(g, tangents) if gi is not None and gi.requires_grad]
        cols = []
        for k in range(tangents[0].shape[0]):
            jv = None
            if pairs:
                (jv,) = torch.autograd.grad([p[0] for p in pairs], u, [p[1][k] for p in pairs],
                                            retain_graph=True, allow_unused=True)
            cols.append(torch.zeros_like(out) if jv is None else jv)
    return torch.stack(cols).detach()
