"""Matrix-free linear algebra on the operator protocol, torch-native (runs where the operator runs).

Every algorithm sees only the protocol (``A.shape``, ``A.torch_dtype``, ``A.device``, ``A.tags``,
``A @ V``, ``A.T @ W``), so it works on any operator: curvature operators, helpers, composites,
a user's own.  Results are small dataclasses with diagnostics.
"""

from .density import DensityResult, LogdetResult, logdet, spectral_density
from .diagonal import DiagonalResult, diagonal
from .lanczos import EighResult, LanczosDecomposition, eigsh, lanczos
from .solve import (
    ConvergenceError, ConvergenceWarning, InverseOperator, NystromPreconditioner, SolveResult, inverse,
    nystrom_preconditioner, solve,
)
from .summaries import CondResult, NormEstimate, RankResult, cond, nuclear_norm, rank, spectral_norm
from .svd import LowRankResult, nystrom, randomized_svd
from .trace import NormResult, TraceResult, frobenius_norm, trace
from .truncated_svd import SVDResult, svds

__all__ = [
    "eigsh", "lanczos", "EighResult", "LanczosDecomposition", "svds", "SVDResult",
    "spectral_density", "logdet", "DensityResult", "LogdetResult",
    "trace", "frobenius_norm", "TraceResult", "NormResult", "diagonal", "DiagonalResult",
    "randomized_svd", "nystrom", "LowRankResult",
    "solve", "inverse", "nystrom_preconditioner", "SolveResult", "InverseOperator", "NystromPreconditioner",
    "ConvergenceError", "ConvergenceWarning",
    "rank", "cond", "spectral_norm", "nuclear_norm", "RankResult", "CondResult", "NormEstimate",
]
