r"""Curvature operators per subset of the data: per class, per cluster, or per named index set
(:func:`per_subset`); see :mod:`curvops.analysis.averages` for how they average back to the
full-data operator."""

from __future__ import annotations

from typing import Any, Hashable, Iterable, Mapping

import torch
from torch import Tensor

from ..operators import Operator
from .operator_family import build_operator, resolve_operator


class SubsetOperators(dict):
    """``{name: operator}`` from :func:`per_subset`, with each subset's samples.

    Attributes:
        sizes: ``{name: number of samples}`` (the weights that rebuild the full-data operator
            of a mean-reduced loss: ``average(ops, weights=ops.sizes)``).
        indices: ``{name: index tensor [n_S]}`` of the samples in each subset (data order).
    """

    def __init__(self, items: Iterable[tuple[Hashable, Operator]], sizes: dict, indices: dict):
        super().__init__(items)
        self.sizes = sizes
        self.indices = indices

def _tree_index(x, idx: Tensor, api: str):
    if isinstance(x, Tensor):
        return x[idx.to(x.device)]
    if isinstance(x, Mapping):
        return {k: _tree_index(v, idx, api) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(_tree_index(v, idx, api) for v in x)
    raise TypeError(f"{api}: expected inputs X as a tensor, or a tuple / dict of tensors, got {type(x).__name__}.")


def _tree_leading(x, api: str) -> list[int]:
    if isinstance(x, Tensor):
        return [int(x.shape[0])] if x.dim() > 0 else [-1]
    if isinstance(x, Mapping):
        return [n for v in x.values() for n in _tree_leading(v, api)]
    if isinstance(x, tuple):
        return [n for v in x for n in _tree_leading(v, api)]
    raise TypeError(f"{api}: expected inputs X as a tensor, or a tuple / dict of tensors, got {type(x).__name__}.")


def _split_data(data, api: str) -> tuple[Any, Tensor, int]:
    if not (isinstance(data, tuple) and len(data) == 2 and isinstance(data[1], Tensor)):
        raise TypeError(f"{api}: expected data as an (X, y) pair of tensors to select subsets of samples, got "
                        f"{type(data).__name__}{f' of length {len(data)}' if isinstance(data, (list, tuple)) else ''}. "
                        f"Concatenate the batches into one (X, y) pair (X may be a tuple or dict of tensors); "
                        f"batch_size= still splits it for the products.")
    X, y = data
    if y.dim() == 0:
        raise ValueError(f"{api}: expected targets y with a leading sample dimension, got a 0-dim tensor.")
    N = int(y.shape[0])
    sizes = _tree_leading(X, api)
    if any(n != N for n in sizes):
        raise ValueError(f"{api}: expected every tensor in X to have {N} samples (as y), got leading sizes {sizes}.")
    return X, y, N


def _labels_to_subsets(labels: Tensor, N: int, api: str, what: str) -> dict[Hashable, Tensor]:
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"{api}: expected {what} as an integer tensor, got dtype {labels.dtype}. "
                        f"Convert with labels.long() (or pass a dict of boolean masks).")
    if labels.shape != (N,):
        raise ValueError(f"{api}: expected {what} of shape ({N},) (one per sample), got {tuple(labels.shape)}.")
    labels = labels.cpu()
    return {int(c): torch.nonzero(labels == c).flatten() for c in torch.unique(labels)}


def _index_subset(name, value, N: int, api: str) -> Tensor:
    t = value if isinstance(value, Tensor) else torch.as_tensor(value)
    t = t.cpu()
    if t.numel() == 0:
        raise ValueError(f"{api}: subset {name!r} is empty; every subset needs at least one sample.")
    if t.dtype == torch.bool:
        if t.shape != (N,):
            raise ValueError(f"{api}: subset {name!r}: expected a boolean mask of shape ({N},), got {tuple(t.shape)}.")
        idx = torch.nonzero(t).flatten()
        if idx.numel() == 0:
            raise ValueError(f"{api}: subset {name!r} is empty (its mask selects no sample); every subset needs "
                             f"at least one sample.")
        return idx
    if t.is_floating_point() or t.is_complex() or t.dim() != 1:
        raise TypeError(f"{api}: subset {name!r}: expected a 1-D integer index tensor or a boolean mask [{N}], "
                        f"got dtype {t.dtype} and shape {tuple(t.shape)}.")
    if int(t.min()) < 0 or int(t.max()) >= N:
        raise ValueError(f"{api}: subset {name!r}: expected indices in [0, {N}), got range "
                         f"[{int(t.min())}, {int(t.max())}].")
    return t.long()


def _resolve_subsets(subsets, y: Tensor, N: int, api: str) -> dict[Hashable, Tensor]:
    if isinstance(subsets, str):
        if subsets != "classes":
            raise ValueError(f"{api}: expected subsets='classes', a dict name → indices/mask, or a tensor of "
                             f"cluster labels, got {subsets!r}.")
        if y.is_floating_point() or y.dim() != 1:
            raise ValueError(f"{api}(subsets='classes'): expected integer class labels y of shape ({N},), got "
                             f"{y.dtype} of shape {tuple(y.shape)}. Pass the labels yourself, e.g. "
                             f"subsets=y.argmax(1) for one-hot targets.")
        return _labels_to_subsets(y, N, api, "class labels y")
    if isinstance(subsets, Mapping):
        if not subsets:
            raise ValueError(f"{api}: expected at least one subset, got an empty dict.")
        return {name: _index_subset(name, v, N, api) for name, v in subsets.items()}
    if isinstance(subsets, Tensor) or hasattr(subsets, "__array__"):
        return _labels_to_subsets(torch.as_tensor(subsets), N, api, "cluster labels")
    raise TypeError(f"{api}: expected subsets='classes', a dict name → indices/mask, or a tensor of cluster "
                    f"labels, got {type(subsets).__name__}.")


def per_subset(operator, model, loss, data, subsets="classes", **kw) -> SubsetOperators:
    r"""One operator per subset of the data: per class, per cluster, or per named index set.

    .. math:: A_S = A\big(\theta;\ \{(x_i, y_i)\}_{i\in S}\big),

    the operator family ``operator`` (the Hessian, GGN, …) of the same model and parameters on
    the samples of ``S`` only, normalized like the loss on those samples (a mean-reduced loss
    averages over the ``n_S`` samples of the subset).  Weighted by ``n_S / N``, the subsets of a
    partition average back to the full-data operator (for ``reduction="mean"``; see
    :mod:`curvops.analysis.averages`), so ``average(ops, weights=ops.sizes)`` equals ``operator(model, loss, data)``.

    **Cost**: construction only: the subsets' data are gathered (a copy of the selected samples)
    and the operators are built lazily (no pass over the data); each product with ``A_S``
    costs one pass over ``S``.

    Args:
        operator: an operator class (``curvops.Hessian``, ``GGN``, ``GradientCovariance``, …), a
            name (``"hessian"``, ``"ggn"``, ``"fisher"``, ``"empirical_fisher"``,
            ``"gradient_covariance"``), or a callable ``(model, loss, data, **kw) -> Operator``.
        model, loss: as for :class:`curvops.Objective`.
        data: an ``(X, y)`` pair of tensors (``X`` may be a tuple or dict of tensors).
        subsets: ``"classes"`` (one operator per class label in the integer targets ``y``), a
            dict ``name → index tensor or boolean mask [N]``, or an integer tensor ``[N]`` of
            cluster labels (one operator per distinct label).
        **kw: passed to ``operator`` (e.g. ``batch_size=``, ``params=``, ``reduction=``).

    Returns:
        :class:`SubsetOperators`: a dict ``{name: operator}`` (labels as ``int`` for classes
        and clusters, in increasing order; the dict's keys otherwise) with ``.sizes`` and
        ``.indices``.

    Raises:
        TypeError: data not an ``(X, y)`` pair of tensors, labels not integers, a bad operator.
        ValueError: an empty subset (named), indices out of range, masks or labels of the wrong
            length, non-integer class targets for ``"classes"`` — all before any operator is built.

    Example:
        >>> ops = per_subset(curvops.Hessian, model, "cross_entropy", (X, y), "classes")  # doctest: +SKIP
        >>> {c: curvops.eigsh(H, 1).eigenvalues.item() for c, H in ops.items()}          # doctest: +SKIP
        >>> H = average(ops, weights=ops.sizes)   # = curvops.Hessian(model, "cross_entropy", (X, y))  # doctest: +SKIP
    """
    api = "per_subset"
    factory = resolve_operator(operator, api)
    X, y, N = _split_data(data, api)
    parts = _resolve_subsets(subsets, y, N, api)
    ops, sizes, indices = [], {}, {}
    for name, idx in parts.items():
        sub = (_tree_index(X, idx, api), y[idx.to(y.device)])
        ops.append((name, build_operator(factory, model, loss, sub, kw, api, f"subset {name!r}")))
        sizes[name], indices[name] = int(idx.numel()), idx
    return SubsetOperators(ops, sizes, indices)
