r"""The Hessian of the whole-data loss, $H = \nabla^2_\theta L(\theta)$."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..objective import Batch, Objective
from . import tags as _tags
from ._curvature import CurvatureOperator, make_objective

_BATCHED, _LOOP = "reverse-over-reverse, batched columns", "reverse-over-reverse, column loop"
_SINGLE = "reverse-over-reverse, one column"


class _GraphCache:
    """Per-batch gradient graphs kept between products, within a byte budget."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.entries: dict[int, tuple] = {}
        self.nbytes = 0
        self.stamp: tuple | None = None  # the parameter and buffer values the graphs were built from
        self.full = False

    def clear(self):
        self.entries.clear()
        self.nbytes, self.full = 0, False


_BATCHED, _LOOP = "reverse-over-reverse, batched columns", "reverse-over-reverse, column loop"
_SINGLE = "reverse-over-reverse, one column"


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

    def _prepare(self, batch: Batch):
        theta = [t.detach().requires_grad_() for t in self.objective.theta()]
        with torch.enable_grad():
            s = self._scalar(batch, theta)
            if not s.requires_grad:  # outputs independent of θ: a zero term
                return theta, [None] * len(theta), []
            grads = torch.autograd.grad(s, theta, create_graph=True, allow_unused=True)
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        return theta, grads, live

    def _batch_accumulate(self, batch: Batch, Vs: list[Tensor], state, out: list[Tensor], weight: float) -> None:
        theta, grads, live = state
        if not live:  # s_b is at most linear in θ: its Hessian is zero
            return
        K = Vs[0].shape[0]
        outs = [grads[i] for i in live]
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


class Hessian(ScalarHessian):
    r"""Hessian of the loss over the whole data set.

    .. math:: H = \nabla^2_\theta L(\theta) \in \mathbb{R}^{P \times P}

    **Cost**: per product, one pass over the data; per batch one forward, one backward that
    records its graph, and one double-backward per column on that graph (``column_strategy``:
    ``"loop"`` over the columns, ``"batched"`` through autograd's ``is_grads_batched``, or
    ``"auto"``: loop on CPU, batched on CUDA, as measured fastest; an operation without a
    batching rule switches to the loop — ``last_path`` says which ran).
    Reverse-over-reverse works on every model whose gradient works.

    With ``keep_graphs=True`` the per-batch gradient graphs are kept between products, so a
    product costs only the double-backward (about 1.2 gradients on an MLP instead of 2–3).
    Memory: the tensors autograd saves for each batch's forward + backward (measured through
    saved-tensor hooks; about 3–5× the batch's activations), up to ``max_graph_bytes`` in total;
    batches beyond the budget are recomputed each product.  The cache is dropped whenever a
    parameter or buffer of the model holds other values than when the graphs were built (an
    optimizer step, ``p.data.mul_``, ``p.data = …``, ``load_state_dict``: checked by value before
    every product, O(P)), or with :meth:`clear_cache`.

    **Tags**: symmetric.

    Args:
        model_or_objective: an :class:`~curvops.Objective`, or a model followed by ``loss`` and ``data``.
        keep_graphs: keep per-batch gradient graphs between products (see above).
        max_graph_bytes: memory budget of the kept graphs (default 1 GiB).
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

    def __init__(self, model_or_objective, loss=None, data=None, *, keep_graphs: bool = False,
                 max_graph_bytes: int = 2**30, max_columns: int = 64, column_strategy: str = "auto",
                 **kwargs):
        objective = make_objective(model_or_objective, loss, data, **kwargs)
        super().__init__(objective, max_columns=max_columns, column_strategy=column_strategy)
        self.keep_graphs = keep_graphs
        if keep_graphs and _shuffles(objective.data):
            raise ValueError(
                "Hessian(keep_graphs=True): the DataLoader shuffles, so kept per-batch graphs would not match "
                "the batches of later passes. Use shuffle=False (the operator does not depend on the order)."
            )
        self._cache = _GraphCache(max_graph_bytes) if keep_graphs else None

    def clear_cache(self) -> None:
        """Drop the kept gradient graphs (frees their memory)."""
        if self._cache is not None:
            self._cache.clear()

    @property
    def cache_bytes(self) -> int:
        """Bytes held by kept gradient graphs (0 without ``keep_graphs``)."""
        return 0 if self._cache is None else self._cache.nbytes

    def _scalar(self, batch: Batch, theta) -> Tensor:
        obj = self.objective
        return obj.loss(obj.forward(theta, batch.x), batch.y, batch.index)

    def _prepare(self, batch: Batch):
        cache = self._cache
        if cache is None:
            return super()._prepare(batch)
        entry = cache.entries.get(batch.index)
        if entry is not None:
            return entry
        if cache.full:
            return super()._prepare(batch)
        # Count the bytes autograd saves for this batch's graph (unique storages).
        seen: set[int] = set()
        nbytes = 0

        def pack(t):
            nonlocal nbytes
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                nbytes += storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            entry = super()._prepare(batch)
        if cache.nbytes + nbytes <= cache.max_bytes:
            cache.entries[batch.index] = entry
            cache.nbytes += nbytes
        else:
            cache.full = True
        return entry

    def _matmat_torch(self, V: Tensor) -> Tensor:
        cache = self._cache
        if cache is not None and not self.objective.state_matches(cache.stamp):
            cache.clear()  # the model changed (in place, through .data, or reassigned): rebuild
            cache.stamp = self.objective.state_stamp()
        return super()._matmat_torch(V)


def _shuffles(data) -> bool:
    from torch.utils.data import DataLoader, RandomSampler

    return isinstance(data, DataLoader) and isinstance(getattr(data, "sampler", None), RandomSampler)
