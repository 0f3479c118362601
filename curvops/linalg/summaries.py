r"""One-number summaries of an operator's spectrum: rank, condition number, spectral and nuclear norm.

Each is computed matrix-free from a few extremal eigenvalues (Lanczos, :func:`eigsh`) or a
stochastic trace, and returns the value with the diagnostics that qualify it: which formula
applied, how many products it took, whether the eigensolver converged.

Which formula applies follows the operator's *tags* (promises, never guessed from numbers):
PSD operators use their eigenvalues directly; symmetric ones their eigenvalues' magnitudes;
anything else (untagged, rectangular) its singular values, through Lanczos on the Gram
operator $A^\top A$ or $A A^\top$ (whichever is smaller) — mathematically the Golub-Kahan
bidiagonalization, at two products (one with A, one with Aᵀ) per step.

References:
    Golub, Kahan (1965). *Calculating the Singular Values and Pseudo-Inverse of a Matrix.*
    Golub, Van Loan (2013). *Matrix Computations* (4th ed.), §2.4 and §10.
    Hutchinson (1989). *A Stochastic Estimator of the Trace of the Influence Matrix for Laplacian
    Smoothing Splines.*
    Ubaru, Chen, Saad (2017). *Fast Estimation of tr(f(A)) via Stochastic Lanczos Quadrature.*

The summaries live one per module: :mod:`.numerical_rank` (:func:`rank`), :mod:`.condition`
(:func:`cond`) and :mod:`.norms` (:func:`spectral_norm`, :func:`nuclear_norm`); this module
gathers them under their old import path.
"""

from .condition import CondResult, cond
from .norms import NormEstimate, nuclear_norm, spectral_norm
from .numerical_rank import RankResult, rank

__all__ = ["rank", "cond", "spectral_norm", "nuclear_norm", "RankResult", "CondResult", "NormEstimate"]
