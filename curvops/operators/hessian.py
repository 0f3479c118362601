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
        self.versions: tuple[int, ...] | None = None
        self.full = False

    def clear(self):
        self.entries.clear()
        self.nbytes, self.full = 0, False


class Hessian(CurvatureOperator):
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
    batches beyond the budget are recomputed each product.  The cache is dropped when the
    parameters change in place (e.g. an optimizer step) or with :meth:`clear_cache`.

    **Tags**: symmetric.

    Args:
        model_or_objective: an :class:`~curvops.Objective`, or a model followed by ``loss`` and ``data``.
        keep_graphs: keep per-batch gradient graphs between products (see above).
        max_graph_bytes: memory budget of the kept graphs (default 1 GiB).
        max_columns: columns processed together per batch (memory ∝ max_columns · P).
        **kwargs: passed to :class:`~curvops.Objective` (``params=``, ``reduction=``, …).

    Example:
        >>> H = Hessian(model, torch.nn.MSELoss(), (X, y))      # doctest: +SKIP
        >>> Hv = H @ v                                         # doctest: +SKIP
    """

    def __init__(self, model_or_objective, loss=None, data=None, *, keep_graphs: bool = False,
                 max_graph_bytes: int = 2**30, max_columns: int = 64, column_strategy: str = "auto",
                 **kwargs):
        objective = make_objective(model_or_objective, loss, data, **kwargs)
        super().__init__(objective, tags=(_tags.SYMMETRIC,), max_columns=max_columns)
        self.keep_graphs = keep_graphs
        if keep_graphs and _shuffles(objective.data):
            raise ValueError(
                "Hessian(keep_graphs=True): the DataLoader shuffles, so kept per-batch graphs would not match "
                "the batches of later passes. Use shuffle=False (the operator does not depend on the order)."
            )
        self._cache = _GraphCache(max_graph_bytes) if keep_graphs else None
        if column_strategy not in ("auto", "batched", "loop"):
            raise ValueError(f"Hessian: column_strategy must be 'auto', 'batched' or 'loop', got {column_strategy!r}.")
        # Measured (docs/performance.md): on CPU a loop over the columns on one graph beats
        # autograd's vmapped backward (1.37 vs 1.63 gradients per column on the MLP anchor);
        # on CUDA the batched backward wins by keeping the device busy.
        if column_strategy == "auto":
            column_strategy = "batched" if objective.device.type == "cuda" else "loop"
        self.column_strategy = column_strategy
        self._batched_ok = column_strategy == "batched"

    def clear_cache(self) -> None:
        """Drop the kept gradient graphs (frees their memory)."""
        if self._cache is not None:
            self._cache.clear()

    @property
    def cache_bytes(self) -> int:
        """Bytes held by kept gradient graphs (0 without ``keep_graphs``)."""
        return 0 if self._cache is None else self._cache.nbytes

    # -- one batch ---------------------------------------------------------------------
    def _build_graph(self, batch: Batch, count_bytes: bool):
        obj = self.objective
        theta = [t.detach().requires_grad_() for t in obj.theta()]
        seen: set[int] = set()
        nbytes = [0]

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                nbytes[0] += t.untyped_storage().nbytes()
            return t

        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if count_bytes else _null()
        with torch.enable_grad(), hooks:
            value = obj.loss(obj.forward(theta, batch.x), batch.y, batch.index)
            grads = torch.autograd.grad(value, theta, create_graph=True, allow_unused=True)
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        return theta, grads, live, nbytes[0]

    def _double_backward(self, theta, grads, live, Vs: list[Tensor], out: list[Tensor], weight: float) -> None:
        """out += weight · H_b Vs, one double-backward per column (or one batched backward)."""
        K = Vs[0].shape[0]
        if not live:
            return
        outs = [grads[i] for i in live]
        if K > 1 and self._batched_ok:
            try:
                res = torch.autograd.grad(outs, theta, [Vs[i] for i in live], retain_graph=True,
                                          allow_unused=True, is_grads_batched=True)
                self.last_path = _BATCHED
                for o, r in zip(out, res):
                    if r is not None:
                        o.add_(r, alpha=weight)
                return
            except RuntimeError:
                self._batched_ok = False  # an op without a batching rule: loop from now on
        for k in range(K):
            res = torch.autograd.grad(outs, theta, [Vs[i][k] for i in live], retain_graph=True, allow_unused=True)
            for o, r in zip(out, res):
                if r is not None:
                    o[k].add_(r, alpha=weight)
        self.last_path = _SINGLE if K == 1 else _LOOP

    def _prepare(self, batch: Batch):
        cache = self._cache
        if cache is None:
            theta, grads, live, _ = self._build_graph(batch, count_bytes=False)
            return theta, grads, live
        entry = cache.entries.get(batch.index)
        if entry is None:
            theta, grads, live, nbytes = self._build_graph(batch, count_bytes=not cache.full)
            entry = (theta, grads, live)
            if not cache.full and cache.nbytes + nbytes <= cache.max_bytes:
                cache.entries[batch.index] = entry
                cache.nbytes += nbytes
            else:
                cache.full = True
        return entry

    def _batch_accumulate(self, batch: Batch, Vs: list[Tensor], state, out: list[Tensor], weight: float) -> None:
        theta, grads, live = state
        self._double_backward(theta, grads, live, Vs, out, weight)

    def _matmat_torch(self, V: Tensor) -> Tensor:
        cache = self._cache
        if cache is not None:
            versions = self.objective.state_versions()
            if cache.versions != versions:
                cache.clear()
                cache.versions = versions
        return super()._matmat_torch(V)


def _shuffles(data) -> bool:
    from torch.utils.data import DataLoader, RandomSampler

    return isinstance(data, DataLoader) and isinstance(getattr(data, "sampler", None), RandomSampler)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
