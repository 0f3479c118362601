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


def random_cotangent(out: Tensor) -> Tensor:
    """A fixed random cotangent like ``out`` (its own generator: the global RNG is left alone).

    The double-VJP trick works at any cotangent ``u`` (``Jᵀu`` is linear in it); a nonzero one lets
    :func:`check_double_vjp` see a backward that is not recorded (its gradients are then nonzero
    yet do not depend on ``u``)."""
    gen = torch.Generator(device=out.device).manual_seed(0)
    return torch.randn(out.shape, generator=gen, dtype=out.dtype, device=out.device).requires_grad_()


def reaches(roots: Sequence[Tensor], leaf: Tensor) -> list[bool]:
    """Whether the autograd graph of each root reaches ``leaf`` (a leaf that requires grad)."""
    target = torch.autograd.graph.get_gradient_edge(leaf).node
    parents: dict = {}
    seen, stack = set(), [r.grad_fn for r in roots if r.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            if child is not None:
                parents.setdefault(child, []).append(node)
                stack.append(child)
    good, stack = set(), [target] if target in seen else []
    while stack:
        node = stack.pop()
        if node in good:
            continue
        good.add(node)
        stack.extend(parents.get(node, []))
    return [r.grad_fn in good for r in roots]


def check_double_vjp(grads: Sequence[Tensor], u: Tensor) -> None:
    """Raise when a gradient ``Jᵢᵀu`` is nonzero but its graph does not reach ``u``: some layer's
    backward was not recorded (``once_differentiable``), so the double-VJP trick would drop its terms."""
    ok = reaches(grads, u)
    for g, good in zip(grads, ok):
        if not good and bool((g != 0).any()):
            raise RuntimeError(
                "double-VJP: a layer's backward is not differentiable (e.g. an autograd.Function marked "
                "once_differentiable), so J v can't be computed by reverse mode twice; give that Function "
                "a forward-mode formula (a jvp staticmethod) or a differentiable backward."
            )


def jvp_by_double_vjp(f: Callable, primals: Sequence[Tensor], tangents: Sequence[Tensor]) -> Tensor:
    """J V = ∂/∂u ⟨Jᵀu, V⟩: a VJP with a cotangent u, then a VJP of that w.r.t. u, per column."""
    th = [t.detach().requires_grad_() for t in primals]
    with torch.enable_grad():
        out = f(*th)
        if not out.requires_grad:
            return out.new_zeros(tangents[0].shape[0], *out.shape)
        u = random_cotangent(out)
        g = torch.autograd.grad(out, th, u, create_graph=True, allow_unused=True)
        check_double_vjp([gi for gi in g if gi is not None], u)
        pairs = [(gi, v) for gi, v in zip(g, tangents) if gi is not None and gi.requires_grad]
        cols = []
        for k in range(tangents[0].shape[0]):
            jv = None
            if pairs:
                (jv,) = torch.autograd.grad([p[0] for p in pairs], u, [p[1][k] for p in pairs],
                                            retain_graph=True, allow_unused=True)
            cols.append(torch.zeros_like(out) if jv is None else jv)
    return torch.stack(cols).detach()
