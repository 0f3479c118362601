"""Analyses built on operators and algorithms: stationary points (more to come: landscapes,
averages over runs and checkpoints, active subspaces)."""

from .stationary import StationaryPointResult, classify_stationary_point

__all__ = ["StationaryPointResult", "classify_stationary_point"]
