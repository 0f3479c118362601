r"""Directions of a landscape: random (Gaussian, filter-normalized) directions, filter normalization
(Li et al. 2018), and reading a direction given as a tensor, a dict, a matrix column or an
:class:`~curvops.linalg.lanczos.EighResult`."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch import Tensor, nn

from ..linalg.lanczos import EighResult
from ..objective import Objective, _select_params
from .landscape_eval import _FunctionTarget, _geometry


def _column(mat: Tensor, index, api: str, what: str) -> tuple[Tensor, int]:
    k = mat.shape[1]
    if index is None:
        if k != 1:
            raise ValueError(f"{api}: {what} has {k} columns; pass index= to pick one.")
        index = 0
    if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
        raise TypeError(f"{api}: expected index as an integer, got {type(index).__name__}.")
    if not -k <= int(index) < k:
        raise ValueError(f"{api}: expected index in [{-k}, {k}) for {what} with {k} columns, got {index}.")
    j = int(index) % k
    return mat[:, j], j


def _direction(spec, index, names, shapes, dtype, device, api: str, default_label: str) -> tuple[Tensor, str]:
    """Any accepted direction form → (flat [P] tensor on device, label)."""
    P = sum(int(np.prod(s, dtype=np.int64)) for s in shapes)
    label = default_label
    if isinstance(spec, EighResult):
        if spec.eigenvectors is None:
            raise ValueError(f"{api}: the EighResult holds no eigenvectors; call eigsh(..., return_eigenvectors=True).")
        if index is None:
            index = -1  # eigenvalues ascend: the largest
        vec, j = _column(spec.eigenvectors, index, api, "the EighResult")
        lam = spec.eigenvalues.detach().cpu()
        rank = int((lam > lam[j]).sum()) + 1
        label = f"eigenvector {rank} (λ={float(lam[j]):.4g})"
        flat = vec
    elif isinstance(spec, Mapping):
        index_of = {n: i for i, n in enumerate(names)}
        unknown = [n for n in spec if n not in index_of]
        if unknown:
            raise ValueError(f"{api}: unknown parameter names {unknown} in the direction; expected names among "
                             f"{list(names)} (the selected parameters; select others with params=).")
        parts = []
        for n, s in zip(names, shapes):
            if n in spec:
                t = spec[n]
                if not isinstance(t, Tensor):
                    raise TypeError(f"{api}: direction entry {n!r} must be a torch.Tensor, got {type(t).__name__}.")
                if t.shape != s:
                    raise ValueError(f"{api}: direction entry {n!r} has shape {tuple(t.shape)}, expected {tuple(s)}.")
                parts.append(t.detach().to(device=device, dtype=dtype).reshape(-1))
            else:
                parts.append(torch.zeros(int(np.prod(s, dtype=np.int64)), dtype=dtype, device=device))
        flat = torch.cat(parts)
    elif isinstance(spec, (Tensor, np.ndarray)):
        t = torch.as_tensor(spec).detach() if isinstance(spec, np.ndarray) else spec.detach()
        if not t.is_floating_point():
            raise TypeError(f"{api}: expected a floating direction, got dtype {t.dtype}.")
        if t.dim() == 2:
            t, j = _column(t, index, api, f"the direction matrix of shape {tuple(t.shape)}")
            if spec.shape[1] > 1:
                label = f"column {j}"
        elif t.dim() != 1:
            raise ValueError(f"{api}: expected a direction of shape ({P},) or ({P}, k) with index=, "
                             f"got shape {tuple(t.shape)}.")
        flat = t
    else:
        raise TypeError(f"{api}: expected a direction as a tensor [P], a dict {{name: tensor}}, an EighResult or a "
                        f"[P, k] tensor with index=, got {type(spec).__name__}.")
    if flat.shape != (P,):
        raise ValueError(f"{api}: expected a direction of length {P} (the selected parameters), got length "
                         f"{flat.shape[0]}. Use the same params= selection as the operator it came from.")
    flat = flat.to(device=device, dtype=dtype)
    if not bool(torch.isfinite(flat).all()):
        raise ValueError(f"{api}: expected a finite direction, got NaN/Inf entries.")
    if not bool((flat != 0).any()):
        raise ValueError(f"{api}: the direction is zero; every step would evaluate the same point.")
    return flat, label


def _filter_normalize_flat(flat: Tensor, shapes, values: list[Tensor], ignore_bias_bn: bool) -> Tensor:
    out = []
    for d, s, w in zip(torch.split(flat, [int(np.prod(s, dtype=np.int64)) for s in shapes]), shapes, values):
        d = d.reshape(s)
        if w.dim() <= 1:
            d = torch.zeros_like(d) if ignore_bias_bn else torch.sign(d) * w.abs()  # each entry its own filter
        else:
            dn = d.reshape(s[0], -1).norm(dim=1)
            wn = w.reshape(s[0], -1).norm(dim=1)
            scale = torch.where(dn > 0, wn / torch.where(dn > 0, dn, torch.ones_like(dn)), torch.zeros_like(dn))
            d = d * scale.reshape(-1, *([1] * (w.dim() - 1)))
        out.append(d.reshape(-1))
    return torch.cat(out)


def _geometry_of(source, api: str, params=None):
    """names, shapes, values, dtype, device for random_direction / filter_normalize sources."""
    if params is not None and not isinstance(source, nn.Module):
        raise TypeError(f"{api}: params= selects parameters of an nn.Module; got {type(source).__name__}.")
    if isinstance(source, nn.Module):
        named = dict(source.named_parameters())
        names = tuple(_select_params(source, params))
        vals = [named[n].detach() for n in names]
        return names, tuple(v.shape for v in vals), vals, vals[0].dtype, vals[0].device
    if not isinstance(source, Objective) and isinstance(getattr(source, "objective", None), Objective):
        source = source.objective
    if isinstance(source, Objective):
        return _geometry(source)
    if isinstance(source, Tensor):
        if not source.is_floating_point():
            raise TypeError(f"{api}: expected a floating tensor, got dtype {source.dtype}.")
        return ("w",), (source.shape,), [source.detach()], source.dtype, source.device
    if isinstance(source, Mapping) and source and all(isinstance(t, Tensor) for t in source.values()):
        vals = [t.detach() for t in source.values()]
        return tuple(source), tuple(t.shape for t in vals), vals, vals[0].dtype, vals[0].device
    raise TypeError(f"{api}: expected an nn.Module, an Objective, a tensor or a dict of tensors, "
                    f"got {type(source).__name__}.")


def _as_output(flat: Tensor, names, shapes, source) -> Tensor | dict[str, Tensor]:
    if isinstance(source, Tensor):
        return flat.reshape(shapes[0])
    parts = torch.split(flat, [int(np.prod(s, dtype=np.int64)) for s in shapes])
    return {n: p.reshape(s) for n, p, s in zip(names, parts, shapes)}


def random_direction(model_or_objective, *, kind: str = "filter", generator: torch.Generator | None = None,
                     ignore_bias_bn: bool | None = None, params=None) -> dict[str, Tensor] | Tensor:
    r"""A random direction in parameter space, filter-normalized by default (Li et al. 2018).

    ``kind="gaussian"``: $d \sim \mathcal N(0, I)$ over the selected parameters.
    ``kind="filter"``: a Gaussian $g$ rescaled filter by filter to the weights' filter norms,

    .. math:: d_{i} = \frac{g_{i}}{\lVert g_{i}\rVert}\,\lVert \theta_{i}\rVert,

    where a *filter* $i$ is one slice along dim 0 of a parameter of ≥ 2 dimensions (one output
    unit's row of a Linear weight, one output channel of a Conv weight). Parameters of ≤ 1
    dimension (biases, normalization scales) are zeroed when ``ignore_bias_bn`` (the default for
    ``"filter"``); otherwise each entry is its own filter, $d_i = \mathrm{sign}(g_i)\,|\theta_i|$.
    Filter normalization makes landscapes of differently scaled networks comparable, since
    rescaling a filter's weights (which ReLU networks are invariant to) rescales its direction too.

    **Cost**: no pass over the data; one Gaussian draw of P numbers.

    Args:
        model_or_objective: an ``nn.Module`` (its trainable parameters, or ``params=``), an
            :class:`~curvops.Objective` or a curvature operator (its selected parameters), a tensor
            (e.g. ``w0`` of a function ``f(w)``) or a dict of tensors.
        kind: ``"filter"`` or ``"gaussian"``.
        generator: ``torch.Generator`` for reproducibility, or an int seed (as the linalg functions
            take it: ``torch.Generator().manual_seed(seed)``); the global generator when None.
        ignore_bias_bn: zero the parameters of ≤ 1 dimension (default: True for ``"filter"``,
            False for ``"gaussian"``).
        params: parameter selection for an ``nn.Module``, as in :class:`~curvops.Objective`.

    Returns:
        ``{name: tensor}`` shaped like the parameters (a tensor when given a tensor), on their device.

    Raises:
        ValueError: unknown ``kind``; a direction that comes out zero (e.g. only 1-D parameters with
            ``ignore_bias_bn=True``, or all-zero weights).
        TypeError: an unsupported ``model_or_objective`` or ``generator``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> d1, d2 = random_direction(model, generator=g), random_direction(model, generator=g)  # doctest: +SKIP
        >>> loss_plane(model, "cross_entropy", (X, y), directions=(d1, d2))                   # doctest: +SKIP
    """
    api = "random_direction"
    if kind not in ("filter", "gaussian"):
        raise ValueError(f"{api}: expected kind 'filter' or 'gaussian', got {kind!r}.")
    if isinstance(generator, int) and not isinstance(generator, bool):
        generator = torch.Generator().manual_seed(generator)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{api}: expected a torch.Generator or an int seed, got {type(generator).__name__}.")
    names, shapes, values, dtype, device = _geometry_of(model_or_objective, api, params)
    P = sum(int(np.prod(s, dtype=np.int64)) for s in shapes)
    where = generator.device if generator is not None else device
    flat = torch.randn(P, generator=generator, dtype=dtype, device=where).to(device)
    ignore = (kind == "filter") if ignore_bias_bn is None else bool(ignore_bias_bn)
    if kind == "filter":
        flat = _filter_normalize_flat(flat, shapes, values, ignore)
    elif ignore:
        flat = _zero_low_dim(flat, shapes)
    if not bool((flat != 0).any()):
        raise ValueError(f"{api}: the direction came out zero: every selected parameter is ≤ 1-D (zeroed by "
                         f"ignore_bias_bn=True) or has zero weights; pass ignore_bias_bn=False or kind='gaussian'.")
    return _as_output(flat, names, shapes, model_or_objective)


def _zero_low_dim(flat: Tensor, shapes) -> Tensor:
    parts = torch.split(flat, [int(np.prod(s, dtype=np.int64)) for s in shapes])
    return torch.cat([p if len(s) >= 2 else torch.zeros_like(p) for p, s in zip(parts, shapes)])


def filter_normalize(model_or_objective, direction, *, ignore_bias_bn: bool = True,
                     params=None) -> dict[str, Tensor] | Tensor:
    r"""Rescale every filter of ``direction`` to the norm of the matching filter of the weights.

    $d_i \leftarrow d_i\,\lVert\theta_i\rVert / \lVert d_i\rVert$ per filter (slice along dim 0 of a
    parameter of ≥ 2 dimensions; a zero filter stays zero); parameters of ≤ 1 dimension are zeroed
    when ``ignore_bias_bn``, else $d_i \leftarrow \mathrm{sign}(d_i)\,|\theta_i|$ entrywise.
    See :func:`random_direction`. **Cost**: O(P), no data pass.

    Args:
        model_or_objective: as for :func:`random_direction`.
        direction: a tensor ``[P]`` or a dict ``{name: tensor}`` (missing names are zero).
        ignore_bias_bn: zero the parameters of ≤ 1 dimension.
        params: parameter selection for an ``nn.Module``.

    Returns:
        The normalized direction as a dict (a tensor when ``model_or_objective`` is a tensor).

    Raises:
        ValueError / TypeError: a direction of the wrong length, shape or kind, non-finite or zero.
    """
    api = "filter_normalize"
    names, shapes, values, dtype, device = _geometry_of(model_or_objective, api, params)
    flat, _ = _direction(direction, None, names, shapes, dtype, device, api, "")
    return _as_output(_filter_normalize_flat(flat, shapes, values, ignore_bias_bn), names, shapes,
                      model_or_objective)


def _prepare_directions(api, target, specs, indices, labels, normalize, defaults):
    names, shapes, values, dtype, device = _geometry(target)
    if normalize not in (None, "filter"):
        raise ValueError(f"{api}: expected normalize=None or 'filter', got {normalize!r}.")
    if normalize == "filter" and isinstance(target, _FunctionTarget):
        raise ValueError(f"{api}: normalize='filter' needs a model's parameter shapes (filters); a flat w0 has "
                         f"none. Normalize the direction yourself.")
    flats, labs = [], []
    for spec, index, default in zip(specs, indices, defaults):
        if spec is None:
            raise TypeError(f"{api}: expected a direction (direction= / directions=), got None.")
        flat, label = _direction(spec, index, names, shapes, dtype, device, api, default)
        if normalize == "filter":
            flat = _filter_normalize_flat(flat, shapes, values, True)
            if not bool((flat != 0).any()):
                raise ValueError(f"{api}: the filter-normalized direction is zero (it only touched ≤ 1-D "
                                 f"parameters, which filter normalization zeroes).")
            label += " (filter-normalized)"
        flats.append(flat)
        labs.append(label)
    if labels is not None:
        labs = list(labels)
    return torch.stack(flats, dim=1), tuple(labs), dtype  # D: [P, n_dirs]
