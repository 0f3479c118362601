r"""GPyTorch bridge: any curvops operator as a ``linear_operator.LinearOperator``, and an NTK kernel.

:func:`to_linear_operator` wraps an operator so that GPyTorch's machinery (``matmul``,
``solve`` by CG, Lanczos, ``inv_quad_logdet`` by stochastic Lanczos quadrature, root
decompositions, GP models) runs on it through its products; nothing is densified unless
GPyTorch itself decides to (see the caveats).  :class:`NTKKernel` is a GPyTorch kernel whose
covariance is the empirical neural tangent kernel of a network at fixed parameters.

Caveats (linear_operator 0.6, gpytorch 1.15):

* GPyTorch's ``eigh``/``svd``/``eigvalsh`` of a generic operator densify it and **clamp
  negative eigenvalues to zero** (they assume a covariance, i.e. PSD): do not use them on a
  Hessian; use :func:`curvops.linalg` algorithms instead.  ``solve`` and
  ``inv_quad_logdet`` likewise assume PSD.
* Below ``gpytorch.settings.max_cholesky_size`` (800 rows by default) GPyTorch forms the
  matrix (``to_dense``: one product with all unit vectors) and uses Cholesky; above it, CG
  (tolerance 1 and at most 1000 iterations by default) and SLQ with 10 probes × 20 steps.
* GPyTorch's ``linear_cg`` stalls near a relative residual of 1e-5 even in float64 (seen on
  a 40×40 SPD matrix with condition number 8, for a dense operator as for ours, whatever
  ``cg_tolerance``): it zeroes a step when ``pᵀAp`` or ``rᵀr`` (for a right-hand side scaled
  to norm 1) falls below an absolute ``eps = 1e-10``.  For tight solves use
  :func:`curvops.linalg.solve.solve`, or, for a low-rank curvature plus a diagonal
  (``to_linear_operator(A).add_diagonal(δ)``, a GP's ``K + σ²I``), GPyTorch's pivoted-Cholesky
  preconditioner with enough rank: ``max_preconditioner_size(n)``,
  ``min_preconditioning_size(1)``, ``preconditioner_tolerance(1e-13)`` make the preconditioner
  the matrix itself to rounding, so CG, ``inv_quad_logdet`` (log det of the preconditioner plus
  SLQ on ≈ I) and GP posteriors agree with dense float64 answers to ~1e-14 (its rows cost one
  product each; tests/test_gpytorch.py).
* Caches follow the model: GPyTorch memoizes ``to_dense``, ``cholesky``, ``root_decomposition``
  and friends on the wrapper; these are keyed on the values of every parameter and buffer the
  wrapped operator reads (through its :class:`~curvops.Objective`), so after an in-place update,
  a reassignment of ``p.data`` or ``load_state_dict`` they are recomputed, as products are
  (contract rule 9). Operators without an Objective (``Dense``, function operators) are taken
  as fixed. Caches of GPyTorch operators built *on top of* the wrapper (``add_diagonal``, sums)
  are GPyTorch's own: rebuild those after changing the model (GPyTorch's models do on every call).
* Products run in the curvature operator's own autograd mode (contract rule 8), so they are
  exact inside GPyTorch's ``autograd.Function.forward`` (grad mode off), under ``no_grad`` and
  under ``inference_mode``.
* Gradients flow only to tensors in a LinearOperator's representation; a curvops operator's
  parameters (network weights, data) are not part of it, so GPyTorch can differentiate with
  respect to right-hand sides but not through the curvature itself.

Requires the optional dependencies: ``pip install 'curvops[gpytorch]'``.

References:
    Gardner, Pleiss, Bindel, Weinberger, Wilson (2018). *GPyTorch: Blackbox Matrix-Matrix
    Gaussian Process Inference with GPU Acceleration*.
    Jacot, Gabriel, Hongler (2018). *Neural Tangent Kernel: Convergence and Generalization in
    Neural Networks*.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import gpytorch
    from linear_operator.operators import LinearOperator
    from linear_operator.utils.getitem import _is_noop_index, _noop_index
    from linear_operator.utils.memoize import cached
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "curvops.interop.gpytorch needs gpytorch and linear_operator: pip install 'curvops[gpytorch]'."
    ) from err

from ..operators import Dense, Diagonal, Identity, LowRank, Operator, as_operator
from ..objective import Objective

#: columns per product when unit vectors are used to read entries of a generic operator.
ENTRY_BLOCK = 256


def _objectives(op: Operator) -> list[Objective]:
    """Every :class:`~curvops.Objective` an operator reads, found through its attributes
    (composites hold operators, curvature operators an Objective); each listed once."""
    found: dict[int, Objective] = {}
    seen: set[int] = set()
    stack: list = [op]
    while stack:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, Objective):
            found[id(x)] = x
        elif isinstance(x, Operator):
            stack.extend(vars(x).values())
        elif isinstance(x, (list, tuple)):
            stack.extend(v for v in x if isinstance(v, (Operator, Objective, list, tuple)))
    return list(found.values())


def _unit_columns(n: int, idx: Tensor, dtype, device) -> Tensor:
    E = torch.zeros(n, idx.numel(), dtype=dtype, device=device)
    E[idx, torch.arange(idx.numel(), device=device)] = 1
    return E


class CurvopsLinearOperator(LinearOperator):
    r"""A curvops :class:`~curvops.Operator` seen as a ``linear_operator.LinearOperator``.

    Products go to the curvops operator (``A @ V`` and ``A.T @ W``, one call per block of
    right-hand sides, batch dimensions folded into columns).  The wrapper's dtype and device
    are those of a zero-size *carrier* tensor (its first argument), so ``.to()``,
    ``.double()``, ``.cpu()``, ``detach()`` and GPyTorch's reconstructions work as for any
    LinearOperator; when they differ from the curvops operator's, right-hand sides are
    converted on the way in and results on the way out.

    Entry access is exact: ``_diagonal`` and ``_get_indices`` read the matrix directly for
    :class:`~curvops.Dense`, :class:`~curvops.Diagonal`, :class:`~curvops.Identity` and
    :class:`~curvops.LowRank`, and otherwise through products with unit vectors
    (``ENTRY_BLOCK`` columns per product; the diagonal of an n×n operator costs n products,
    a set of entries as many products as it has distinct columns).

    Batch dimensions (from ``unsqueeze``, ``expand``, batch slicing) are identical copies of
    the one operator: ``batch_shape`` records them and products broadcast over them.

    Construct with :func:`to_linear_operator` (or ``CurvopsLinearOperator(A)``).

    Args:
        carrier: the curvops operator (public form), or the carrier tensor (internal form,
            with ``op=``) used by GPyTorch's ``self.__class__(*args, **kwargs)`` rebuilds.
        op: the curvops operator, when ``carrier`` is the carrier tensor.
        batch_shape: leading batch dimensions (copies of the operator).
    """

    def __init__(self, carrier, *, op=None, batch_shape: tuple = ()):
        if op is None:
            op, carrier = carrier, None
        if not isinstance(op, Operator):
            op = as_operator(op)
        if carrier is None:
            carrier = torch.empty(0, dtype=op.torch_dtype, device=op.device)
        if not isinstance(carrier, Tensor) or carrier.dim() != 1 or carrier.numel() != 0:
            raise TypeError(
                "CurvopsLinearOperator: expected a curvops operator (or a zero-size carrier tensor and op=).")
        batch_shape = tuple(int(b) for b in batch_shape)
        super().__init__(carrier, op=op, batch_shape=batch_shape)
        self.carrier = carrier
        self.op = op
        self._batch = batch_shape
        self._state_of = _objectives(op)

    # ---- GPyTorch's memo cache, keyed on the model's state -----------------------------------
    @property
    def _memoize_cache(self) -> dict:
        """GPyTorch's memo (``to_dense``, ``cholesky``, root decompositions), emptied whenever a
        parameter or buffer the operator reads has changed value since it was filled.

        **Cost**: a comparison of the model's parameters and buffers per look-up (O(P), no pass
        over the data); one copy of them when the cache is (re)started.
        """
        d = self.__dict__
        cache = d.setdefault("_memo", {})
        objectives = d.get("_state_of", ())
        if objectives:
            stamps = d.get("_memo_stamps")
            if stamps is None or not all(o.state_matches(st) for o, st in zip(objectives, stamps)):
                cache.clear()
                d["_memo_stamps"] = [o.state_stamp() for o in objectives]
        return cache

    @_memoize_cache.setter
    def _memoize_cache(self, value: dict) -> None:
        self.__dict__["_memo"] = value
        self.__dict__["_memo_stamps"] = None

    def _with(self, *, op=None, batch_shape=None) -> "CurvopsLinearOperator":
        return self.__class__(self.carrier, op=self.op if op is None else op,
                              batch_shape=self._batch if batch_shape is None else batch_shape)

    # ---- what LinearOperator needs --------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.carrier.dtype

    @property
    def device(self) -> torch.device:
        return self.carrier.device

    def _size(self) -> torch.Size:
        return torch.Size((*self._batch, *self.op.shape))

    def _transpose_nonbatch(self) -> LinearOperator:
        if self.op.is_symmetric:
            return self
        return self._with(op=self.op.T)

    def _matmul(self, rhs: Tensor) -> Tensor:
        M, N = self.op.shape
        if rhs.dim() == 1:
            out = self._apply(rhs[:, None])[:, 0]
            return out.expand(*self._batch, M) if self._batch else out
        if rhs.shape[-2] != N:
            raise ValueError(f"CurvopsLinearOperator._matmul: expected rhs [..., {N}, C], got {tuple(rhs.shape)}.")
        batch, C = rhs.shape[:-2], rhs.shape[-1]
        V = rhs.movedim(-2, 0).reshape(N, -1)  # [N, batch·C]: one call for all batches
        out = self._apply(V).reshape(M, *batch, C).movedim(0, -2)
        # the batch copies of the operator are identical: broadcast the result over them
        out_batch = torch.broadcast_shapes(torch.Size(self._batch), batch)
        return out.expand(*out_batch, M, C) if out_batch != batch else out

    def _apply(self, V: Tensor) -> Tensor:
        out = self.op @ V.to(dtype=self.op.torch_dtype, device=self.op.device)
        return out.to(dtype=self.dtype, device=self.device)

    # ---- batch dimensions: identical copies of the one operator ------------------------------
    def _unsqueeze_batch(self, dim: int) -> LinearOperator:
        b = list(self._batch)
        b.insert(dim, 1)
        return self._with(batch_shape=tuple(b))

    def _expand_batch(self, batch_shape) -> LinearOperator:
        return self._with(batch_shape=tuple(batch_shape))

    def _permute_batch(self, *dims: int) -> LinearOperator:
        return self._with(batch_shape=tuple(self._batch[d] for d in dims))

    def _getitem(self, row_index, col_index, *batch_indices) -> LinearOperator:
        res = self
        if batch_indices:
            dummy = torch.empty(*self._batch, 0)[(*batch_indices, slice(None))]
            res = self._with(batch_shape=tuple(dummy.shape[:-1]))
        if _is_noop_index(row_index) and _is_noop_index(col_index):
            return res
        return LinearOperator._getitem(res, row_index, col_index, *([_noop_index] * len(res._batch)))

    # ---- entries ---------------------------------------------------------------------------
    def _diagonal(self) -> Tensor:
        op = self.op
        if op.shape[0] != op.shape[1]:
            raise ValueError(f"CurvopsLinearOperator.diagonal: expected a square operator, got {op.shape}.")
        if isinstance(op, Dense):
            d = op.A.diagonal()
        elif isinstance(op, Diagonal):
            d = op.d
        elif isinstance(op, Identity):
            d = torch.ones(op.shape[0], dtype=op.torch_dtype, device=op.device)
        elif isinstance(op, LowRank):
            d = (op.U * op.S * (op.U if op.V is None else op.V)).sum(1)
        else:
            from ..linalg.diagonal import diagonal

            d = diagonal(op, method="exact", block_size=ENTRY_BLOCK).value
        return d.to(dtype=self.dtype, device=self.device).expand(*self._batch, d.numel())

    def _get_indices(self, row_index, col_index, *batch_indices) -> Tensor:
        shape = torch.broadcast_shapes(row_index.shape, col_index.shape, *(b.shape for b in batch_indices))
        op = self.op
        rows = row_index.expand(shape).reshape(-1).to(op.device)
        cols = col_index.expand(shape).reshape(-1).to(op.device)
        if isinstance(op, Dense):
            vals = op.A[rows, cols]
        elif isinstance(op, Diagonal):
            vals = torch.where(rows == cols, op.d[rows], torch.zeros((), dtype=op.torch_dtype, device=op.device))
        elif isinstance(op, Identity):
            vals = (rows == cols).to(op.torch_dtype)
        elif isinstance(op, LowRank):
            right = op.U if op.V is None else op.V
            vals = (op.U[rows] * op.S * right[cols]).sum(-1)
        else:
            vals = self._entries_by_products(rows, cols)
        return vals.reshape(shape).to(dtype=self.dtype, device=self.device)

    def _entries_by_products(self, rows: Tensor, cols: Tensor) -> Tensor:
        """A[rows, cols] from products with unit vectors: by columns, or by rows through the
        adjoint when fewer distinct rows are asked for (and the operator is symmetric)."""
        op = self.op
        by_rows = op.is_symmetric and rows.unique().numel() < cols.unique().numel()
        read, other = (rows, cols) if by_rows else (cols, rows)
        uniq, inverse = read.unique(return_inverse=True)
        vals = torch.empty(read.numel(), dtype=op.torch_dtype, device=op.device)
        n = op.shape[1]
        for start in range(0, uniq.numel(), ENTRY_BLOCK):
            idx = uniq[start:start + ENTRY_BLOCK]
            block = op @ _unit_columns(n, idx, op.torch_dtype, op.device)  # columns idx of A (= rows, if symmetric)
            sel = (inverse >= start) & (inverse < start + idx.numel())
            vals[sel] = block[other[sel], inverse[sel] - start]
        return vals

    @cached
    def to_dense(self) -> Tensor:
        """The dense matrix, by the curvops operator's own ``to_dense`` (e.g. the NTK's
        factorized route), in this wrapper's dtype and device."""
        D = self.op.to_dense(max_entries=max(self.op.shape[0] * self.op.shape[1], 1))
        return D.to(dtype=self.dtype, device=self.device).expand(*self._batch, *D.shape)

    def __repr__(self) -> str:
        batch = f", batch_shape={self._batch}" if self._batch else ""
        return f"CurvopsLinearOperator({self.op!r}, dtype={self.dtype}, device={self.device}{batch})"


def to_linear_operator(A) -> CurvopsLinearOperator:
    r"""Wrap a curvops operator (or tensor/array/scipy operator) as a GPyTorch ``LinearOperator``.

    The result supports everything a ``LinearOperator`` does through products: ``@``,
    ``solve`` (CG above ``max_cholesky_size``), ``inv_quad_logdet`` (SLQ), ``root_decomposition``
    (Lanczos), ``add_diagonal``, slicing, ``.to()``.  See the module caveats: GPyTorch's
    ``eigh``/``svd`` clamp negative eigenvalues, and its solves assume PSD.

    **Cost**: a GPyTorch product with a ``[..., N, C]`` right-hand side is one call of the
    curvops operator with ``prod(batch)·C`` columns.

    Args:
        A: a curvops operator (or anything :func:`curvops.as_operator` wraps).

    Returns:
        :class:`CurvopsLinearOperator`.

    Example:
        >>> G = curvops.GGN(model, loss, (X, y))                                    # doctest: +SKIP
        >>> L = to_linear_operator(G).add_diagonal(torch.tensor(1e-2))             # doctest: +SKIP
        >>> with gpytorch.settings.max_cholesky_size(0):                           # doctest: +SKIP
        ...     inv_quad, logdet = L.inv_quad_logdet(b[:, None], logdet=True)
    """
    return CurvopsLinearOperator(A)


# ---- an NTK kernel ---------------------------------------------------------------------------
class NTKKernel(gpytorch.kernels.Kernel):
    r"""GPyTorch kernel $k(x, x') = \nabla_\theta f(x;\theta)^\top \nabla_\theta f(x';\theta)$: the empirical NTK.

    ``forward(x1, x2)`` returns the cross-kernel $J(X_1)J(X_2)^\top$ as a lazy
    :class:`CurvopsLinearOperator` over :class:`curvops.NTK` (symmetric PSD when ``x1`` and
    ``x2`` are the same inputs); GPyTorch slices train/test blocks by calling it on the
    corresponding inputs.  The network's parameters are fixed: they are **not** kernel
    hyperparameters (GPyTorch's optimizer does not see them), and no gradient flows through
    the kernel to them.  Wrap it in ``gpytorch.kernels.ScaleKernel`` for an output scale.

    For a network with C > 1 outputs and no ``output_reduction``, the kernel is
    (N₁C)×(N₂C) in sample-major order (row ``i·C + c``: GPyTorch's interleaved multitask
    order) and ``num_outputs_per_input`` returns C.

    **Cost**: a product with the kernel is one VJP pass over ``x2`` and one JVP pass over
    ``x1``; ``diag=True`` costs N₁ VJP columns (per-sample gradient norms); GPyTorch's dense
    path (below ``max_cholesky_size``) uses :meth:`curvops.NTK.to_dense`.

    Args:
        model: ``nn.Module`` (or ``f(params, x)`` with ``params=``) taking inputs [n, d].
        params: parameter selection, as in :class:`curvops.NTK`.
        output_reduction: ``None``, ``"sum"`` or ``"mean"`` over each sample's outputs.
        batch_size: split inputs into batches of this size in the products.
        **kwargs: passed to ``gpytorch.kernels.Kernel`` (e.g. ``active_dims``).

    Raises:
        ValueError: inputs with batch dimensions (only [n, d] inputs are supported) or
            ``last_dim_is_batch=True``.

    References:
        Jacot, Gabriel, Hongler (2018). *Neural Tangent Kernel: Convergence and Generalization
        in Neural Networks*.
        Novak, Sohl-Dickstein, Schoenholz (2022). *Fast Finite Width Neural Tangent Kernel*.
    """

    def __init__(self, model, *, params=None, output_reduction: str | None = None,
                 batch_size: int | None = None, **kwargs):
        super().__init__(**kwargs)
        # kept out of nn.Module registration: the network's weights are not GP hyperparameters
        object.__setattr__(self, "_ntk_config", dict(model=model, params=params, output_reduction=output_reduction,
                                                     batch_size=batch_size))

    @property
    def model(self):
        return self._ntk_config["model"]

    def _ntk(self, X1, X2=None):
        from ..operators.ntk import NTK

        cfg = dict(self._ntk_config)
        return NTK(cfg.pop("model"), X1, X2, **cfg)

    def _check_inputs(self, x: Tensor, last_dim_is_batch: bool) -> None:
        if last_dim_is_batch:
            raise ValueError("NTKKernel: last_dim_is_batch=True is not supported.")
        if x.dim() != 2:
            raise ValueError(f"NTKKernel: expected inputs of shape [n, d], got {tuple(x.shape)} (no batch dimensions).")

    def num_outputs_per_input(self, x1: Tensor, x2: Tensor) -> int:
        if self._ntk_config["output_reduction"] is not None:
            return 1
        K = self._ntk(x1[:1], x2[:1])
        return K.shape[0]

    def forward(self, x1: Tensor, x2: Tensor, diag: bool = False, last_dim_is_batch: bool = False, **params):
        self._check_inputs(x1, last_dim_is_batch)
        self._check_inputs(x2, last_dim_is_batch)
        same = x1 is x2 or (x1.shape == x2.shape and torch.equal(x1, x2))
        if diag:
            if not same:
                raise ValueError("NTKKernel(diag=True): expected x1 and x2 to be the same inputs.")
            return self._diag(x1)
        return CurvopsLinearOperator(self._ntk(x1) if same else self._ntk(x1, x2))

    def _diag(self, x: Tensor) -> Tensor:
        """diag J Jᵀ = squared norms of the per-sample (per-output) gradients, by VJPs of unit vectors."""
        from ..operators.jacobian import Jacobian

        cfg = dict(self._ntk_config)
        J = Jacobian(cfg.pop("model"), x, **cfg)
        M = J.shape[0]
        out = torch.empty(M, dtype=J.torch_dtype, device=J.device)
        for start in range(0, M, ENTRY_BLOCK):
            idx = torch.arange(start, min(start + ENTRY_BLOCK, M), device=J.device)
            G = J.T @ _unit_columns(M, idx, J.torch_dtype, J.device)  # rows idx of J, as columns
            out[start:start + idx.numel()] = (G * G).sum(0)
        return out.to(dtype=x.dtype, device=x.device)
