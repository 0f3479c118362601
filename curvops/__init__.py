"""curvops: the curvature of any PyTorch model as lazy, matrix-free operators."""

from . import linalg
from . import analysis, report
from .analysis import (
    ActiveSubspaceResult, active_subspace, active_subspace_convergence, per_sample_gradients,
    LandscapeResult, QuadraticModel, StationaryPointResult, TrackResult, across_checkpoints, across_models,
    activation_along, classify_stationary_point, loss_along, loss_plane, per_subset, random_direction, track,
)
from .linalg import (
    cond, diagonal, eigsh, nuclear_norm, frobenius_norm, inverse, logdet, nystrom, randomized_svd, rank, solve,
    spectral_density, spectral_norm, svds, trace,
)
from .objective import Objective
from .operators import (
    ActivationHessian, CrossHessian, GradientCovariance, GradientFactor, HessianResidual, OutputHessian, submatrix,
    GGN, PSD, SYMMETRIC, Dense, DeterminismReport, Diagonal, EmpiricalFisher, Fisher, Hessian, Identity,
    Jacobian, NTK, LowRank, Operator, ParamLayout, as_operator, block_diag, check_deterministic, func_operator, restrict, tag,
    MixedDerivative, ParameterHessian, KFAC, EKFAC,
)
from .analysis.response import HypergradientResult, ResponseJacobian, StationarityWarning, hypergradient
from .analysis.influence import InfluenceResult, SelfInfluenceResult, influence, self_influence

from ._version import __version__

__all__ = [
    "linalg", "eigsh", "svds", "spectral_density", "logdet", "trace", "frobenius_norm", "diagonal", "randomized_svd",
    "nystrom", "solve", "inverse", "rank", "cond", "spectral_norm", "nuclear_norm", "classify_stationary_point",
    "StationaryPointResult", "analysis", "QuadraticModel", "LandscapeResult", "loss_along", "loss_plane",
    "activation_along", "random_direction", "per_subset", "across_models", "across_checkpoints", "track",
    "TrackResult", "active_subspace", "active_subspace_convergence", "per_sample_gradients", "ActiveSubspaceResult",
    "GradientFactor", "report",
    "ResponseJacobian", "MixedDerivative", "ParameterHessian", "hypergradient", "HypergradientResult",
    "StationarityWarning", "influence", "self_influence", "InfluenceResult", "SelfInfluenceResult",
    "Objective", "Operator", "Jacobian", "NTK", "GradientCovariance", "ActivationHessian", "OutputHessian", "HessianResidual", "CrossHessian", "submatrix", "ParamLayout", "Hessian", "GGN", "Fisher", "EmpiricalFisher", "KFAC", "EKFAC",
    "Dense", "Diagonal", "Identity", "LowRank", "as_operator", "block_diag", "func_operator",
    "restrict", "tag", "check_deterministic", "DeterminismReport", "PSD", "SYMMETRIC", "__version__",
]
