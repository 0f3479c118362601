r"""The active-subspace matrix: the (weighted, optionally centred, optionally restricted) covariance
of per-sample gradients, its square-root factor, and the per-sample gradients themselves."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.func import grad, vmap

from ..objective import Batch, Objective, _tree_leaves, _tree_map
from . import _autodiff
from . import tags as _tags
from ._curvature import join_columns, make_objective, split_columns
from .base import Operator

#: elements of per-sample gradients computed in one vmapped chunk by default (about 32 MB in float64)
CHUNK_ELEMENTS = 2**22


def _objective(model_or_objective, loss, data, g, kwargs) -> Objective:
    """The objective; a loss is optional when ``g`` is a callable (loss-free objective)."""
    if not isinstance(model_or_objective, Objective) and loss is None and data is not None:
        if g == "loss":
            raise TypeError("GradientCovariance: g='loss' needs a loss; pass loss= (a name, a torch loss or a "
                            "callable), or a callable g(outputs, targets) -> [n].")
        return Objective(model_or_objective, None, data, **kwargs)
    return make_objective(model_or_objective, loss, data, **kwargs)


def _subset_mask(subset, n: int) -> Tensor:
    """An index tensor or boolean mask over the N samples → boolean mask [N] (validated)."""
    api = "GradientCovariance(subset=...)"
    t = torch.as_tensor(subset)
    if t.dtype == torch.bool:
        if t.shape != (n,):
            raise ValueError(f"{api}: expected a boolean mask of shape ({n},) (one entry per sample), "
                             f"got shape {tuple(t.shape)}.")
        mask = t.clone()
    elif not t.is_floating_point() and not t.is_complex():
        if t.dim() != 1:
            raise ValueError(f"{api}: expected a 1-D tensor of sample indices, got shape {tuple(t.shape)}.")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
            raise ValueError(f"{api}: expected indices in [0, {n}), got range [{int(t.min())}, {int(t.max())}].")
        if t.unique().numel() != t.numel():
            raise ValueError(f"{api}: expected distinct indices, got {t.numel() - t.unique().numel()} repeated; "
                             f"use weights= to count samples more than once.")
        mask = torch.zeros(n, dtype=torch.bool)
        mask[t.long().cpu()] = True
    else:
        raise TypeError(f"{api}: expected an integer index tensor or a boolean mask, got dtype {t.dtype}.")
    if not bool(mask.any()):
        raise ValueError(f"{api}: the subset is empty; select at least one sample.")
    return mask


def _class_tensor(classes) -> Tensor:
    api = "GradientCovariance(classes=...)"
    t = torch.as_tensor([classes] if isinstance(classes, int) else classes)
    if t.dim() == 1 and t.numel() == 0:
        raise ValueError(f"{api}: expected at least one class, got none.")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool or t.dim() != 1:
        raise TypeError(f"{api}: expected an integer class or a 1-D sequence of integer classes, got "
                        f"{classes!r}.")
    return t.long()


class GradientCovariance(Operator):
    r"""Second moment (or covariance) of per-sample gradients, matrix-free.

    .. math:: C = \frac{1}{W}\sum_{i \in S} w_i\, \nabla g_i \nabla g_i^\top
        \quad\text{or, centred,}\quad
        \frac{1}{W}\sum_{i \in S} w_i\, (\nabla g_i - \mu)(\nabla g_i - \mu)^\top,\qquad
        \mu = \frac{1}{W}\sum_{i \in S} w_i \nabla g_i,\ W = \sum_{i \in S} w_i

    with ``g_i = g(f(θ, x_i), y_i)`` a scalar per sample: by default the loss of sample i alone
    (``g="loss"``), or any callable ``g(outputs, targets) -> [n]`` of a batch that acts sample by
    sample (e.g. one model output, ``lambda out, y: out[:, 0]``). ``S`` is the set of kept
    samples: all of them, or those selected by ``subset`` (positions in data order) and/or
    ``classes`` (integer targets in the given classes, decided batch by batch, so DataLoaders
    work); C is normalized by the kept weight W. Its eigenvectors are the active subspace of
    ``g`` (Constantine 2015); for ``g = loss``, unit weights and all samples, the uncentred C is
    the empirical Fisher with mean normalization (with ``ignore_index``, samples whose targets
    are all ignored have no loss and are left out, as there).

    Also here: :meth:`sample_gradients` (the rows ∇g_i, chunked ``vmap(grad)``) and
    :meth:`factor` (the matrix-free N×P factor F with FᵀF = C).

    **Cost**: per product one pass over the data; per batch a forward-mode product of the
    per-sample vector g (vmapped over columns) and one VJP per column. Centring adds one pass for
    μ on the first product (cached, and recomputed when the parameters change).
    Never forms a P×P matrix or all per-sample gradients at once. Samples that are not kept are
    dropped from each batch before the model runs.

    **Tags**: symmetric, psd.

    Args:
        model_or_objective, loss, data, **kwargs: as for :class:`~curvops.Hessian`; ``loss`` may
            be omitted when ``g`` is a callable (then ``data`` may be inputs only).
        g: ``"loss"`` or a callable ``g(outputs, targets) -> Tensor[n]``.
        weights: per-sample weights ``[N]`` in data order (default: all ones), ≥ 0.
        center: subtract the weighted mean gradient.
        subset: sample indices (1-D integer tensor, distinct) or a boolean mask ``[N]`` in data order.
        classes: an integer class or a sequence of classes; keeps the samples whose integer target
            ``y [n]`` is one of them (needs class-index targets).

    Raises:
        ValueError: bad weights, subset or classes; a callable g that does not return one value
            per sample; targets that are not class indices when ``classes`` is set; no kept sample
            (found during the first pass when only ``classes`` decides).
        TypeError: g="loss" without a loss; a subset or classes of the wrong kind.

    Example:
        >>> import torch, curvops
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
        >>> X, y = torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 2, (16,))
        >>> C = curvops.GradientCovariance(model, "cross_entropy", (X, y))
        >>> EF = curvops.EmpiricalFisher(model, "cross_entropy", (X, y))
        >>> torch.allclose(C.to_dense(), EF.to_dense())       # unit weights, uncentred: the empirical Fisher
        True
        >>> C1 = curvops.GradientCovariance(model, "cross_entropy", (X, y), classes=[1], center=True)
        >>> C1.shape, C1.is_psd                                # the class-1 samples' gradient covariance
        ((26, 26), True)

    References:
        Constantine (2015). *Active Subspaces: Emerging Ideas for Dimension Reduction in Parameter Studies*.
    """

    def __init__(self, model_or_objective, loss=None, data=None, *, g: str | Callable = "loss",
                 weights: Tensor | None = None, center: bool = False, subset=None, classes=None,
                 max_columns: int = 64, **kwargs):
        if not (isinstance(g, str) and g == "loss") and not callable(g):
            raise ValueError(f"GradientCovariance: g must be 'loss' or a callable g(outputs, targets), got {g!r}.")
        obj: Objective = _objective(model_or_objective, loss, data, g, kwargs)
        if isinstance(g, str) and obj.loss_fn is None:
            raise ValueError("GradientCovariance: g='loss' needs an objective with a loss; pass loss= or a callable "
                             "g(outputs, targets) -> [n].")
        n = obj.num_samples() if (weights is not None or subset is not None) else None
        if weights is not None:
            weights = torch.as_tensor(weights, dtype=obj.dtype, device=obj.device)
            if weights.shape != (n,):
                raise ValueError(f"GradientCovariance: expected weights of shape ({n},) (one per sample), "
                                 f"got {tuple(weights.shape)}.")
            if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()) or float(weights.sum()) <= 0:
                raise ValueError("GradientCovariance: weights must be finite, non-negative and not all zero.")
        mask = None if subset is None else _subset_mask(subset, n).to(obj.device)
        if mask is not None and weights is not None and float(weights[mask].sum()) <= 0:
            raise ValueError("GradientCovariance: the weights of the samples in subset= are all zero; expected a "
                             "positive total weight.")
        P = obj.num_params
        super().__init__((P, P), obj.dtype, obj.device, tags=(_tags.PSD,), domain=obj.layout, range=obj.layout)
        self.objective, self.g, self.weights, self.center = obj, g, weights, center
        self.subset_mask = mask
        self.classes = None if classes is None else _class_tensor(classes).to(obj.device)
        self.max_columns = max_columns
        #: the torch.distributed group the data is sharded over (None: one process)
        self.process_group = obj.process_group
        self._mean: tuple | None = None  # (state stamp, μ [P])
        #: the kernel of the last product (forward mode or the double-VJP fallback)
        self.last_path: str | None = None

    # ---- the per-sample function and the kept samples ---------------------------------------
    def _per_sample(self, batch: Batch) -> Callable:
        """θ ↦ [n] per-sample values g_i for this batch."""
        obj = self.objective

        def values(*theta):
            out = obj.forward(theta, batch.x)
            if self.g != "loss":
                v = self.g(out, batch.y)
                if not isinstance(v, Tensor) or v.shape != (batch.n,):
                    raise ValueError(f"GradientCovariance: g must return one value per sample, shape ({batch.n},), "
                                     f"got {tuple(getattr(v, 'shape', ()))} on batch {batch.index}.")
                return v
            obj.check_target(out, batch.y, batch.index)
            return vmap(lambda o, t: obj.loss_fn(o[None], t[None]).reshape(()))(out, batch.y)

        return values

    def _kept(self, batch: Batch, offset: int) -> tuple[Batch | None, Tensor]:
        """The kept samples of a batch (``None`` if none) and their weights."""
        w = (torch.ones(batch.n, dtype=self.torch_dtype, device=self.device) if self.weights is None
             else self.weights[offset:offset + batch.n])
        keep = None
        if self.subset_mask is not None:
            keep = self.subset_mask[offset:offset + batch.n]
            if keep.shape[0] != batch.n:
                raise ValueError(f"GradientCovariance: the data has more samples than the {self.subset_mask.shape[0]} "
                                 f"that subset= was built for (batch {batch.index}).")
        if self.classes is not None:
            y = batch.y
            if (not isinstance(y, Tensor) or y.is_floating_point() or y.dtype == torch.bool
                    or tuple(y.shape) != (batch.n,)):
                got = f"dtype {y.dtype}, shape {tuple(y.shape)}" if isinstance(y, Tensor) else type(y).__name__
                raise ValueError(f"GradientCovariance(classes=...): expected integer class targets of shape "
                                 f"({batch.n},) on batch {batch.index}, got {got}. For one-hot or soft targets "
                                 f"select the samples with subset= instead.")
            in_class = torch.isin(y, self.classes.to(y.device))
            keep = in_class if keep is None else keep & in_class
        if isinstance(self.g, str) and self.objective.reduction == "mean":
            d = self.objective.sample_weights(batch)  # a sample whose targets are all ignored has no loss (0/0)
            if d is not None:
                counted = (d > 0).to(w.device)
                keep = counted if keep is None else keep & counted
        if keep is None or bool(keep.all()):
            return batch, w
        idx = keep.nonzero().squeeze(1)
        if idx.numel() == 0:
            return None, w[:0]
        x = _tree_map(lambda t: t[idx.to(t.device)], batch.x)
        y = None if batch.y is None else _tree_map(lambda t: t[idx.to(t.device)], batch.y)
        return Batch(x, y, int(idx.numel()), batch.index), w[idx]

    def _kept_batches(self):
        """One pass: the kept part of every batch that keeps a sample, with its weights."""
        offset = 0
        for batch in self.objective.batches():
            kept, w = self._kept(batch, offset)
            offset += batch.n
            if kept is not None:
                yield kept, w

    def kept_weights(self) -> Tensor:
        """Weights ``[N_kept]`` of the kept samples in data order (unit weights: ones).

        **Cost**: no pass, unless ``classes`` is set or ``g="loss"`` with a mean cross-entropy (which
        may ignore every target of a sample): then one pass over the data that reads only the
        targets (the model does not run).
        """
        obj = self.objective
        ignores = isinstance(self.g, str) and obj.reduction == "mean" and obj.loss_kind == "cross_entropy"
        if self.classes is None and not ignores:
            n = self.objective.num_samples()
            w = torch.ones(n, dtype=self.torch_dtype, device=self.device) if self.weights is None else self.weights
            return w if self.subset_mask is None else w[self.subset_mask]
        parts, offset = [], 0
        for batch in self.objective.batches():
            kept, w = self._kept(batch, offset)
            parts.append(w)
            offset += batch.n
        w = torch.cat(parts)
        self._check_total(float(w.sum()))
        return w

    @staticmethod
    def _check_total(total: float) -> None:
        if not total > 0:
            raise ValueError("GradientCovariance: no sample is kept (or all kept samples have zero weight): check "
                             "subset=, classes= and weights=.")

    # ---- products ------------------------------------------------------------------------------
    def mean_gradient(self) -> Tensor:
        """μ = Σ w_i ∇g_i / W over the kept samples (one pass; cached until the parameters change)."""
        obj = self.objective
        if self._mean is not None and obj.state_matches(self._mean[0]):
            return self._mean[1]
        stamp = obj.state_stamp()
        acc = [torch.zeros(s, dtype=self.torch_dtype, device=self.device) for s in obj.layout.shapes]

        def run():  # this rank's shard; summed over the ranks (with the total weight) by reduce_pass
            total = 0.0
            with obj.session():
                for kept, w in self._kept_batches():
                    pull = _autodiff.Pullback(obj, self._per_sample(kept), obj.theta())
                    for a, r in zip(acc, pull(w)):
                        a.add_(r)
                    total += float(w.sum())
            return torch.cat([a.reshape(-1) for a in acc]), total

        flat, total = obj.reduce_pass(run, lambda: obj.zeros((obj.num_params,)), "GradientCovariance")
        self._check_total(total)
        mu = flat / total
        self._mean = (stamp, mu)
        return mu

    def _matmat_torch(self, V: Tensor) -> Tensor:
        obj, K = self.objective, V.shape[1]
        acc = [torch.zeros(K, *s, dtype=V.dtype, device=V.device) for s in obj.layout.shapes]
        starts = list(range(0, K, self.max_columns))
        chunks = [split_columns(obj, V[:, s:s + self.max_columns]) for s in starts]

        def run():  # this rank's shard; summed over the ranks (with the total weight) by reduce_pass
            total = 0.0
            with obj.session():
                for kept, w in self._kept_batches():
                    fn, theta = self._per_sample(kept), tuple(obj.theta())
                    pull = _autodiff.Pullback(obj, fn, theta)
                    for s, Vs in zip(starts, chunks):
                        k = Vs[0].shape[0]
                        S, self.last_path = _autodiff.jvp_columns(obj, fn, theta, Vs)  # [k, n]: ⟨∇g_i, v⟩
                        res = pull.columns(w[None] * S)
                        for a, r in zip(acc, res):
                            a[s:s + k].add_(r)
                    total += float(w.sum())
            return join_columns(acc, K), total

        out, total = obj.reduce_pass(run, lambda: V.new_zeros(obj.num_params, K), "GradientCovariance")
        self._check_total(total)
        out = out / total
        if self.center:
            mu = self.mean_gradient()
            out = out - mu[:, None] * (mu @ V)[None]
        return out

    # ---- per-sample gradients and the factor -------------------------------------------------------
    def _sample_fn(self) -> Callable:
        """(θ, x_i, y_i) ↦ g_i for one sample (no batch dimension), for ``vmap(grad(...))``."""
        obj = self.objective

        def one(theta, x, y):
            xb = _tree_map(lambda t: t.unsqueeze(0), x)
            yb = None if y is None else _tree_map(lambda t: t.unsqueeze(0), y)
            out = obj.forward(theta, xb)
            value = obj.loss_fn(out, yb) if self.g == "loss" else self.g(out, yb)
            return value.reshape(())

        return one

    def default_chunk_size(self) -> int:
        """Samples per vmapped chunk: about ``CHUNK_ELEMENTS`` gradient entries (16 to 1024 samples)."""
        return int(min(1024, max(16, CHUNK_ELEMENTS // max(1, self.shape[0]))))

    def sample_gradient_pass(self, consume: Callable[[Tensor, Tensor], None], chunk_size: int | None = None) -> int:
        r"""Call ``consume(G_c, w_c)`` for chunks of per-sample gradients ``G_c [c, P]`` (rows ∇g_i of
        kept samples, data order, not centred or weighted) with their weights ``w_c [c]``.

        **Cost**: one pass; per chunk one ``vmap(grad(g_i))`` over its samples (each sample runs
        alone, as a batch of one), memory O(chunk · P). Returns the number of rows.
        """
        obj = self.objective
        c = self.default_chunk_size() if chunk_size is None else chunk_size
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise ValueError(f"GradientCovariance.sample_gradient_pass: expected a positive integer chunk_size, "
                             f"got {chunk_size!r}.")
        one = self._sample_fn()
        randomness = "different" if obj.allow_stochastic else "error"
        rows, offset, total = 0, 0, 0.0
        with obj.session():
            theta = tuple(obj.theta())
            for batch in obj.batches():
                checking = obj._checking
                kept, w = self._kept(batch, offset)
                offset += batch.n
                if kept is None:
                    continue
                if checking:  # first pass: targets and the shape of g, on the whole batch
                    with torch.no_grad():
                        self._per_sample(kept)(*theta)
                y_dims = None if kept.y is None else 0
                per_sample = vmap(grad(one), in_dims=(None, 0, y_dims), randomness=randomness)
                if not _autodiff.functorch_ok(obj):
                    per_sample = _loop_grad(one)
                for s in range(0, kept.n, c):
                    x = _tree_map(lambda t: t[s:s + c], kept.x)
                    y = None if kept.y is None else _tree_map(lambda t: t[s:s + c], kept.y)
                    try:
                        parts = per_sample(theta, x, y)
                    except RuntimeError as err:
                        # torch.func refuses the model (a legacy autograd.Function), or vmap cannot
                        # batch it (data-dependent control flow, .item(): HuggingFace models): one
                        # sample at a time by plain autograd — exact; a genuine error raises again there
                        if _autodiff.refuses_functorch(err):
                            _autodiff.note(obj, "functorch", False)
                        per_sample = _loop_grad(one)
                        parts = per_sample(theta, x, y)
                        self.last_path = "per-sample gradients one sample at a time (torch.autograd)"
                    n = parts[0].shape[0]
                    G = torch.cat([p.reshape(n, -1) for p in parts], dim=1)
                    consume(G, w[s:s + c])
                    rows += n
                total += float(w.sum())
        self._check_total(total)
        return rows

    def sample_gradients(self, chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
        r"""All per-sample gradients of the kept samples, ``G [N_kept, P]``, and their weights ``[N_kept]``.

        Row i is ∇_θ g_i (layout order); C = Gᵀ diag(w) G / W (uncentred).
        **Cost**: one pass (:meth:`sample_gradient_pass`); memory N_kept · P entries (written in
        place; with ``classes`` the rows are collected first, so the peak is twice that).
        """
        w = self.kept_weights() if self.classes is None else None
        if w is not None:
            G = torch.empty(w.shape[0], self.shape[1], dtype=self.torch_dtype, device=self.device)
            row = [0]

            def write(Gc, _w):
                G[row[0]:row[0] + Gc.shape[0]] = Gc
                row[0] += Gc.shape[0]

            rows = self.sample_gradient_pass(write, chunk_size)
            if rows != G.shape[0]:
                raise ValueError(f"GradientCovariance.sample_gradients: a pass kept {rows} samples, expected "
                                 f"{G.shape[0]}; the data changed.")
            return G, w
        parts: list[Tensor] = []
        weights: list[Tensor] = []

        def keep(Gc, wc):
            parts.append(Gc)
            weights.append(wc)

        self.sample_gradient_pass(keep, chunk_size)
        return torch.cat(parts), torch.cat(weights)

    def factor(self, multipliers: Tensor | None = None, kept_weights: Tensor | None = None):
        """The factor F [N_kept, P] with FᵀF = C (see :class:`GradientFactor`)."""
        from .gradient_factor import GradientFactor  # the factor builds on this class

        return GradientFactor(self, multipliers, kept_weights)


def _loop_grad(one: Callable) -> Callable:
    """``vmap(grad(one))`` by plain autograd, one sample at a time (models torch.func refuses)."""
    def per_sample(theta, x, y):
        rows = []
        n = _tree_leaves(x)[0].shape[0]
        for i in range(n):
            th = [t.detach().requires_grad_() for t in theta]
            xi = _tree_map(lambda t: t[i], x)
            yi = None if y is None else _tree_map(lambda t: t[i], y)
            with torch.enable_grad():
                value = one(th, xi, yi)
                grads = torch.autograd.grad(value, th, allow_unused=True)
            rows.append([torch.zeros_like(t) if g is None else g for g, t in zip(grads, th)])
        return [torch.stack(parts) for parts in zip(*rows)]

    return per_sample
