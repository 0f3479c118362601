"""What the report's sections share: the operators, budgets, seed, cached results, figures and progress.

Under torch.distributed (``ranks`` given) the objective and the Hessian/GGN are built on this rank's
shard with the process group (their products are all-reduced); :meth:`Context.local` swaps in
one-process versions on the whole data for the sections rank 0 runs alone, and only rank 0 draws
figures.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Any, Callable

import torch
from torch import Tensor

from .budgets import Budgets


class Pending(Exception):
    """A section whose library module is not available (recorded, not an error)."""


class Skipped(Exception):
    """A section that does not apply to this model (recorded with the reason)."""


class Context:
    """The model's operators, budgets, the seed, cached results and the figures written so far."""

    def __init__(self, model, loss, data, *, params, batch_size, budgets_kw, seed, outdir, strict,
                 progress=False, ranks=None):
        from ..objective import Objective
        from ..operators import GGN, Hessian

        self.model, self.loss, self.data, self.outdir, self.seed = model, loss, data, outdir, seed
        self.strict = strict
        self.kw = dict(params=params, batch_size=batch_size)
        self.ranks = ranks  # None, or the report's curvops.report.ranks.Ranks
        shard, group = data, None
        if ranks is not None:
            from .ranks import shard_data

            shard, ranks.shard_sizes, ranks.unit = shard_data(data, ranks.rank, ranks.world)
            group = ranks.group
        self.objective = Objective(model, loss, shard, process_group=group, **self.kw)
        self.progress = progress
        self._bar = None  # the running section's inner progress bar
        self.H = self.counted(Hessian(model, loss, shard, process_group=group, **self.kw))
        self.G = self.counted(GGN(model, loss, shard, process_group=group, **self.kw))
        self._local = None  # one-process objective, H, G on the whole data (built on first use)
        self.num_params = self.objective.num_params
        self.device = self.objective.device
        self.budgets = Budgets.make(self.num_params, **budgets_kw)
        self.cache: dict[str, Any] = {}
        self.figures: dict[str, dict] = {}

    @property
    def rank(self) -> int:
        """This process's rank (0 without torch.distributed)."""
        return 0 if self.ranks is None else self.ranks.rank

    @contextmanager
    def local(self):
        """Inside: ``objective``, ``H`` and ``G`` are one-process operators on the whole data (for a
        section rank 0 runs alone, which must not enter a collective the other ranks never join)."""
        if self.ranks is None:
            yield self
            return
        if self._local is None:
            from ..objective import Objective
            from ..operators import GGN, Hessian

            self._local = (Objective(self.model, self.loss, self.data, **self.kw),
                           self.counted(Hessian(self.model, self.loss, self.data, **self.kw)),
                           self.counted(GGN(self.model, self.loss, self.data, **self.kw)))
        saved = self.objective, self.H, self.G
        self.objective, self.H, self.G = self._local
        try:
            yield self
        finally:
            self.objective, self.H, self.G = saved

    # ---- progress inside a section ------------------------------------------------------------
    @contextmanager
    def steps(self, name: str, unit: str = "product"):
        """An inner progress bar for the section ``name`` (on stderr below the sections' bar, when
        ``progress``): it counts the products of every operator made with :meth:`counted` and the
        steps a section reports with :meth:`tick`, so a long section shows that it moves."""
        from tqdm.auto import tqdm

        self._bar = tqdm(desc=f"  {name}", unit=unit, file=sys.stderr, disable=not self.progress, leave=False,
                         position=1)
        try:
            yield self._bar
        finally:
            self._bar.close()
            self._bar = None

    def tick(self, n: int = 1) -> None:
        """Advance the running section's inner progress bar by ``n`` steps."""
        if self._bar is not None:
            self._bar.update(n)

    def counted(self, A):
        """``A`` itself, with each product also counted on the inner progress bar (one per column).

        Only this instance's torch product is wrapped (every product, dense materialization
        included, goes through it); the values are those of ``A``."""
        product = A._matmat_torch

        def matmat(V):
            out = product(V)
            self.tick(V.shape[1])
            return out

        A._matmat_torch = matmat
        return A

    # ---- data and figures ------------------------------------------------------------------
    def generator(self) -> torch.Generator:
        """A fresh generator on the model's device, seeded with the report's seed."""
        return torch.Generator(device=self.device).manual_seed(self.seed)

    def first_samples(self, n: int):
        """``(x, y)`` of the first ``n`` samples of the data as the user gave them (on the device, in
        the model's dtype): targets *before* the loss's own transformation (e.g. the causal-LM
        shift), since they go to a new objective with the same loss."""
        from .._data import leading_dim, tree_map

        obj = self.objective
        xs, ys, count = [], [], 0
        for index, raw in enumerate(obj.data):
            x, y = obj._split(raw, index)
            x = tree_map(lambda t: obj._to_device(t, index), x)
            y = tree_map(lambda t: obj._to_device(t, index), y)
            take = min(leading_dim(x, y), n - count)
            if take <= 0:
                continue
            xs.append(_tree_slice(x, take))
            ys.append(_tree_slice(y, take))
            count += take
            if count >= n:
                break
        return _tree_cat(xs), _tree_cat(ys), count

    def figure(self, key: str, caption: str, draw: Callable) -> None:
        """Save ``<key>.png`` drawn by ``draw(plot, path)`` (``plot`` = :mod:`curvops.plotting`; it draws on a
        new figure and saves it to ``path``), close that figure and record it.  A missing plot
        module or a failing plot is recorded for this figure only (re-raised when strict).  Only
        rank 0 of a distributed report draws (and writes) figures."""
        if self.rank != 0:
            return
        try:
            import curvops.plotting as plot
        except ImportError as err:
            self.figures[key] = {"file": None, "caption": caption, "status": "pending",
                                 "message": f"curvops.plotting is not available ({err})"}
            return
        import matplotlib.pyplot as plt

        name = f"{key}.png"
        ax = None
        try:
            ax = draw(plot, os.path.join(self.outdir, name))
        except Exception as err:
            if self.strict:
                raise
            self.figures[key] = {"file": None, "caption": caption, "status": "error",
                                 "message": f"{type(err).__name__}: {err}"}
            return
        finally:
            if ax is not None:
                plt.close(ax.figure)
        self.figures[key] = {"file": name, "caption": caption, "status": "ok"}


def _tree_slice(x, n):
    if isinstance(x, Tensor):
        return x[:n] if x.dim() > 0 else x
    if isinstance(x, dict):
        return {k: _tree_slice(v, n) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_tree_slice(v, n) for v in x)
    return x


def _tree_cat(parts):
    first = parts[0]
    if isinstance(first, Tensor):
        return torch.cat(parts) if first.dim() > 0 else first
    if isinstance(first, dict):
        return {k: _tree_cat([p[k] for p in parts]) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(_tree_cat([p[i] for p in parts]) for i in range(len(first)))
    return first
