r"""The generalized Gauss-Newton matrix $G = J^\top H_\ell J$."""

from __future__ import annotations

import torch
from torch import Tensor

from .._losses import kept_targets
from ..objective import Batch
from . import tags as _tags
from ._curvature import compiled_product, make_objective
from ._output_graphs import OutputSpaceOperator
from .fisher import _Likelihood


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


class GGN(OutputSpaceOperator):
    r"""Generalized Gauss-Newton matrix, normalized like the loss.

    .. math:: G = \frac{1}{W}\sum_b w_b\, J_b^\top \big(\nabla^2_f \ell_b\big) J_b,\qquad
        J_b = \partial f(X_b)/\partial\theta,\qquad W = \sum_b w_b

    where ``ℓ_b`` is the user's loss on batch ``b`` exactly as torch reduces it, and ``w_b`` the
    batch's weight in the whole-data loss (defined in :class:`~curvops.Objective`): for a 'mean'
    loss ``w_b = d_b``, what the batch mean divides by (elements for MSE/BCE, non-ignored targets
    or their class weights for cross-entropy, samples for a callable); for a 'sum' loss ``w_b = 1``
    and there is no ``1/W``.  So ``G`` is the GGN of torch's loss on the concatenated data, for any
    batch split (docs/conventions.md).  The loss Hessian in output space is taken in closed form for
    MSE, BCE-with-logits and cross-entropy without class weights or label smoothing (2I, s(1−s),
    diag(p) − ppᵀ per position, ignored targets masked), and from autodiff of the user's loss
    otherwise, so any twice-differentiable loss works.

    **Cost**: with kept graphs (``keep_graphs``, by default ``"auto"``: as for
    :class:`~curvops.Hessian`, within ``max_graph_bytes``, by default 25 % of the available
    memory) the first product records per batch the forward and the graph of ``Jᵀu``; every
    product then costs per batch one reverse pass for ``J V`` (the double-VJP trick on the kept
    graph) and one for ``Jᵀ``, batched over the columns of a block — about one gradient on an MLP.
    Without kept graphs, per batch one forward + one VJP graph, one forward-mode product per column
    (vmapped over the columns of a block) and one VJP per column (vmapped).  The kept graphs are
    dropped whenever the model's parameters or buffers change (checked by value before every
    product) or with :meth:`clear_cache`.

    **Tags**: symmetric, psd (PSD holds for losses convex in the outputs: MSE, cross-entropy,
    BCE-with-logits, …; pass ``convex_loss=False`` for a loss that is not).

    Args:
        model_or_objective: an :class:`~curvops.Objective`, or a model followed by ``loss`` and ``data``.
        convex_loss: whether the loss is convex in the outputs (sets the ``psd`` tag).
        keep_graphs: ``"auto"``, ``True`` or ``False``: keep per-batch graphs between products.
        max_graph_bytes: memory budget of the kept graphs in bytes (None: 25 % of the available memory).
        max_columns: columns processed together per batch (memory ∝ max_columns · P).
        **kwargs: passed to :class:`~curvops.Objective` (``params=``, ``batch_size=``, …).

    Example:
        >>> import torch, curvops
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
        >>> X, y = torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 2, (16,))
        >>> G = curvops.GGN(model, "cross_entropy", (X, y), batch_size=8)
        >>> G.shape, G.is_psd
        ((26, 26), True)
        >>> F = curvops.Fisher(model, "cross_entropy", (X, y))   # exact Fisher = GGN for cross-entropy
        >>> torch.allclose(G.to_dense(), F.to_dense())
        True
    """

    def __init__(self, model_or_objective, loss=None, data=None, *, convex_loss: bool = True,
                 max_columns: int = 64, keep_graphs: bool | str = "auto", max_graph_bytes: int | None = None,
                 **kwargs):
        objective = make_objective(model_or_objective, loss, data, **kwargs)
        tags = (_tags.PSD,) if convex_loss else (_tags.SYMMETRIC,)
        super().__init__(objective, tags=tags, max_columns=max_columns, keep_graphs=keep_graphs,
                         max_graph_bytes=max_graph_bytes)
        # MSE, BCE-with-logits and cross-entropy without class weights or label smoothing: the loss
        # Hessian in closed form (2I; s(1−s); diag(p) − ppᵀ per position), the same as the exact
        # Fisher's — a few elementwise passes over the outputs instead of a double backward through
        # the loss (which dominates for a 50k-token vocabulary). Any other loss: autodiff.
        try:
            self._closed = _Likelihood(objective)
        except ValueError:
            self._closed = None
        self._path_suffix = ", closed-form loss Hessian" if self._closed is not None else ""

    def _matmat_torch(self, V: Tensor) -> Tensor:
        out = compiled_product(self, "ggn", V)
        return out if out is not None else super()._matmat_torch(V)

    def _apply_closed(self, batch: Batch, out: Tensor, JV: Tensor) -> Tensor:
        obj, lik = self.objective, self._closed
        keep = kept_targets(obj.loss_kind, obj.loss_module, batch.y)  # ignore_index: those terms drop out
        if keep is not None:
            keep = keep.unsqueeze(1).to(out.dtype)
            JV = JV * keep
        M = lik.scale(obj, batch) * lik.expected_hessian(out, JV)
        return M if keep is None else M * keep

    def _apply_M(self, batch: Batch, out: Tensor, JV: Tensor) -> Tensor:
        if self._closed is not None:
            return self._apply_closed(batch, out, JV)
        return loss_hessian_apply(self.objective, batch, out, JV)
