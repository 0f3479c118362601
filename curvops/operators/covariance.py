r"""The active-subspace matrix: the (weighted, optionally centred) covariance of per-sample gradients."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.func import jvp, vjp, vmap

from ..objective import Batch, Objective
from . import tags as _tags
from ._curvature import join_columns, make_objective, split_columns
from .base import Operator


class GradientCovariance(Operator):
    r"""Second moment (or covariance) of per-sample gradients, matrix-free.

    .. math:: C = \frac{1}{W}\sum_i w_i\, \nabla g_i \nabla g_i^\top
        \quad\text{or, centred,}\quad
        \frac{1}{W}\sum_i w_i\, (\nabla g_i - \mu)(\nabla g_i - \mu)^\top,\qquad
        \mu = \frac{1}{W}\sum_i w_i \nabla g_i,\ W = \sum_i w_i

    with ``g_i = g(f(θ, x_i), y_i)`` a scalar per sample: by default the loss of sample i alone
    (``g="loss"``), or any callable ``g(outputs, targets) -> [n]`` of a batch (e.g. one model
    output, ``lambda out, y: out[:, 0]``). Its eigenvectors are the active subspace of ``g``
    (Constantine 2015); for ``g = loss`` and unit weights, the uncentred C is the empirical Fisher
    with mean normalization.

    **Cost**: per product one pass over the data; per batch a forward-mode product of the
    per-sample vector g (vmapped over columns) and one VJP per column. Centring adds one pass for
    μ on the first product (cached, and recomputed when the parameters change).
    Never forms a P×P matrix or all per-sample gradients at once.

    **Tags**: symmetric, psd.

    Args:
        model_or_objective, loss, data, **kwargs: as for :class:`~curvops.Hessian`.
        g: ``"loss"`` or a callable ``g(outputs, targets) -> Tensor[n]``.
        weights: per-sample weights ``[N]`` in data order (default: all ones), ≥ 0.
        center: subtract the weighted mean gradient.

    References:
        Constantine (2015). *Active Subspaces: Emerging Ideas for Dimension Reduction in Parameter Studies*.
    """

    def __init__(self, model_or_objective, loss=None, data=None, *, g: str | Callable = "loss",
                 weights: Tensor | None = None, center: bool = False, max_columns: int = 64, **kwargs):
        obj: Objective = make_objective(model_or_objective, loss, data, **kwargs)
        if not (g == "loss" or callable(g)):
            raise ValueError(f"GradientCovariance: g must be 'loss' or a callable g(outputs, targets), got {g!r}.")
        if weights is not None:
            weights = torch.as_tensor(weights, dtype=obj.dtype, device=obj.device)
            n = obj.num_samples()
            if weights.shape != (n,):
                raise ValueError(f"GradientCovariance: expected weights of shape ({n},) (one per sample), "
                                 f"got {tuple(weights.shape)}.")
            if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()) or float(weights.sum()) <= 0:
                raise ValueError("GradientCovariance: weights must be finite, non-negative and not all zero.")
        P = obj.num_params
        super().__init__((P, P), obj.dtype, obj.device, tags=(_tags.PSD,), domain=obj.layout, range=obj.layout)
        self.objective, self.g, self.weights, self.center = obj, g, weights, center
        self.max_columns = max_columns
        self._mean: tuple | None = None  # (state versions, μ [P])

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

    def _batch_weights(self, batch: Batch, offset: int) -> Tensor:
        if self.weights is None:
            return torch.ones(batch.n, dtype=self.torch_dtype, device=self.device)
        return self.weights[offset:offset + batch.n]

    def mean_gradient(self) -> Tensor:
        """μ = Σ w_i ∇g_i / W (one pass; cached until the parameters change)."""
        obj = self.objective
        versions = obj.state_versions()
        if self._mean is not None and self._mean[0] == versions:
            return self._mean[1]
        acc = [torch.zeros(s, dtype=self.torch_dtype, device=self.device) for s in obj.layout.shapes]
        total, offset = 0.0, 0
        with obj.session():
            for batch in obj.batches():
                w = self._batch_weights(batch, offset)
                _, vjp_fn = vjp(self._per_sample(batch), *obj.theta())
                for a, r in zip(acc, vjp_fn(w)):
                    a.add_(r)
                total += float(w.sum())
                offset += batch.n
        mu = torch.cat([a.reshape(-1) for a in acc]) / total
        self._mean = (versions, mu)
        return mu

    def _matmat_torch(self, V: Tensor) -> Tensor:
        obj, K = self.objective, V.shape[1]
        acc = [torch.zeros(K, *s, dtype=V.dtype, device=V.device) for s in obj.layout.shapes]
        total, offset = 0.0, 0
        starts = list(range(0, K, self.max_columns))
        chunks = [split_columns(obj, V[:, s:s + self.max_columns]) for s in starts]
        with obj.session():
            for batch in obj.batches():
                w = self._batch_weights(batch, offset)
                fn, theta = self._per_sample(batch), tuple(obj.theta())
                _, vjp_fn = vjp(fn, *theta)
                for s, Vs in zip(starts, chunks):
                    k = Vs[0].shape[0]
                    if k == 1:
                        S = jvp(fn, theta, tuple(v[0] for v in Vs))[1][None]
                        res = [r[None] for r in vjp_fn(w * S[0])]
                    else:
                        S = vmap(lambda *v: jvp(fn, theta, v)[1])(*Vs)  # [k, n]: ⟨∇g_i, v⟩
                        res = vmap(vjp_fn)(w[None] * S)
                    for a, r in zip(acc, res):
                        a[s:s + k].add_(r)
                total += float(w.sum())
                offset += batch.n
        out = join_columns(acc, K) / total
        if self.center:
            mu = self.mean_gradient()
            out = out - mu[:, None] * (mu @ V)[None]
        return out
