"""Shared machinery of the P×P curvature operators of an :class:`~curvops.Objective`.

A product with K columns is one pass over the data: the batch loop is outside, and
inside each batch the columns are processed in chunks of at most ``max_columns``
(vmapped / batched autograd), so memory stays O(max_columns · P + one batch).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from .._modes import product_mode
from ..objective import Batch, Objective
from . import _autodiff
from . import tags as _tags
from .base import Operator


def make_objective(model_or_objective, loss=None, data=None, **kwargs) -> Objective:
    if isinstance(model_or_objective, Objective):
        if loss is not None or data is not None or kwargs:
            raise TypeError("pass either an Objective or (model, loss, data, ...), not both.")
        return model_or_objective
    if loss is None or data is None:
        raise TypeError("expected (model, loss, data) or an Objective.")
    return Objective(model_or_objective, loss, data, **kwargs)


def split_columns(objective: Objective, V: Tensor) -> list[Tensor]:
    """Flat block [P, K] → per-parameter tensors [K, *shape]."""
    K = V.shape[1]
    parts = torch.split(V, list(objective.layout.numels), dim=0)
    return [p.T.contiguous().reshape(K, *s) for p, s in zip(parts, objective.layout.shapes)]


def join_columns(parts: Sequence[Tensor], K: int) -> Tensor:
    """Per-parameter tensors [K, *shape] → flat block [P, K]."""
    return torch.cat([p.reshape(K, -1) for p in parts], dim=1).T


def zeros_for_none(grads: Sequence[Tensor | None], like: Sequence[Tensor], K: int | None = None):
    out = []
    for g, t in zip(grads, like):
        if g is None:
            shape = t.shape if K is None else (K, *t.shape)
            g = torch.zeros(shape, dtype=t.dtype, device=t.device)
        out.append(g)
    return out


class CurvatureOperator(Operator):
    """Base class: a symmetric P×P operator of an objective, normalized like the loss.

    Subclasses implement ``_batch_matmat(batch, Vs) -> list[[K, *shape]]`` for the
    curvature of the batch loss ℓ_b (as the user's reduction defines it); the base
    class loops over batches, chunks columns and applies the whole-data normalization.
    """

    def __init__(self, objective: Objective, tags=(_tags.SYMMETRIC,), *, max_columns: int = 64):
        P = objective.num_params
        super().__init__((P, P), objective.dtype, objective.device, tags=tags,
                         domain=objective.layout, range=objective.layout)
        if not isinstance(max_columns, int) or max_columns < 1:
            raise ValueError(f"{type(self).__name__}: max_columns must be a positive integer, got {max_columns!r}.")
        self.objective = objective
        self.max_columns = max_columns
        #: which kernel ran in the last product (for diagnostics and benchmarks)
        self.last_path: str | None = None
        #: the torch.distributed group the data is sharded over (None: one process)
        self.process_group = objective.process_group

    def _batch_weight(self, batch: Batch) -> float:
        """w_b: the product is Σ_b w_b (batch term) / Σ_b w_b for 'mean', Σ_b (batch term) for 'sum'."""
        return self.objective.batch_weight(batch)

    def _prepare(self, batch: Batch):
        """Per-batch state shared by all column chunks of one product (e.g. a gradient graph)."""
        return None

    def _batch_matmat(self, batch: Batch, Vs: list[Tensor], state=None) -> list[Tensor]:
        raise NotImplementedError

    def _batch_accumulate(self, batch: Batch, Vs: list[Tensor], state, out: list[Tensor], weight: float) -> None:
        """``out += weight · (batch curvature) @ Vs``, in place (kernels may write column by column)."""
        for o, r in zip(out, self._batch_matmat(batch, Vs, state)):
            o.add_(r, alpha=weight)

    def _matmat_torch(self, V: Tensor) -> Tensor:
        obj = self.objective
        K = V.shape[1]
        starts = range(0, K, self.max_columns)
        chunks = [split_columns(obj, V[:, s:s + self.max_columns]) for s in starts]
        # The accumulator lives in parameter form [K, *shape]; it is joined to [P, K] once at the end
        # (no per-batch copies of the whole block).
        # bf16/fp16 models: each batch term in the model's precision, the sum over batches in float32
        acc_dtype = torch.float32 if V.dtype in (torch.bfloat16, torch.float16) else V.dtype
        acc = [torch.zeros(K, *shape, dtype=acc_dtype, device=V.device) for shape in obj.layout.shapes]

        def run():  # this rank's shard (all the data without a process group)
            total = 0.0
            with obj.session():
                for batch in obj.batches():
                    weight = self._batch_weight(batch)  # d_b for 'mean' (0: every target ignored), 1 for 'sum'
                    if weight == 0:
                        continue
                    state = self._prepare(batch)
                    for s, Vs in zip(starts, chunks):
                        self._batch_accumulate(batch, Vs, state, [a[s:s + Vs[0].shape[0]] for a in acc], weight)
                    total += weight
                    del state
            return join_columns(acc, K), total

        # with a process group: + one all-reduce of the [P, K] block and the total weight
        out, total = obj.reduce_pass(run, lambda: torch.zeros(obj.num_params, K, dtype=acc_dtype, device=V.device),
                                     type(self).__name__)
        with product_mode():
            return obj.normalize(out, total).to(V.dtype)


def compiled_product(op: CurvatureOperator, kind: str, V: Tensor) -> Tensor | None:
    """``Objective(compile=...)``'s compiled pass for ``kind`` ("hessian", "ggn"), or None when the
    objective has none or it is not available for this model/shape (the caller runs eagerly).
    The compiled pass wins over kept graphs: the user opted in."""
    compiled = op.objective.compiled
    if compiled is None:
        return None
    out = compiled.matmat(kind, V, op.max_columns)
    if out is not None:
        op.last_path = compiled.last_path
    return out


def kept_pass(op: CurvatureOperator, V: Tensor, columns: Callable[[list[Tensor]], list[Tensor]]) -> Tensor:
    """A product when every batch's graph is kept (``op._cache.complete``): no pass over the data;
    ``columns(Vs) -> Σ_b w_b (batch term) Vs`` per chunk of columns, then the usual reduction over
    ranks and the whole-data normalization (the kept weights sum to the total a pass would count)."""
    obj, cache = op.objective, op._cache
    K = V.shape[1]
    acc_dtype = torch.float32 if V.dtype in (torch.bfloat16, torch.float16) else V.dtype

    def run():
        parts = []
        with obj.session():
            for s in range(0, K, op.max_columns):
                Vs = split_columns(obj, V[:, s:s + op.max_columns])
                parts.append(join_columns([r.to(acc_dtype) for r in columns(Vs)], Vs[0].shape[0]))
        return torch.cat(parts, dim=1), sum(cache.weights.values())

    out, total = obj.reduce_pass(run, lambda: torch.zeros(obj.num_params, K, dtype=acc_dtype, device=V.device),
                                 type(op).__name__)
    with product_mode():
        return obj.normalize(out, total).to(V.dtype)


def output_space(objective: Objective, batch: Batch, theta: Sequence[Tensor], Vs: list[Tensor],
                 apply_M: Callable[[Tensor, Tensor], Tensor], path: list[str]) -> list[Tensor]:
    """Jᵀ M J for a block of columns on one batch (J = ∂f/∂θ of the batch outputs).

    ``apply_M(out, JV [K, *out.shape]) -> [K, *out.shape]`` applies the output-space matrix.
    Cost: one forward for the VJP, one forward-mode pass per column (vmapped), one VJP per column;
    without forward mode (a layer lacking its formula) J V comes from the double-VJP trick, and a
    model that torch.func refuses (a legacy autograd.Function) runs on plain torch.autograd
    (see ``_autodiff``).
    """
    def f(*th):
        return objective.forward(th, batch.x)

    K = Vs[0].shape[0]
    if K == 1 and _autodiff.forward_ok(objective):
        try:
            res = _single_column(f, objective, batch, theta, Vs, apply_M)
            _autodiff.note(objective, "forward_mode", True)
            path.append("forward-mode J (dual tensors) and reverse-mode Jᵀ on one forward pass")
            return res
        except (RuntimeError, NotImplementedError) as err:
            if not _autodiff.lacks_forward_mode(err):
                raise
            _autodiff.note(objective, "forward_mode", False)  # the paths below have exact fallbacks
    pull = _autodiff.Pullback(objective, f, theta)
    objective.check_target(pull.out, batch.y, batch.index)
    JV, kind = _autodiff.jvp_columns(objective, f, theta, Vs)
    MJV = apply_M(pull.out.detach(), JV)
    res = pull.columns(MJV)
    engine = "torch.func" if pull.functorch else "torch.autograd"
    path.append(f"{kind} J, reverse-mode Jᵀ ({engine})")
    return res


def _single_column(f, objective: Objective, batch: Batch, theta, Vs, apply_M) -> list[Tensor]:
    """Jᵀ M J v with one forward pass: dual tensors carry J v next to the primal, whose
    autograd graph then gives Jᵀ (about 2× a gradient instead of 2.6–3.2× for separate passes)."""
    import torch.autograd.forward_ad as fwAD

    th = [t.detach().requires_grad_() for t in theta]
    with torch.enable_grad(), fwAD.dual_level():
        dual = f(*[fwAD.make_dual(t, v[0]) for t, v in zip(th, Vs)])
        out, jv = fwAD.unpack_dual(dual)
    objective.check_target(out, batch.y, batch.index)
    jv = torch.zeros_like(out) if jv is None else jv.detach()
    M = apply_M(out.detach(), jv[None])[0]
    if not out.requires_grad:
        return [torch.zeros(1, *t.shape, dtype=t.dtype, device=t.device) for t in th]
    res = torch.autograd.grad(out, th, M, allow_unused=True)
    return [torch.zeros_like(t)[None] if r is None else r[None] for r, t in zip(res, th)]


_jvp_by_double_vjp = _autodiff.jvp_by_double_vjp  # old name
