"""Structural tags: promises made by an operator's author, never guessed from numbers.

``SYMMETRIC``: A = Aᵀ.  ``PSD``: symmetric and vᵀAv ≥ 0 for every v (PSD implies
SYMMETRIC here).  The rules below say which tags a composite keeps.
"""

from __future__ import annotations

from typing import Iterable

SYMMETRIC = "symmetric"
PSD = "psd"
ALL_TAGS = frozenset({SYMMETRIC, PSD})


def normalize(tags: Iterable[str]) -> frozenset[str]:
    """Validate tag names; PSD implies SYMMETRIC."""
    tags = frozenset(tags)
    unknown = tags - ALL_TAGS
    if unknown:
        raise ValueError(
            f"tags: expected a subset of {sorted(ALL_TAGS)}, got unknown {sorted(unknown)}."
        )
    if PSD in tags:
        tags = tags | {SYMMETRIC}
    return tags


def sum_tags(parts: Iterable[frozenset[str]]) -> frozenset[str]:
    """A sum keeps the tags every term has."""
    parts = list(parts)
    out = parts[0]
    for p in parts[1:]:
        out = out & p
    return out


def scale_tags(tags: frozenset[str], c: float) -> frozenset[str]:
    """c·A keeps symmetry; PSD only when c ≥ 0."""
    out = tags & {SYMMETRIC}
    if PSD in tags and c >= 0:
        out = out | {PSD}
    return out
