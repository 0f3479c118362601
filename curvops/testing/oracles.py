r"""Naive dense oracles on the concatenated data, with torch.func; no code shared with curvops.

The parameters are flattened here (in ``named_parameters()`` order, or the dict order of a
plain function's parameters) and the whole-data loss is

.. math:: L(\theta) = \texttt{loss}(f_\theta(X), y)

with the loss's own reduction on *all* samples at once: for 'mean' this averages over every
loss element of the data set, which is the declared normalization (1/N) Σ_b n_b ℓ_b.
Every function returns a dense [P, P] float64 matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jacrev

from .zoo import Problem


def param_dict(problem: Problem) -> dict[str, Tensor]:
    """All differentiable parameters (trainable ones for a module), detached, in order."""
    if isinstance(problem.model, nn.Module):
        return {n: p.detach() for n, p in problem.model.named_parameters() if p.requires_grad}
    return {n: t.detach() for n, t in problem.params.items()}


def param_slices(problem: Problem) -> dict[str, slice]:
    """Where each parameter lives in the flat vector."""
    out, start = {}, 0
    for name, t in param_dict(problem).items():
        out[name] = slice(start, start + t.numel())
        start += t.numel()
    return out


def flat_params(problem: Problem) -> Tensor:
    return torch.cat([t.reshape(-1) for t in param_dict(problem).values()])


def _unflatten(problem: Problem, theta: Tensor) -> dict[str, Tensor]:
    ref = param_dict(problem)
    return {n: theta[s].reshape(ref[n].shape) for n, s in param_slices(problem).items()}


def forward(problem: Problem, theta: Tensor, x) -> Tensor:
    """f_θ(x) for a flat θ; the model's other tensors (frozen params, buffers) are constants."""
    p = _unflatten(problem, theta)
    model = problem.model
    if not isinstance(model, nn.Module):
        return model(p, x)
    consts = {n: t.detach() for n, t in model.named_parameters() if n not in p}
    consts.update({n: b for n, b in model.named_buffers()})
    if isinstance(x, dict):
        return functional_call(model, {**p, **consts}, (), x)
    return functional_call(model, {**p, **consts}, (x,))


def loss_fn(problem: Problem, out: Tensor, y: Tensor, reduction: str | None = None) -> Tensor:
    reduction = reduction or problem.reduction
    if problem.loss == "mse":
        return F.mse_loss(out, y, reduction=reduction)
    if problem.loss == "cross_entropy":
        return F.cross_entropy(out, y, reduction=reduction)
    return F.binary_cross_entropy_with_logits(out, y, reduction=reduction)


def total_loss(problem: Problem, theta: Tensor) -> Tensor:
    """L(θ) on the concatenated data."""
    return loss_fn(problem, forward(problem, theta, problem.X), problem.y)


def hessian_dense(problem: Problem) -> Tensor:
    """∇²L(θ) by forward-over-reverse differentiation of the whole-data loss."""
    return hessian(lambda th: total_loss(problem, th))(flat_params(problem))


def _jacobian_and_outputs(problem: Problem) -> tuple[Tensor, Tensor]:
    """J = ∂f(X)/∂θ as [N·m, P] (m outputs per sample) and the outputs f(X)."""
    theta = flat_params(problem)
    out = forward(problem, theta, problem.X)
    J = jacrev(lambda th: forward(problem, th, problem.X))(theta)
    return J.reshape(out.numel(), theta.numel()), out.detach()


def ggn_dense(problem: Problem) -> Tensor:
    """Jᵀ (∇²_f L) J with the loss Hessian in output space from autodiff."""
    J, out = _jacobian_and_outputs(problem)
    H_out = hessian(lambda o: loss_fn(problem, o.reshape(out.shape), problem.y))(out.reshape(-1))
    return J.T @ H_out @ J


def output_fisher(problem: Problem, out: Tensor) -> Tensor:
    """Closed-form E_ŷ[∇_f ℓ ∇_f ℓᵀ] of the summed loss, as a block-diagonal [N·m, N·m] matrix."""
    if problem.loss == "mse":  # ℓ = Σ (f - y)², y ~ N(f, I/2)
        return 2.0 * torch.eye(out.numel(), dtype=out.dtype)
    if problem.loss == "bce_with_logits":
        s = torch.sigmoid(out).reshape(-1)
        return torch.diag(s * (1 - s))
    p = torch.softmax(out, dim=1)  # [N, C]
    return torch.block_diag(*[torch.diag(pi) - torch.outer(pi, pi) for pi in p])


def fisher_dense(problem: Problem) -> Tensor:
    """Exact (type-2) Fisher, normalized like the loss: 1/(number of loss elements) for 'mean'."""
    J, out = _jacobian_and_outputs(problem)
    elements = out.numel() // (out.shape[1] if problem.loss == "cross_entropy" else 1)
    scale = 1.0 / elements if problem.reduction == "mean" else 1.0
    return scale * J.T @ output_fisher(problem, out) @ J


def empirical_fisher_dense(problem: Problem) -> Tensor:
    """(1/N) Σ_i ∇ℓ_i ∇ℓ_iᵀ ('mean') or Σ_i ('sum'), ℓ_i the loss of sample i alone."""
    theta = flat_params(problem)
    rows = []
    for i in range(problem.N):
        x_i, y_i = problem.slice_inputs(slice(i, i + 1)), problem.y[i:i + 1]
        rows.append(grad(lambda th: loss_fn(problem, forward(problem, th, x_i), y_i))(theta))
    G = torch.stack(rows)  # [N, P]
    F_emp = G.T @ G
    return F_emp / problem.N if problem.reduction == "mean" else F_emp


ORACLES = {
    "Hessian": hessian_dense,
    "GGN": ggn_dense,
    "Fisher": fisher_dense,
    "EmpiricalFisher": empirical_fisher_dense,
}


def per_sample_gradients(problem: Problem, g=None) -> Tensor:
    """G [N, P]: rows ∇g_i (per-sample loss, or ``g(outputs, targets) -> [N]``) by jacrev on the flat parameters."""
    theta = flat_params(problem)

    def values(th):
        out = forward(problem, th, problem.X)
        if g is not None:
            return g(out, problem.y)
        return torch.stack([loss_fn(problem, out[i:i + 1], problem.y[i:i + 1]) for i in range(problem.N)])

    return jacrev(values)(theta).detach()
