r"""Inputs of an active-subspace estimate: the data or a sampler ρ, and the shared argument checks
that turn them into a :class:`~curvops.operators.covariance.GradientCovariance`."""

from __future__ import annotations

import math
from typing import Callable

import torch

from ...objective import Objective, _tree_leaves
from ...operators.covariance import GradientCovariance
from .plan import METHODS


def _leading(X, api: str, what: str) -> int:
    leaves = _tree_leaves(X)
    if not leaves:
        raise TypeError(f"{api}: expected the sampler's {what} to be a tensor (or a dict/tuple of tensors), got "
                        f"{type(X).__name__}.")
    dims = {int(t.shape[0]) if t.dim() else -1 for t in leaves}
    return dims.pop() if len(dims) == 1 else -1


def _draw(sampler: Callable, n: int, generator: torch.Generator, api: str):
    out = sampler(n, generator)
    if isinstance(out, tuple) and len(out) == 2:  # (inputs, targets)
        X, y = out
    else:
        X, y = out, None
    for what, T in (("inputs", X), ("targets", y)):
        if T is None:
            continue
        lead = _leading(T, api, what)
        if lead != n:
            got = "tensors with different leading dimensions" if lead == -1 else f"leading dimension {lead}"
            raise ValueError(f"{api}: expected sampler(n, generator) to return n samples (leading dimension n); "
                             f"sampler({n}, generator) returned {what} with {got}. Return X of shape [n, ...] "
                             f"(or (X, y)).")
    return X, y


def _sampled_data(model, loss, g, sampler, num_samples, generator, kwargs, api: str):
    if isinstance(model, Objective):
        raise TypeError(f"{api}: sampler= needs a model (an nn.Module or f(params, x)), got an Objective, whose data "
                        f"is fixed. Pass the model and loss instead.")
    if not callable(sampler):
        raise TypeError(f"{api}: expected sampler to be a callable sampler(n, generator) -> X or (X, y), got "
                        f"{type(sampler).__name__}.")
    if num_samples is None:
        raise ValueError(f"{api}: sampler= needs num_samples (how many inputs to draw from ρ), got None.")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"{api}: expected num_samples to be a positive integer, got {num_samples!r}.")
    probe_gen = torch.Generator(device=generator.device)
    probe_gen.set_state(generator.get_state())
    n0 = min(2, num_samples)
    X0, y0 = _draw(sampler, n0, probe_gen, api)
    if y0 is None and isinstance(g, str):
        raise ValueError(f"{api}: g='loss' needs targets, but the sampler returns inputs only. Return (X, y) from "
                         f"the sampler, or pass a callable g(outputs, targets) -> [n] (e.g. a model output).")
    probe = GradientCovariance(model, loss, X0 if y0 is None else (X0, y0), g=g, **kwargs)
    obj = probe.objective
    try:
        with obj.session(), torch.no_grad():
            for batch in obj.batches():
                probe._per_sample(batch)(*obj.theta())
    except (RuntimeError, ValueError, TypeError, IndexError, KeyError) as err:
        shapes = [tuple(t.shape) for t in _tree_leaves(X0)]
        raise ValueError(f"{api}: the model (or g) failed on a small draw of the sampler: sampler({n0}, generator) "
                         f"returned inputs of shape {shapes[0] if len(shapes) == 1 else shapes}; the error was: "
                         f"{err}. Make the sampler return inputs the model accepts.") from err
    X, y = _draw(sampler, num_samples, generator, api)
    return X if y is None else (X, y)


# ---- the shared set-up -----------------------------------------------------------------------------------
def _check_common(method, memory_budget, tol, generator, api: str) -> torch.Generator:
    if method not in METHODS:
        raise ValueError(f"{api}: expected method in {METHODS}, got {method!r}.")
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float)):
        raise TypeError(f"{api}: expected memory_budget as a number of bytes, got {type(memory_budget).__name__}.")
    if not (memory_budget > 0 and math.isfinite(memory_budget)):
        raise ValueError(f"{api}: expected a positive, finite memory_budget (bytes), got {memory_budget!r}.")
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"{api}: expected tol > 0, got {tol!r}.")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{api}: expected a torch.Generator, got {type(generator).__name__}.")
    return generator if generator is not None else torch.Generator().manual_seed(0)


def _covariance(model_or_objective, loss, data, g, sampler, num_samples, weights, center, subset, classes,
                gen, kwargs, api: str) -> GradientCovariance:
    if sampler is not None:
        if data is not None:
            raise TypeError(f"{api}: pass either data or sampler=, not both.")
        data = _sampled_data(model_or_objective, loss, g, sampler, num_samples, gen, kwargs, api)
    elif num_samples is not None:
        raise ValueError(f"{api}: num_samples applies to draws only — of inputs x ~ ρ (sampler=) or of parameters "
                         f"θ ~ ρ (prior=); to use part of the data pass subset= (got num_samples={num_samples!r} "
                         f"with neither).")
    cov = GradientCovariance(model_or_objective, loss, data, g=g, weights=weights, center=center, subset=subset,
                             classes=classes, **kwargs)
    if cov.objective.process_group is not None:  # before any pass: the same error on every rank
        raise ValueError(
            f"{api}: the active subspace over data samples is not data-parallel: on torch.distributed each "
            f"rank would decompose only its own shard's per-sample gradients. Run it on one process over the "
            f"whole data, or take the eigenvalues with curvops.eigsh(GradientCovariance(model, loss, data, "
            f"distributed=True), k=...), whose products sum over the ranks; prior= (parameter draws over the "
            f"whole data loss) is data-parallel.")
    return cov


def _check_k(k, N: int, P: int, api: str) -> None:
    r = min(N, P)
    if k is None:
        return
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= r:
        raise ValueError(f"{api}: expected 1 ≤ k ≤ min(N, P) = {r} (N = {N} kept samples, P = {P} parameters), "
                         f"got k={k!r}. Pass k=None for all eigenpairs.")
