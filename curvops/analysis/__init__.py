"""Analyses built on operators and algorithms: stationary points and the quadratic toy model
(more to come: landscapes, averages over runs and checkpoints, active subspaces)."""

from .quadratic import QuadraticModel, QuadraticStability, QuadraticStationaryPoints
from .stationary import StationaryPointResult, classify_stationary_point

__all__ = ["StationaryPointResult", "classify_stationary_point", "QuadraticModel", "QuadraticStability",
           "QuadraticStationaryPoints"]
