"""Explicit (and costly) checks of an operator's assumptions."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, RandomSampler


@dataclass
class DeterminismReport:
    """Result of :func:`check_deterministic`."""

    deterministic: bool
    issues: list[str] = field(default_factory=list)
    max_relative_difference: float = 0.0

    def __bool__(self) -> bool:
        return self.deterministic


def check_deterministic(A, *, num_products: int = 2, rtol: float = 1e-6, seed: int = 0,
                        strict: bool = False) -> DeterminismReport:
    """Check that an objective-backed operator is one fixed matrix.

    Looks for dropout and train-mode BatchNorm in the model and a shuffling ``DataLoader``,
    then multiplies one random vector ``num_products`` times and compares the results.

    **Cost**: ``num_products`` products (each one pass over the data).

    Args:
        A: an operator with an ``objective`` (Hessian, GGN, Fisher, EmpiricalFisher, …).
        strict: raise ``ValueError`` listing the issues instead of returning a failing report.
    """
    obj = getattr(A, "objective", None)
    if obj is None:
        raise TypeError(f"check_deterministic: expected an operator built on an Objective, got {type(A).__name__}.")
    issues = [f"stochastic module: {m}" for m in obj.stochastic_modules()]
    data = obj.data
    if isinstance(data, DataLoader) and isinstance(getattr(data, "sampler", None), RandomSampler):
        issues.append("the DataLoader shuffles (batches change between passes; set shuffle=False)")
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(A.shape[1], generator=gen, dtype=A.torch_dtype).to(A.device)
    outs = [A @ v for _ in range(max(2, num_products))]
    worst = 0.0
    for o in outs[1:]:
        worst = max(worst, float((o - outs[0]).norm() / outs[0].norm().clamp_min(1e-300)))
    if worst > rtol:
        issues.append(f"repeated products differ (relative difference {worst:.3g} > rtol={rtol:g})")
    report = DeterminismReport(deterministic=not issues, issues=issues, max_relative_difference=worst)
    if strict and issues:
        raise ValueError("check_deterministic: the operator is not a fixed matrix: " + "; ".join(issues))
    return report
