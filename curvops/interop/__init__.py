"""Bridges to other libraries; each submodule imports its optional dependency on first use.

* :mod:`curvops.interop.gpytorch`: :func:`~curvops.interop.gpytorch.to_linear_operator`
  (any operator as a ``linear_operator.LinearOperator``) and
  :class:`~curvops.interop.gpytorch.NTKKernel` (needs ``pip install 'curvops[gpytorch]'``).
"""

from __future__ import annotations

_GPYTORCH = ("to_linear_operator", "CurvopsLinearOperator", "NTKKernel")

__all__ = list(_GPYTORCH)


def __getattr__(name: str):
    if name in _GPYTORCH:
        from . import gpytorch as _gp

        return getattr(_gp, name)
    raise AttributeError(f"module 'curvops.interop' has no attribute {name!r}")
