"""What :func:`~curvops.analysis.influence` and :func:`~curvops.analysis.self_influence` return."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


def _check_k(k, n: int, api: str) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{api}: expected a positive integer k, got {k!r}.")
    return min(k, n)


@dataclass
class InfluenceResult:
    r"""Influence scores of training samples on query samples, with diagnostics.

    ``scores[i, j]`` is the first-order change of the loss of query sample j when the loss of
    training sample i gets the extra weight ε in the training objective, per unit ε:

    .. math:: \mathcal{I}_{ij} = \frac{d\,\ell(z^{q}_j, \hat\theta_\varepsilon)}{d\varepsilon}\Big|_{\varepsilon=0}
              = -\nabla\ell(z^{q}_j)^\top (C + \delta I)^{-1} \nabla\ell(z_i)

    (Koh & Liang 2017's $\mathcal{I}_{\text{up,loss}}$, with ``C`` the curvature normalized like the
    training loss: $\hat\theta_\varepsilon = \arg\min L(\theta) + \frac{\delta}{2}\|\theta\|^2 + \varepsilon\,\ell(z_i)$.)
    **Positive**: up-weighting sample i raises the query loss — removing it is predicted to lower it
    (a *harmful* sample for that query). **Negative**: a *helpful* sample (a proponent).

    Attributes:
        scores: ``[N_train, N_query]`` in the model's dtype (rows in training-data order, columns in
            query order).
        loss_weights: ``[N_train]``: ``w_i`` with ``L = Σ_i w_i ℓ_i`` (``1/N`` for a mean loss without
            ignored or weighted targets, 1 for a sum): removing sample i is ``ε = −w_i``.
        solver: ``"inverse"`` (the operator's own damped inverse), ``"cg"`` or ``"minres"``.
        damping: δ.
        solve: the :class:`~curvops.linalg.SolveResult` of the block solve (None for ``"inverse"``, and
            with several query chunks): ``converged``, ``iterations``, ``num_matvecs``,
            ``residual_norm`` per query column.
        solves: the solve of every query chunk (empty for ``"inverse"``).
        curvature: a short description of the curvature operator.
        chunk_size: training samples per chunk of per-sample gradients.
        timings: seconds spent on ``"query_gradients"``, ``"solve"``, ``"train_gradients"``.
    """

    scores: Tensor
    loss_weights: Tensor
    solver: str
    damping: float
    solve: Any = None
    solves: list = field(default_factory=list)
    curvature: str = ""
    chunk_size: int | None = None
    timings: dict = field(default_factory=dict)

    @property
    def num_train(self) -> int:
        return int(self.scores.shape[0])

    @property
    def num_query(self) -> int:
        return int(self.scores.shape[1])

    @property
    def converged(self) -> bool:
        """Whether every solve converged (always True for the operator's own inverse)."""
        solves = self.solves or ([] if self.solve is None else [self.solve])
        return all(bool(s.converged) for s in solves)

    def total(self) -> Tensor:
        """``[N_train]``: the influence on the sum of the query losses (row sums of ``scores``)."""
        return self.scores.sum(dim=1)

    def removal_effect(self) -> Tensor:
        r"""``[N_train, N_query]``: the predicted change of each query loss when training sample i is
        removed, to first order: $-w_i\,\mathcal{I}_{ij}$ (``ε = −w_i``)."""
        return -self.loss_weights[:, None] * self.scores

    def _column(self, query, api: str) -> Tensor:
        if query is None:
            return self.total()
        if isinstance(query, bool) or not isinstance(query, int) or not -self.num_query <= query < self.num_query:
            raise ValueError(f"{api}: expected query=None (all queries) or an index in [0, {self.num_query}), "
                             f"got {query!r}.")
        return self.scores[:, query]

    def top_k(self, k: int, query: int | None = None, *, largest: bool = True) -> tuple[Tensor, Tensor]:
        """``(values, indices)`` of the k largest (or smallest) scores for query ``query``, or of the
        row sums (:meth:`total`) when ``query`` is None; indices are training-sample positions."""
        api = "InfluenceResult.top_k"
        col = self._column(query, api)
        return torch.topk(col, _check_k(k, self.num_train, api), largest=largest)

    def harmful(self, k: int, query: int | None = None) -> Tensor:
        """Indices of the k training samples with the largest scores: up-weighting them raises the query
        loss most (removing them is predicted to lower it)."""
        return self.top_k(k, query, largest=True)[1]

    def helpful(self, k: int, query: int | None = None) -> Tensor:
        """Indices of the k training samples with the most negative scores (proponents: up-weighting them
        lowers the query loss most)."""
        return self.top_k(k, query, largest=False)[1]

    def __repr__(self) -> str:
        return (f"InfluenceResult(scores {self.num_train}×{self.num_query}, solver={self.solver!r}, "
                f"damping={self.damping:g}, converged={self.converged}, curvature={self.curvature!r})")


@dataclass
class SelfInfluenceResult:
    r"""Self-influence of each training sample, $s_i = \nabla\ell(z_i)^\top (C + \delta I)^{-1} \nabla\ell(z_i) \ge 0$.

    The negative of the influence of a sample on its own loss (:class:`InfluenceResult` with the
    query = the sample): large values mark samples the model fits only by bending around them —
    mislabelled or atypical ones (Koh & Liang 2017, §5.4).

    Attributes:
        scores: ``[N_train]``.
        loss_weights: ``[N_train]`` as in :class:`InfluenceResult`.
        solver, damping, curvature, chunk_size, timings: as in :class:`InfluenceResult`.
        solves: the :class:`~curvops.linalg.SolveResult` of each chunk's block solve (empty for
            ``"inverse"``).
    """

    scores: Tensor
    loss_weights: Tensor
    solver: str
    damping: float
    solves: list = field(default_factory=list)
    curvature: str = ""
    chunk_size: int | None = None
    timings: dict = field(default_factory=dict)

    @property
    def converged(self) -> bool:
        return all(bool(s.converged) for s in self.solves)

    def top_k(self, k: int) -> tuple[Tensor, Tensor]:
        """``(values, indices)`` of the k largest self-influences."""
        return torch.topk(self.scores, _check_k(k, int(self.scores.shape[0]), "SelfInfluenceResult.top_k"))

    def __repr__(self) -> str:
        return (f"SelfInfluenceResult({int(self.scores.shape[0])} samples, solver={self.solver!r}, "
                f"damping={self.damping:g}, converged={self.converged}, curvature={self.curvature!r})")
