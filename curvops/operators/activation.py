r"""Second derivatives of the loss with respect to layer activations (and cross-layer blocks)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..objective import Objective
from . import tags as _tags
from ._curvature import make_objective
from ._taps import resolve_modules, tapped
from .base import Operator


class ActivationHessian(Operator):
    r"""Hessian of the whole-data loss with respect to one layer's activations, or a cross block.

    .. math:: H_{ab} = \frac{\partial^2 L}{\partial F^{(a)}\, \partial F^{(b)}}
        \in \mathbb{R}^{(N A) \times (N B)}

    where ``F^(a)`` is the output of module ``layer`` and ``F^(b)`` of module ``layer2``
    (default: the same layer, giving the symmetric ∇²_{F^(a)} L). Derivatives are taken with
    respect to additive perturbations of the modules' outputs (forward hooks, no model surgery),
    so a cross block between a layer and a later one is the mixed derivative of L with respect to
    perturbations entering at both places. Rows and columns are sample-major (``i·A + j``); the
    loss is additive over batches, so the matrix is block diagonal over batches (over samples when
    the model treats samples independently) and products work batch by batch — no N×N blow-up.
    Normalized like the loss (whole-data mean or sum).

    **Cost**: per product one pass; per batch a forward, a backward that records its graph, and a
    double backward per column. **Tags**: symmetric when ``layer2`` is ``None`` or equal to ``layer``.
    The adjoint of the (a, b) block is the (b, a) block.
    """

    def __init__(self, model_or_objective, loss=None, data=None, *, layer: str, layer2: str | None = None,
                 **kwargs):
        obj: Objective = make_objective(model_or_objective, loss, data, **kwargs)
        if obj.process_group is not None:
            raise ValueError("ActivationHessian: expected an objective without process_group=, got a distributed "
                             "one. Its rows and columns are the samples of the data, which a sharded objective "
                             "splits over ranks; build it on one rank's data, or use Hessian/GGN (parameter space).")
        self.objective = obj
        self.layer, self.layer2 = layer, (layer if layer2 is None else layer2)
        self._modules = resolve_modules(obj.model, {self.layer, self.layer2}, "ActivationHessian")
        probe = obj.first_sample()
        record: dict = {}
        with obj.session(), torch.no_grad(), tapped(self._modules, record=record, api="ActivationHessian"):
            obj.forward(obj.theta(), probe.x)
        self.shapes = {n: tuple(record[n].shape[1:]) for n in self._modules}
        self.sizes = {n: int(record[n][0].numel()) for n in self._modules}
        self.N = obj.num_samples()
        symmetric = self.layer == self.layer2
        super().__init__((self.N * self.sizes[self.layer], self.N * self.sizes[self.layer2]), obj.dtype,
                         obj.device, tags=(_tags.SYMMETRIC,) if symmetric else ())

    def _block(self, V: Tensor, rows: str, cols: str) -> Tensor:
        """(∂²L/∂F_rows ∂F_cols) V, batch by batch."""
        obj = self.objective
        A, B = self.sizes[rows], self.sizes[cols]
        K = V.shape[1]
        out = V.new_zeros(self.N * A, K)
        offset, total = 0, 0.0
        with obj.session():
            for batch in obj.batches():
                n = batch.n
                weight = obj.batch_weight(batch)  # 0 when every target of the batch is ignored
                if weight == 0:
                    offset += n
                    continue
                total += weight
                deltas = {name: torch.zeros(n, *self.shapes[name], dtype=obj.dtype, device=obj.device,
                                            requires_grad=True) for name in self._modules}
                with torch.enable_grad():
                    with tapped(self._modules, add=deltas, api="ActivationHessian"):
                        out_b = obj.forward(obj.theta(), batch.x)
                    value = obj.loss(out_b, batch.y, batch.index)
                    (g,) = torch.autograd.grad(value, deltas[cols], create_graph=True)
                Vb = V[offset * B:(offset + n) * B].T.reshape(K, n, *self.shapes[cols])
                if g.requires_grad:
                    for k in range(K):
                        (h,) = torch.autograd.grad(g, deltas[rows], Vb[k], retain_graph=True, allow_unused=True)
                        if h is not None:
                            out[offset * A:(offset + n) * A, k] = weight * h.reshape(-1)
                offset += n
        return obj.normalize(out, total)

    def _matmat_torch(self, V: Tensor) -> Tensor:
        return self._block(V, self.layer, self.layer2)

    def _rmatmat_torch(self, W: Tensor) -> Tensor:
        return self._block(W, self.layer2, self.layer)
