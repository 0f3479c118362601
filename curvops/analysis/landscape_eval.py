r"""Evaluating a landscape: what is evaluated at a point (a model's whole-data loss, or a function
f(w)), the steps, metrics and options, and the engine that evaluates all points in one pass over
the data (``vmap`` over stacked parameter sets, chunked to a memory budget, a loop as fallback)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import vmap

from ..objective import Objective

_BATCH_MODES = ("auto", "vmap", "loop")
_DEFAULT_BUDGET = 2 ** 28  # bytes for the stacked parameter sets and activations of one chunk


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
    """One pass: [ℓ, metrics] at each of M points over the whole data → ([M, 1 + K], samples seen here).

    The loss column is normalized exactly like the Objective's loss (``Σ_b w_b ℓ_b / Σ_b w_b``
    with ``w_b = obj.batch_weight(b)``, i.e. ignored targets and class weights count as torch
    counts them); metric columns are sample means (``Σ_b n_b m_b / N``).  With a process group
    the sums run over every rank's shard (one all-reduce), so every rank gets the whole-data values.
    ``forward_at(batch, offset)`` gives ``fn(*point_inputs) -> outputs`` for one batch;
    ``inputs(s, m)`` the stacked inputs of points s … s+m-1; ``point_numel(n)`` the numbers held
    per point for a batch of n samples (sizes the chunks).
    """
    names = ["the loss"] + [f"metric {k!r}" for k in metrics]
    itemsize = torch.finfo(obj.dtype).bits // 8
    mean = obj.reduction == "mean"
    seen = 0

    def like() -> Tensor:
        return torch.zeros(M + 1, len(names), dtype=obj.dtype, device=obj.device)

    def run() -> tuple[Tensor, float]:
        nonlocal seen
        acc = like()  # rows 0..M-1: Σ w_b ℓ_b and Σ n_b metric_b; row M, column 0: the sample count
        weight_total = 0.0
        for batch in obj.batches():
            fwd = forward_at(batch, seen)

            def point(*args, b=batch, fwd=fwd):
                out = fwd(*args)
                vals = [obj.loss(out, b.y, b.index)] + [fn(out, b.y) for fn in metrics.values()]
                return _scalars(vals, names, obj.dtype, api)

            m = _chunk(chunk_size, budget, point_numel(batch.n), itemsize, M)
            w = obj.batch_weight(batch)
            scale = torch.full((len(names),), float(batch.n) if mean else 1.0, dtype=obj.dtype, device=obj.device)
            scale[0] = w
            for s in range(0, M, m):
                r = runner(point, inputs(s, m))
                if w == 0:  # every target of the batch is ignored: its loss is 0/0 and weighs nothing
                    r[:, 0] = 0
                acc[s:s + r.shape[0]] += r * scale
            acc[M, 0] += batch.n
            weight_total += w
            seen += batch.n
        return acc, weight_total

    with obj.session(), torch.no_grad():
        acc, weight_total = obj.reduce_pass(run, like, api)
    vals = acc[:M]
    if mean:
        vals = vals.clone()
        vals[:, 0] = obj.normalize(vals[:, 0], weight_total)
        if vals.shape[1] > 1:
            vals[:, 1:] /= acc[M, 0]
    return vals, seen


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

def _run(api, target, D, C, metrics, batch, chunk_size, memory_budget):
    runner = _Runner(batch, api)
    if isinstance(target, _FunctionTarget):
        vals = _evaluate_function(target, D, C.to(D.device), metrics, runner, chunk_size, memory_budget, api)
        return vals, runner.path, "function"
    vals = _evaluate_params(target, D, C.to(D.device), metrics, runner, chunk_size, memory_budget, api)
    return vals, runner.path, "parameters"
