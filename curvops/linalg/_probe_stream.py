r"""Random test vectors drawn block by block (private): the probes of the trace and diagonal estimators.

:class:`ProbeStream` stands for ``m`` test vectors of length ``n`` without holding them: column ``j``
comes from its own generator, seeded with the ``j``-th of ``m`` seeds drawn from the caller's
generator when the stream is made.  So a column depends only on the generator's state and on ``j`` —
not on how the columns are grouped into blocks (``block_size``, the operator's ``max_columns``) — and
an algorithm can draw a block, use it and drop it: memory is one block in the operator's dtype, never
all ``m`` columns (nor an int64 or float64 copy of them).  The same generator state on every rank
(:func:`~curvops.linalg._checks.check_generator` gives one to distributed operators) gives the same
columns on every rank.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: distributions of random test vectors
DISTRIBUTIONS = ("rademacher", "gaussian", "sphere")

_SEED_HIGH = 2**62


class ProbeStream:
    r"""``m`` test vectors ``[n]`` with $\mathbb{E}[\omega\omega^\top] = I$, drawn on demand by block.

    ``"rademacher"``: ±1 entries; ``"gaussian"``: standard normal; ``"sphere"``: Gaussian columns scaled
    to norm $\sqrt n$.  Drawn on the generator's device (the CPU for ``generator=None``, which then
    draws the seeds from torch's default generator), in ``dtype``, then moved to ``device``.
    """

    def __init__(self, n: int, m: int, distribution: str, generator: torch.Generator | None,
                 dtype: torch.dtype, device: torch.device, api: str):
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"{api}: expected distribution in {DISTRIBUTIONS}, got {distribution!r}.")
        self.n, self.m, self.distribution = int(n), int(m), distribution
        self.dtype, self.device = dtype, torch.device(device)
        self.where = generator.device if generator is not None else torch.device("cpu")
        self.seeds = torch.randint(0, _SEED_HIGH, (self.m,), generator=generator, device=self.where).tolist()

    def _column(self, j: int) -> Tensor:
        gen = torch.Generator(device=self.where).manual_seed(self.seeds[j])
        n, dtype = self.n, self.dtype
        if self.distribution == "rademacher":
            return torch.randint(0, 2, (n,), generator=gen, dtype=dtype, device=self.where).mul_(2).sub_(1)
        v = torch.randn(n, generator=gen, dtype=dtype, device=self.where)
        if self.distribution == "sphere":
            v.mul_(math.sqrt(n) / v.norm().clamp_min(torch.finfo(dtype).tiny))
        return v

    def block(self, start: int, stop: int) -> Tensor:
        """Columns ``start:stop`` as ``[n, stop − start]`` on ``device`` (a transposed view of row-major
        storage: each column contiguous)."""
        if not 0 <= start <= stop <= self.m:
            raise IndexError(f"ProbeStream.block: columns {start}:{stop} outside 0:{self.m}.")
        rows = torch.empty(stop - start, self.n, dtype=self.dtype, device=self.where)
        for j in range(start, stop):
            rows[j - start] = self._column(j)
        return rows.to(self.device).T

    def blocks(self, step: int | None):
        """``(start, stop, block)`` over all ``m`` columns, ``step`` at a time (None: all at once)."""
        step = self.m if step is None else max(1, int(step))
        for start in range(0, self.m, step):
            stop = min(start + step, self.m)
            yield start, stop, self.block(start, stop)


def default_step(A, block_size: int | None, m: int) -> int:
    """Columns per product: ``block_size``, else the operator's own slice (``max_columns``), else all m."""
    if block_size is not None:
        return int(block_size)
    step = A._column_step() if hasattr(A, "_column_step") else None
    return m if step is None else min(m, step)
