r"""Second derivatives of the model outputs: weighted output Hessians and the Hessian residual.

By the chain rule the Hessian of a batch loss ``ℓ_b(f(θ, X_b))`` splits into two terms,

.. math::
    \nabla^2_\theta \ell_b = J_b^\top \big(\nabla^2_f \ell_b\big) J_b
    + \sum_{i \in b} \sum_k \frac{\partial \ell_b}{\partial f_{ik}}\, \nabla^2_\theta f_{ik},

the generalized Gauss-Newton matrix (:class:`~curvops.GGN`) and a residual built from the
Hessians of the single output components.  This module gives the second term and its
building block as operators:

* :class:`OutputHessian` — ``Σ_{i,k} u_{ik} ∇²_θ f_k(x_i)`` for any weighting ``u`` (a one-hot
  ``u`` is the Hessian of one output component of one sample);
* :class:`HessianResidual` — the residual above with ``u = ∂ℓ/∂f``, normalized like the loss,
  so that ``Hessian = GGN + HessianResidual``.

Both compute a Hessian-vector product of the scalar ``θ ↦ ⟨u_b, f(θ, X_b)⟩`` per batch
(reverse-over-reverse), never a difference of two other operators.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from ..objective import Batch, Objective
from ._curvature import make_objective
from .hessian import ScalarHessian as _ScalarHVP

def _check_output(api: str, out, batch: Batch) -> Tensor:
    if not isinstance(out, Tensor):
        raise TypeError(
            f"{api}: expected the model to return a tensor, got {type(out).__name__} on batch {batch.index}. "
            f"Pass output= to pick the prediction (e.g. output=lambda o: o.logits)."
        )
    return out


# ---- OutputHessian ----------------------------------------------------------------------
def _never_called(out, target):  # the loss slot of OutputHessian's Objective
    raise AssertionError("OutputHessian: internal error, the placeholder loss was called.")


def _inputs_only(data):
    """Bare inputs ``X`` (tensor or dict) or ``(X, None)`` → ``(X, empty targets)``; else unchanged."""
    if isinstance(data, tuple) and len(data) == 2 and data[1] is None:
        X = data[0]
    elif isinstance(data, (Tensor, Mapping)):
        X = data
    else:
        return data
    leaves = [X] if isinstance(X, Tensor) else [t for t in (X.values() if isinstance(X, Mapping) else X)
                                                  if isinstance(t, Tensor)]
    if not leaves or leaves[0].dim() == 0:
        raise TypeError(
            f"OutputHessian: expected inputs as a tensor [N, ...] or a dict/tuple of such tensors, got "
            f"{type(X).__name__}. Pass data as X, (X, None), (X, y), a list of batches or a DataLoader."
        )
    return X, torch.zeros(leaves[0].shape[0], 0)


def _shuffles(data) -> bool:
    from torch.utils.data import DataLoader, RandomSampler

    return isinstance(data, DataLoader) and isinstance(getattr(data, "sampler", None), RandomSampler)


class _OneHot:
    """Weights of one output component of one sample (built lazily per batch)."""

    def __init__(self, sample: int, index):
        if isinstance(sample, bool) or not isinstance(sample, int) or sample < 0:
            raise ValueError(f"OutputHessian.component: expected sample as an integer ≥ 0, got {sample!r}.")
        if isinstance(index, int) and not isinstance(index, bool):
            index = (index,)
        if not (isinstance(index, tuple) and all(isinstance(k, int) and not isinstance(k, bool) for k in index)):
            raise TypeError(
                f"OutputHessian.component: expected index as an int (flat index into one sample's outputs) "
                f"or a tuple of ints, got {index!r}."
            )
        self.sample, self.index = sample, index

    def __call__(self, out: Tensor, offset: int) -> Tensor:
        u = torch.zeros_like(out)
        i = self.sample - offset
        if 0 <= i < out.shape[0]:
            row = u[i]
            shape = tuple(row.shape)
            if len(self.index) == 1:
                if not 0 <= self.index[0] < max(row.numel(), 1):
                    raise ValueError(
                        f"OutputHessian.component: expected index in [0, {row.numel()}) (flat index into "
                        f"outputs of shape {shape}), got {self.index[0]}."
                    )
                row.view(-1)[self.index[0]] = 1
            else:
                if len(self.index) != len(shape) or any(not 0 <= k < s for k, s in zip(self.index, shape)):
                    raise ValueError(
                        f"OutputHessian.component: expected an index into one sample's outputs of shape "
                        f"{shape}, got {self.index}."
                    )
                row[self.index] = 1
        return u


class OutputHessian(_ScalarHVP):
    r"""Weighted sum of the parameter Hessians of the model outputs.

    .. math:: A = \sum_{i=1}^{N} \sum_{k} u_{ik}\, \nabla^2_\theta f_k(x_i;\theta)
              \in \mathbb{R}^{P \times P}

    for a weighting ``u`` over samples ``i`` and output components ``k`` (``u`` has the shape of
    the stacked outputs, ``[N, *out_shape]``).  A one-hot ``u`` gives the Hessian
    ``∇²_θ f_k(x_i)`` of a single component (:meth:`component`); ``u = ∂L/∂f`` gives
    :class:`HessianResidual`.  There is no loss and no normalization: the weights carry any
    scaling, and the sum runs over every sample of every batch.

    Internally the data and model go through an :class:`~curvops.Objective` whose loss slot
    holds a placeholder that is never called (reduction ``"sum"``, so batches are added with
    weight 1); targets in the data are ignored, and inputs-only data is accepted.

    **Cost**: per product one pass over the data; per batch one forward, one backward that records
    its graph (of ``θ ↦ ⟨u_b, f(θ, X_b)⟩``), then one double-backward per column (a loop on CPU,
    batched on CUDA, as for :class:`~curvops.Hessian`) — about one HVP per column.

    **Tags**: symmetric (indefinite in general; zero for a model linear in θ).

    Args:
        model: an ``nn.Module`` or a plain function ``f(params, x)`` (then pass ``params=`` as the
            dict of all its parameters).
        data: inputs ``X`` (a tensor or dict of tensors), ``(X, None)``, ``(X, y)``, a list of
            ``(x, y)`` batches or an unshuffled ``DataLoader`` (targets are ignored).
        weights: a tensor of the stacked outputs' shape ``[N, *out_shape]`` (rows in data order), or a
            callable ``(batch) -> Tensor`` returning the weights of one
            :class:`~curvops.objective.Batch` (shape ``[n_b, *out_shape]``), called once per batch
            per product.
        params: which parameters to differentiate (names, submodules, a predicate; for a plain
            function the dict of all its parameters).
        select: for a plain function, the subset of ``params`` to differentiate.
        batch_size: split an ``X`` / ``(X, y)`` pair into batches of this size.
        output: optional ``output(model_output) -> prediction``.
        allow_stochastic: accept dropout / train-mode BatchNorm (see :class:`~curvops.Objective`).
        max_columns: columns processed together per batch.
        column_strategy: ``"auto"``, ``"loop"`` or ``"batched"`` (as for :class:`~curvops.Hessian`).

    Raises:
        TypeError: weights neither a tensor nor a callable; bad data or model (from Objective).
        ValueError: weights that are not finite, a weights tensor whose number of rows differs from
            the number of samples (at construction for an ``(X, y)`` pair, else at the end of the
            first product), weights of the wrong shape on a batch (during the product), a weights
            tensor with a shuffling DataLoader.

    Example:
        >>> A = OutputHessian(model, X, torch.ones(len(X), 3))        # doctest: +SKIP
        >>> H_00 = OutputHessian.component(model, X, sample=0, index=0)  # doctest: +SKIP
    """

    def __init__(self, model, data, weights, *, params=None, select=None, batch_size: int | None = None,
                 output: Callable | None = None, allow_stochastic: bool = False, max_columns: int = 64,
                 column_strategy: str = "auto"):
        if isinstance(model, Objective):
            raise TypeError(
                "OutputHessian: expected a model (nn.Module or function), got an Objective; an output Hessian "
                "involves no loss. Pass objective.model and the data instead."
            )
        objective = Objective(model, _never_called, _inputs_only(data), params=params, select=select,
                              reduction="sum", batch_size=batch_size, output=output,
                              allow_stochastic=allow_stochastic)
        super().__init__(objective, max_columns=max_columns, column_strategy=column_strategy)
        self._one_hot: _OneHot | None = None
        self._fn: Callable | None = None
        self.weights: Tensor | None = None
        if isinstance(weights, _OneHot):
            self._one_hot = weights
        elif isinstance(weights, Tensor):
            if weights.dim() == 0 or weights.is_complex():
                raise ValueError(
                    f"OutputHessian: expected real weights of shape [N, *out_shape], got a "
                    f"{'complex' if weights.is_complex() else '0-dim'} tensor of shape {tuple(weights.shape)}."
                )
            u = weights.detach().to(device=objective.device, dtype=objective.dtype)
            if not bool(torch.isfinite(u).all()):
                raise ValueError("OutputHessian: expected finite weights, got NaN or Inf entries.")
            if _shuffles(objective.data):
                raise ValueError(
                    "OutputHessian: expected an unshuffled DataLoader with a weights tensor (its rows follow the "
                    "data order), got shuffle=True. Use shuffle=False, or pass weights as a callable (batch) -> u."
                )
            self.weights = u
        elif callable(weights):
            self._fn = weights
        else:
            raise TypeError(
                f"OutputHessian: expected weights as a tensor [N, *out_shape] or a callable (batch) -> tensor, "
                f"got {type(weights).__name__}."
            )
        known_n = getattr(objective.data, "n", None)  # an (X, y) pair: the sample count is free
        if known_n is not None:
            self._check_count(known_n)
        self._offset = 0

    @classmethod
    def component(cls, model, data, *, sample: int, index, **kwargs) -> "OutputHessian":
        r"""The Hessian of one output component of one sample, :math:`\nabla^2_\theta f_k(x_i)`.

        Args:
            model, data, **kwargs: as for :class:`OutputHessian`.
            sample: the sample ``i`` (its position in the data order).
            index: the component ``k``: an int (flat index into one sample's outputs) or a tuple
                indexing one sample's output tensor.

        Returns:
            An :class:`OutputHessian` with one-hot weights (built per batch, never stored).

        Raises:
            ValueError: ``sample`` or ``index`` out of range (``index`` when the batch holding the
                sample is reached; ``sample`` at construction for an ``(X, y)`` pair, else at the end
                of the first product).
            TypeError: an ``index`` that is neither an int nor a tuple of ints.
        """
        return cls(model, data, _OneHot(sample, index), **kwargs)

    def _check_count(self, n: int) -> None:
        if self.weights is not None and self.weights.shape[0] != n:
            raise ValueError(
                f"OutputHessian: expected weights with one row per sample ({n} samples), got shape "
                f"{tuple(self.weights.shape)}. Stack the weights in data order as [N, *out_shape]."
            )
        if self._one_hot is not None and self._one_hot.sample >= n:
            raise ValueError(
                f"OutputHessian.component: expected sample in [0, {n}), got {self._one_hot.sample}."
            )

    def _batch_weights(self, batch: Batch, out: Tensor) -> Tensor:
        offset = self._offset
        if self._one_hot is not None:
            return self._one_hot(out.detach(), offset)
        if self.weights is not None:
            if offset + batch.n > self.weights.shape[0]:
                raise ValueError(
                    f"OutputHessian: expected weights with one row per sample, got {self.weights.shape[0]} rows "
                    f"but the data has at least {offset + batch.n} samples (batch {batch.index})."
                )
            u = self.weights[offset:offset + batch.n]
        else:
            u = self._fn(batch)
            if not isinstance(u, Tensor):
                raise TypeError(
                    f"OutputHessian: expected the weights callable to return a tensor, got {type(u).__name__} "
                    f"on batch {batch.index}."
                )
            u = u.detach().to(device=out.device, dtype=out.dtype)
        if u.shape != out.shape:
            raise ValueError(
                f"OutputHessian: expected weights of the outputs' shape {tuple(out.shape)} on batch {batch.index}, "
                f"got {tuple(u.shape)}. Weights are [N, *out_shape] over the whole data ([n_b, *out_shape] "
                f"from a callable)."
            )
        return u

    def _scalar(self, batch: Batch, theta: Sequence[Tensor]) -> Tensor:
        out = _check_output("OutputHessian", self.objective.forward(theta, batch.x), batch)
        u = self._batch_weights(batch, out)
        self._offset += batch.n
        return (u * out).sum()

    def _matmat_torch(self, V: Tensor) -> Tensor:
        self._offset = 0
        res = super()._matmat_torch(V)
        self._check_count(self._offset)
        return res


# ---- HessianResidual --------------------------------------------------------------------
class HessianResidual(_ScalarHVP):
    r"""The Hessian minus the GGN, computed directly from the output Hessians.

    .. math:: R = \frac{1}{W}\sum_b w_b \sum_{i \in b} \sum_k \frac{\partial \ell_b}{\partial f_{ik}}\,
              \nabla^2_\theta f_{ik} \in \mathbb{R}^{P \times P},
              \qquad \nabla^2_\theta L = G + R

    with the batch losses ``ℓ_b``, the batch weights ``w_b`` of :class:`~curvops.Objective`
    (``w_b = d_b``, what the batch mean divides by, and ``W = Σ_b w_b`` for ``"mean"``; ``w_b = 1``
    and no ``1/W`` for ``"sum"``) and the GGN ``G`` (:class:`~curvops.GGN`).  Per
    batch, ``r_b = ∂ℓ_b/∂f`` is evaluated at the current outputs and held fixed, and the product
    is the HVP of ``θ ↦ ⟨r_b, f(θ, X_b)⟩`` — no Hessian or GGN product is formed or subtracted.
    ``R`` vanishes where the loss gradient in output space does (an interpolating minimum of a
    regression) and for models linear in θ.

    **Cost**: per product one pass over the data; per batch one forward, one loss gradient in output
    space, one backward that records its graph, then one double-backward per column (about one
    HVP per column, like :class:`~curvops.Hessian`).

    **Tags**: symmetric (indefinite in general).

    Args:
        model_or_objective: an :class:`~curvops.Objective`, or a model followed by ``loss`` and ``data``.
        max_columns: columns processed together per batch.
        column_strategy: ``"auto"``, ``"loop"`` or ``"batched"`` (as for :class:`~curvops.Hessian`).
        **kwargs: passed to :class:`~curvops.Objective` (``params=``, ``reduction=``, ``batch_size=``, …).

    Raises:
        TypeError / ValueError: bad model, loss or data (from :class:`~curvops.Objective`).

    Example:
        >>> R = HessianResidual(model, "cross_entropy", (X, y))       # doctest: +SKIP
        >>> Rv = R @ v                                             # doctest: +SKIP
    """

    def __init__(self, model_or_objective, loss=None, data=None, *, max_columns: int = 64,
                 column_strategy: str = "auto", **kwargs):
        objective = make_objective(model_or_objective, loss, data, **kwargs)
        super().__init__(objective, max_columns=max_columns, column_strategy=column_strategy)

    def _scalar(self, batch: Batch, theta: Sequence[Tensor]) -> Tensor:
        obj = self.objective
        out = _check_output("HessianResidual", obj.forward(theta, batch.x), batch)
        o = out.detach().requires_grad_()
        value = obj.loss(o, batch.y, batch.index)
        (r,) = torch.autograd.grad(value, o, allow_unused=True)
        if r is None:  # a loss that ignores the outputs
            r = torch.zeros_like(o)
        return (r * out).sum()
