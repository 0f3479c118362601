"""What a solve returns and raises: :class:`SolveResult`, :class:`ConvergenceError`, :class:`ConvergenceWarning`."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


class ConvergenceError(RuntimeError):
    """An iterative solve did not reach its tolerance and the caller asked for ``strict=True``.

    The :class:`SolveResult` is attached as ``.result``.
    """

    def __init__(self, message: str, result: "SolveResult | None" = None):
        super().__init__(message)
        self.result = result


class ConvergenceWarning(UserWarning):
    """A solve inside a lazy :func:`inverse` did not converge (the product is still returned)."""


@dataclass
class SolveResult:
    """The outcome of :func:`solve`, with diagnostics.

    Attributes:
        x: the solution, shaped like ``b`` ([N] or [N, K]), on the operator's device.
        converged: True when every column reached its tolerance.
        num_matvecs: products spent (columns, with ``A`` and ``A.T`` together; the
            preconditioner's construction included, its applications not).
        residual_norm: the final residual norm per column (a float for a vector ``b``, a CPU
            tensor [K] for a block): CG ``‖b − (A+λI)x‖`` and LSMR
            ``‖[b; 0] − [A; √λ I]x‖``, both from the recurrences; MINRES the same in the
            preconditioner's norm ``‖r‖_M`` (the 2-norm without one).
        iterations: iterations of the (block) recurrence.
        history: the residual norm before the first and after each iteration (for blocks,
            the largest over the columns).
        method: ``"cg"``, ``"minres"`` or ``"lsmr"``.
        negative_curvature: CG only: some column met $p^\\top(A + \\lambda I)p \\le 0$ (the
            operator is not positive definite); that column stopped at the previous iterate.
        message: why the iteration stopped, in words.
        info: method-specific extras (LSMR: ``normal_residual_norm`` ``‖Aᵀr − λx‖`` and
            ``norm_A`` estimate; a preconditioner's cost ``preconditioner_matvecs``).
    """

    x: Tensor
    converged: bool
    num_matvecs: int
    residual_norm: float | Tensor
    iterations: int
    history: list[float]
    method: str
    negative_curvature: bool = False
    message: str = ""
    info: dict = field(default_factory=dict)
