r"""The Hessian of the whole-data loss, $H = \nabla^2_\theta L(\theta)$."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..objective import Batch, Objective
from . import tags as _tags
from ._curvature import CurvatureOperator, compiled_product, kept_pass, make_objective, zeros_for_none
from ._graph_cache import GraphCache, KeptGraphsMixin

_BATCHED, _LOOP = "reverse-over-reverse, batched columns", "reverse-over-reverse, column loop"
_SINGLE = "reverse-over-reverse, one column"
_KEPT = ", kept graph"


class ScalarHessian(CurvatureOperator):
    """Curvature operator whose batch term is the θ-Hessian of a per-batch scalar ``s_b(θ)``
    (the loss for :class:`Hessian`; ⟨u_b, f⟩ for output Hessians and the Hessian residual).

    Subclasses implement ``_scalar(batch, theta) -> Tensor`` (a 0-dim tensor built from
    ``self.objective.forward(theta, batch.x)``).  Per batch: one forward, one backward that
    records its graph (shared by all column chunks), one double-backward per column.
    """

    def __init__(self, objective: Objective, *, max_columns: int, column_strategy: str):
        super().__init__(objective, tags=(_tags.SYMMETRIC,), max_columns=max_columns)
        if column_strategy not in ("auto", "batched", "loop"):
            raise ValueError(
                f"{type(self).__name__}: expected column_strategy 'auto', 'batched' or 'loop', "
                f"got {column_strategy!r}."
            )
        # As for Hessian (docs/performance.md): a column loop on one graph is fastest on CPU,
        # autograd's batched backward on CUDA.
        if column_strategy == "auto":
            column_strategy = "batched" if objective.device.type == "cuda" else "loop"
        self.column_strategy = column_strategy
        self._batched_ok = column_strategy == "batched"

    def _scalar(self, batch: Batch, theta: Sequence[Tensor]) -> Tensor:
        raise NotImplementedError

    def _prepare(self, batch: Batch, edges: bool = False, theta=None):
        """(θ leaves, the live gradient outputs, their indices); with ``edges`` the outputs are
        autograd edges, so the parameter-sized gradients themselves need not be held."""
        if theta is None:
            theta = [t.detach().requires_grad_() for t in self.objective.theta()]
        with torch.enable_grad():
            s = self._scalar(batch, theta)
            if not s.requires_grad:  # outputs independent of θ: a zero term
                return theta, [], []
            grads = torch.autograd.grad(s, theta, create_graph=True, allow_unused=True)
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        outs = [torch.autograd.graph.get_gradient_edge(grads[i]) if edges else grads[i] for i in live]
        return theta, outs, live

    def _batch_accumulate(self, batch: Batch, Vs: list[Tensor], state, out: list[Tensor], weight: float) -> None:
        theta, outs, live = state
        if not live:  # s_b is at most linear in θ: its Hessian is zero
            return
        K = Vs[0].shape[0]
        if K > 1 and self._batched_ok:
            try:
                res = torch.autograd.grad(outs, theta, [Vs[i] for i in live], retain_graph=True,
                                          allow_unused=True, is_grads_batched=True)
                for o, r in zip(out, res):
                    if r is not None:
                        o.add_(r, alpha=weight)
                self.last_path = _BATCHED
                return
            except RuntimeError:
                self._batched_ok = False  # an op without a batching rule: loop from now on
        for k in range(K):
            res = torch.autograd.grad(outs, theta, [Vs[i][k] for i in live], retain_graph=True, allow_unused=True)
            for o, r in zip(out, res):
                if r is not None:
                    o[k].add_(r, alpha=weight)
        self.last_path = _SINGLE if K == 1 else _LOOP


class Hessian(KeptGraphsMixin, ScalarHessian):
    r"""Hessian of the loss over the whole data set.

    .. math:: H = \nabla^2_\theta L(\theta) \in \mathbb{R}^{P \times P}

    **Cost**: per product, one pass over the data; per batch one forward, one backward that
    records its graph, and one double-backward per column on that graph (``column_strategy``:
    ``"loop"`` over the columns, ``"batched"`` through autograd's ``is_grads_batched``, or
    ``"auto"``: loop on CPU, batched on CUDA, as measured fastest; an operation without a
    batching rule switches to the loop — ``last_path`` says which ran).
    Reverse-over-reverse works on every model whose gradient works.

    **Kept graphs** (``keep_graphs``, by default ``"auto"``): the per-batch gradient graphs are kept
    between products, so a product costs only the double backward (about 1.3 gradients on an MLP
    instead of 2–3); the first product builds them.  ``"auto"`` keeps them when the data is a fixed
    list of batches or a split ``(X, y)`` pair (not a DataLoader) and the model has no stochastic
    modules; ``True`` also for a non-shuffling DataLoader; ``False`` never.  Memory: the tensors
    autograd saves for each batch's forward + backward, counted through saved-tensor hooks (views of
    one input tensor are charged their own slice; the model's parameters are not charged, and the
    parameter-sized gradients are not held), up to ``max_graph_bytes`` — by default 25 % of the
    memory available when the graphs are built (free device memory on CUDA, ``MemAvailable`` on
    CPU), shared by all operators' automatic caches.  Batches beyond the budget are recomputed in
    each product, and one warning says so; when every batch is kept, a product is one double
    backward through all the graphs and does not touch the data.  The graphs are dropped whenever a
    parameter or buffer of the model holds other values than when they were built (an optimizer
    step, ``p.data.mul_``, ``p.data = …``, ``load_state_dict``: checked by value before every
    product, O(P)), when the data changed (a batch of the list replaced or appended, a data tensor
    written in place), or with :meth:`clear_cache`.

    **Tags**: symmetric.

    Args:
        model_or_objective: an :class:`~curvops.Objective`, or a model followed by ``loss`` and ``data``.
        keep_graphs: ``"auto"``, ``True`` or ``False``: keep per-batch gradient graphs between
            products (see above).
        max_graph_bytes: memory budget of the kept graphs in bytes (default None: 25 % of the
            available memory).
        max_columns: columns processed together per batch (memory ∝ max_columns · P).
        **kwargs: passed to :class:`~curvops.Objective` (``params=``, ``reduction=``, …).

    Example:
        >>> import torch, curvops
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
        >>> X, y = torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 2, (16,))
        >>> H = curvops.Hessian(model, "cross_entropy", (X, y), batch_size=8)   # 26 parameters
        >>> H.shape
        (26, 26)
        >>> v = torch.randn(26, dtype=torch.float64)
        >>> torch.allclose(H @ v, H.to_dense() @ v)            # matrix-free = dense
        True
        >>> Hv = H @ {n: torch.ones_like(p) for n, p in model.named_parameters()}   # dict in, dict out
        >>> sorted(Hv)
        ['0.bias', '0.weight', '2.bias', '2.weight']
        >>> bool(curvops.eigsh(H, k=2).eigenvalues[-1] > 0)    # ascending: the last is the largest
        True
    """

    def __init__(self, model_or_objective, loss=None, data=None, *, keep_graphs: bool | str = "auto",
                 max_graph_bytes: int | None = None, max_columns: int = 64, column_strategy: str = "auto",
                 **kwargs):
        objective = make_objective(model_or_objective, loss, data, **kwargs)
        super().__init__(objective, max_columns=max_columns, column_strategy=column_strategy)
        self.keep_graphs = keep_graphs
        self._cache = GraphCache("Hessian", objective, keep_graphs, max_graph_bytes)

    def _scalar(self, batch: Batch, theta) -> Tensor:
        obj = self.objective
        return obj.loss(obj.forward(theta, batch.x), batch.y, batch.index)

    def _prepare(self, batch: Batch, edges: bool = False):
        cache = self._cache
        entry = cache.get(batch.index)
        if entry is not None:
            return entry
        if not cache.enabled or cache.full:
            return super()._prepare(batch)
        return cache.build(batch.index, lambda: (super(Hessian, self)._prepare(batch, True, cache.theta), []),
                           self._batch_weight(batch))

    def _batch_accumulate(self, batch: Batch, Vs, state, out, weight: float) -> None:
        super()._batch_accumulate(batch, Vs, state, out, weight)
        if self.last_path is not None and state is self._cache.get(batch.index):
            self.last_path += _KEPT

    def _matmat_torch(self, V: Tensor) -> Tensor:
        out = compiled_product(self, "hessian", V)
        if out is not None:
            return out
        cache = self._cache
        with self.objective.session():  # one read of the model's state for the check and the product
            cache.sync()  # drops the graphs when the model or the data changed since they were built
            if cache.complete:
                return kept_pass(self, V, self._kept_columns)
            out = super()._matmat_torch(V)
        cache.pass_done()
        return out

    def _kept_columns(self, Vs: list[Tensor]) -> list[Tensor]:
        """Σ_b w_b H_b V over every kept batch: one double backward through all the graphs at once
        (they share their θ leaves, so autograd sums the batches itself)."""
        cache = self._cache
        outs, gos, scaled = [], [], {}
        for index, (_, edges, live) in cache.entries.items():
            w = cache.weights[index]
            if w not in scaled:  # batches of equal weight share one scaled copy of the columns
                scaled[w] = [v * w for v in Vs]
            outs += edges
            gos += [scaled[w][i] for i in live]
        theta = cache.theta
        K = Vs[0].shape[0]
        if not outs:
            return [torch.zeros(K, *t.shape, dtype=t.dtype, device=t.device) for t in theta]
        self.last_path = (_SINGLE if K == 1 else _LOOP) + _KEPT
        if K > 1 and self._batched_ok:
            try:
                res = torch.autograd.grad(outs, theta, gos, retain_graph=True, allow_unused=True,
                                          is_grads_batched=True)
                self.last_path = _BATCHED + _KEPT
                return zeros_for_none(res, theta, K)
            except RuntimeError:
                self._batched_ok = False
        cols = [torch.autograd.grad(outs, theta, [g[k] for g in gos], retain_graph=True, allow_unused=True)
                for k in range(K)]
        return [torch.stack(c) for c in zip(*[zeros_for_none(c, theta) for c in cols])]
