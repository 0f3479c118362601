r"""Preconditioners for the solvers: the randomized Nyström preconditioner, and the choice of one.

References:
    Frangella, Tropp, Udell (2023). *Randomized Nyström Preconditioning*. SIAM J. Matrix Anal. Appl.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..operators import Operator
from ._checks import check_flag, check_int, check_real
from ._primitives import _operator
from .svd import nystrom


class NystromPreconditioner(Operator):
    r"""$P^{-1} = (\hat\lambda_\ell + \mu)\,U(\hat\Lambda + \mu I)^{-1}U^\top + (I - UU^\top)$.

    The inverse Nyström preconditioner of Frangella, Tropp, Udell (2023) for $A + \mu I$,
    from a rank-ℓ Nyström approximation $\hat A = U\hat\Lambda U^\top$ ($\hat\lambda_\ell$ its
    smallest kept eigenvalue).  It approximates $(\hat\lambda_\ell + \mu)(A + \mu I)^{-1}$;
    the scale is immaterial to CG.  Once ℓ exceeds the effective dimension of A at μ, the
    preconditioned condition number is O(1).

    **Cost** of a product: two thin products with U (no products with A).  **Tags**: symmetric, PSD.

    Attributes:
        U, eigenvalues: the Nyström factors; ``damping``: μ; ``num_matvecs``: the products
        with A that building it took.
    """

    def __init__(self, U: Tensor, eigenvalues: Tensor, damping: float, num_matvecs: int):
        super().__init__((U.shape[0], U.shape[0]), U.dtype, U.device, tags=("psd",))
        self.U, self.eigenvalues, self.damping, self.num_matvecs = U, eigenvalues, float(damping), num_matvecs
        self._scale = (eigenvalues[-1] + damping) / (eigenvalues + damping) - 1.0  # [ℓ]

    def _matmat_torch(self, V: Tensor) -> Tensor:
        return V + self.U @ (self._scale[:, None] * (self.U.T @ V))


def nystrom_preconditioner(A, rank: int, damping: float = 0.0, *, oversample: int = 10,
                           generator: torch.Generator | int | None = None,
                           assume_psd: bool = False) -> NystromPreconditioner:
    r"""The Nyström preconditioner for CG on $A + \mu I$ (``damping`` = μ), A PSD.

    Builds a rank-``rank`` Nyström approximation (:func:`curvops.linalg.svd.nystrom`) and
    returns :class:`NystromPreconditioner`, an operator approximating $(A + \mu I)^{-1}$ up to
    a scale.  Choose ``rank`` near the effective dimension
    $d_\mathrm{eff}(\mu) = \operatorname{tr}(A(A + \mu I)^{-1})$.

    **Cost**: ``rank + oversample`` products with A, in one call.

    Args:
        A: square PSD operator (tag ``"psd"``, or ``assume_psd=True``).
        rank: rank ℓ of the approximation.
        damping: μ ≥ 0.
        oversample: extra sketch columns.
        generator: random source for the sketch: ``None``,
            a ``torch.Generator``, or an int seed (a new generator on the operator's device,
            seeded with it).
        assume_psd: accept an operator without the ``"psd"`` tag.

    Returns:
        :class:`NystromPreconditioner` (symmetric, PSD).

    Raises:
        ValueError: non-PSD operator, negative damping, or ``damping == 0`` while the
            smallest kept eigenvalue is 0 to working precision (rank above the numerical rank
            of A: lower it or damp).
        TypeError: an argument of the wrong kind: a count that is not an int (e.g. a float),
            a ``generator`` that is not None, a ``torch.Generator`` or an int seed, a flag that
            is not a bool, a tolerance that is not a real number.

    References:
        Frangella, Tropp, Udell (2023). *Randomized Nyström Preconditioning*.
    """
    api = "nystrom_preconditioner"
    damping = check_real(damping, "damping", api, minimum=0.0, expected="a finite damping >= 0")
    rank = check_int(rank, "rank", api, minimum=1, expected="1 <= rank", fix="Pass the rank of the approximation.")
    assume_psd = check_flag(assume_psd, "assume_psd", api)
    approx = nystrom(A, rank, oversample=oversample, generator=generator, assume_psd=assume_psd)
    lam = approx.S
    floor = 10 * torch.finfo(lam.dtype).eps * max(float(lam[0]), damping)
    if float(lam[-1]) + damping <= floor:
        raise ValueError(
            f"{api}: the smallest of the {rank} kept eigenvalues is {float(lam[-1]):.3g} and damping is "
            f"{damping}; the preconditioner would be singular. Lower the rank or pass damping > 0."
        )
    return NystromPreconditioner(approx.U, lam, damping, approx.num_matvecs)


def _make_preconditioner(A, preconditioner, method, damping, rank, generator, assume_psd, api):
    if preconditioner is None:
        return None, 0
    if method == "lsmr":
        raise ValueError(f"{api}: LSMR takes no preconditioner here; pass preconditioner=None.")
    if isinstance(preconditioner, str):
        if preconditioner != "nystrom":
            raise ValueError(f"{api}: expected preconditioner None, an operator or 'nystrom', got {preconditioner!r}.")
        if method != "cg":
            raise ValueError(
                f"{api}: the Nyström preconditioner needs a PSD operator and method='cg', got {method!r}.")
        rank = min(int(rank), A.shape[0])
        P = nystrom_preconditioner(A, rank, damping, generator=generator, assume_psd=assume_psd)
        return P, P.num_matvecs
    P = _operator(preconditioner, f"{api} (preconditioner)")
    if P.shape != A.shape or P.torch_dtype != A.torch_dtype or P.device != A.device:
        raise ValueError(
            f"{api}: expected a preconditioner of shape {tuple(A.shape)}, dtype {A.torch_dtype} on {A.device}, "
            f"got shape {tuple(P.shape)}, dtype {P.torch_dtype} on {P.device}."
        )
    return P, 0
