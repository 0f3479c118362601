"""Test helpers: a tiny model zoo, dense torch.func oracles and the operator contract checks.

Imported by the test suite (and usable by anyone testing their own operators); not part of
the flat public API.
"""

from . import contract, oracles, zoo
from .zoo import CASES, Problem, ZooCase

__all__ = ["CASES", "Problem", "ZooCase", "contract", "oracles", "zoo"]
