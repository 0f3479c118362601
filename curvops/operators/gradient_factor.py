r"""The matrix-free square-root factor of the active-subspace matrix: F with FᵀF = C."""

from __future__ import annotations

import torch
from torch import Tensor

from . import _autodiff
from ._curvature import join_columns, split_columns
from .base import Operator

class GradientFactor(Operator):
    r"""A square-root factor of the gradient covariance: $F^\top F = C$, matrix-free.

    .. math:: F = D\,(G - \mathbf{1}\mu^\top),\qquad D = \operatorname{diag}\big(\sqrt{m_i w_i / W}\big),
        \quad W = \sum_i m_i w_i,\quad \mu = \frac{1}{W}\sum_i m_i w_i \nabla g_i

    (μ = 0 unless the covariance is centred), with rows ∇g_i of G over the kept samples in data
    order, w_i their weights and m_i optional multipliers (e.g. bootstrap counts; default 1).
    The singular values σ of F give the eigenvalues σ² of C and its right singular vectors the
    eigenvectors, without squaring the condition number (small eigenvalues keep their relative
    accuracy, unlike those of a product with C).

    **Cost**: ``F @ V``: one pass, a forward-mode product of the per-sample g vector per column
    (vmapped); ``F.T @ U``: one pass, one VJP per column (vmapped). Construction: one pass over the
    targets if ``classes`` is set (unless ``kept_weights``, from :meth:`GradientCovariance.kept_weights`,
    is passed); centring adds one pass for μ. The data must come in the same order on every pass
    (no shuffling DataLoader).

    **Tags**: none.
    """

    def __init__(self, covariance, multipliers: Tensor | None = None, kept_weights: Tensor | None = None):
        # covariance: the GradientCovariance whose factor this is (built by its .factor())
        cov = covariance
        w = cov.kept_weights() if kept_weights is None else kept_weights
        if multipliers is not None:
            m = torch.as_tensor(multipliers, dtype=cov.torch_dtype, device=cov.device)
            if m.shape != w.shape or not bool(torch.isfinite(m).all()) or bool((m < 0).any()):
                raise ValueError(f"GradientFactor: expected finite non-negative multipliers of shape {tuple(w.shape)} "
                                 f"(one per kept sample), got shape {tuple(m.shape)}.")
            w = w * m
        total = float(w.sum())
        covariance._check_total(total)
        super().__init__((int(w.shape[0]), cov.shape[1]), cov.torch_dtype, cov.device, domain=cov.objective.layout)
        self.covariance, self.row_weights, self.total_weight = cov, w, total
        self.scale = (w / total).sqrt()  # D
        self.max_columns = cov.max_columns
        self._mu: tuple | None = None  # (state stamp, μ)

    def mean(self) -> Tensor | None:
        """μ [P] (None when not centred); one pass, cached until a parameter or buffer changes."""
        if not self.covariance.center:
            return None
        obj = self.covariance.objective
        if self._mu is None or not obj.state_matches(self._mu[0]):
            stamp = obj.state_stamp()
            u = (self.row_weights / self.total_weight)[:, None]
            self._mu = (stamp, self._uncentred_rmatmat(u)[:, 0])
        return self._mu[1]

    def _batches(self):
        """(kept batch, row slice) over one pass, with the row count checked."""
        cov, offset, row = self.covariance, 0, 0
        for batch in cov.objective.batches():
            kept, _ = cov._kept(batch, offset)
            offset += batch.n
            if kept is None:
                continue
            if row + kept.n > self.shape[0]:
                break
            yield kept, slice(row, row + kept.n)
            row += kept.n
        if row != self.shape[0]:
            raise ValueError(f"GradientFactor: a pass over the data kept {row} samples, expected {self.shape[0]}; the "
                             f"data must be the same, in the same order, on every pass (no shuffling).")

    def _matmat_torch(self, V: Tensor) -> Tensor:  # [P, K] -> [N, K]
        cov, obj, K = self.covariance, self.covariance.objective, V.shape[1]
        out = V.new_zeros(self.shape[0], K)
        starts = list(range(0, K, self.max_columns))
        chunks = [split_columns(obj, V[:, s:s + self.max_columns]) for s in starts]
        with obj.session():
            theta = tuple(obj.theta())
            for kept, rows in self._batches():
                fn = cov._per_sample(kept)
                for s, Vs in zip(starts, chunks):
                    out[rows, s:s + Vs[0].shape[0]] = _autodiff.jvp_columns(obj, fn, theta, Vs)[0].T
        mu = self.mean()
        if mu is not None:
            out -= (mu @ V)[None]
        return out.mul_(self.scale[:, None])

    def _uncentred_rmatmat(self, U: Tensor) -> Tensor:  # Gᵀ U, [N, K] -> [P, K]
        cov, obj, K = self.covariance, self.covariance.objective, U.shape[1]
        acc = [torch.zeros(K, *s, dtype=U.dtype, device=U.device) for s in obj.layout.shapes]
        with obj.session():
            theta = tuple(obj.theta())
            for kept, rows in self._batches():
                pull = _autodiff.Pullback(obj, cov._per_sample(kept), theta)
                for s in range(0, K, self.max_columns):
                    cot = U[rows, s:s + self.max_columns].T.contiguous()  # [k, n]
                    for a, r in zip(acc, pull.columns(cot)):
                        a[s:s + cot.shape[0]].add_(r)
        return join_columns(acc, K)

    def _rmatmat_torch(self, U: Tensor) -> Tensor:  # [N, K] -> [P, K]
        Us = U * self.scale[:, None]
        out = self._uncentred_rmatmat(Us)
        mu = self.mean()
        if mu is not None:
            out -= mu[:, None] * Us.sum(0)[None]
        return out
