r"""Output-space curvature ``Jᵀ M J`` (GGN, Fisher, empirical Fisher) on kept per-batch graphs.

Per batch the kept entry holds the forward's graph (``f = f(θ, X_b)``) and the graph of the
vector-Jacobian product ``g(u) = Jᵀ u`` at a fixed random cotangent leaf ``u`` (recorded with
``create_graph``).  A product then needs no forward pass:

* ``J V`` by the **double-VJP trick** on the kept graph: ``J v = ∂⟨g(u), v⟩/∂u`` (one reverse pass
  through the recorded backward; ``g`` is linear in ``u``, so where it is taken does not matter);
* ``M`` applied to the block of columns at once (one loss Hessian shared by all K columns);
* ``Jᵀ (M J V)`` by the kept forward graph's backward.

The gradients ``g`` are held as autograd edges only (no parameter-sized tensors per batch).  For a
block of K columns both reverse passes run batched over the columns (``is_grads_batched``); an
operation without a batching rule switches to a loop over the columns.  A model whose backward is
not itself differentiable (``once_differentiable``, a legacy Function with a non-differentiable
backward) cannot use the trick — seen on the first batch as a nonzero gradient whose graph does not
reach ``u`` (:func:`~curvops.operators._autodiff.check_double_vjp`): the operator then drops its kept
graphs and runs the recompute path of :func:`~curvops.operators._curvature.output_space` (forward
mode) from then on.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..objective import Batch
from . import _autodiff
from ._curvature import CurvatureOperator, kept_pass, output_space, zeros_for_none
from ._graph_cache import GraphCache, KeptGraphsMixin

KEPT_PATH = "double-VJP J and reverse-mode Jᵀ on the kept graph (torch.autograd)"


def build_entry(objective, batch: Batch, theta: list[Tensor], check: bool):
    """The kept graph of one batch on the θ leaves ``theta``:
    ``((θ, f, u, edges of Jᵀu, live indices, the batch without its inputs), held tensors)``."""
    lite = Batch(None, batch.y, batch.n, batch.index)
    with torch.enable_grad():
        out = objective.forward(theta, batch.x)
        objective.check_target(out, batch.y, batch.index)
        if not isinstance(out, Tensor) or not out.requires_grad:
            return (theta, out, None, [], [], lite), []
        u = _autodiff.random_cotangent(out)
        g = torch.autograd.grad(out, theta, u, create_graph=True, allow_unused=True)
    live = [i for i, gi in enumerate(g) if gi is not None]
    if check:  # once per operator: every gradient's graph reaches u (or the gradient is zero)
        _autodiff.check_double_vjp([g[i] for i in live], u)
    edges = [torch.autograd.graph.get_gradient_edge(g[i]) for i in live]
    return (theta, out, u, edges, live, lite), [out, u]


def kept_products(entry, Vs: list[Tensor], apply_M: Callable[[Tensor, Tensor], Tensor],
                  batched: bool) -> tuple[list[Tensor], bool]:
    """``Jᵀ M J V`` on a kept entry → (per parameter ``[K, *shape]``, whether the batched kernels ran)."""
    theta, out, u, edges, live, _ = entry
    K = Vs[0].shape[0]
    if not live:
        return [torch.zeros(K, *t.shape, dtype=t.dtype, device=t.device) for t in theta], batched
    tangents = [Vs[i] for i in live]
    grad = torch.autograd.grad
    if K == 1:
        (jv,) = grad(edges, u, [t[0] for t in tangents], retain_graph=True)
        M = apply_M(out.detach(), jv[None])
        res = grad(out, theta, M[0], retain_graph=True, allow_unused=True)
        return [torch.zeros_like(t)[None] if r is None else r[None] for r, t in zip(res, theta)], batched
    if batched:
        try:
            (JV,) = grad(edges, u, tangents, retain_graph=True, is_grads_batched=True)
            M = apply_M(out.detach(), JV)
            res = grad(out, theta, M, retain_graph=True, allow_unused=True, is_grads_batched=True)
            return [torch.zeros(K, *t.shape, dtype=t.dtype, device=t.device) if r is None else r
                    for r, t in zip(res, theta)], True
        except RuntimeError as err:  # an operation without a batching rule: loop over the columns
            if "vmap" not in str(err) and "batch" not in str(err):
                raise
    JV = torch.stack([grad(edges, u, [t[k] for t in tangents], retain_graph=True)[0] for k in range(K)])
    M = apply_M(out.detach(), JV)
    cols = [grad(out, theta, M[k], retain_graph=True, allow_unused=True) for k in range(K)]
    return [torch.stack([torch.zeros_like(t) if c[j] is None else c[j] for c in cols])
            for j, t in enumerate(theta)], False


class OutputSpaceOperator(KeptGraphsMixin, CurvatureOperator):
    """Base of :class:`~curvops.GGN`, :class:`~curvops.Fisher` and :class:`~curvops.EmpiricalFisher`:
    per batch ``Jᵀ M_b J`` with ``M_b`` from ``_apply_M(batch, out, JV)``, on kept graphs when the
    :class:`~curvops.operators._graph_cache.GraphCache` keeps them, else recomputed per product."""

    _path_suffix = ""

    def __init__(self, objective, tags, *, max_columns: int, keep_graphs, max_graph_bytes):
        super().__init__(objective, tags=tags, max_columns=max_columns)
        self.keep_graphs = keep_graphs
        self._cache = GraphCache(type(self).__name__, objective, keep_graphs, max_graph_bytes)
        self._batched = True
        self._checked = False

    def _apply_M(self, batch: Batch, out: Tensor, JV: Tensor) -> Tensor:
        raise NotImplementedError

    def _give_up_keeping(self) -> None:
        cache = self._cache
        cache.clear()
        cache.enabled = False

    def _prepare(self, batch: Batch):
        cache = self._cache
        entry = cache.get(batch.index)
        if entry is not None or not cache.enabled or cache.full:
            return entry
        try:
            entry = cache.build(batch.index, lambda: build_entry(self.objective, batch, cache.theta, not self._checked),
                                self._batch_weight(batch))
            self._checked = True
            return entry
        except (RuntimeError, NotImplementedError):
            # no double backward through some layer: the recompute path below is exact (and raises
            # again if the error is the model's own)
            self._give_up_keeping()
            return None

    def _batch_matmat(self, batch: Batch, Vs: list[Tensor], state=None) -> list[Tensor]:
        apply_M = lambda out, JV: self._apply_M(batch, out, JV)  # noqa: E731
        if state is not None:
            try:
                res, self._batched = kept_products(state, Vs, apply_M, self._batched)
                self.last_path = KEPT_PATH + self._path_suffix
                return res
            except (RuntimeError, NotImplementedError):
                self._give_up_keeping()
        path: list[str] = []
        res = output_space(self.objective, batch, self.objective.theta(), Vs, apply_M, path)
        self.last_path = path[-1] + self._path_suffix
        return res

    def _matmat_torch(self, V: Tensor) -> Tensor:
        cache = self._cache
        with self.objective.session():  # one read of the model's state for the check and the product
            cache.sync()  # drops the graphs when the model or the data changed since they were built
            if cache.complete:
                try:
                    return kept_pass(self, V, self._kept_columns)
                except (RuntimeError, NotImplementedError):
                    self._give_up_keeping()
            out = super()._matmat_torch(V)
        cache.pass_done()
        return out

    def _kept_columns(self, Vs: list[Tensor]) -> list[Tensor]:
        """Σ_b w_b J_bᵀ M_b J_b V over every kept batch with two reverse passes through all the graphs
        at once: one for every batch's J_b V (double-VJP), one for the sum of the Jᵀ (shared θ leaves)."""
        cache = self._cache
        entries = [(e, cache.weights[i]) for i, e in cache.entries.items() if e[4]]
        theta, K = cache.theta, Vs[0].shape[0]
        if not entries:
            return [torch.zeros(K, *t.shape, dtype=t.dtype, device=t.device) for t in theta]
        edges = [x for e, _ in entries for x in e[3]]
        us = [e[2] for e, _ in entries]
        tangents = [Vs[i] for e, _ in entries for i in e[4]]
        outs = [e[1] for e, _ in entries]
        grad = torch.autograd.grad

        def M_of(JVs):
            return [w * self._apply_M(e[5], e[1].detach(), JV) for (e, w), JV in zip(entries, JVs)]

        self.last_path = KEPT_PATH + self._path_suffix
        if K > 1 and self._batched:
            try:
                JVs = grad(edges, us, tangents, retain_graph=True, is_grads_batched=True)
                res = grad(outs, theta, M_of(JVs), retain_graph=True, allow_unused=True, is_grads_batched=True)
                return zeros_for_none(res, theta, K)
            except RuntimeError as err:
                if "vmap" not in str(err) and "batch" not in str(err):
                    raise
                self._batched = False
        cols = []
        for k in range(K):
            JVs = grad(edges, us, [t[k] for t in tangents], retain_graph=True)
            Ms = M_of([jv[None] for jv in JVs])
            cols.append(zeros_for_none(grad(outs, theta, [m[0] for m in Ms], retain_graph=True, allow_unused=True),
                                       theta))
        return [torch.stack(c) for c in zip(*cols)]
