"""Bridges to other libraries; each submodule imports its optional dependency on first use.

* :mod:`curvops.interop.gpytorch`: :func:`~curvops.interop.gpytorch.to_linear_operator`
  (any operator as a ``linear_operator.LinearOperator``) and
  :class:`~curvops.interop.gpytorch.NTKKernel` (needs ``pip install 'curvops[gpytorch]'``).
* :mod:`curvops.interop.laplace`: :class:`~curvops.interop.laplace.CurvopsGGN`,
  :class:`~curvops.interop.laplace.CurvopsEF`, :class:`~curvops.interop.laplace.CurvopsHessian`,
  curvature backends of laplace-torch (needs ``pip install 'curvops[laplace]'``; see docs/guide/laplace.md).
"""

from __future__ import annotations

_GPYTORCH = ("to_linear_operator", "CurvopsLinearOperator", "NTKKernel")
_LAPLACE = ("CurvopsInterface", "CurvopsGGN", "CurvopsEF", "CurvopsHessian")

__all__ = list(_GPYTORCH) + list(_LAPLACE)


def __getattr__(name: str):
    if name in _GPYTORCH:
        from . import gpytorch as _gp

        return getattr(_gp, name)
    if name in _LAPLACE:
        from . import laplace as _la

        return getattr(_la, name)
    raise AttributeError(f"module 'curvops.interop' has no attribute {name!r}")
