r"""Dense float64 oracles by plain reverse-mode autograd, row by row; no code shared with curvops.

Every matrix here is built from :func:`torch.autograd.grad` alone, one row at a time, on the
concatenated data:

* a Jacobian ``∂ vec y(x) / ∂ x``: one backward per output entry (:func:`jacobian`);
* a Hessian ``∇² s(x)``: ``g = ∇s`` with ``create_graph=True``, then one backward of
  ``g · e_i`` per row (:func:`hessian`; reverse-over-reverse);
* a mixed block ``∂² s / ∂a ∂b``: ``g_a = ∂s/∂a`` recorded, then one backward in ``b`` per
  row (:func:`mixed`);
* the GGN ``Jᵀ H_ℓ J`` from an explicit Jacobian and the loss Hessian in output space
  (:func:`ggn`), per-sample gradients (:func:`per_sample_gradients`), and the response
  Jacobian ``−H_ww⁻¹ ∂²L/∂w∂λ`` by a dense solve (:func:`response_jacobian`).

``torch.func.hessian`` (forward-over-reverse) is deliberately not used: in torch 2.13 it is
wrong through LayerNorm.  The attention kernels run on the MATH SDPA backend here, the only
one with double-backward formulas.  These helpers are slow (one backward per row) and meant
for models with at most a few hundred parameters.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = [
    "ModuleFunction", "derivative_mode", "jacobian", "hessian", "mixed", "ggn", "per_sample_gradients",
    "second_moment", "response_jacobian",
]


@contextlib.contextmanager
def derivative_mode():
    """Grad on, inference mode and autocast off, attention on the MATH backend (double backward)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(torch.autocast("cpu", enabled=False))
        stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        yield


def _fresh(x: Tensor) -> Tensor:
    return x.detach().clone().requires_grad_(True)


def jacobian(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``∂ vec fn(x) / ∂ vec x`` as [fn(x).numel(), x.numel()], one backward per row."""
    with derivative_mode():
        x = _fresh(x)
        y = fn(x).reshape(-1)
        rows = []
        for i in range(y.numel()):
            if not y.requires_grad:
                rows.append(torch.zeros(x.numel(), dtype=x.dtype))
                continue
            (r,) = torch.autograd.grad(y[i], x, retain_graph=True, allow_unused=True)
            rows.append(torch.zeros(x.numel(), dtype=x.dtype) if r is None else r.reshape(-1))
        return torch.stack(rows).detach()


def mixed(fn: Callable[[Tensor, Tensor], Tensor], a: Tensor, b: Tensor) -> Tensor:
    """``∂² fn(a, b) / ∂a ∂b`` as [a.numel(), b.numel()] (reverse-over-reverse, row by row)."""
    with derivative_mode():
        a, b = _fresh(a), _fresh(b)
        s = fn(a, b)
        (g,) = torch.autograd.grad(s, a, create_graph=True, allow_unused=True)
        zeros = torch.zeros(b.numel(), dtype=b.dtype)
        if g is None or not g.requires_grad:
            return torch.zeros(a.numel(), b.numel(), dtype=a.dtype)
        g = g.reshape(-1)
        rows = []
        for i in range(g.numel()):  # one backward of g · e_i per row
            (r,) = torch.autograd.grad(g[i], b, retain_graph=True, allow_unused=True)
            rows.append(zeros if r is None else r.reshape(-1))
        return torch.stack(rows).detach()


def hessian(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``∇² fn(x)`` as [x.numel(), x.numel()]: one gradient with ``create_graph``, one backward per row."""
    with derivative_mode():
        x = _fresh(x)
        (g,) = torch.autograd.grad(fn(x), x, create_graph=True, allow_unused=True)
        if g is None or not g.requires_grad:
            return torch.zeros(x.numel(), x.numel(), dtype=x.dtype)
        g = g.reshape(-1)
        rows = []
        for i in range(g.numel()):
            (r,) = torch.autograd.grad(g[i], x, retain_graph=True, allow_unused=True)
            rows.append(torch.zeros(x.numel(), dtype=x.dtype) if r is None else r.reshape(-1))
        return torch.stack(rows).detach()


def ggn(out_fn: Callable[[Tensor], Tensor], loss_fn: Callable[[Tensor], Tensor], theta: Tensor
        ) -> tuple[Tensor, Tensor, Tensor]:
    """``(Jᵀ H_ℓ J, J, H_ℓ)``: J = ∂ vec out_fn(θ)/∂θ, H_ℓ = ∇²_f loss_fn(f) at f = out_fn(θ)."""
    J = jacobian(out_fn, theta)
    with derivative_mode():
        out = out_fn(theta.detach()).detach()
    H_out = hessian(lambda f: loss_fn(f.reshape(out.shape)), out.reshape(-1))
    return J.T @ H_out @ J, J, H_out


def per_sample_gradients(sample_loss: Callable[[Tensor, int], Tensor], theta: Tensor, n: int) -> Tensor:
    """Rows ``∇_θ sample_loss(θ, i)`` for i < n, as [n, P] (one backward each)."""
    rows = []
    with derivative_mode():
        for i in range(n):
            th = _fresh(theta)
            (g,) = torch.autograd.grad(sample_loss(th, i), th, allow_unused=True)
            rows.append(torch.zeros_like(theta) if g is None else g.reshape(-1))
    return torch.stack(rows).detach()


def second_moment(G: Tensor, center: bool = False) -> Tensor:
    """``(1/N) Σ_i g_i g_iᵀ`` of the rows of G, or the covariance ``(1/N) Σ (g_i − μ)(g_i − μ)ᵀ``."""
    if center:
        G = G - G.mean(0, keepdim=True)
    return G.T @ G / G.shape[0]


def response_jacobian(L: Callable[[Tensor, Tensor], Tensor], w: Tensor, h: Tensor) -> Tensor:
    """``−H_ww⁻¹ ∂²L/∂w∂λ`` [P, Q] for ``L(w_flat, λ_flat)``, by a dense solve."""
    H = hessian(lambda x: L(x, h.detach()), w)
    M = mixed(L, w, h)
    return -torch.linalg.solve(H, M)


class ModuleFunction:
    """``f(θ_flat, x)`` of an ``nn.Module`` at its *current* state, by :func:`functional_call`.

    θ is the concatenation of the chosen parameters (``named_parameters()`` order); the other
    parameters and every buffer are copied now and held fixed.  ``module=`` runs a submodule
    whose parameter names are the same as the model's (e.g. ``nn.Sequential(*model[:k])``).
    """

    def __init__(self, model: nn.Module, names: Sequence[str] | None = None):
        named = dict(model.named_parameters())
        self.model = model
        self.names = list(named) if names is None else list(names)
        self.shapes = [named[n].shape for n in self.names]
        self.numels = [named[n].numel() for n in self.names]
        self.theta = torch.cat([named[n].detach().reshape(-1) for n in self.names]).clone()
        self.consts = {n: p.detach().clone() for n, p in named.items() if n not in self.names}
        self.consts.update({n: b.detach().clone() for n, b in model.named_buffers()})

    def offsets(self) -> dict[str, slice]:
        out, start = {}, 0
        for n, k in zip(self.names, self.numels):
            out[n] = slice(start, start + k)
            start += k
        return out

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        parts = torch.split(theta, self.numels)
        return {n: p.reshape(s) for n, p, s in zip(self.names, parts, self.shapes)}

    def __call__(self, theta: Tensor, x, module: nn.Module | None = None) -> Tensor:
        module = self.model if module is None else module
        state = {**self.unflatten(theta), **self.consts}
        keys = {n for n, _ in module.named_parameters()} | {n for n, _ in module.named_buffers()}
        return functional_call(module, {k: v for k, v in state.items() if k in keys}, (x,))
