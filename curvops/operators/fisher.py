r"""Fisher information (exact type-2 and Monte-Carlo) and the empirical Fisher."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..objective import Batch, Objective
from . import tags as _tags
from ._curvature import CurvatureOperator, make_objective, output_space


def _per_sample_dot(E: Tensor, T: Tensor) -> Tensor:
    """⟨E_i, T_ki⟩ over the non-sample dimensions: E [n, ...], T [K, n, ...] → [K, n, 1, ...]."""
    s = (E[None] * T).reshape(T.shape[0], T.shape[1], -1).sum(-1)
    return s.reshape(*s.shape, *([1] * (T.dim() - 2)))


class _Likelihood:
    """The distribution p(y | f) whose negative log-likelihood is the per-sample 'sum' loss."""

    def __init__(self, objective: Objective):
        kind = objective.loss_kind
        if kind is None:
            raise ValueError(
                "Fisher: expected one of the losses 'mse', 'cross_entropy', 'bce_with_logits' (as a name or a "
                "torch loss module); the Fisher of an arbitrary callable is not defined. Use GGN or "
                "EmpiricalFisher instead."
            )
        mod = objective.loss_module
        if kind == "cross_entropy" and (getattr(mod, "weight", None) is not None
                                        or getattr(mod, "label_smoothing", 0.0) != 0.0):
            raise ValueError("Fisher: cross_entropy with class weights or label smoothing has no standard "
                             "likelihood; use GGN or EmpiricalFisher.")
        if kind == "bce_with_logits" and (getattr(mod, "weight", None) is not None
                                          or getattr(mod, "pos_weight", None) is not None):
            raise ValueError("Fisher: bce_with_logits with weight/pos_weight has no standard likelihood; "
                             "use GGN or EmpiricalFisher.")
        self.kind = kind
        self.reduction = objective.reduction

    def scale(self, out: Tensor) -> float:
        """c_b: 1/(n_b m_b) for 'mean' (m_b loss elements per sample), 1 for 'sum'."""
        if self.reduction == "sum":
            return 1.0
        per_sample = out[0].numel() if out.dim() > 0 else 1
        if self.kind == "cross_entropy":
            per_sample //= out.shape[1]
        return 1.0 / (out.shape[0] * per_sample)

    def expected_hessian(self, out: Tensor, T: Tensor) -> Tensor:
        """E_y[∇ℓ ∇ℓᵀ] · T per sample (equals the loss Hessian for these likelihoods)."""
        if self.kind == "mse":
            return 2.0 * T
        if self.kind == "bce_with_logits":
            s = torch.sigmoid(out)
            return (s * (1 - s))[None] * T
        p = torch.softmax(out, dim=1)[None]
        return p * T - p * (p * T).sum(dim=2, keepdim=True)

    def sample_grads(self, out: Tensor, num_samples: int, generator: torch.Generator) -> Tensor:
        """∇_f ℓ(f, ŷ) for ŷ ~ p(·|f): [S, *out.shape]."""
        shape = (num_samples, *out.shape)
        if self.kind == "mse":  # ℓ = ‖f − y‖², y ~ N(f, I/2): ∇ = 2(f − y) = −√2 ε
            eps = torch.randn(shape, generator=generator, dtype=out.dtype, device=out.device)
            return -math.sqrt(2.0) * eps
        if self.kind == "bce_with_logits":
            s = torch.sigmoid(out)
            y = torch.bernoulli(s.expand(shape), generator=generator)
            return s[None] - y
        p = torch.softmax(out, dim=1)
        C = out.shape[1]
        flat = p.movedim(1, -1).reshape(-1, C)
        idx = torch.multinomial(flat, num_samples, replacement=True, generator=generator)  # [rows, S]
        onehot = torch.nn.functional.one_hot(idx.T, C).to(out.dtype)  # [S, rows, C]
        onehot = onehot.reshape(num_samples, *p.movedim(1, -1).shape).movedim(-1, 2)
        return p[None] - onehot


class Fisher(CurvatureOperator):
    r"""Fisher information of the model's predictive distribution, normalized like the loss.

    .. math:: F = c \sum_i J_i^\top\, \mathbb{E}_{\hat y\sim p(\cdot|f_i)}\!\big[\nabla_f \ell(f_i,\hat y)
              \nabla_f \ell(f_i,\hat y)^\top\big]\, J_i

    where ℓ is the per-sample loss in its 'sum' form (the negative log-likelihood of p up to a
    constant: softmax categorical for cross-entropy, N(f, I/2) for MSE, Bernoulli for
    BCE-with-logits) and ``c`` the loss's normalization (1/(N·m) for 'mean' with m loss elements
    per sample, 1 for 'sum').  ``mc_samples=None`` gives the exact (type-2) Fisher, which equals
    the GGN for these losses; ``mc_samples=S`` draws S labels per sample from a generator seeded
    by ``seed`` and the batch index, so the Monte-Carlo Fisher is one fixed matrix across products
    (as long as batches come in the same order).

    **Cost**: like :class:`~curvops.GGN`.  **Tags**: symmetric, psd.
    """

    def __init__(self, model_or_objective, loss=None, data=None, *, mc_samples: int | None = None,
                 seed: int = 0, max_columns: int = 64, **kwargs):
        objective = make_objective(model_or_objective, loss, data, **kwargs)
        if mc_samples is not None and (not isinstance(mc_samples, int) or mc_samples < 1):
            raise ValueError(f"Fisher: mc_samples must be None (exact) or a positive integer, got {mc_samples!r}.")
        self.likelihood = _Likelihood(objective)
        super().__init__(objective, tags=(_tags.PSD,), max_columns=max_columns)
        self.mc_samples, self.seed = mc_samples, int(seed)

    def _apply_M(self, batch: Batch, out: Tensor, JV: Tensor) -> Tensor:
        lik = self.likelihood
        c = lik.scale(out)
        if self.mc_samples is None:
            return c * lik.expected_hessian(out, JV)
        gen = torch.Generator(device=out.device)
        gen.manual_seed(self.seed * 1_000_003 + batch.index)
        E = lik.sample_grads(out, self.mc_samples, gen)  # [S, n, ...]
        acc = torch.zeros_like(JV)
        for s in range(E.shape[0]):
            acc += E[s][None] * _per_sample_dot(E[s], JV)
        return (c / self.mc_samples) * acc

    def _batch_matmat(self, batch: Batch, Vs: list[Tensor], state=None) -> list[Tensor]:
        obj, path = self.objective, []
        res = output_space(obj, batch, obj.theta(), Vs, lambda out, JV: self._apply_M(batch, out, JV), path)
        self.last_path = path[-1]
        return res


class EmpiricalFisher(CurvatureOperator):
    r"""Empirical Fisher: the uncentred second moment of per-sample loss gradients.

    .. math:: \tilde F = \frac{1}{N}\sum_i \nabla\ell_i \nabla\ell_i^\top \ (\text{mean}),\qquad
              \tilde F = \sum_i \nabla\ell_i \nabla\ell_i^\top \ (\text{sum})

    where ℓ_i is the loss of sample i alone (with the loss's own reduction over its elements).
    Needs a loss that is a sum (or mean) of per-sample terms, each depending on its own output row.

    **Cost**: like :class:`~curvops.GGN` (one forward-mode and one reverse-mode product per column).
    **Tags**: symmetric, psd.
    """

    def __init__(self, model_or_objective, loss=None, data=None, *, max_columns: int = 64, **kwargs):
        objective = make_objective(model_or_objective, loss, data, **kwargs)
        super().__init__(objective, tags=(_tags.PSD,), max_columns=max_columns)

    def _apply_M(self, batch: Batch, out: Tensor, JV: Tensor) -> Tensor:
        obj = self.objective
        o = out.detach().requires_grad_()
        with torch.enable_grad():
            value = obj.loss(o, batch.y, batch.index)
            (E,) = torch.autograd.grad(value, o)
        if obj.reduction == "mean":  # E_i = ∇ℓ_i / n_b; Σ_i J_iᵀ ∇ℓ_i ∇ℓ_iᵀ J_i / n_b = n_b Σ_i J_iᵀ E_i E_iᵀ J_i
            return batch.n * E[None] * _per_sample_dot(E, JV)
        return E[None] * _per_sample_dot(E, JV)

    def _batch_matmat(self, batch: Batch, Vs: list[Tensor], state=None) -> list[Tensor]:
        obj, path = self.objective, []
        res = output_space(obj, batch, obj.theta(), Vs, lambda out, JV: self._apply_M(batch, out, JV), path)
        self.last_path = path[-1]
        return res
