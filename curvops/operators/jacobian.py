r"""Jacobians of the stacked outputs (or of any layer's output) over a data set.

Row ordering (documented once, used everywhere): outputs are stacked **sample-major**, row
``i·C + c`` is component ``c`` of the flattened output of sample ``i`` (samples in data order).
The same holds for per-sample variables (inputs, activations): column ``i·D + d``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torch.func import jvp, vmap

from ..objective import Batch, Objective
from . import _autodiff
from ._curvature import join_columns, split_columns
from ._taps import resolve_modules, tapped
from .base import Operator

_REDUCTIONS = (None, "sum", "mean")


def _loss_free_objective(model_or_objective, data, **kwargs) -> Objective:
    if isinstance(model_or_objective, Objective):
        if data is not None or kwargs:
            raise TypeError("pass either an Objective or (model, data, ...), not both.")
        return model_or_objective
    if data is None:
        raise TypeError("expected (model, data) or an Objective.")
    return Objective(model_or_objective, None, data, **kwargs)


class Jacobian(Operator):
    r"""Jacobian of stacked outputs with respect to parameters, inputs, or a layer's activations.

    .. math:: J = \frac{\partial\, \mathrm{vec}\, f^{(\text{of})}(X)}{\partial\, \text{wrt}}
        \in \mathbb{R}^{(N C) \times P} \ \text{(parameters)}, \quad
        \mathbb{R}^{(N C) \times (N D)} \ \text{(inputs or activations: per-sample blocks)}

    ``wrt``: ``"params"`` (the selected parameters), ``"inputs"`` (a tensor input), or the name
    of a module (``wrt="2"``, ``wrt="encoder.layer1"``): the derivative with respect to that
    module's output, taken by adding a zero perturbation to it through a forward hook (no model
    surgery). ``of``: ``None`` for the model output, or a module name for a layer-to-layer
    Jacobian ∂f^(of)/∂F^(wrt). ``output_reduction``: ``"sum"``/``"mean"`` over each sample's
    output components (C = 1).  With respect to inputs or activations the matrix is block diagonal
    over samples (no N×N blow-up: products work batch by batch).

    **Cost**: ``J @ V``: one pass, a forward-mode product per column (vmapped); ``J.T @ W``: one
    pass, a VJP per column (vmapped). Construction runs the model on one sample to learn shapes.
    A model without forward mode for some layer gets ``J @ V`` by the double-VJP trick (two
    reverse passes); one with a legacy ``autograd.Function`` runs on plain ``torch.autograd``;
    ``last_path`` says which ran.

    **Tags**: none.

    Raises:
        ValueError: unknown module names, a module that never runs or runs twice per forward,
            ``wrt="inputs"`` with non-tensor inputs.

    Example:
        >>> import torch, curvops
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
        >>> X, y = torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 2, (16,))
        >>> J = curvops.Jacobian(model, X)                      # (N·C) × P, rows sample-major
        >>> J.shape
        (32, 26)
        >>> Jd = J.to_dense()
        >>> w = torch.randn(32, dtype=torch.float64)
        >>> torch.allclose(J.T @ w, Jd.T @ w)                   # the adjoint is a VJP
        True
        >>> curvops.Jacobian(model, X, wrt="1").shape          # w.r.t. the Tanh's output: block diagonal
        (32, 64)
    """

    def __init__(self, model_or_objective, data=None, *, wrt: str = "params", of: str | None = None,
                 output_reduction: str | None = None, max_columns: int = 64, **kwargs):
        obj = _loss_free_objective(model_or_objective, data, **kwargs)
        if output_reduction not in _REDUCTIONS:
            raise ValueError(f"Jacobian: output_reduction must be None, 'sum' or 'mean', got {output_reduction!r}.")
        self.objective, self.wrt, self.of, self.output_reduction = obj, wrt, of, output_reduction
        self.max_columns = max_columns
        names = [n for n in (wrt if wrt not in ("params", "inputs") else None, of) if n is not None]
        self._modules = resolve_modules(obj.model, names, "Jacobian") if names else {}
        probe = obj.first_sample()
        if wrt == "inputs" and not isinstance(probe.x, Tensor):
            raise ValueError("Jacobian(wrt='inputs'): expected a single tensor input, got "
                             f"{type(probe.x).__name__}; differentiate a layer's activation instead.")
        with obj.session(), torch.no_grad():
            record: dict = {}
            out = self._run(obj.theta(), probe.x, None, record)
        self.out_shape = tuple(out.shape[1:])
        self.C = int(out[0].numel())
        if wrt == "params":
            self.var_shape, D = None, obj.num_params
        else:
            var = probe.x if wrt == "inputs" else record[wrt]
            self.var_shape = tuple(var.shape[1:])
            D = int(var[0].numel())
        self.D = D
        self.N = obj.num_samples()
        #: which kernel ran in the last product (forward mode or the double-VJP fallback; torch.func or autograd)
        self.last_path: str | None = None
        cols = D if wrt == "params" else self.N * D
        super().__init__((self.N * self.C, cols), obj.dtype, obj.device,
                         domain=obj.layout if wrt == "params" else None)

    # -- the differentiated function of one batch -----------------------------------------
    def _run(self, theta, x, delta, record=None):
        record = {} if record is None else record
        add = {self.wrt: delta} if delta is not None else None
        with tapped(self._modules, add=add, record=record, api="Jacobian"):
            out = self.objective.forward(theta, x)
        return self._reduce_output(record[self.of] if self.of is not None else out)

    def _reduce_output(self, val: Tensor) -> Tensor:
        if self.output_reduction is None:
            return val
        flat = val.reshape(val.shape[0], -1)
        return flat.sum(1) if self.output_reduction == "sum" else flat.mean(1)

    def _function(self, batch: Batch):
        """(g, primals): g maps the differentiation variable(s) of this batch to its outputs."""
        obj = self.objective
        theta = obj.theta()
        if self.wrt == "params":
            return (lambda *th: self._run(th, batch.x, None)), tuple(theta)
        if self.wrt == "inputs":
            return (lambda xv: self._run(theta, xv, None)), (batch.x,)
        delta = torch.zeros(batch.n, *self.var_shape, dtype=obj.dtype, device=obj.device)
        return (lambda d: self._run(theta, batch.x, d)), (delta,)

    def _chunks(self, K: int):
        return [(s, min(s + self.max_columns, K)) for s in range(0, K, self.max_columns)]

    # -- products ----------------------------------------------------------------------------
    def _matmat_torch(self, V: Tensor) -> Tensor:  # [cols, K] -> [N·C, K]
        obj, K = self.objective, V.shape[1]
        out = V.new_zeros(self.shape[0], K)
        offset = 0
        with obj.session():
            for batch in obj.batches():
                g, primals = self._function(batch)
                rows = slice(offset * self.C, (offset + batch.n) * self.C)
                for s, e in self._chunks(K):
                    if self.wrt == "params":
                        tangents = split_columns(obj, V[:, s:e])
                    else:
                        block = V[offset * self.D:(offset + batch.n) * self.D, s:e]
                        tangents = [block.T.reshape(e - s, batch.n, *self.var_shape)]
                    JV, self.last_path = _autodiff.jvp_columns(obj, g, primals, tangents)
                    out[rows, s:e] = JV.reshape(e - s, -1).T
                offset += batch.n
        return out

    def _rmatmat_torch(self, W: Tensor) -> Tensor:  # [N·C, K] -> [cols, K]
        obj, K = self.objective, W.shape[1]
        if self.wrt == "params":
            acc = [torch.zeros(K, *s, dtype=W.dtype, device=W.device) for s in obj.layout.shapes]
        else:
            out = W.new_zeros(self.shape[1], K)
        offset = 0
        with obj.session():
            for batch in obj.batches():
                g, primals = self._function(batch)
                rows = W[offset * self.C:(offset + batch.n) * self.C]
                pull = _autodiff.Pullback(obj, g, primals)
                self.last_path = "reverse mode (" + ("torch.func" if pull.functorch else "torch.autograd") + ")"
                for s, e in self._chunks(K):
                    cot = rows[:, s:e].T.reshape(e - s, batch.n, *(() if self.output_reduction else self.out_shape))
                    res = pull.columns(cot)
                    if self.wrt == "params":
                        for a, r in zip(acc, res):
                            a[s:e].add_(r)
                    else:
                        cols = slice(offset * self.D, (offset + batch.n) * self.D)
                        out[cols, s:e] = res[0].reshape(e - s, -1).T
                offset += batch.n
        return join_columns(acc, K) if self.wrt == "params" else out


def _jvp_columns(g, primals: Sequence[Tensor], tangents: Sequence[Tensor]) -> Tensor:
    """[K, *out] forward-mode products of g at primals for K stacked tangent columns."""
    if tangents[0].shape[0] == 1:
        return jvp(g, tuple(primals), tuple(t[0] for t in tangents))[1][None]
    return vmap(lambda *t: jvp(g, tuple(primals), t)[1])(*tangents)
