r"""curvops as a curvature backend of laplace-torch: ``Laplace(model, "classification", backend=CurvopsGGN)``.

laplace-torch (0.3) takes its curvature from a backend class implementing
``laplace.curvature.CurvatureInterface``: per batch ``full`` (a P×P matrix), ``diag`` (its diagonal)
and ``kron`` (Kronecker factors), each with the batch's loss.  The classes here compute them with
curvops operators:

* :class:`CurvopsGGN`: ``full`` from :class:`~curvops.GGN` (``stochastic=True``: the Monte-Carlo
  :class:`~curvops.Fisher`), ``diag`` exact (one pass of per-sample gradients per output), ``kron``
  from :class:`~curvops.KFAC` (type-2; ``"mc"`` when stochastic);
* :class:`CurvopsEF`: ``full`` from :class:`~curvops.EmpiricalFisher`, ``diag`` from the per-sample
  gradients, ``kron`` from KFAC with ``fisher_type="empirical"``;
* :class:`CurvopsHessian`: ``full`` from :class:`~curvops.Hessian`, ``diag`` exact (P Hessian
  products, in blocks), no ``kron``.

**laplace-torch's conventions** (which the backends follow exactly, so that they can be swapped for
its curvlinops backend): the loss is a **sum** over the data (``MSELoss(reduction="sum")``,
``CrossEntropyLoss(reduction="sum")``), not a mean, and every returned matrix and loss is multiplied
by the likelihood's ``factor``: ½ for regression (torch's MSE is ‖f − y‖², the Gaussian
log-likelihood with unit noise has ½‖f − y‖²) and 1 for classification.  So ``full`` returns
``factor · ∇²`` of the summed loss (GGN: ``Σ_i J_iᵀ J_i`` for regression, ``Σ_i J_iᵀ(diag p_i −
p_i p_iᵀ)J_i`` for classification), and laplace-torch adds the batches' matrices and losses.  For
``kron`` the factors are those of the summed loss: ``B`` (output side) a sum over the batch, ``A``
(input side) a mean over its ``M`` rows rescaled by ``M/N`` so that laplace-torch's sum of the
factors over batches is ``(Σ B) ⊗ (mean A)``; weight and bias get separate blocks (laplace-torch's
layout: ``[B, A]`` for a weight, ``[B]`` for its bias), each scaled by ``factor``.

``last_layer=True`` (``subset_of_weights="last_layer"``) and ``subnetwork_indices``
(``SubnetLaplace``, ``full`` only) are supported; the Jacobians of the predictive come from
laplace-torch's own ``torch.func`` code (inherited).  Dict-shaped batches (``dict_key_x``/``dict_key_y``,
HuggingFace style) reach the model as one positional dict of tensors, as laplace-torch passes them,
without the labels entry (``dict_key_y``).

Install: ``pip install 'curvops[laplace]'`` pulls laplace-torch from PyPI, which pulls torchvision
(and may replace a CPU torch by a CUDA build); on a CPU-only torch install it without dependencies
and remove torchvision (docs/guide/laplace.md).

References:
    Daxberger, Kristiadi, Immer, Eschenhagen, Bauer, Hennig (2021). *Laplace Redux — Effortless
    Bayesian Deep Learning*. NeurIPS.
"""

from __future__ import annotations

from collections.abc import MutableMapping

import torch
from torch import Tensor

try:
    from laplace.curvature import CurvatureInterface, EFInterface, GGNInterface
    from laplace.utils import Kron
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "curvops.interop.laplace needs laplace-torch 0.3: pip install 'curvops[laplace]', or on a CPU-only torch "
        "(the registry's requirements pull torchvision and a CUDA torch): pip install --no-deps laplace-torch==0.3 "
        "asdfghjkl==0.1a4 backpack-for-pytorch==1.7.1 unfoldNd==0.2.3 torchmetrics==1.9.0 lightning-utilities==0.15.3 "
        "curvlinops-for-pytorch==3.0.1 einops einconv opt-einsum, then pip uninstall -y torchvision "
        "(docs/guide/laplace.md)."
    ) from err

from ..linalg import diagonal
from ..objective import Objective
from ..operators import KFAC, EmpiricalFisher, Fisher, GGN, GradientCovariance, Hessian, Operator

__all__ = ["CurvopsInterface", "CurvopsGGN", "CurvopsEF", "CurvopsHessian"]


class CurvopsInterface(CurvatureInterface):
    """Common part of the curvops backends: the batch's objective and the ``full``/``diag``/``kron`` plumbing.

    Subclasses name the operator (:meth:`_operator`) and may override :meth:`_diag` and
    :attr:`_fisher_type` (the KFAC variant; None: no ``kron``).
    """

    _fisher_type: str | None = None

    # ---- the batch ------------------------------------------------------------------------
    def _objective(self, x, y) -> Objective:
        api = type(self).__name__
        if not isinstance(y, Tensor):
            raise TypeError(f"{api}: expected tensor targets, got {type(y).__name__}.")
        if isinstance(x, MutableMapping):  # laplace-torch calls model(batch) with the whole dict, labels included
            batch = {k: v for k, v in x.items() if k != self.dict_key_y}
            bad = [k for k, v in batch.items() if not isinstance(v, Tensor)]
            if bad:
                raise TypeError(f"{api}: expected a dict batch of tensors, got non-tensor entries {bad}; "
                                f"remove them from the batches (or use laplace-torch's CurvlinopsGGN).")
            return Objective(self.model, self.lossfunc, [(batch, y)], params=list(self.params), call="positional")
        if not isinstance(x, Tensor):
            raise TypeError(f"{api}: expected tensor (or dict-of-tensor) inputs, got {type(x).__name__}.")
        return Objective(self.model, self.lossfunc, [(x, y)], params=list(self.params))

    def _loss(self, obj: Objective) -> Tensor:
        """``factor`` × the batch's summed loss, as laplace-torch adds it up."""
        return torch.as_tensor(self.factor * obj.loss_value(), dtype=obj.dtype, device=obj.device)

    def _operator(self, obj: Objective) -> Operator:
        raise NotImplementedError

    # ---- laplace-torch's interface ------------------------------------------------------------
    def full(self, x, y, **kwargs) -> tuple[Tensor, Tensor]:
        """``(factor · loss, factor · C)``: the batch's summed loss and its curvature as a dense P×P matrix
        (or |S|×|S| over ``subnetwork_indices``).  **Cost**: ``P`` (or ``|S|``) products with the operator,
        in blocks of 256 columns."""
        obj = self._objective(x, y)
        op = self._operator(obj)
        P = op.shape[0]
        if self.subnetwork_indices is None:
            H = op.to_dense(max_entries=max(P * P, 1))
        else:
            idx = torch.as_tensor(self.subnetwork_indices, device=op.device).long()
            H = torch.cat([(op @ _units(P, idx[s:s + 256], op))[idx] for s in range(0, idx.numel(), 256)], dim=1)
        return self._loss(obj), self.factor * H

    def diag(self, x, y, **kwargs) -> tuple[Tensor, Tensor]:
        """``(factor · loss, factor · diag C)`` for the batch."""
        if self.subnetwork_indices is not None:
            raise ValueError(f"{type(self).__name__}.diag: subnetwork_indices are for full Hessians (SubnetLaplace); "
                             f"use hessian_structure='full'.")
        obj = self._objective(x, y)
        return self._loss(obj), self.factor * self._diag(obj)

    def _diag(self, obj: Objective) -> Tensor:
        """The exact diagonal from products with unit vectors (P products, in blocks)."""
        return diagonal(self._operator(obj), method="exact").value

    def kron(self, x, y, N: int, **kwargs) -> tuple[Tensor, Kron]:
        """``(factor · loss, Kron)``: the batch's KFAC factors in laplace-torch's layout (see the module
        docstring), ``A`` rescaled by ``M/N``.  ``kfac_approx=`` (``"expand"``/``"reduce"``) is passed on.

        Raises:
            ValueError: a parameter outside a layer KFAC supports (Linear, Conv2d), named.
        """
        api = type(self).__name__
        if self._fisher_type is None:
            raise NotImplementedError(f"{api}: no Kronecker factorization of this curvature; use CurvopsGGN or "
                                      f"CurvopsEF with hessian_structure='kron'.")
        if self.subnetwork_indices is not None:
            raise ValueError(f"{api}.kron: subnetwork_indices are for full Hessians (SubnetLaplace).")
        obj = self._objective(x, y)
        mc = self.num_samples if self._fisher_type == "mc" else 1
        K = KFAC(obj, fisher_type=self._fisher_type, kfac_approx=kwargs.get("kfac_approx", "expand"), mc_samples=mc)
        factors: dict[str, list[Tensor]] = {}
        M = int(y.shape[0])
        for rec in K.kron_factors():
            A, B = rec.A, rec.B
            if rec.weight is not None:
                A_w = A[:-1, :-1] if rec.bias is not None else A
                factors[rec.weight] = [B.clone(), A_w * (M / N)]
            if rec.bias is not None:
                factors[rec.bias] = [B * A[-1, -1]]
        kron = Kron([factors[n] for n in obj.layout.names]) * self.factor
        return self._loss(obj), kron


def _units(P: int, idx: Tensor, op: Operator) -> Tensor:
    E = torch.zeros(P, idx.numel(), dtype=op.torch_dtype, device=op.device)
    E[idx, torch.arange(idx.numel(), device=op.device)] = 1
    return E


class CurvopsGGN(CurvopsInterface, GGNInterface):
    """The generalized Gauss-Newton (= the Fisher for these likelihoods) from curvops.

    ``full``: :class:`~curvops.GGN` (``stochastic=True``: the Monte-Carlo :class:`~curvops.Fisher`
    with ``num_samples`` labels per sample); ``diag``: exact, ``Σ_i Σ_c (∇_θ⟨s_ic, f_i⟩)²`` with ``s_ic``
    the columns of a square root of the output-space Hessian (one pass of per-sample gradients per
    output, ``C`` in all; stochastic: the exact diagonal of the MC Fisher); ``kron``:
    :class:`~curvops.KFAC` (``"type-2"``, or ``"mc"`` when stochastic).

    Args:
        model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y: laplace-torch's.
        stochastic: the Monte-Carlo Fisher instead of the GGN.
        num_samples: sampled labels per sample when stochastic.
    """

    def __init__(self, model, likelihood, last_layer: bool = False, subnetwork_indices=None,
                 dict_key_x: str = "input_ids", dict_key_y: str = "labels", stochastic: bool = False,
                 num_samples: int = 1):
        super().__init__(model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y,
                         stochastic=stochastic, num_samples=num_samples)

    @property
    def _fisher_type(self) -> str:
        return "mc" if self.stochastic else "type-2"

    def _operator(self, obj: Objective) -> Operator:
        return Fisher(obj, mc_samples=self.num_samples) if self.stochastic else GGN(obj)

    def _diag(self, obj: Objective) -> Tensor:
        if self.stochastic:
            return super()._diag(obj)
        out = torch.zeros(obj.num_params, dtype=obj.dtype, device=obj.device)

        def add(G: Tensor, _w: Tensor) -> None:
            out.add_((G * G).sum(0))

        C = _num_outputs(obj)
        for c in range(C):
            GradientCovariance(obj, g=_root_column(self.likelihood, c)).sample_gradient_pass(add)
        return out


def _num_outputs(obj: Objective) -> int:
    with obj.session(), torch.no_grad():
        out = obj.forward(obj.theta(), obj.first_sample().x)
    if out.dim() != 2:
        raise ValueError(f"CurvopsGGN.diag: expected model outputs [n, C], got shape {tuple(out.shape)}.")
    return int(out.shape[1])


def _root_column(likelihood: str, c: int):
    r"""``g(out, y) = ⟨s_c, f⟩`` per sample, with ``s_c`` (held fixed) column c of ``S``, ``S Sᵀ`` the
    summed loss's Hessian in output space: ``√2 e_c`` for MSE (Hessian 2I); ``√p_c (e_c − p)`` for
    cross-entropy (``diag p − p pᵀ``)."""
    def g(out: Tensor, y) -> Tensor:
        with torch.no_grad():
            f = out.detach()
            if likelihood == "regression":
                s = torch.zeros_like(f)
                s[:, c] = 2.0 ** 0.5
            else:
                p = torch.softmax(f, dim=1)
                s = -p * p[:, c:c + 1].sqrt()
                s[:, c] += p[:, c].sqrt()
        return (out * s).sum(dim=1)

    return g


class CurvopsEF(CurvopsInterface, EFInterface):
    """The empirical Fisher ``Σ_i ∇ℓ_i ∇ℓ_iᵀ`` of the summed loss from curvops.

    ``full``: :class:`~curvops.EmpiricalFisher`; ``diag``: ``Σ_i (∇ℓ_i)²`` from one pass of per-sample
    gradients; ``kron``: :class:`~curvops.KFAC` with ``fisher_type="empirical"``.
    """

    _fisher_type = "empirical"

    def _operator(self, obj: Objective) -> Operator:
        return EmpiricalFisher(obj)

    def _diag(self, obj: Objective) -> Tensor:
        out = torch.zeros(obj.num_params, dtype=obj.dtype, device=obj.device)

        def add(G: Tensor, _w: Tensor) -> None:
            out.add_((G * G).sum(0))

        GradientCovariance(obj).sample_gradient_pass(add)
        return out


class CurvopsHessian(CurvopsInterface):
    """The Hessian of the summed loss from curvops: ``full`` (:class:`~curvops.Hessian`), ``diag`` (exact,
    ``P`` Hessian products in blocks); no ``kron``."""

    def _operator(self, obj: Objective) -> Operator:
        return Hessian(obj)
