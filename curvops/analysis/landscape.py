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

References:
    Li, Xu, Taylor, Studer, Goldstein (2018). *Visualizing the Loss Landscape of Neural Nets*. NeurIPS.
    Goodfellow, Vinyals, Saxe (2015). *Qualitatively Characterizing Neural Network Optimization Problems*. ICLR.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import vmap

from ..linalg.lanczos import EighResult
from ..objective import Objective, _select_params
from ..operators._taps import resolve_modules, tapped

_BATCH_MODES = ("auto", "vmap", "loop")
_DEFAULT_BUDGET = 2 ** 28  # bytes for the stacked parameter sets and activations of one chunk


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


# ---- targets: what is evaluated at a point -------------------------------------------------
@dataclass
class _FunctionTarget:
    f: Callable
    w0: Tensor


def _resolve_target(api: str, model_or_objective, loss, data, w0, kwargs) -> Objective | _FunctionTarget:
    obj = model_or_objective
    if not isinstance(obj, (Objective, nn.Module)) and isinstance(getattr(obj, "objective", None), Objective):
        obj = obj.objective  # a curvature operator: use its objective
    if isinstance(obj, Objective):
        if loss is not None or data is not None or kwargs or w0 is not None:
            raise TypeError(f"{api}: expected either an Objective (or operator) or (model, loss, data, ...), got both; "
                            f"drop loss/data/w0 and the Objective keyword arguments.")
        return obj
    if w0 is not None:
        if isinstance(obj, nn.Module) or not callable(obj):
            raise TypeError(f"{api}: w0= goes with a plain function f(w) -> scalar, got {type(obj).__name__}.")
        if loss is not None or data is not None or kwargs:
            raise TypeError(f"{api}: a function f(w) with w0= takes no loss, data or Objective keyword arguments.")
        if not isinstance(w0, Tensor):
            w0 = torch.as_tensor(np.asarray(w0))
        if w0.dim() != 1 or w0.numel() == 0 or not w0.is_floating_point():
            raise ValueError(f"{api}: expected w0 as a non-empty 1-D floating tensor, got shape {tuple(w0.shape)} "
                             f"and dtype {w0.dtype}.")
        if not bool(torch.isfinite(w0).all()):
            raise ValueError(f"{api}: expected a finite w0, got NaN/Inf entries.")
        return _FunctionTarget(obj, w0.detach())
    if loss is None or data is None:
        raise TypeError(f"{api}: expected (model, loss, data), an Objective, or a function f(w) with w0=; "
                        f"got {type(obj).__name__} with loss={'given' if loss is not None else None} and "
                        f"data={'given' if data is not None else None}.")
    return Objective(obj, loss, data, **kwargs)


def _geometry(target) -> tuple[tuple[str, ...], tuple[torch.Size, ...], list[Tensor], torch.dtype, torch.device]:
    """(names, shapes, current values, dtype, device) of the perturbed parameter vector."""
    if isinstance(target, _FunctionTarget):
        w0 = target.w0
        return ("w",), (w0.shape,), [w0], w0.dtype, w0.device
    return target.layout.names, target.layout.shapes, target.theta(), target.dtype, target.device


# ---- steps, metrics, options -----------------------------------------------------------
def _default_steps(dtype) -> Tensor:
    return torch.arange(-10, 11, dtype=dtype) / 10  # exact 0 and exact symmetry, unlike linspace


def _as_steps(steps, dtype, api: str, what: str = "steps") -> Tensor:
    if steps is None:
        return _default_steps(dtype)
    if isinstance(steps, Tensor):
        t = steps.detach()
    else:
        try:
            t = torch.as_tensor(np.asarray(steps, dtype=np.float64))
        except (TypeError, ValueError) as err:
            raise TypeError(f"{api}: expected {what} as a 1-D tensor of numbers, got {type(steps).__name__}.") from err
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8)):
        raise TypeError(f"{api}: expected {what} as a 1-D tensor of real numbers, got dtype {t.dtype}.")
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(f"{api}: expected {what} as a non-empty 1-D tensor, got shape {tuple(t.shape)}. "
                         f"For a plane use loss_plane(..., steps=(alphas, betas)).")
    t = t.to(device="cpu", dtype=dtype)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{api}: expected finite {what}, got NaN/Inf entries.")
    return t


def _check_metrics(metrics, api: str) -> dict[str, Callable]:
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise TypeError(f"{api}: expected metrics as a dict {{name: callable}}, got {type(metrics).__name__}.")
    for name, fn in metrics.items():
        if not isinstance(name, str) or name == "loss":
            raise ValueError(f"{api}: metric names must be strings other than 'loss', got {name!r}.")
        if not callable(fn):
            raise TypeError(f"{api}: metric {name!r} must be callable, got {type(fn).__name__}.")
    return dict(metrics)


def _check_options(batch, chunk_size, memory_budget, api: str) -> None:
    if batch not in _BATCH_MODES:
        raise ValueError(f"{api}: expected batch in {_BATCH_MODES}, got {batch!r}.")
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"{api}: expected chunk_size as a positive integer or None, got {chunk_size!r}.")
    if not isinstance(memory_budget, (int, float)) or not memory_budget > 0:
        raise ValueError(f"{api}: expected a positive memory_budget in bytes, got {memory_budget!r}.")


# ---- directions ------------------------------------------------------------------------
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
        generator: ``torch.Generator`` for reproducibility (the global generator when None).
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
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{api}: expected a torch.Generator, got {type(generator).__name__}.")
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


# ---- evaluation engine -------------------------------------------------------------------
class _Runner:
    """Evaluates ``fn`` at stacked inputs: vmap, or a loop (also as the fallback when vmap fails)."""

    def __init__(self, mode: str, api: str):
        self.mode, self.api, self.reason = mode, api, None

    def __call__(self, fn: Callable[..., Tensor], stacked: list[Tensor]) -> Tensor:
        if self.mode != "loop" and self.reason is None:
            try:
                return vmap(fn)(*stacked)
            except (RuntimeError, NotImplementedError) as err:
                if self.mode == "vmap":
                    raise RuntimeError(f"{self.api}: vmap could not batch the evaluation ({err}); pass batch='auto' "
                                       f"or batch='loop' to evaluate point by point.") from err
                self.reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        m = stacked[0].shape[0]
        return torch.stack([fn(*[s[i] for s in stacked]) for i in range(m)])

    @property
    def path(self) -> str:
        if self.mode == "loop":
            return "loop"
        return "vmap" if self.reason is None else f"loop (vmap failed: {self.reason})"


def _scalars(values: list, names: list[str], dtype, api: str) -> Tensor:
    out = []
    for v, name in zip(values, names):
        if not isinstance(v, Tensor):
            v = torch.as_tensor(v)
        if v.numel() != 1:
            raise ValueError(f"{api}: {name} must be a scalar per evaluation, got shape {tuple(v.shape)}.")
        out.append(v.reshape(()).to(dtype))
    return torch.stack(out)


def _activation_numel(obj: Objective) -> int:
    """Σ of module output sizes for one sample (a bound on a forward's live activations); one probe forward."""
    probe = obj.first_sample()
    sizes: list[int] = []
    handles = []

    def hook(mod, inp, out):
        if isinstance(out, Tensor):
            sizes.append(out.numel())

    try:
        if isinstance(obj.model, nn.Module):
            for m in obj.model.modules():
                handles.append(m.register_forward_hook(hook))
        with obj.session(), torch.no_grad():
            out = obj.forward(obj.theta(), probe.x)
    finally:
        for h in handles:
            h.remove()
    return sum(sizes) + (out.numel() if isinstance(out, Tensor) else 0) + 1


def _chunk(chunk_size, budget, per_point_numel: int, itemsize: int, M: int) -> int:
    if chunk_size is not None:
        return min(chunk_size, M)
    return max(1, min(M, int(budget // max(1, per_point_numel * itemsize))))


def _data_pass(obj: Objective, M: int, metrics: dict, runner: _Runner, api: str,
               forward_at: Callable, inputs: Callable, point_numel: Callable, chunk_size, budget) -> tuple[Tensor, int]:
    """One pass: Σ_b w_b [ℓ_b, metrics_b] at each of M points, normalized like the loss → ([M, 1 + K], N).

    ``forward_at(batch, offset)`` gives ``fn(*point_inputs) -> outputs`` for one batch;
    ``inputs(s, m)`` the stacked inputs of points s … s+m-1; ``point_numel(n)`` the numbers held
    per point for a batch of n samples (sizes the chunks).
    """
    names = ["the loss"] + [f"metric {k!r}" for k in metrics]
    acc = torch.zeros(M, len(names), dtype=obj.dtype, device=obj.device)
    total = 0
    itemsize = torch.finfo(obj.dtype).bits // 8
    with obj.session(), torch.no_grad():
        for batch in obj.batches():
            fwd = forward_at(batch, total)

            def point(*args, b=batch, fwd=fwd):
                out = fwd(*args)
                vals = [obj.loss(out, b.y, b.index)] + [fn(out, b.y) for fn in metrics.values()]
                return _scalars(vals, names, obj.dtype, api)

            m = _chunk(chunk_size, budget, point_numel(batch.n), itemsize, M)
            weight = batch.n if obj.reduction == "mean" else 1
            for s in range(0, M, m):
                acc[s:s + m] += weight * runner(point, inputs(s, m))
            total += batch.n
    return (acc / total if obj.reduction == "mean" else acc), total


def _evaluate_params(obj: Objective, D: Tensor, C: Tensor, metrics: dict, runner: _Runner,
                     chunk_size, budget, api: str) -> Tensor:
    """[ℓ, metrics](θ + C_m · Dᵀ) for every row m of C → [M, 1 + K] (one data pass)."""
    theta = torch.cat([t.reshape(-1) for t in obj.theta()])
    numels, shapes = list(obj.layout.numels), obj.layout.shapes
    M = C.shape[0]
    act = _activation_numel(obj) if (runner.mode != "loop" and chunk_size is None and M > 1) else 0

    def inputs(s: int, m: int) -> list[Tensor]:
        W = theta + C[s:s + m] @ D.T  # [m, P]; an all-zero row gives θ exactly
        return [p.reshape(-1, *sh) for p, sh in zip(torch.split(W, numels, dim=1), shapes)]

    return _data_pass(obj, M, metrics, runner, api, lambda b, offset: (lambda *th: obj.forward(th, b.x)), inputs,
                      lambda n: theta.numel() + 2 * n * act, chunk_size, budget)[0]


def _evaluate_function(target: _FunctionTarget, D: Tensor, C: Tensor, metrics: dict, runner: _Runner,
                       chunk_size, budget, api: str) -> Tensor:
    names = ["f(w)"] + [f"metric {k!r}" for k in metrics]
    w0 = target.w0

    def point(w):
        return _scalars([target.f(w)] + [fn(w) for fn in metrics.values()], names, w0.dtype, api)

    M = C.shape[0]
    m = _chunk(chunk_size, budget, 4 * w0.numel(), w0.element_size(), M)
    with torch.no_grad():
        return torch.cat([runner(point, [w0 + C[s:s + m] @ D.T]) for s in range(0, M, m)])


def _assemble(values: Tensor, metrics: dict, shape: tuple[int, ...], zero: int) -> tuple[dict, dict]:
    values = values.detach().cpu()
    names = ["loss", *metrics]
    count = int(np.prod(shape))
    out = {n: values[:count, k].reshape(shape).clone() for k, n in enumerate(names)}
    base = {n: float(values[zero, k]) for k, n in enumerate(names)}
    return out, base


def _with_base(C: Tensor, zero: int | None) -> tuple[Tensor, int]:
    """Append the base point (all-zero coefficients) when it is not among the rows of C."""
    if zero is not None:
        return C, zero
    return torch.cat([C, C.new_zeros(1, C.shape[1])]), C.shape[0]


def _zero_index(steps: Tensor) -> int | None:
    hits = (steps == 0).nonzero()
    return int(hits[0, 0]) if hits.numel() else None


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


def _run(api, target, D, C, metrics, batch, chunk_size, memory_budget):
    runner = _Runner(batch, api)
    if isinstance(target, _FunctionTarget):
        vals = _evaluate_function(target, D, C.to(D.device), metrics, runner, chunk_size, memory_budget, api)
        return vals, runner.path, "function"
    vals = _evaluate_params(target, D, C.to(D.device), metrics, runner, chunk_size, memory_budget, api)
    return vals, runner.path, "parameters"


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
