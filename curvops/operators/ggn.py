r"""The generalized Gauss-Newton matrix $G = J^\top H_\ell J$."""

from __future__ import annotations

import torch
from torch import Tensor

from ..objective import Batch
from . import tags as _tags
from ._curvature import CurvatureOperator, make_objective, output_space


def loss_hessian_apply(objective, batch: Batch, out: Tensor, T: Tensor) -> Tensor:
    """``∇²_f ℓ_b(f) · T`` for a block T [K, *out.shape], by autodiff of the user's loss."""
    o = out.detach().requires_grad_()
    with torch.enable_grad():
        value = objective.loss(o, batch.y, batch.index)
        (g,) = torch.autograd.grad(value, o, create_graph=True)
    if not g.requires_grad:  # loss linear in the outputs: zero Hessian
        return torch.zeros_like(T)
    K = T.shape[0]
    if K == 1:
        (h,) = torch.autograd.grad(g, o, T[0], allow_unused=True)
        return torch.zeros_like(T) if h is None else h[None]
    (h,) = torch.autograd.grad(g, o, T, is_grads_batched=True, allow_unused=True)
    return torch.zeros_like(T) if h is None else h


class GGN(CurvatureOperator):
    r"""Generalized Gauss-Newton matrix, normalized like the loss.

    .. math:: G = \sum_b w_b\, J_b^\top \big(\nabla^2_f \ell_b\big) J_b,\qquad J_b = \partial f(X_b)/\partial\theta

    with the whole-data weights ``w_b`` of :class:`~curvops.Objective`.  The loss Hessian in
    output space comes from autodiff of the user's loss, so any twice-differentiable loss works.

    **Cost**: per batch one forward + one VJP graph, one forward-mode product per column
    (vmapped over the columns of a block) and one VJP per column (vmapped).

    **Tags**: symmetric, psd (PSD holds for losses convex in the outputs: MSE, cross-entropy,
    BCE-with-logits, …; pass ``convex_loss=False`` for a loss that is not).
    """

    def __init__(self, model_or_objective, loss=None, data=None, *, convex_loss: bool = True,
                 max_columns: int = 64, **kwargs):
        objective = make_objective(model_or_objective, loss, data, **kwargs)
        tags = (_tags.PSD,) if convex_loss else (_tags.SYMMETRIC,)
        super().__init__(objective, tags=tags, max_columns=max_columns)

    def _batch_matmat(self, batch: Batch, Vs: list[Tensor], state=None) -> list[Tensor]:
        obj = self.objective
        path: list[str] = []
        res = output_space(obj, batch, obj.theta(), Vs,
                           lambda out, JV: loss_hessian_apply(obj, batch, out, JV), path)
        self.last_path = path[-1]
        return res
