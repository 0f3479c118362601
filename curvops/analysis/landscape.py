r"""Loss landscapes at finite step sizes: the loss (and metrics) along directions and on planes.

Derivatives describe a loss near a point; a landscape shows it at finite distance
(``seeds/000``, *Perturbations*). For a base point $\theta$ and directions $d, d_1, d_2$:

.. math::
    \ell(t) = L(\theta + t\,d), \qquad
    \ell(\alpha, \beta) = L(\theta + \alpha\, d_1 + \beta\, d_2),

with $L$ the whole-data loss of :class:`~curvops.Objective` ($\tfrac1N\sum_b n_b \ell_b$ for a
mean-reduced loss, $\sum_b \ell_b$ for a sum). Near a stationary point
$\ell(t) \approx L(\theta) + \tfrac12 t^2\, d^\top H d$, so the landscape along a Hessian eigenvector
$v_j$ is the parabola $\tfrac12\lambda_j t^2$ where the quadratic model holds, and shows where it
stops holding. The steps are in units of the direction as given (eigenvectors have unit norm).

Directions are flat tensors ``[P]``, ``{name: tensor}`` dicts (missing names are zero), columns of
an :class:`~curvops.linalg.lanczos.EighResult` or of an ``[P, k]`` tensor picked by ``index=``, or
random directions from :func:`random_direction`, optionally filter-normalized (Li et al. 2018).
:func:`activation_along` perturbs a layer's output instead of the parameters.

All step values are evaluated in **one pass over the data**: per batch, the perturbed parameter
sets $\theta + t\,d$ are stacked and evaluated together with ``torch.func.vmap`` over
``functional_call`` (chunked to a memory budget), with a plain loop of functional calls as the
fallback for models or metrics that ``vmap`` can't batch.

This module holds the result type and the entry points; the directions are in
:mod:`.directions` (:func:`random_direction` and :func:`filter_normalize` are re-exported here),
the evaluation engine in :mod:`.landscape_eval`.

References:
    Li, Xu, Taylor, Studer, Goldstein (2018). *Visualizing the Loss Landscape of Neural Nets*. NeurIPS.
    Goodfellow, Vinyals, Saxe (2015). *Qualitatively Characterizing Neural Network Optimization Problems*. ICLR.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import torch
from torch import Tensor

from ..linalg.lanczos import EighResult
from ..operators._taps import resolve_modules, tapped
from .directions import _prepare_directions, filter_normalize, random_direction
from .landscape_eval import (_DEFAULT_BUDGET, _activation_numel, _as_steps, _assemble, _check_metrics, _check_options,
                             _data_pass, _resolve_target, _run, _Runner, _with_base, _zero_index)


@dataclass
class LandscapeResult:
    r"""Loss (and metrics) evaluated on a line or a plane of perturbations.

    Attributes:
        steps: the step values: ``[T]`` for a line, ``(alphas [A], betas [B])`` for a plane (CPU).
        values: ``{name: tensor}`` with ``"loss"`` first, then the metrics; ``[T]`` for a line,
            ``[A, B]`` for a plane with ``values[name][i, j]`` at ``(alphas[i], betas[j])`` (CPU).
        base: ``{name: float}``, the values at the unperturbed point (t = 0).
        labels: one label per direction (for plot axes), e.g. ``"eigenvector 1 (λ=2.5)"``.
        num_evaluations: points evaluated (each one whole-data forward pass of the loss),
            including the base point when it is not among the steps.
        num_passes: passes over the data (1: every point is evaluated batch by batch in one pass).
        path: how the points were evaluated: ``"vmap"``, ``"loop"``, or ``"loop (vmap failed: …)"``.
        kind: what was perturbed: ``"parameters"``, ``"activations"`` or ``"function"`` (a plain
            ``f(w)``).
        directions: the directions actually used (after normalization): flat ``[P]`` tensors for
            parameters and functions, the activation direction as given for activations.
        layer: the perturbed module's name (activations only).
    """

    steps: Tensor | tuple[Tensor, Tensor]
    values: dict[str, Tensor]
    base: dict[str, float]
    labels: tuple[str, ...]
    num_evaluations: int
    num_passes: int
    path: str
    kind: str
    directions: tuple[Tensor, ...] = field(repr=False, default=())
    layer: str | None = None

    @property
    def loss(self) -> Tensor:
        """``values["loss"]``."""
        return self.values["loss"]

    @property
    def ndim(self) -> int:
        """1 for a line, 2 for a plane."""
        return 2 if isinstance(self.steps, tuple) else 1

    def mesh(self) -> tuple[Tensor, Tensor]:
        """``(Alpha, Beta)`` grids ``[A, B]`` (``indexing="ij"``) matching ``values`` of a plane."""
        if self.ndim != 2:
            raise ValueError("LandscapeResult.mesh: expected a plane (2 directions), got a line.")
        return torch.meshgrid(self.steps[0], self.steps[1], indexing="ij")
# ---- public entry points -------------------------------------------------------------------
def loss_along(model_or_objective, loss=None, data=None, direction=None, *, steps=None, index: int | None = None,
               w0: Tensor | None = None, metrics: Mapping[str, Callable] | None = None, normalize: str | None = None,
               label: str | None = None, batch: str = "auto", chunk_size: int | None = None,
               memory_budget: float = _DEFAULT_BUDGET, **objective_kwargs) -> LandscapeResult:
    r"""The loss (and metrics) along one direction: $\ell(t) = L(\theta + t\,d)$ at every step t.

    **Cost**: one pass over the data for all steps together (plus a one-sample probe forward that
    sizes the chunks); per batch, T forwards batched with ``vmap`` in chunks of at most
    ``chunk_size`` points (memory ~ chunk · (P + activations of one batch)). The base point t = 0
    is evaluated too when it is not among the steps.

    Args:
        model_or_objective: an ``nn.Module`` or ``f(params, x)`` with ``loss`` and ``data`` (and
            Objective keyword arguments such as ``params=``, ``batch_size=``); an
            :class:`~curvops.Objective`; a curvature operator (its objective); or a plain function
            ``f(w: Tensor[P]) -> scalar`` with ``w0=`` (e.g. ``QuadraticModel.value``).
        loss, data: as for :class:`~curvops.Objective`.
        direction: a tensor ``[P]``; a dict ``{name: tensor}`` (missing parameters are zero); an
            :class:`~curvops.linalg.lanczos.EighResult` or a ``[P, k]`` tensor with ``index=``.
        steps: 1-D step values t (default: the 21 values k/10, k = −10…10).
        index: the column of an EighResult (default −1: its largest eigenvalue) or ``[P, k]`` tensor.
        w0: the base point of a plain function ``f(w)``.
        metrics: ``{name: callable(outputs, targets) -> scalar}`` per batch, combined over batches like
            the loss (n_b-weighted mean for a mean-reduced loss, sum for a sum); for a function
            ``f(w)``: ``callable(w) -> scalar``.
        normalize: ``None`` or ``"filter"`` (rescale the direction by :func:`filter_normalize`).
        label: the direction's label (default: ``"eigenvector r (λ=…)"`` for an EighResult, rank r
            counted from its largest eigenvalue; else ``"direction"``).
        batch: ``"auto"`` (vmap, falling back to a loop when vmap fails), ``"vmap"`` (no fallback) or
            ``"loop"`` (one functional call per point).
        chunk_size: points per vmapped call (default: from ``memory_budget``).
        memory_budget: bytes allowed for one chunk's stacked parameters and activations.
        **objective_kwargs: passed to :class:`~curvops.Objective`.

    Returns:
        :class:`LandscapeResult` with ``steps [T]`` and ``values[name] [T]``.

    Raises:
        ValueError: a direction of the wrong length / shape, with unknown names, non-finite or zero;
            steps that are not a non-empty finite 1-D tensor; bad options; an index out of range.
        TypeError: wrong kinds of arguments (e.g. a direction that is neither tensor, dict nor
            EighResult, or a model without loss/data).

    Example:
        >>> H = curvops.Hessian(model, "cross_entropy", (X, y))                       # doctest: +SKIP
        >>> top = curvops.eigsh(H, 2, which="LA")                                    # doctest: +SKIP
        >>> res = loss_along(H, direction=top, steps=torch.linspace(-2, 2, 41))       # doctest: +SKIP
        >>> res.labels, res.values["loss"].shape                                     # doctest: +SKIP
        (('eigenvector 1 (λ=3.21)',), torch.Size([41]))
    """
    api = "loss_along"
    metrics = _check_metrics(metrics, api)
    _check_options(batch, chunk_size, memory_budget, api)
    if label is not None and not isinstance(label, str):
        raise TypeError(f"{api}: expected label as a string, got {type(label).__name__}.")
    target = _resolve_target(api, model_or_objective, loss, data, w0, objective_kwargs)
    D, labels, dtype = _prepare_directions(api, target, [direction], [index],
                                           None if label is None else [label], normalize, ["direction"])
    t = _as_steps(steps, dtype, api)
    C, zero = _with_base(t[:, None], _zero_index(t))
    vals, path, kind = _run(api, target, D, C, metrics, batch, chunk_size, memory_budget)
    values, base = _assemble(vals, metrics, (t.numel(),), zero)
    return LandscapeResult(steps=t, values=values, base=base, labels=labels, num_evaluations=C.shape[0],
                           num_passes=0 if kind == "function" else 1, path=path, kind=kind,
                           directions=tuple(D.T))


def loss_plane(model_or_objective, loss=None, data=None, directions=None, *, steps=None, index=None,
               w0: Tensor | None = None, metrics: Mapping[str, Callable] | None = None, normalize: str | None = None,
               labels: tuple[str, str] | None = None, batch: str = "auto", chunk_size: int | None = None,
               memory_budget: float = _DEFAULT_BUDGET, **objective_kwargs) -> LandscapeResult:
    r"""The loss (and metrics) on a plane: $\ell(\alpha, \beta) = L(\theta + \alpha\,d_1 + \beta\,d_2)$.

    **Cost**: one pass over the data for all A·B grid points together (see :func:`loss_along`).

    Args:
        directions: ``(d1, d2)``, each in any form :func:`loss_along` accepts; or one EighResult /
            ``[P, k]`` tensor whose columns ``index`` (default ``(-1, -2)``: the two largest
            eigenvalues of an EighResult) span the plane.
        steps: ``(alphas, betas)``, 1-D each (default: k/10, k = −10…10, for both).
        index: ``(i, j)``: the columns for ``d1`` and ``d2`` (where they are EighResults or matrices).
        labels: two labels (default: eigenvector labels, or ``"direction 1"`` / ``"direction 2"``).
        Others: as for :func:`loss_along`.

    Returns:
        :class:`LandscapeResult` with ``steps = (alphas [A], betas [B])`` and ``values[name] [A, B]``,
        ``values[name][i, j]`` at ``(alphas[i], betas[j])``; ``mesh()`` gives matching grids.

    Raises:
        ValueError / TypeError: as for :func:`loss_along`, and for directions or steps that are not pairs.

    Example:
        >>> g = torch.Generator().manual_seed(0)                                          # doctest: +SKIP
        >>> d = (random_direction(model, generator=g), random_direction(model, generator=g))  # doctest: +SKIP
        >>> res = loss_plane(model, "cross_entropy", (X, y), directions=d)               # doctest: +SKIP
    """
    api = "loss_plane"
    metrics = _check_metrics(metrics, api)
    _check_options(batch, chunk_size, memory_budget, api)
    if isinstance(directions, (EighResult, Tensor, np.ndarray)) and not (
            isinstance(directions, (Tensor, np.ndarray)) and directions.ndim == 1):
        specs = [directions, directions]
        if index is None:
            if isinstance(directions, EighResult):
                index = (-1, -2)
            elif directions.shape[1] == 2:
                index = (0, 1)
    elif isinstance(directions, (tuple, list)) and len(directions) == 2:
        specs = list(directions)
    else:
        raise TypeError(f"{api}: expected directions as a pair (d1, d2) or one EighResult / [P, k] tensor, got "
                        f"{type(directions).__name__}" + (f" of length {len(directions)}"
                                                          if isinstance(directions, (tuple, list)) else "") + ".")
    indices = (None, None) if index is None else index
    if not isinstance(indices, (tuple, list)) or len(indices) != 2:
        raise TypeError(f"{api}: expected index as a pair (i, j), got {index!r}.")
    if labels is not None and (not isinstance(labels, (tuple, list)) or len(labels) != 2
                               or not all(isinstance(s, str) for s in labels)):
        raise TypeError(f"{api}: expected labels as a pair of strings, got {labels!r}.")
    if steps is not None and (not isinstance(steps, (tuple, list)) or len(steps) != 2):
        raise ValueError(f"{api}: expected steps as a pair (alphas, betas) of 1-D tensors, got "
                         f"{type(steps).__name__}.")
    target = _resolve_target(api, model_or_objective, loss, data, w0, objective_kwargs)
    D, labs, dtype = _prepare_directions(api, target, specs, indices, labels, normalize,
                                         ["direction 1", "direction 2"])
    a = _as_steps(None if steps is None else steps[0], dtype, api, "alphas")
    b = _as_steps(None if steps is None else steps[1], dtype, api, "betas")
    grid = torch.stack(torch.meshgrid(a, b, indexing="ij"), dim=-1).reshape(-1, 2)
    za, zb = _zero_index(a), _zero_index(b)
    C, zero = _with_base(grid, None if za is None or zb is None else za * b.numel() + zb)
    vals, path, kind = _run(api, target, D, C, metrics, batch, chunk_size, memory_budget)
    values, base = _assemble(vals, metrics, (a.numel(), b.numel()), zero)
    return LandscapeResult(steps=(a, b), values=values, base=base, labels=labs, num_evaluations=C.shape[0],
                           num_passes=0 if kind == "function" else 1, path=path, kind=kind,
                           directions=tuple(D.T))


def activation_along(model, loss=None, data=None, *, layer: str, direction, steps=None,
                     metrics: Mapping[str, Callable] | None = None, label: str | None = None, batch: str = "auto",
                     chunk_size: int | None = None, memory_budget: float = _DEFAULT_BUDGET,
                     **objective_kwargs) -> LandscapeResult:
    r"""The loss (and metrics) when a layer's output is shifted: $\ell(t) = L(F^{(l)} + t\,d)$.

    The output of module ``layer`` gets ``t·d`` added through a forward hook (always removed; the
    model is left untouched). ``d`` is shaped like one sample's activation (then broadcast over all
    samples) or like the whole data's activation ``[N, *shape]`` (rows in the order the data yields
    samples). The loss is normalized like the Objective's.

    **Cost**: a one-sample probe forward (the layer's shape), then one pass over the data for all
    steps; per batch, T forwards batched with ``vmap`` in chunks.

    Args:
        model: an ``nn.Module`` (or an Objective / curvature operator, with ``loss`` and ``data`` None).
        loss, data, **objective_kwargs: as for :class:`~curvops.Objective`.
        layer: a name from ``model.named_modules()``; the module must run once per forward pass.
        direction: tensor of shape ``[*shape]`` (one sample) or ``[N, *shape]`` (every sample).
        steps, metrics, label, batch, chunk_size, memory_budget: as for :func:`loss_along`.

    Returns:
        :class:`LandscapeResult` with ``kind="activations"`` and ``layer`` set.

    Raises:
        ValueError: unknown layer, a layer that runs more than once or never; a direction of the wrong
            shape, non-finite or zero; bad steps or options.
        TypeError: a model that is not an ``nn.Module``; a direction that is not a tensor.

    Example:
        >>> d = torch.randn(16, dtype=torch.float64)                                      # doctest: +SKIP
        >>> res = activation_along(model, "cross_entropy", (X, y), layer="1", direction=d)  # doctest: +SKIP
    """
    api = "activation_along"
    metrics = _check_metrics(metrics, api)
    _check_options(batch, chunk_size, memory_budget, api)
    if label is not None and not isinstance(label, str):
        raise TypeError(f"{api}: expected label as a string, got {type(label).__name__}.")
    obj = _resolve_target(api, model, loss, data, None, objective_kwargs)
    modules = resolve_modules(obj.model, [layer], api)
    if not isinstance(direction, (Tensor, np.ndarray)):
        raise TypeError(f"{api}: expected the direction as a tensor, got {type(direction).__name__}.")
    d = torch.as_tensor(direction).detach()
    if not d.is_floating_point():
        raise TypeError(f"{api}: expected a floating direction, got dtype {d.dtype}.")
    t = _as_steps(steps, obj.dtype, api)
    record: dict = {}
    with tapped(modules, record=record, api=api):  # one probe forward: the layer's shape and activation sizes
        act = _activation_numel(obj)
    shape = tuple(record[layer].shape[1:])
    per_sample = tuple(d.shape) != shape
    N = obj.num_samples() if per_sample else 0
    if per_sample and tuple(d.shape) != (N, *shape):
        raise ValueError(f"{api}: expected a direction of shape {shape} (one sample of {layer!r}'s output) or "
                         f"{(N, *shape)} (all {N} samples), got shape {tuple(d.shape)}.")
    d = d.to(device=obj.device, dtype=obj.dtype)
    if not bool(torch.isfinite(d).all()):
        raise ValueError(f"{api}: expected a finite direction, got NaN/Inf entries.")
    if not bool((d != 0).any()):
        raise ValueError(f"{api}: the direction is zero; every step would evaluate the same point.")

    C, zero = _with_base(t[:, None], _zero_index(t))
    ts = C[:, 0].to(obj.device)
    runner = _Runner(batch, api)
    theta = obj.theta()

    def forward_at(b, offset: int):
        if per_sample and offset + b.n > N:
            raise ValueError(f"{api}: the data yielded more than the {N} samples the direction covers.")
        d_b = d[offset:offset + b.n] if per_sample else d.expand(b.n, *shape)

        def fwd(s):
            with tapped(modules, add={layer: s * d_b}, api=api):
                return obj.forward(theta, b.x)
        return fwd

    vals, seen = _data_pass(obj, ts.numel(), metrics, runner, api, forward_at, lambda s, m: [ts[s:s + m]],
                            lambda n: 3 * n * act + 1, chunk_size, memory_budget)
    if per_sample and seen != N:
        raise ValueError(f"{api}: the data yielded {seen} samples, the direction covers {N}.")
    values, base = _assemble(vals, metrics, (t.numel(),), zero)
    return LandscapeResult(steps=t, values=values, base=base,
                           labels=(label if label is not None else f"activation direction ({layer})",),
                           num_evaluations=ts.numel(), num_passes=1, path=runner.path, kind="activations",
                           directions=(d,), layer=layer)


__all__ = ["LandscapeResult", "loss_along", "loss_plane", "activation_along", "random_direction", "filter_normalize"]
