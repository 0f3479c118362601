r"""Averages of curvature operators over data subsets, training runs and checkpoints.

For any operator family (the Hessian, GGN, Fisher, gradient covariance, …) ``seeds/000`` asks
for averages over parts of the data, written $\bar A$, and over training runs, written
$\langle A\rangle$:

.. math::
    A_S = A(\theta;\ \{(x_i, y_i)\}_{i \in S}), \qquad
    \langle A \rangle_w = \frac{\sum_r w_r\, A_r}{\sum_r w_r}.

* :func:`per_subset` builds one operator per class, cluster or named index set, on that
  subset's samples only (same model, same parameters).
* :func:`average` is the weighted mean of operators of one shape, as a lazy sum: a product
  costs one product with every term.
* :func:`across_models` and :func:`across_checkpoints` average one operator family over
  several models of one architecture (independent runs, or checkpoints of one run).

For a loss that averages over samples (``reduction="mean"``) the full-data operator is the
count-weighted average of the per-subset operators of any partition of the data,

.. math:: A = \sum_S \frac{n_S}{N}\, A_S \qquad (\text{exactly, for the Hessian, GGN, Fisher, …}),

so ``average(ops, weights=ops.sizes)`` rebuilds it; for ``reduction="sum"`` the full
operator is the plain sum ``Σ_S A_S``.

The helpers live in :mod:`.operator_family` (operator families by name), :mod:`.checkpoints`
(loading and checking checkpoints) and :mod:`.subsets` (:func:`per_subset`); their names are
re-exported here.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import scipy.sparse.linalg as spla
from torch import Tensor, nn

from ..operators import Operator
from ..operators.algebra import add, as_operator, scale
from .checkpoints import _describe, check_state, load_state, model_at, validate_checkpoints
from .operator_family import OPERATORS, build_operator, resolve_operator
from .subsets import SubsetOperators, per_subset


def _weights(weights, names: list, api: str) -> list[float]:
    R = len(names)
    if weights is None:
        return [1.0] * R
    if isinstance(weights, Mapping):
        missing = [n for n in names if n not in weights]
        extra = [n for n in weights if n not in names]
        if missing or extra:
            raise ValueError(f"{api}: weights keys do not match the operators': missing {missing[:5]}, unexpected "
                             f"{extra[:5]}.")
        values = [weights[n] for n in names]
    else:
        values = weights.tolist() if isinstance(weights, Tensor) else list(weights)
    if len(values) != R:
        raise ValueError(f"{api}: expected {R} weights (one per operator), got {len(values)}.")
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError) as err:
        raise TypeError(f"{api}: expected numeric weights, got {values[:5]}.") from err
    bad = [v for v in values if not (v > 0 and v < float("inf"))]
    if bad:
        raise ValueError(f"{api}: expected finite positive weights, got {bad[:5]}. Drop an operator instead of "
                         f"giving it weight 0.")
    return values


def average(operators, weights=None) -> Operator:
    r"""Weighted average of operators of one shape, as a lazy sum.

    .. math:: \langle A \rangle_w = \frac{\sum_{r=1}^R w_r A_r}{\sum_{r=1}^R w_r}, \qquad w_r > 0.

    **Cost**: no work at construction; a product costs one product with each ``A_r``.

    **Tags**: those every term shares (the weights are positive, so PSD terms give a PSD average).

    Args:
        operators: a sequence of operators (or tensors / scipy operators), or a dict of them
            (e.g. from :func:`per_subset`).
        weights: ``None`` (equal weights), a sequence or tensor of ``R`` positive weights, or a
            dict with the operators' keys (e.g. ``ops.sizes``).

    Returns:
        The operator ``Σ_r (w_r / Σ w) A_r``.

    Raises:
        TypeError: not operators, or operators of different dtypes.
        ValueError: no operators, shapes that differ, different parameter sets or devices,
            weights that are not finite and positive or do not match the operators.

    Example:
        >>> import torch
        >>> from curvops import Dense, Identity
        >>> A = average([Dense(torch.eye(3, dtype=torch.float64)), 3 * Identity(3)], weights=[1, 3])
        >>> (A @ torch.ones(3, dtype=torch.float64)).tolist()       # (1·1 + 3·3) / 4 = 2.5
        [2.5, 2.5, 2.5]
    """
    api = "average"
    if isinstance(operators, Mapping):
        names, items = list(operators), list(operators.values())
    elif isinstance(operators, (spla.LinearOperator, Tensor)) or not isinstance(operators, Iterable):
        raise TypeError(f"{api}: expected a sequence or dict of operators, got {type(operators).__name__}.")
    else:
        items = list(operators)
        names = list(range(len(items)))
    if not items:
        raise ValueError(f"{api}: expected at least one operator, got none.")
    ops = []
    for name, A in zip(names, items):
        if not isinstance(A, (spla.LinearOperator, Tensor)) and not hasattr(A, "__array__"):
            raise TypeError(f"{api}: operator {name!r} is a {type(A).__name__}; expected an Operator, tensor or "
                            f"scipy LinearOperator.")
        ops.append(as_operator(A))
    shapes = {tuple(A.shape) for A in ops}
    if len(shapes) > 1:
        listing = ", ".join(f"{n!r}: {tuple(A.shape)}" for n, A in zip(names, ops))
        raise ValueError(f"{api}: expected operators of one shape, got {listing}. Average operators of the same "
                         f"model architecture and parameter selection.")
    dtypes = {A.torch_dtype for A in ops}
    if len(dtypes) > 1:
        raise TypeError(f"{api}: expected operators of one dtype, got {sorted(map(str, dtypes))}.")
    for lay in ("domain", "range"):
        layouts = [getattr(A, lay, None) for A in ops]
        if len({x for x in layouts if x is not None}) > 1:
            raise ValueError(f"{api}: the operators are over different parameter sets (their {lay} layouts differ); "
                             f"build them with the same parameter selection (params=).")
    w = _weights(weights, names, api)
    total = sum(w)
    return add(*[scale(A, wr / total) for A, wr in zip(ops, w)])


def _check_same_architecture(models: list[nn.Module], api: str) -> None:
    ref = [(n, tuple(p.shape), p.dtype) for n, p in models[0].named_parameters()]
    for r, m in enumerate(models[1:], start=1):
        got = [(n, tuple(p.shape), p.dtype) for n, p in m.named_parameters()]
        if got != ref:
            diff = [f"{a} vs {b}" for a, b in zip(ref, got) if a != b][:3]
            raise ValueError(f"{api}: model {r} does not have the parameter names and shapes of model 0 "
                             f"({len(got)} vs {len(ref)} parameters; first differences: {diff}). Average models "
                             f"of one architecture.")


def across_models(operator, models, loss, data, weights=None, **kw) -> Operator:
    r"""Average of one operator family over several models of one architecture (e.g. training runs).

    .. math:: \langle A \rangle = \frac{\sum_r w_r\, A(\theta_r)}{\sum_r w_r},

    where each term is the operator of model ``r`` **at its own parameters** θ_r: a product
    ``⟨A⟩ v`` is ``Σ_r (w_r/Σw) A(θ_r) v``, each model's curvature applied to the same vector of
    parameter coordinates.  This is meaningful when the coordinates correspond across models
    (checkpoints of one run, fine-tunings of one initialization); independent runs are related
    by permutations of hidden units, so their averaged curvature also averages over unaligned
    directions.

    **Cost**: construction builds ``R`` lazy operators (no data pass); a product costs one
    product with each model's operator.

    Args:
        operator: operator class, name or callable, as for :func:`per_subset`.
        models: ``R ≥ 1`` ``nn.Module`` s with the same parameter names, shapes and dtypes.
        loss, data: as for :class:`curvops.Objective` (the same data for every model).
        weights: as for :func:`average`.
        **kw: passed to ``operator``.

    Returns:
        The averaged operator (see :func:`average`).

    Raises:
        TypeError: models that are not ``nn.Module`` s.
        ValueError: no models, or models whose parameter names/shapes differ (before any operator
            is built), operators over different parameter selections, bad weights.

    Example:
        >>> H = across_models(curvops.Hessian, [run0, run1, run2], "cross_entropy", (X, y))  # doctest: +SKIP
        >>> curvops.eigsh(H, k=5).eigenvalues                                               # doctest: +SKIP
    """
    api = "across_models"
    factory = resolve_operator(operator, api)
    if isinstance(models, nn.Module) or not isinstance(models, Iterable):
        raise TypeError(f"{api}: expected a sequence of nn.Module models, got {type(models).__name__}.")
    models = list(models)
    if not models:
        raise ValueError(f"{api}: expected at least one model, got none.")
    for r, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise TypeError(f"{api}: model {r} is a {type(m).__name__}; expected an nn.Module.")
    _check_same_architecture(models, api)
    _weights(weights, list(range(len(models))), api)  # fail early on bad weights
    ops = [build_operator(factory, m, loss, data, kw, api, f"model {r}") for r, m in enumerate(models)]
    _check_layouts(ops, "model", api)
    return average(ops, weights)


def _check_layouts(ops: Sequence[Operator], what: str, api: str) -> None:
    layouts = [getattr(A, "domain", None) for A in ops]
    for r, lay in enumerate(layouts[1:], start=1):
        if lay != layouts[0]:
            raise ValueError(f"{api}: the operator of {what} {r} is over different parameters than that of {what} 0 "
                             f"(check requires_grad flags, or select them with params=).")


def across_checkpoints(operator, model, checkpoints, loss, data, weights=None, **kw) -> Operator:
    r"""Average of one operator family over checkpoints of a model (e.g. along training).

    .. math:: \langle A \rangle = \frac{\sum_t w_t\, A(\theta_t)}{\sum_t w_t}.

    Each checkpoint is loaded into its own deep copy of ``model`` (the model passed in is left
    untouched), and each term is the operator **at that checkpoint's parameters**: a product
    applies every checkpoint's own curvature to the same vector of parameter coordinates and
    averages the results (see :func:`across_models`).

    Every checkpoint is checked against ``model.state_dict()`` (missing or unexpected keys,
    shapes) before any copy or operator is built.

    **Cost**: ``T`` model copies in memory (the operators keep them); a product costs one
    product with each checkpoint's operator.  Files are read twice (a memory-mapped check, then
    the load).

    Args:
        operator: operator class, name or callable, as for :func:`per_subset`.
        model: the ``nn.Module`` whose architecture the checkpoints share.
        checkpoints: state dicts, file paths (loaded with ``torch.load(path, weights_only=True,
            map_location=<model's device>)``), or modules of the same architecture.
        loss, data: as for :class:`curvops.Objective`.
        weights: as for :func:`average`.
        **kw: passed to ``operator``.

    Returns:
        The averaged operator (see :func:`average`).

    Raises:
        TypeError: a model that is not an ``nn.Module``, checkpoints of the wrong kind or holding
            non-tensor entries, a model that cannot be deep-copied.
        ValueError: no checkpoints, a missing file, missing/unexpected keys or mismatched shapes
            (naming the checkpoint), bad weights — all before any operator is built.

    Example:
        >>> H = across_checkpoints("hessian", model, ["ep10.pt", "ep11.pt", "ep12.pt"],  # doctest: +SKIP
        ...                        "cross_entropy", (X, y))
    """
    api = "across_checkpoints"
    factory = resolve_operator(operator, api)
    checkpoints = validate_checkpoints(model, checkpoints, api)
    _weights(weights, list(range(len(checkpoints))), api)
    ops = []
    for t, ck in enumerate(checkpoints):
        twin = model_at(model, ck, t, api)
        ops.append(build_operator(factory, twin, loss, data, kw, api, _describe(ck, t)))
    _check_layouts(ops, "checkpoint", api)
    return average(ops, weights)


__all__ = ["per_subset", "average", "across_models", "across_checkpoints", "SubsetOperators", "OPERATORS",
           "resolve_operator", "build_operator", "load_state", "check_state", "validate_checkpoints", "model_at"]
