r"""Fisher information (exact type-2 and Monte-Carlo) and the empirical Fisher."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._losses import kept_targets
from ..objective import Batch, Objective
from . import tags as _tags
from ._curvature import make_objective
from ._output_graphs import OutputSpaceOperator


def _per_sample_dot(E: Tensor, T: Tensor) -> Tensor:
    """⟨E_i, T_ki⟩ over the non-sample dimensions: E [n, ...], T [K, n, ...] → [K, n, 1, ...]."""
    s = (E[None] * T).reshape(T.shape[0], T.shape[1], -1).sum(-1)
    return s.reshape(*s.shape, *([1] * (T.dim() - 2)))



def per_sample_loss_grads(obj: Objective, batch: Batch, E: Tensor) -> Tensor:
    """∇ℓ_i w.r.t. the outputs from E = ∇(batch loss) of a 'mean' loss (one row per sample).

    E_i = ∇S_i / d_b (S_i: sample i's summed loss terms, d_b = Σ_i d_i), so ∇ℓ_i = ∇S_i / d_i
    = (d_b / d_i) E_i (0 for a sample whose targets are all ignored); n_b E_i when all d_i are equal.
    """
    d = obj.sample_weights(batch)
    if d is None:
        return batch.n * E
    d = d.to(device=E.device, dtype=E.dtype)
    ratio = torch.where(d > 0, d.sum() / d.clamp(min=torch.finfo(E.dtype).tiny), 0.0)
    return ratio.reshape(-1, *([1] * (E.dim() - 1))) * E

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

    def scale(self, objective: Objective, batch: Batch) -> float:
        """c_b = 1/d_b for 'mean' (d_b: the number of loss terms the batch mean divides by, ignored
        targets excluded), 1 for 'sum'."""
        if self.reduction == "sum":
            return 1.0
        return 1.0 / objective.batch_weight(batch)

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


class Fisher(OutputSpaceOperator):
    r"""Fisher information of the model's predictive distribution, normalized like the loss.

    .. math:: F = c \sum_i J_i^\top\, \mathbb{E}_{\hat y\sim p(\cdot|f_i)}\!\big[\nabla_f \ell(f_i,\hat y)
              \nabla_f \ell(f_i,\hat y)^\top\big]\, J_i

    where ℓ is the per-sample loss in its 'sum' form (the negative log-likelihood of p up to a
    constant: softmax categorical for cross-entropy, N(f, I/2) for MSE, Bernoulli for
    BCE-with-logits) and ``c`` the loss's normalization (1/(N·m) for 'mean' with m loss elements
    per sample, 1 for 'sum').  ``mc_samples=None`` gives the exact (type-2) Fisher, which equals
    the GGN for these losses; ``mc_samples=S`` draws S labels per sample from a generator seeded
    by ``seed`` and the batch index, so the Monte-Carlo Fisher is one fixed matrix across products
    (as long as batches come in the same order).  With a process group the draws are seeded by
    ``seed``, the rank and the batch index, so no two ranks reuse draws; the MC matrix then depends
    on how the data is sharded (the exact Fisher does not).

    **Cost**: like :class:`~curvops.GGN` (kept graphs included: ``keep_graphs``,
    ``max_graph_bytes``); ``mc_samples=S`` adds S outer products per sample in output space.
    **Tags**: symmetric, psd.

    Args:
        model_or_objective: an :class:`~curvops.Objective`, or a model followed by ``loss`` and ``data``
            (``loss``: ``"mse"``, ``"cross_entropy"``, ``"bce_with_logits"`` or the torch module).
        mc_samples: ``None`` for the exact Fisher, or the number of sampled labels per sample.
        seed: seeds the Monte-Carlo labels (with the batch index).
        max_columns: columns processed together per batch.
        keep_graphs: ``"auto"``, ``True`` or ``False``: keep per-batch graphs between products (see GGN).
        max_graph_bytes: memory budget of the kept graphs in bytes (None: 25 % of the available memory).
        **kwargs: passed to :class:`~curvops.Objective`.

    Raises:
        ValueError: a loss without a likelihood (a callable; class weights or label smoothing).

    Example:
        >>> import torch, curvops
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
        >>> X, y = torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 2, (16,))
        >>> F = curvops.Fisher(model, "cross_entropy", (X, y), mc_samples=100, seed=0)
        >>> F.shape, F.is_psd
        ((26, 26), True)
        >>> v = torch.randn(26, dtype=torch.float64)
        >>> torch.equal(F @ v, F @ v)                           # one fixed matrix across products
        True
    """

    def __init__(self, model_or_objective, loss=None, data=None, *, mc_samples: int | None = None,
                 seed: int = 0, max_columns: int = 64, keep_graphs: bool | str = "auto",
                 max_graph_bytes: int | None = None, **kwargs):
        objective = make_objective(model_or_objective, loss, data, **kwargs)
        if mc_samples is not None and (not isinstance(mc_samples, int) or mc_samples < 1):
            raise ValueError(f"Fisher: mc_samples must be None (exact) or a positive integer, got {mc_samples!r}.")
        self.likelihood = _Likelihood(objective)
        super().__init__(objective, tags=(_tags.PSD,), max_columns=max_columns, keep_graphs=keep_graphs,
                         max_graph_bytes=max_graph_bytes)
        self.mc_samples, self.seed = mc_samples, int(seed)

    def _apply_M(self, batch: Batch, out: Tensor, JV: Tensor) -> Tensor:
        lik, obj = self.likelihood, self.objective
        c = lik.scale(obj, batch)
        keep = kept_targets(obj.loss_kind, obj.loss_module, batch.y)  # ignore_index: those terms drop out
        if keep is not None:
            keep = keep.unsqueeze(1).to(out.dtype)  # broadcast over the class dimension
            JV = JV * keep
        if self.mc_samples is None:
            M = c * lik.expected_hessian(out, JV)
            return M if keep is None else M * keep
        gen = torch.Generator(device=out.device)
        # distributed: rank r's batch b gets its own draws (rank 0 draws as one process would)
        gen.manual_seed(self.seed * 1_000_003 + batch.index + obj.rank * 2**40)
        E = lik.sample_grads(out, self.mc_samples, gen)  # [S, n, ...]
        if keep is not None:
            E = E * keep
        acc = torch.zeros_like(JV)
        for s in range(E.shape[0]):
            acc += E[s][None] * _per_sample_dot(E[s], JV)
        return (c / self.mc_samples) * acc


class EmpiricalFisher(OutputSpaceOperator):
    r"""Empirical Fisher: the uncentred second moment of per-sample loss gradients.

    .. math:: \tilde F = \frac{1}{N}\sum_i \nabla\ell_i \nabla\ell_i^\top \ (\text{mean}),\qquad
              \tilde F = \sum_i \nabla\ell_i \nabla\ell_i^\top \ (\text{sum})

    where ℓ_i is the loss of sample i alone, exactly as torch computes it on that sample (its own
    reduction over its elements: for 'mean' a mean over its elements, or over its non-ignored
    targets with ``ignore_index``), and N the number of samples with at least one counted target
    ('mean').  Needs a loss that is a sum (or mean) of per-sample terms, each depending on its own
    output row.  For MSE / BCE with C outputs per sample this makes ℓ_i a mean over C elements:
    curvlinops' convention (a sum over them, with 1/(N·C) in front) is C times this matrix; see
    docs/conventions.md.

    **Cost**: like :class:`~curvops.GGN` (with kept graphs — ``keep_graphs``, ``max_graph_bytes`` —
    two reverse passes on the kept graph per block; without, one forward-mode and one reverse-mode
    product per column).
    **Tags**: symmetric, psd.

    Args:
        model_or_objective: an :class:`~curvops.Objective`, or a model followed by ``loss`` and ``data``.
        max_columns: columns processed together per batch.
        keep_graphs: ``"auto"``, ``True`` or ``False``: keep per-batch graphs between products (see GGN).
        max_graph_bytes: memory budget of the kept graphs in bytes (None: 25 % of the available memory).
        **kwargs: passed to :class:`~curvops.Objective`.

    Example:
        >>> import torch, curvops
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
        >>> X, y = torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 2, (16,))
        >>> EF = curvops.EmpiricalFisher(model, "cross_entropy", (X, y), batch_size=4)
        >>> G = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(
        ...     torch.nn.functional.cross_entropy(model(X[i:i + 1]), y[i:i + 1]), model.parameters())])
        ...     for i in range(16)])                           # per-sample gradients, [N, P]
        >>> torch.allclose(EF.to_dense(), G.T @ G / 16)
        True
    """

    def __init__(self, model_or_objective, loss=None, data=None, *, max_columns: int = 64,
                 keep_graphs: bool | str = "auto", max_graph_bytes: int | None = None, **kwargs):
        objective = make_objective(model_or_objective, loss, data, **kwargs)
        super().__init__(objective, tags=(_tags.PSD,), max_columns=max_columns, keep_graphs=keep_graphs,
                         max_graph_bytes=max_graph_bytes)

    def _batch_weight(self, batch: Batch) -> float:
        if self.objective.reduction == "sum":
            return 1.0
        d = self.objective.sample_weights(batch)
        return float(batch.n) if d is None else float((d > 0).sum())

    def _apply_M(self, batch: Batch, out: Tensor, JV: Tensor) -> Tensor:
        obj = self.objective
        o = out.detach().requires_grad_()
        with torch.enable_grad():
            value = obj.loss(o, batch.y, batch.index)
            (E,) = torch.autograd.grad(value, o)
        if obj.reduction == "mean":
            # the batch term is (1/n'_b) Σ_i ∇ℓ_i ∇ℓ_iᵀ over the n'_b counted samples
            G = per_sample_loss_grads(obj, batch, E)
            return G[None] * _per_sample_dot(G, JV) / self._batch_weight(batch)
        return E[None] * _per_sample_dot(E, JV)
