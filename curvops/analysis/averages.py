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
"""

from __future__ import annotations

import copy
import os
from typing import Any, Callable, Hashable, Iterable, Mapping, Sequence

import scipy.sparse.linalg as spla
import torch
from torch import Tensor, nn

from ..operators import GGN, EmpiricalFisher, Fisher, GradientCovariance, Hessian, Operator
from ..operators.algebra import add, as_operator, scale

#: operator families known by name (``track(operator="ggn")``, ``per_subset("hessian", …)``)
OPERATORS: dict[str, Callable[..., Operator]] = {
    "hessian": Hessian,
    "ggn": GGN,
    "fisher": Fisher,
    "empirical_fisher": EmpiricalFisher,
    "gradient_covariance": GradientCovariance,
}


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


# ---- helpers shared with track.py ------------------------------------------------------------
def resolve_operator(operator, api: str) -> Callable[..., Operator]:
    """An operator family: a name in :data:`OPERATORS`, an operator class, or a callable
    ``(model, loss, data, **kw) -> Operator``."""
    if isinstance(operator, str):
        key = operator.lower()
        if key not in OPERATORS:
            raise ValueError(f"{api}: expected an operator name among {sorted(OPERATORS)}, a class such as "
                             f"curvops.Hessian, or a callable (model, loss, data, **kw) -> Operator, "
                             f"got {operator!r}.")
        return OPERATORS[key]
    if not callable(operator) or isinstance(operator, Operator):
        raise TypeError(f"{api}: expected an operator class (e.g. curvops.Hessian), a name such as 'hessian', "
                        f"or a callable (model, loss, data, **kw) -> Operator, got {type(operator).__name__}. "
                        f"Pass the class, not a built operator.")
    return operator


def build_operator(factory: Callable[..., Operator], model, loss, data, kw: dict, api: str, what: str) -> Operator:
    """``factory(model, loss, data, **kw)``, checked to be an operator."""
    op = factory(model, loss, data, **kw)
    if not isinstance(op, spla.LinearOperator):
        raise TypeError(f"{api}: the operator factory returned {type(op).__name__} for {what}; expected an Operator.")
    return as_operator(op)


def _describe(checkpoint, i: int) -> str:
    if isinstance(checkpoint, (str, os.PathLike)):
        return f"checkpoint {i} ({os.fspath(checkpoint)!r})"
    return f"checkpoint {i}"


def _model_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def load_state(checkpoint, i: int, api: str, *, map_location=None, mmap: bool = False) -> dict[str, Tensor]:
    """A state dict from a checkpoint: a state dict itself, an ``nn.Module``, or a file path
    (``torch.load(path, weights_only=True, map_location=…)``)."""
    what = _describe(checkpoint, i)
    if isinstance(checkpoint, nn.Module):
        return checkpoint.state_dict()
    if isinstance(checkpoint, (str, os.PathLike)):
        path = os.fspath(checkpoint)
        if not os.path.isfile(path):
            raise ValueError(f"{api}: {what}: no such file.")
        try:
            try:
                sd = torch.load(path, weights_only=True, map_location=map_location, mmap=mmap)
            except RuntimeError:
                if not mmap:
                    raise
                sd = torch.load(path, weights_only=True, map_location=map_location)  # legacy format: no mmap
        except Exception as err:  # noqa: BLE001 - re-raised with the file named
            first = (str(err).strip().splitlines() or [""])[0]
            raise ValueError(f"{api}: could not load {what} with torch.load(weights_only=True) "
                             f"({type(err).__name__}: {first}). Save the model's state dict "
                             f"(torch.save(model.state_dict(), path)), not the model; the full error is chained "
                             f"above.") from err
        checkpoint = sd
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"{api}: expected {what} as a state dict, a file path or an nn.Module, "
                        f"got {type(checkpoint).__name__}.")
    bad = [k for k, v in checkpoint.items() if not isinstance(v, Tensor)]
    if bad:
        raise TypeError(f"{api}: {what} holds entries that are not tensors ({bad[:5]}); expected a model "
                        f"state dict. If it wraps one, pass the state dict itself (e.g. ckpt['model']).")
    return dict(checkpoint)


def check_state(reference: Mapping[str, Tensor], state: Mapping[str, Tensor], i: int, checkpoint, api: str) -> None:
    """Raise unless ``state`` has exactly the keys and shapes of ``reference`` (a model's state dict)."""
    what = _describe(checkpoint, i)
    missing = [k for k in reference if k not in state]
    unexpected = [k for k in state if k not in reference]
    shapes = [f"{k}: {tuple(state[k].shape)} vs model {tuple(reference[k].shape)}"
              for k in reference if k in state and state[k].shape != reference[k].shape]
    if missing or unexpected:
        raise ValueError(f"{api}: {what} does not match the model's state dict: missing keys {missing[:5]}"
                         f"{' …' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
                         f"{' …' if len(unexpected) > 5 else ''}. Checkpoints must come from this architecture.")
    if shapes:
        raise ValueError(f"{api}: {what} has tensors of the wrong shape: {shapes[:5]}"
                         f"{' …' if len(shapes) > 5 else ''}. Checkpoints must come from this architecture.")


def validate_checkpoints(model: nn.Module, checkpoints, api: str) -> list:
    """Check every checkpoint against ``model`` (keys and shapes) before any heavy work.

    Files are opened memory-mapped on the CPU for the check and read again when used, so a long
    list of checkpoints is never held in memory at once.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{api}: expected the model as an nn.Module (checkpoints are loaded into a copy of it), "
                        f"got {type(model).__name__}.")
    if isinstance(checkpoints, (str, os.PathLike, Mapping, nn.Module)) or not isinstance(checkpoints, Iterable):
        raise TypeError(f"{api}: expected a sequence of checkpoints (state dicts, file paths or modules), "
                        f"got {type(checkpoints).__name__}. Wrap a single one in a list.")
    checkpoints = list(checkpoints)
    if not checkpoints:
        raise ValueError(f"{api}: expected at least one checkpoint, got none.")
    reference = model.state_dict()
    for i, ck in enumerate(checkpoints):
        state = load_state(ck, i, api, map_location="cpu", mmap=True)
        check_state(reference, state, i, ck, api)
        del state
    return checkpoints


def model_at(model: nn.Module, checkpoint, i: int, api: str) -> nn.Module:
    """A deep copy of ``model`` holding the checkpoint's state (the user's model is not touched)."""
    state = load_state(checkpoint, i, api, map_location=_model_device(model))
    check_state(model.state_dict(), state, i, checkpoint, api)
    try:
        twin = copy.deepcopy(model)
    except Exception as err:  # noqa: BLE001
        raise TypeError(f"{api}: could not deep-copy the model ({err}); checkpoints are loaded into a copy so "
                        f"that the model stays untouched.") from err
    for p in twin.parameters():
        p.grad = None
    with torch.no_grad():
        twin.load_state_dict(state, strict=True)
    return twin


# ---- subsets -----------------------------------------------------------------------------------
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
    partition average back to the full-data operator (for ``reduction="mean"``; see the module
    docstring), so ``average(ops, weights=ops.sizes)`` equals ``operator(model, loss, data)``.

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


# ---- averages ---------------------------------------------------------------------------------
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
