"""Analyses built on operators and algorithms: stationary points, the quadratic toy model,
loss landscapes, active subspaces, averages over data/runs/checkpoints, tracking and decompositions."""

from .active_subspace import (
    ActiveSubspaceConvergence, ActiveSubspaceResult, PriorGradientCovariance, active_subspace,
    active_subspace_convergence, per_sample_gradients, prior_gradients, subspace_distance, subspace_distances,
)
from .averages import SubsetOperators, across_checkpoints, across_models, average, per_subset
from .decompose import NMFResult, PCAResult, nmf, pca
from .influence import InfluenceResult, SelfInfluenceResult, influence, self_influence
from .landscape import LandscapeResult, activation_along, filter_normalize, loss_along, loss_plane, random_direction
from .response import HypergradientResult, ResponseJacobian, StationarityWarning, hypergradient
from .quadratic import QuadraticModel, QuadraticStability, QuadraticStationaryPoints
from .stationary import StationaryPointResult, classify_stationary_point
from .track import TrackResult, track

__all__ = ["StationaryPointResult", "classify_stationary_point", "QuadraticModel", "QuadraticStability",
           "QuadraticStationaryPoints", "LandscapeResult", "loss_along", "loss_plane", "activation_along",
           "random_direction", "filter_normalize", "per_subset", "average", "across_models",
           "across_checkpoints", "SubsetOperators", "track", "TrackResult", "pca", "PCAResult", "nmf", "NMFResult",
           "active_subspace", "active_subspace_convergence", "per_sample_gradients", "subspace_distance",
           "subspace_distances", "ActiveSubspaceResult", "ActiveSubspaceConvergence", "PriorGradientCovariance", "prior_gradients",
           "ResponseJacobian", "hypergradient", "HypergradientResult", "StationarityWarning",
           "influence", "self_influence", "InfluenceResult", "SelfInfluenceResult"]
