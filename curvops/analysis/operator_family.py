r"""Operator families for the averages and for tracking: known by name (:data:`OPERATORS`), given as a
class or as a factory ``(model, loss, data, **kw) -> Operator``, and built with a check."""

from __future__ import annotations

from typing import Callable

import scipy.sparse.linalg as spla

from ..operators import GGN, EmpiricalFisher, Fisher, GradientCovariance, Hessian, Operator
from ..operators.algebra import as_operator

#: operator families known by name (``track(operator="ggn")``, ``per_subset("hessian", …)``)
OPERATORS: dict[str, Callable[..., Operator]] = {
    "hessian": Hessian,
    "ggn": GGN,
    "fisher": Fisher,
    "empirical_fisher": EmpiricalFisher,
    "gradient_covariance": GradientCovariance,
}


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
