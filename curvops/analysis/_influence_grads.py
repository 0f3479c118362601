"""The pieces :mod:`curvops.analysis.influence` is built from: per-sample loss weights, streamed
per-sample gradients in data order, the curvature check, and the inverse-curvature product."""

from __future__ import annotations

import math
import warnings
from typing import Callable

import torch
from torch import Tensor

from ..linalg import ConvergenceError, ConvergenceWarning, SolveResult, solve
from ..linalg._checks import check_real
from ..objective import Objective
from ..operators import GradientCovariance, Operator

SOLVERS = ("auto", "inverse", "cg", "minres")


def loss_weights(obj: Objective) -> Tensor:
    r"""``w [N]``: the weight of each sample's own loss ``ℓ_i`` in the whole-data loss, ``L = Σ_i w_i ℓ_i``.

    ``w_i = d_i / Σ_j d_j`` for a ``"mean"`` loss (``d_i``: what the mean of sample i alone divides
    by — its elements for MSE/BCE, its non-ignored targets or their class weights for
    cross-entropy; so ``w_i = 1/N`` without ignored or weighted targets), ``w_i = 1`` for
    ``"sum"``.  **Cost**: one pass over the data that reads the targets only (the model does not run).
    """
    parts = []
    for batch in obj.batches():
        if obj.reduction == "sum":
            parts.append(torch.ones(batch.n, dtype=torch.float64))
            continue
        d = obj.sample_weights(batch)
        if d is None:
            d = torch.full((batch.n,), obj.batch_weight(batch) / batch.n, dtype=torch.float64)
        parts.append(d.detach().to("cpu", torch.float64))
    w = torch.cat(parts)
    if obj.reduction == "mean":
        total = float(w.sum())
        if not total > 0:
            raise ValueError("influence: every target of the data is ignored (ignore_index) or has zero class "
                             "weight, so the mean loss is 0/0; check the targets.")
        w = w / total
    return w.to(device=obj.device, dtype=obj.dtype)


def stream_gradients(obj: Objective, kept: Tensor, consume: Callable[[Tensor, Tensor], None],
                     chunk_size: int | None) -> None:
    """``consume(rows, G_c)``: per-sample gradients ``G_c [c, P]`` of the losses ``ℓ_i`` with the sample
    positions ``rows [c]`` in data order, chunk by chunk (memory O(chunk · P)).

    Samples whose targets are all ignored (``kept`` False) have no loss and get no row.
    """
    cov = GradientCovariance(obj)
    positions = kept.nonzero().squeeze(1).cpu()
    seen = [0]

    def take(G: Tensor, _w: Tensor) -> None:
        start = seen[0]
        rows = positions[start:start + G.shape[0]]
        if rows.shape[0] != G.shape[0]:
            raise ValueError("influence: the data gave more samples than in the first pass; expected fixed data "
                             "(a list of batches, an (X, y) pair or a non-shuffling DataLoader).")
        seen[0] += G.shape[0]
        consume(rows, G)

    cov.sample_gradient_pass(take, chunk_size)
    if seen[0] != positions.shape[0]:
        raise ValueError(f"influence: a pass over the data gave {seen[0]} samples, the first pass "
                         f"{positions.shape[0]}; expected fixed data.")


def check_curvature(curvature, obj: Objective, api: str) -> Operator:
    """The curvature is a square operator on the objective's parameters (names, shapes, dtype, device)."""
    if not isinstance(curvature, Operator):
        raise TypeError(f"{api}: expected curvature= as a curvops operator (GGN, Hessian, EmpiricalFisher, "
                        f"Fisher, KFAC, ...) or None for the GGN of the training data, got "
                        f"{type(curvature).__name__}.")
    P = obj.num_params
    if tuple(curvature.shape) != (P, P):
        raise ValueError(f"{api}: expected a {P}×{P} curvature (the model's {P} selected parameters), got shape "
                         f"{tuple(curvature.shape)}. Build it with the same model and params= as the influence.")
    dom = curvature.domain
    if dom is not None and (tuple(dom.names) != tuple(obj.layout.names) or tuple(dom.shapes) != tuple(obj.layout.shapes)):
        raise ValueError(f"{api}: the curvature's parameters {list(dom.names)} are not the influence's "
                         f"{list(obj.layout.names)}; build both with the same params=.")
    if curvature.torch_dtype != obj.dtype or curvature.device != obj.device:
        raise ValueError(f"{api}: expected a curvature in {obj.dtype} on {obj.device} (the model's), got "
                         f"{curvature.torch_dtype} on {curvature.device}.")
    return curvature


def resolve_solver(curvature: Operator, solver, api: str) -> str:
    """'auto' → the operator's own inverse if it has one (KFAC, EKFAC), CG for a PSD operator, MINRES for a
    symmetric one."""
    if not isinstance(solver, str) or solver not in SOLVERS:
        raise ValueError(f"{api}: expected solver in {SOLVERS}, got {solver!r}.")
    has_inverse = callable(getattr(curvature, "inverse", None))
    if solver == "auto":
        if has_inverse:
            return "inverse"
        if curvature.is_psd:
            return "cg"
        if curvature.is_symmetric:
            return "minres"
        raise ValueError(f"{api}: the curvature is tagged neither 'psd' nor 'symmetric' and has no inverse(); "
                         f"expected a curvature matrix (GGN, Hessian, EmpiricalFisher, Fisher, KFAC).")
    if solver == "inverse" and not has_inverse:
        raise ValueError(f"{api}: solver='inverse' needs an operator with an inverse(damping=...) method "
                         f"(KFAC, EKFAC); {type(curvature).__name__} has none. Use solver='cg' (PSD) or 'minres'.")
    if solver == "cg" and not curvature.is_psd:
        raise ValueError(f"{api}: solver='cg' needs a PSD curvature, but {type(curvature).__name__} is tagged "
                         f"{sorted(curvature.tags) or 'with no tags'}. Use solver='minres' (a Hessian), or a "
                         f"PSD curvature (GGN, EmpiricalFisher, Fisher).")
    if solver == "minres" and not curvature.is_symmetric:
        raise ValueError(f"{api}: solver='minres' needs a symmetric curvature; {type(curvature).__name__} is "
                         f"tagged {sorted(curvature.tags) or 'with no tags'}.")
    return solver


def check_damping(damping, api: str) -> float:
    value = check_real(damping, "damping", api, expected="a finite float damping")
    if value < 0 or not math.isfinite(value):
        raise ValueError(f"{api}: expected damping >= 0 (the δ of (C + δI)⁻¹), got {value}.")
    return value


def damped_inverse(curvature: Operator, solver: str, damping: float, api: str):
    """The operator's own ``inverse(damping=δ)`` for ``solver="inverse"`` (built before any pass, so that
    its refusals — e.g. KFAC's of δ = 0 — come first), else None."""
    if solver != "inverse":
        return None
    try:
        return curvature.inverse(damping=damping)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{api}: {type(curvature).__name__}.inverse(damping={damping:g}) refused: {err}") from err


def inverse_apply(curvature: Operator, inv, R: Tensor, *, solver: str, damping: float, rtol: float, atol: float,
                  max_iters: int | None, strict: bool, api: str) -> tuple[Tensor, SolveResult | None]:
    """``(C + δI)⁻¹ R`` for a block ``R [P, K]``: the operator's own damped inverse ``inv``, or one block
    solve (one data pass per iteration for all K columns). A solve that did not converge warns
    (:class:`~curvops.linalg.ConvergenceWarning`) or, with ``strict``, raises."""
    if inv is not None:
        X = inv @ R
        if not isinstance(X, Tensor) or tuple(X.shape) != tuple(R.shape):
            raise ValueError(f"{api}: {type(curvature).__name__}.inverse(damping=...) @ V returned "
                             f"{tuple(getattr(X, 'shape', ()))}, expected {tuple(R.shape)}.")
        return X, None
    result = solve(curvature, R, method=solver, damping=damping, rtol=rtol, atol=atol, max_iters=max_iters)
    if not result.converged:
        msg = (f"{api}: the {solver} solve did not converge ({result.message}); raise max_iters or the damping, "
               f"or loosen rtol. Diagnostics: result.solve.")
        if strict:
            raise ConvergenceError(msg, result)
        warnings.warn(msg, ConvergenceWarning, stacklevel=3)
    return result.x, result
