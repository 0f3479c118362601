r"""Kronecker-factored curvature: KFAC and EKFAC as operators, with exact damped inverses."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from . import tags as _tags
from ._curvature import make_objective
from ._kfac_factors import ekfac_eigenvalues, factor_dtype, kfac_factors
from ._kfac_layers import find_blocks
from .base import Operator
from .fisher import _Likelihood

FISHER_TYPES = ("type-2", "mc", "empirical")
KFAC_APPROX = ("expand", "reduce")


class KronFactors(NamedTuple):
    """One layer's Kronecker factors (see :meth:`KFAC.kron_factors`)."""

    module: str             #: the module's name in ``model.named_modules()``
    params: tuple           #: the layer's selected parameter names, in layout order (weight, then bias)
    weight: str | None      #: the weight's parameter name (None when not selected)
    bias: str | None        #: the bias's parameter name (None when not selected or absent)
    kind: str               #: 'linear', 'conv2d' or 'conv1d_hf' (transformers' Conv1D, weight stored [d_in, d_out])
    A: Tensor               #: input side [a, a]: a = d_in + 1 with the bias column last, d_in without bias, 1 for a bias alone
    B: Tensor               #: output-gradient side [d_out, d_out]


class _Kronecker(Operator):
    """Block diagonal over layers; each block maps the layer's Θ-shaped columns [d_out, a, K]."""

    def __init__(self, objective, blocks, tags):
        P = objective.num_params
        super().__init__((P, P), objective.dtype, objective.device, tags=tags,
                         domain=objective.layout, range=objective.layout)
        self.objective, self.blocks = objective, blocks
        self.process_group = objective.process_group
        covered = {n for b in blocks for n in b.params}
        offsets = objective.layout.offsets()
        #: indices of the parameters without a block (skip_unsupported=True): zero rows and columns
        self._skipped = [offsets[n] for n in objective.layout.names if n not in covered]

    def _block(self, i: int, X: Tensor) -> Tensor:
        raise NotImplementedError

    def _rest(self, V: Tensor) -> Tensor | None:
        """The rows of the parameters without a block (None: zero)."""
        return None

    def _matmat_torch(self, V: Tensor) -> Tensor:
        out = torch.zeros_like(V)
        offsets = self.objective.layout.offsets()
        dt = factor_dtype(V.dtype)  # bf16/fp16 models: the blocks in float32, the result in the model's dtype
        for i, blk in enumerate(self.blocks):
            blk.from_matrix(self._block(i, blk.to_matrix(V, offsets).to(dt)), out, offsets)
        for s, e in self._skipped:
            rest = self._rest(V[s:e])
            if rest is not None:
                out[s:e] = rest
        return out


def _sandwich(Q_B: Tensor, lam: Tensor, Q_A: Tensor, X: Tensor) -> Tensor:
    """``Q_B (Λ ⊙ (Q_Bᵀ X Q_A)) Q_Aᵀ`` for a block of columns X [d_out, a, K]."""
    Y = torch.einsum("ji,jkv,kl->ilv", Q_B, X, Q_A).mul_(lam[:, :, None])
    return torch.einsum("ij,jkv,lk->ilv", Q_B, Y, Q_A)


class KFAC(_Kronecker):
    r"""Kronecker-factored approximate curvature (KFAC), block diagonal over layers.

    For every supported layer (``nn.Linear``, ``nn.Conv2d`` with ``groups=1``, transformers' ``Conv1D``)
    the layer's block of the curvature (GGN / Fisher / empirical Fisher, normalized like the loss,
    docs/conventions.md) is approximated by ``A ⊗ B``:

    .. math:: A = \frac{1}{R}\sum_{r} \bar a_r \bar a_r^\top,\qquad
              B = \frac{1}{W}\sum_{r}\sum_c g_{rc}\, g_{rc}^\top

    where ``ā_r = [a_r; 1]`` are the layer's input rows (with a 1 for the bias), ``g_rc`` the
    gradients of ``⟨f, s_c⟩`` w.r.t. the layer's output (``s_c`` the columns of the output-space
    matrix: the loss Hessian's square root for ``"type-2"``, sampled-label gradients for ``"mc"``,
    the per-sample loss gradients for ``"empirical"``), ``W = Σ_b d_b`` for a 'mean' loss (the
    number of counted samples for ``"empirical"``, 1 for 'sum') and ``R`` the number of rows.  For
    layers with weight sharing (sequence positions, conv pixels) ``"expand"`` makes every position
    a row (``R = N·T``); ``"reduce"`` takes one row per sample, ``ā`` the mean over positions and
    ``g`` the sum (Eschenhagen et al., 2023).  For a single linear layer with MSE, ``A ⊗ B`` is the
    exact GGN.

    **Layout.**  A layer's selected parameters form ``Θ = [W | b] ∈ R^{d_out × a}`` (the conv kernel
    flattened to ``[c_out, c_in·k_h·k_w]``, Conv1D's weight transposed to ``[d_out, d_in]``, the bias
    as the last column).  The block acts as ``Θ ↦ B Θ A``; on the row-major ``vec(Θ)`` it is
    ``B ⊗ A``.  The operator is ``P × P`` over the objective's selected parameters in their own
    layout (each parameter flattened row-major, ``model.parameters()`` order); blocks of different
    layers are zero.

    **Cost**: the factors come from one pass over the data at the first product (forward hooks
    for ``A``; per batch one backward per column ``s_c`` — C for a type-2 over C classes or outputs,
    ``mc_samples`` for ``"mc"``, 1 for ``"empirical"`` — batched in chunks of ``max_columns``), and again
    whenever the model's parameters or buffers have changed (contract rule 9; :meth:`refresh` for new
    data).  A product is then two small matrix products per layer; memory O(Σ d_in² + d_out²).
    With a process group the factor sums are all-reduced once per pass.

    **Tags**: symmetric, psd.

    Args:
        model_or_objective: an :class:`~curvops.Objective` over an ``nn.Module``, or a model followed
            by ``loss`` and ``data`` (losses: MSE, cross-entropy incl. ``ignore_index``, BCE-with-logits).
        fisher_type: ``"type-2"`` (exact loss Hessian: the GGN / exact Fisher), ``"mc"`` (``mc_samples``
            sampled labels per sample) or ``"empirical"`` (the empirical Fisher's gradients).
        kfac_approx: ``"expand"`` or ``"reduce"`` for layers with weight sharing.
        mc_samples: labels per sample for ``"mc"`` (must be 1 otherwise).
        generator: a ``torch.Generator`` that seeds the ``"mc"`` labels (one draw at construction);
            without it the seed is 0.  The labels of batch b are seeded by that seed and b, so the
            matrix is the same at every recomputation of the factors.
        layers: names of the modules to give blocks (default: every supported module holding a selected
            parameter).  With a model (not an Objective) and no ``params=``, the parameters of these
            layers are selected.
        skip_unsupported: give parameters outside a supported layer (LayerNorm, embeddings, …) zero blocks
            instead of refusing them.
        max_columns: columns ``s_c`` backpropagated together (memory ∝ max_columns × activations).
        **objective_kwargs: passed to :class:`~curvops.Objective` (``batch_size=``, ``params=``, …).

    Raises:
        ValueError: at construction (before any pass): a selected parameter outside a supported layer or
            shared by two modules (named), unknown ``layers=``, bad options, a loss without a likelihood
            for ``"type-2"``/``"mc"`` (class weights, label smoothing, a callable: use ``"empirical"``).
            During the factor pass: a layer that runs twice in one forward, or not at all.
        TypeError: a plain-function model (KFAC needs the model's modules), a non-Generator ``generator``.

    Example:
        >>> import torch, curvops
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 2).double()
        >>> X, Y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
        >>> K = curvops.KFAC(model, "mse", (X, Y), batch_size=4)
        >>> G = curvops.GGN(model, "mse", (X, Y))
        >>> torch.allclose(K.to_dense(), G.to_dense())        # one linear layer + MSE: exact
        True
        >>> v = torch.randn(8, dtype=torch.float64)
        >>> Kinv = K.inverse(damping=1e-3)
        >>> torch.allclose(Kinv @ (K @ v + 1e-3 * v), v)
        True

    References:
        Martens, Grosse (2015). *Optimizing neural networks with Kronecker-factored approximate curvature.*
        Grosse, Martens (2016). *A Kronecker-factored approximate Fisher matrix for convolution layers.*
        Eschenhagen, Immer, Turner, Schneider, Hennig (2023). *Kronecker-Factored Approximate Curvature for
        Modern Neural Network Architectures.*
    """

    _api = "KFAC"

    def __init__(self, model_or_objective, loss=None, data=None, *, fisher_type: str = "type-2",
                 kfac_approx: str = "expand", mc_samples: int = 1, generator: torch.Generator | None = None,
                 layers=None, skip_unsupported: bool = False, max_columns: int = 64, **objective_kwargs):
        api = self._api
        if fisher_type not in FISHER_TYPES:
            raise ValueError(f"{api}: fisher_type must be one of {FISHER_TYPES}, got {fisher_type!r}.")
        if kfac_approx not in KFAC_APPROX:
            raise ValueError(f"{api}: kfac_approx must be one of {KFAC_APPROX}, got {kfac_approx!r}.")
        if not isinstance(mc_samples, int) or isinstance(mc_samples, bool) or mc_samples < 1:
            raise ValueError(f"{api}: mc_samples must be a positive integer, got {mc_samples!r}.")
        if fisher_type != "mc" and mc_samples != 1:
            raise ValueError(f"{api}: mc_samples={mc_samples} needs fisher_type='mc', got fisher_type={fisher_type!r}.")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"{api}: generator must be a torch.Generator, got {type(generator).__name__}.")
        if not isinstance(max_columns, int) or max_columns < 1:
            raise ValueError(f"{api}: max_columns must be a positive integer, got {max_columns!r}.")
        if isinstance(model_or_objective, nn.Module) and layers is not None and "params" not in objective_kwargs \
                and "select" not in objective_kwargs:
            names = [layers] if isinstance(layers, str) else list(layers)
            mods = dict(model_or_objective.named_modules())
            objective_kwargs["params"] = [f"{m}.{p}" if m else p for m in names if m in mods
                                          for p, _ in mods[m].named_parameters(recurse=False)] or None
        try:
            objective = make_objective(model_or_objective, loss, data, **objective_kwargs)
        except TypeError as err:
            raise TypeError(f"{api}: {err}") from err
        if not isinstance(objective.model, nn.Module):
            raise TypeError(f"{api}: expected an nn.Module model (Kronecker factors come from its layers), got a "
                            f"plain function. Use GGN or Fisher for function models.")
        self._likelihood = None
        if fisher_type != "empirical":
            try:
                self._likelihood = _Likelihood(objective)
            except ValueError as err:
                raise ValueError(f"{api}: fisher_type={fisher_type!r} " + str(err).replace("Fisher: ", "needs a "
                                 "likelihood: ", 1) + " Or use fisher_type='empirical'.") from err
        blocks, self.skipped = find_blocks(objective.model, objective.layout, layers, skip_unsupported, api)
        super().__init__(objective, blocks, tags=(_tags.PSD,))
        self.fisher_type, self.kfac_approx, self.mc_samples = fisher_type, kfac_approx, mc_samples
        self.max_columns = max_columns
        self._seed = 0 if generator is None else int(torch.randint(0, 2**40, (1,), generator=generator,
                                                                   device=generator.device))
        self._stamp = None
        self._factors: tuple[list[Tensor], list[Tensor]] | None = None
        self._eig = None
        #: increases every time the factors are recomputed (inverse operators follow it)
        self.generation = 0

    # ---- factors ---------------------------------------------------------------------
    def refresh(self) -> None:
        """Recompute the factors now (one pass over the data; EKFAC: two), e.g. after the data changed."""
        stamp = [t.clone() for t in self._state()]
        self._factors = self._stamp = self._eig = None  # nothing stale survives a failed pass
        factors = kfac_factors(self)
        self._factors = factors
        try:
            self._after_refresh()
        except BaseException:
            self._factors = self._eig = None
            raise
        self._stamp = stamp
        self.generation += 1

    def _after_refresh(self) -> None:
        pass

    def _state(self) -> list[Tensor]:
        model = self.objective.model
        return [t.detach() for t in (*model.parameters(), *model.buffers())]

    def _current(self) -> tuple[list[Tensor], list[Tensor]]:
        """The factors, recomputed first if any parameter or buffer of the model changed value (compared
        with a copy taken at the last pass, like every curvops cache; O(P), no pass over the data).
        Every public entry point calls this once; the helpers below read the cached state."""
        stamp = self._stamp
        if self._factors is None or stamp is None or not self._same_state(stamp):
            self.refresh()
        return self._factors

    def _same_state(self, stamp: list[Tensor]) -> bool:
        now = self._state()
        return len(now) == len(stamp) and all(
            a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
            for a, b in zip(now, stamp))

    def _eigen(self) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
        """(λ_A, Q_A, λ_B, Q_B) per layer (eigenvalues clamped at 0: the factors are PSD)."""
        if self._eig is None:
            eig = []
            for A, B in zip(*self._factors):
                la, QA = torch.linalg.eigh(A)
                lb, QB = torch.linalg.eigh(B)
                eig.append((la.clamp(min=0), QA, lb.clamp(min=0), QB))
            self._eig = eig
        return self._eig

    def _spectrum(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        """(Q_B, Λ [d_out, a], Q_A): the block is Q_B (Λ ⊙ ·) Q_Aᵀ in its eigenbasis."""
        la, QA, lb, QB = self._eigen()[i]
        return QB, lb[:, None] * la[None, :], QA

    def kron_factors(self) -> list[KronFactors]:
        r"""The Kronecker factors of every layer (computing them if needed).

        Returns:
            One :class:`KronFactors` record per layer, in the order of the layers' first parameter in
            the layout, with fields ``module`` (module name), ``params`` (its selected parameter names,
            weight then bias), ``weight``, ``bias`` (names or None), ``kind`` (``'linear'``,
            ``'conv2d'``, ``'conv1d_hf'``), ``A`` and ``B``.  The layer's block of this operator is
            ``Θ ↦ B Θ A`` with ``Θ = [W | b]`` (``d_out × a``): ``W`` is the weight as ``[d_out, d_in]``
            (a Linear's weight as is; a Conv2d kernel ``[c_out, c_in, k_h, k_w]`` reshaped to
            ``[c_out, c_in·k_h·k_w]``; a Conv1D weight ``[d_in, d_out]`` transposed), ``b`` the bias as the
            **last** column.  So on the row-major flattening of ``Θ`` the block is ``torch.kron(B, A)``,
            and on the column-major (``vec``) flattening ``torch.kron(A, B)``.  ``A`` is
            ``[d_in+1, d_in+1]`` when both weight and bias are selected, ``[d_in, d_in]`` for a weight
            alone and ``[[1.]]`` for a bias alone.  ``A`` is the mean of ``[a;1][a;1]ᵀ`` over rows (no
            loss scaling); ``B`` carries the loss normalization (docs/conventions.md).  The tensors are
            the operator's own; clone them before modifying.

            Libraries that keep weight and bias in separate Kronecker blocks (laplace-torch's ``Kron``,
            curvlinops with ``separate_weight_and_bias=True``) take the weight block
            ``kron(B, A[:-1, :-1])`` and the bias block ``A[-1, -1] · B`` (``A[-1, -1] = 1``, the mean of
            1·1) and drop the weight–bias cross block ``kron(B, A[:-1, -1:])`` that this operator keeps.
        """
        As, Bs = self._current()
        return [KronFactors(b.module, b.params, b.weight, b.bias, b.kind, A, B)
                for b, A, B in zip(self.blocks, As, Bs)]

    # ---- products and functions of the matrix ----------------------------------------------
    def _block(self, i: int, X: Tensor) -> Tensor:
        As, Bs = self._factors
        return torch.einsum("ij,jkv,kl->ilv", Bs[i], X, As[i])

    def _matmat_torch(self, V: Tensor) -> Tensor:
        self._current()  # (re)compute the factors once, before the blocks read them
        return super()._matmat_torch(V)

    def _all_eigenvalues(self, damping: float) -> Tensor:
        lams = [self._spectrum(i)[1].reshape(-1) for i in range(len(self.blocks))]
        n_skip = sum(e - s for s, e in self._skipped)
        lams.append(torch.zeros(n_skip, dtype=lams[0].dtype, device=self.device))
        return torch.cat(lams) + damping

    def logdet(self, damping: float = 0.0) -> Tensor:
        """``log det(K + δI)`` from the factors' eigenvalues (``-inf`` when singular; skipped parameters
        count as zero eigenvalues).  **Cost**: one eigendecomposition per factor."""
        damping = self._check_damping(damping, "logdet", allow_zero=True)
        self._current()
        return torch.log(self._all_eigenvalues(damping)).sum()

    def det(self, damping: float = 0.0) -> Tensor:
        """``det(K + δI) = exp(logdet)`` (over/underflows easily; prefer :meth:`logdet`)."""
        return torch.exp(self.logdet(damping))

    def trace(self) -> Tensor:
        """``tr K = Σ_layers tr(A) tr(B)`` (EKFAC: the sum of its eigenvalues)."""
        As, Bs = self._current()
        return sum((torch.trace(A) * torch.trace(B) for A, B in zip(As, Bs)),
                   torch.zeros((), dtype=self.torch_dtype, device=self.device))

    def _check_damping(self, damping, api: str, allow_zero: bool) -> float:
        try:
            d = float(damping)
        except (TypeError, ValueError):
            raise TypeError(f"{self._api}.{api}: damping must be a number, got {type(damping).__name__}.") from None
        if not math.isfinite(d) or d < 0 or (d == 0 and not allow_zero):
            need = "≥ 0" if allow_zero else "> 0 (the factors are singular in general)"
            raise ValueError(f"{self._api}.{api}: damping must be finite and {need}, got {damping!r}.")
        return d

    def inverse(self, damping: float, *, pi_damping: bool = False) -> Operator:
        r"""The inverse ``(K + δI)⁻¹`` as an operator (exact, from the factors' eigendecompositions).

        Per layer ``(A ⊗ B + δI)⁻¹ = (Q_A ⊗ Q_B) (Λ_A ⊗ Λ_B + δI)⁻¹ (Q_A ⊗ Q_B)ᵀ`` (EKFAC: its
        corrected eigenvalues instead of ``Λ_A ⊗ Λ_B``); parameters without a block get ``1/δ``.

        With ``pi_damping=True`` (KFAC only) the heuristic split of Martens & Grosse (2015) is used
        instead: ``(A + π√δ I)⁻¹ ⊗ (B + √δ/π I)⁻¹`` with ``π = √((tr A / dim A) / (tr B / dim B))``
        — the inverse of a *different* matrix (``K + δI`` plus cross terms ``π√δ I ⊗ B + √δ/π A ⊗ I
        − …``), cheaper to update and common in optimizers.

        The returned operator follows this one: when the factors are recomputed (the model changed),
        its next product uses the new ones.  **Cost**: one eigendecomposition per factor (cached);
        per product four small matrix products per layer.  **Tags**: symmetric, psd.

        Raises:
            ValueError: damping ≤ 0 or not finite; ``pi_damping`` on EKFAC.
        """
        damping = self._check_damping(damping, "inverse", allow_zero=False)
        if pi_damping and type(self) is not KFAC:
            raise ValueError(f"{self._api}.inverse: pi_damping is defined for KFAC's two factors only; "
                             f"use the exact damped inverse (pi_damping=False).")
        return _KroneckerInverse(self, damping, pi_damping)

    def __repr__(self) -> str:
        return (f"<{self._api} {self.shape[0]}×{self.shape[1]} {self.torch_dtype} on {self.device} "
                f"layers={len(self.blocks)} fisher_type={self.fisher_type!r} kfac_approx={self.kfac_approx!r}>")


class _KroneckerInverse(_Kronecker):
    """``(K + δI)⁻¹`` of a KFAC/EKFAC operator (or the π-damped KFAC inverse)."""

    def __init__(self, op: KFAC, damping: float, pi_damping: bool):
        super().__init__(op.objective, op.blocks, tags=(_tags.PSD,))
        self.op, self.damping, self.pi_damping = op, damping, pi_damping
        self._skipped = op._skipped
        self._cache = None

    @property
    def _name(self) -> str:
        return f"{self.op._api}.inverse"

    def _spectra(self) -> list[tuple[Tensor, Tensor, Tensor]]:
        """(Q_B, 1/(Λ + δ) [d_out, a], Q_A) per layer, cached until the factors are recomputed."""
        if self._cache is None or self._cache[0] != self.op.generation:
            out = []
            for i, (la, QA, lb, QB) in enumerate(self.op._eigen()):
                if self.pi_damping:
                    ta, tb = la.mean(), lb.mean()
                    pi = torch.sqrt(ta / tb) if bool(ta > 0) and bool(tb > 0) else torch.ones_like(ta)
                    root = math.sqrt(self.damping)
                    out.append((QB, (1.0 / (lb + root / pi))[:, None] * (1.0 / (la + pi * root))[None, :], QA))
                else:
                    QB, lam, QA = self.op._spectrum(i)
                    out.append((QB, 1.0 / (lam + self.damping), QA))
            self._cache = (self.op.generation, out)
        return self._cache[1]

    def _matmat_torch(self, V: Tensor) -> Tensor:
        self.op._current()  # the factors of the model as it is now (recomputed if it changed)
        return super()._matmat_torch(V)

    def _block(self, i: int, X: Tensor) -> Tensor:
        return _sandwich(*self._spectra()[i], X)

    def _rest(self, V: Tensor) -> Tensor:
        return V / self.damping


class EKFAC(KFAC):
    r"""Eigenvalue-corrected KFAC: KFAC's eigenbasis with the best eigenvalues in it.

    With ``A = Q_A Λ_A Q_Aᵀ`` and ``B = Q_B Λ_B Q_Bᵀ`` the KFAC factors of a layer (:class:`KFAC`,
    same options), EKFAC's block is ``(Q_A ⊗ Q_B) diag(λ) (Q_A ⊗ Q_B)ᵀ`` with

    .. math:: \lambda_{oj} = \frac{1}{W}\sum_i \sum_c \big(q_{B,o}^\top G_{ic}\, q_{A,j}\big)^2,
              \qquad G_{ic} = \sum_t g_{ict}\, \bar a_{it}^\top,

    the second moments of the per-sample gradients ``G_ic`` of the layer's ``Θ`` (summed over the
    sample's positions) in that eigenbasis, normalized like ``B``.  These are the diagonal entries of
    the exact curvature block (GGN for ``"type-2"``, empirical Fisher for ``"empirical"``, the MC
    Fisher for ``"mc"``) in the KFAC eigenbasis, i.e. the diagonal that minimizes the Frobenius
    distance to the exact block in that basis (George et al., 2018) — exactly so when the model
    output has one row per sample, and for ``"empirical"`` always (for sequence outputs with
    ``"type-2"``/``"mc"`` the columns of all positions are backpropagated together, as for KFAC,
    which adds cross-position terms where later layers mix positions: docs/guide/kfac.md).

    **Cost**: two passes over the data at the first product (factors, then eigenvalues; the second
    forms per-sample gradients in the eigenbasis in chunks of samples); recomputed when the model
    changes.  Products, inverses, ``logdet`` and ``trace`` use the eigendecomposition.
    **Tags**: symmetric, psd.

    The arguments are those of :class:`KFAC` (``fisher_type``, ``kfac_approx``, ``mc_samples``,
    ``generator``, ``layers``, ``skip_unsupported``, ``max_columns``, objective keywords).

    Example:
        >>> import torch, curvops
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
        >>> X, y = torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 2, (16,))
        >>> E = curvops.EKFAC(model, "cross_entropy", (X, y))
        >>> G = curvops.GGN(model, "cross_entropy", (X, y)).to_dense()
        >>> bool(abs(E.trace() - G.trace()) < 1e-10)   # the corrected diagonal keeps the exact trace
        True

    References:
        George, Laurent, Bouthillier, Ballas, Vincent (2018). *Fast Approximate Natural Gradient Descent in
        a Kronecker-factored Eigenbasis.*
    """

    _api = "EKFAC"

    def _after_refresh(self) -> None:
        bases = [(QA, QB) for _, QA, _, QB in self._eigen()]
        self._lams = ekfac_eigenvalues(self, bases)

    def _spectrum(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        _, QA, _, QB = self._eigen()[i]
        return QB, self._lams[i], QA

    def eigenvalues(self) -> list[Tensor]:
        """The corrected eigenvalues per layer, ``[d_out, a]`` (entry ``[o, j]`` belongs to ``q_B,o ⊗ q_A,j``)."""
        self._current()
        return list(self._lams)

    def _block(self, i: int, X: Tensor) -> Tensor:
        QB, lam, QA = self._spectrum(i)
        return _sandwich(QB, lam, QA, X)

    def trace(self) -> Tensor:
        self._current()
        return sum((lam.sum() for lam in self._lams), torch.zeros((), dtype=self.torch_dtype, device=self.device))
