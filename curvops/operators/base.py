r"""The operator protocol: a lazy real matrix that is both a scipy and a torch object.

An :class:`Operator` *is* a :class:`scipy.sparse.linalg.LinearOperator` (numpy in,
numpy out) and also multiplies torch tensors on its own device with no host copy,
and parameter dicts ``{name: tensor}`` when its domain is a parameter space.

Subclasses set ``shape``, ``torch_dtype``, ``device`` and ``tags`` through
``Operator.__init__`` and implement ``_matmat_torch(V: [N, K]) -> [M, K]`` and,
unless symmetric, ``_rmatmat_torch(W: [M, K]) -> [N, K]``.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np
import scipy.sparse.linalg as spla
import torch
from torch import Tensor

from .._modes import product_mode, usable
from ..layout import ParamLayout
from . import _threads
from . import tags as _tags

#: default refusal threshold of :meth:`Operator.to_dense` (entries).
MAX_DENSE_ENTRIES = 2**26

#: the composition rules (sum, scale, product, adjoint): :mod:`curvops.operators.algebra` builds on
#: this protocol and registers itself here when the package is imported, so the protocol never
#: imports the algebra (no cycle between the two).
_ALGEBRA = None


def register_algebra(module) -> None:
    global _ALGEBRA
    _ALGEBRA = module


def _algebra():
    assert _ALGEBRA is not None, "curvops.operators.algebra registers itself when curvops.operators is imported"
    return _ALGEBRA


class Operator(spla.LinearOperator):
    r"""Lazy real matrix $A \in \mathbb{R}^{M \times N}$ defined by its products.

    Every operator is a :class:`scipy.sparse.linalg.LinearOperator` (``matvec``, ``matmat``,
    ``rmatvec``, ``rmatmat`` and ``dtype`` are scipy's numpy face: numpy in, numpy out) and a torch
    object: ``A @ v`` with a torch tensor [N] or block [N, K] returns a tensor on ``A.device``; a
    parameter dict (or list of tensors) returns the same form when a side is a parameter space.
    ``A.T``, ``A @ B``, ``A + B``, ``c * A``, ``-A``, ``A / c`` and ``A ** p`` build lazy composites
    that keep the structural tags they can (:mod:`curvops.operators.algebra`).

    Attributes:
        shape: ``(M, N)``.
        torch_dtype: the torch dtype of the products (``dtype`` is the numpy dtype scipy expects).
        device: where products run; torch inputs must live there.
        tags: structural promises (``"symmetric"``, ``"psd"``), set by the operator's author or
            with :func:`curvops.tag`, never inferred from numbers.
        domain: a :class:`~curvops.ParamLayout` when the input side is a parameter space, else None.
        range: the same for the output side.
        process_group: the ``torch.distributed`` group whose ranks share this operator's data (each
            product ends with an all-reduce over it), or None (one process; the default). Composites
            take it from their terms; :mod:`curvops.linalg` then draws identical probes on every rank.

    Subclasses call ``Operator.__init__(shape, torch_dtype, device, tags, domain, range)`` and
    implement ``_matmat_torch(V: [N, K]) -> [M, K]`` and, unless symmetric,
    ``_rmatmat_torch(W: [M, K]) -> [N, K]``; the base class supplies everything else.

    Example:
        >>> import torch, curvops
        >>> A = curvops.Dense(torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64))
        >>> A @ torch.ones(2, dtype=torch.float64)
        tensor([3., 4.], dtype=torch.float64)
        >>> (2 * A - A.T).to_dense()
        tensor([[2., 1.],
                [1., 3.]], dtype=torch.float64)
    """

    process_group = None  # a torch.distributed group for data-parallel operators

    def __init_subclass__(cls, **kwargs):
        # help(cls) shows the constructor's docstring; one a subclass leaves out would otherwise be
        # inherited from scipy's LinearOperator.__init__ ("Initialize this LinearOperator. To be called
        # by subclasses...") and read as if it were ours.  Point to the class docstring instead.
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None and getattr(init, "__doc__", None) is None:
            try:
                init.__doc__ = (f"Build the {cls.__name__}; its arguments are described under Args in the "
                                f"class docstring of {cls.__name__}.")
            except (AttributeError, TypeError):  # a builtin or wrapped __init__
                pass

    def __init__(
        self,
        shape: tuple[int, int],
        torch_dtype: torch.dtype,
        device: torch.device | str,
        tags: Iterable[str] = (),
        domain: ParamLayout | None = None,
        range: ParamLayout | None = None,  # noqa: A002 - the matrix's range
    ):
        """Set the operator's shape, dtypes, device, tags and parameter layouts (for subclasses).

        Raises:
            TypeError: if ``torch_dtype`` is not a floating dtype.
            ValueError: if tags are given for a non-square shape, or a layout's size does not
                match its side of ``shape``.
        """
        if not torch_dtype.is_floating_point:
            raise TypeError(f"{type(self).__name__}: expected a floating torch dtype, got {torch_dtype}.")
        np_dtype = torch.empty((), dtype=torch_dtype).numpy().dtype if torch_dtype != torch.bfloat16 else np.float32
        super().__init__(dtype=np_dtype, shape=(int(shape[0]), int(shape[1])))
        self.torch_dtype = torch_dtype
        self.device = torch.device(device)
        self.tags = _tags.normalize(tags)
        if self.tags and self.shape[0] != self.shape[1]:
            raise ValueError(f"{type(self).__name__}: tags {sorted(self.tags)} need a square operator, got shape {self.shape}.")
        if domain is not None and domain.size != self.shape[1]:
            raise ValueError(f"{type(self).__name__}: domain layout has {domain.size} entries, shape has {self.shape[1]} columns.")
        if range is not None and range.size != self.shape[0]:
            raise ValueError(f"{type(self).__name__}: range layout has {range.size} entries, shape has {self.shape[0]} rows.")
        self.domain = domain
        self.range = range

    # ---- what subclasses implement -------------------------------------------------
    def _matmat_torch(self, V: Tensor) -> Tensor:  # [N, K] -> [M, K]
        raise NotImplementedError(f"{type(self).__name__} does not implement _matmat_torch.")

    def _rmatmat_torch(self, W: Tensor) -> Tensor:  # [M, K] -> [N, K]
        if self.is_symmetric:
            return self._matmat_torch(W)
        raise NotImplementedError(
            f"{type(self).__name__}: the adjoint product is not implemented for this operator."
        )

    @property
    def _name(self) -> str:
        """How error messages name this operator."""
        return type(self).__name__

    # ---- tags ----------------------------------------------------------------------
    @property
    def is_symmetric(self) -> bool:
        """Whether the operator carries the ``"symmetric"`` tag (a promise, not a numerical check)."""
        return _tags.SYMMETRIC in self.tags

    @property
    def is_psd(self) -> bool:
        """Whether the operator carries the ``"psd"`` tag (symmetric positive semi-definite)."""
        return _tags.PSD in self.tags

    # ---- torch entry points ----------------------------------------------------------
    def _check_torch(self, V: Tensor, n: int, api: str) -> None:
        if V.dim() not in (1, 2):
            raise ValueError(f"{api}: expected a vector [{n}] or a block [{n}, K], got shape {tuple(V.shape)}.")
        if V.shape[0] != n:
            what = " (parameters)" if (self.domain if n == self.shape[1] else self.range) is not None else ""
            raise ValueError(
                f"{api}: expected a vector of length {n}{what}, got shape {tuple(V.shape)}."
            )
        if V.dtype != self.torch_dtype:
            raise TypeError(
                f"{api}: expected dtype {self.torch_dtype}, got {V.dtype}. Convert with v.to({self.torch_dtype})."
            )
        if V.device != self.device:
            raise ValueError(
                f"{api}: expected a tensor on {self.device}, got one on {V.device}. Move it with v.to('{self.device}')."
            )

    def _column_step(self) -> int | None:
        """Columns per call of ``_matmat_torch`` for a top-level product (None: all at once).

        An operator with a positive integer ``max_columns`` (the curvature operators, Jacobians,
        covariances) gets blocks wider than that in slices of ``max_columns`` columns written into
        one preallocated output, so a block's extra memory is the output plus one slice's work,
        whatever its width.  Each slice is one pass over the data.
        """
        step = getattr(self, "max_columns", None)
        return step if isinstance(step, int) and not isinstance(step, bool) and step > 0 else None

    def _sliced(self, fn, V: Tensor, rows: int) -> Tensor:
        """``fn(V)`` slice by slice of ``_column_step()`` columns into a preallocated ``[rows, K]``."""
        K, step = V.shape[1], self._column_step()
        if step is None or K <= step:
            return fn(V)
        out = None
        for start in range(0, K, step):
            Y = fn(V[:, start:start + step])
            if out is None:
                out = Y.new_empty(rows, K)
            out[:, start:start + Y.shape[1]] = Y
            del Y
        return out

    def matmat_torch(self, V: Tensor) -> Tensor:
        """Torch product ``A @ V`` for ``V`` of shape [N] or [N, K] (wide blocks in slices, see
        :meth:`_column_step`)."""
        api = f"{self._name} @ v"
        self._check_torch(V, self.shape[1], api)
        if V.dim() == 2 and V.shape[1] == 0:
            return V.new_zeros(self.shape[0], 0)
        with product_mode():  # contract rule 8: the caller's autograd context never changes the matrix
            V = usable(V).detach()  # a vector that requires grad (GPyTorch's) must not record the product
            if V.dim() == 1:
                return self._matmat_torch(V[:, None])[:, 0]
            return self._sliced(self._matmat_torch, V, self.shape[0])

    def rmatmat_torch(self, W: Tensor) -> Tensor:
        """Torch adjoint product ``Aᵀ @ W`` for ``W`` of shape [M] or [M, K]."""
        api = f"{self._name}.T @ v"
        self._check_torch(W, self.shape[0], api)
        if W.dim() == 2 and W.shape[1] == 0:
            return W.new_zeros(self.shape[1], 0)
        with product_mode():
            W = usable(W).detach()
            if W.dim() == 1:
                return self._rmatmat_torch(W[:, None])[:, 0]
            return self._sliced(self._rmatmat_torch, W, self.shape[1])

    def _apply(self, x: Any, adjoint: bool = False):
        """Dispatch on the input's kind: torch, dict/list of tensors, numpy."""
        layout_in = self.range if adjoint else self.domain
        layout_out = self.domain if adjoint else self.range
        fn = self.rmatmat_torch if adjoint else self.matmat_torch
        if isinstance(x, Tensor):
            return fn(x)
        if isinstance(x, Mapping) or (
            isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(t, Tensor) for t in x)
        ):
            api = f"{type(self).__name__} @ params"
            if layout_in is None:
                raise TypeError(f"{api}: this operator's input side is not a parameter space; pass a tensor.")
            flat = layout_in.flatten(x, api)
            out = fn(flat)
            if layout_out is None:
                return out
            return layout_out.unflatten(out, as_dict=isinstance(x, Mapping))
        if isinstance(x, np.ndarray) or np.isscalar(x) is False and hasattr(x, "__array__"):
            arr = np.asarray(x)
            out = fn(torch.as_tensor(arr, dtype=self.torch_dtype, device=self.device))
            return out.detach().cpu().numpy().astype(np.result_type(self.dtype, arr.dtype), copy=False)
        raise TypeError(
            f"{type(self).__name__} @ x: expected a torch.Tensor, a numpy array, a parameter dict or an Operator, "
            f"got {type(x).__name__}."
        )

    # ---- scipy face (numpy in, numpy out) -----------------------------------------
    def _check_numpy(self, x, n: int, api: str, block: bool) -> None:
        shape = np.shape(x)
        ok = (len(shape) == 2) if block else (shape == (n,) or shape == (n, 1))
        if not ok or shape[0] != n:
            what = "a block [{n}, K]" if block else "a vector of length {n} (or [{n}, 1])"
            raise ValueError(f"{api}: expected {what.format(n=n)}, got shape {tuple(shape)}.")

    def matvec(self, x):
        self._check_numpy(x, self.shape[1], f"{self._name}.matvec", block=False)
        return super().matvec(x)

    def rmatvec(self, x):
        self._check_numpy(x, self.shape[0], f"{self._name}.rmatvec", block=False)
        return super().rmatvec(x)

    def matmat(self, X):
        self._check_numpy(X, self.shape[1], f"{self._name}.matmat", block=True)
        return super().matmat(X)

    def rmatmat(self, X):
        self._check_numpy(X, self.shape[0], f"{self._name}.rmatmat", block=True)
        return super().rmatmat(X)

    def _matmat(self, X):
        _threads.limit_for_scipy_solver()  # inside scipy's ARPACK: its BLAS on one thread (see _threads)
        V = torch.as_tensor(np.asarray(X), dtype=self.torch_dtype, device=self.device)
        return self.matmat_torch(V).detach().cpu().numpy()

    def _matvec(self, x):
        return self._matmat(np.asarray(x).reshape(-1, 1))

    def _rmatmat(self, X):
        _threads.limit_for_scipy_solver()
        V = torch.as_tensor(np.asarray(X), dtype=self.torch_dtype, device=self.device)
        return self.rmatmat_torch(V).detach().cpu().numpy()

    def _rmatvec(self, x):
        return self._rmatmat(np.asarray(x).reshape(-1, 1))

    # ---- algebra -------------------------------------------------------------------
    def dot(self, x):
        """``A @ x``: a product with a tensor, numpy array or parameter dict, a composite with an
        operator (``A @ B``), or a scaled operator for a scalar ``x``."""
        algebra = _algebra()

        if isinstance(x, spla.LinearOperator):
            return algebra.product(self, algebra.as_operator(x, like=self))
        if np.isscalar(x) or (isinstance(x, Tensor) and x.dim() == 0):
            return algebra.scale(self, float(x))
        return self._apply(x)

    def __matmul__(self, x):
        """``A @ x`` (see :meth:`dot`); a scalar operand is refused, use ``*``."""
        if np.isscalar(x):
            raise ValueError(f"{type(self).__name__} @ x: scalar operands are not allowed, use '*' instead.")
        return self.dot(x)

    def __rmatmul__(self, x):
        algebra = _algebra()

        if isinstance(x, spla.LinearOperator):
            return algebra.product(algebra.as_operator(x, like=self), self)
        return NotImplemented

    def __call__(self, x):
        """``A(x)`` is ``A @ x``."""
        return self @ x

    def __mul__(self, x):
        return self.dot(x)

    def __rmul__(self, x):
        algebra = _algebra()

        if np.isscalar(x) or (isinstance(x, Tensor) and x.dim() == 0):
            return algebra.scale(self, float(x))
        return NotImplemented

    def __truediv__(self, c):
        algebra = _algebra()

        if not (np.isscalar(c) or (isinstance(c, Tensor) and c.dim() == 0)):
            raise TypeError(f"{type(self).__name__} / c: expected a scalar, got {type(c).__name__}.")
        if float(c) == 0.0:
            raise ValueError(f"{type(self).__name__} / c: division by zero.")
        return algebra.scale(self, 1.0 / float(c))

    def __neg__(self):
        algebra = _algebra()

        return algebra.scale(self, -1.0)

    def __add__(self, other):
        algebra = _algebra()

        if isinstance(other, spla.LinearOperator):
            return algebra.add(self, algebra.as_operator(other, like=self))
        return NotImplemented

    __radd__ = __add__

    def __sub__(self, other):
        algebra = _algebra()

        if isinstance(other, spla.LinearOperator):
            return algebra.add(self, algebra.scale(algebra.as_operator(other, like=self), -1.0))
        return NotImplemented

    def __pow__(self, p):
        algebra = _algebra()

        if not isinstance(p, int) or p < 1:
            raise ValueError(f"{type(self).__name__} ** p: expected a positive integer power, got {p!r}.")
        return algebra.product(*([self] * p))

    def _adjoint(self):
        algebra = _algebra()

        return algebra.adjoint(self)

    def _transpose(self):
        return self._adjoint()

    @property
    def T(self):  # noqa: N802 - matrix notation
        """The transpose ``Aᵀ`` as a lazy operator (``A`` itself when symmetric)."""
        return self._adjoint()

    @property
    def H(self):  # noqa: N802
        """The adjoint; equal to :attr:`T` for these real operators."""
        return self._adjoint()

    # ---- densification -------------------------------------------------------------
    def to_dense(self, *, max_entries: int = MAX_DENSE_ENTRIES, chunk: int = 256) -> Tensor:
        """Materialize the matrix as a torch tensor [M, N] (N products, ``chunk`` columns at a time,
        written into one preallocated output: peak memory the matrix plus one chunk's work).

        Raises:
            ValueError: if M·N exceeds ``max_entries`` (pass a larger ``max_entries`` to force it).
        """
        M, N = self.shape
        if M * N > max_entries:
            raise ValueError(
                f"{type(self).__name__}.to_dense: the matrix has {M}×{N} = {M * N:,} entries, "
                f"above max_entries={max_entries:,}. Use matrix-free algorithms, or pass a larger "
                f"max_entries if you really need it dense."
            )
        out = torch.empty(M, N, dtype=self.torch_dtype, device=self.device)  # the only full-size array
        with product_mode():
            for start in range(0, N, chunk):
                stop = min(start + chunk, N)
                E = torch.zeros(N, stop - start, dtype=self.torch_dtype, device=self.device)
                E[torch.arange(start, stop), torch.arange(stop - start)] = 1
                out[:, start:stop] = self._sliced(self._matmat_torch, E, M)
                del E
        return out

    def __repr__(self) -> str:
        """``<Name M×N dtype on device tags=… last_path=…>``."""
        tags = ",".join(sorted(self.tags)) or "-"
        path = getattr(self, "last_path", None)  # the kernel of the last product, where an operator records it
        path = f" last_path={path!r}" if path else ""
        return (f"<{type(self).__name__} {self.shape[0]}×{self.shape[1]} {self.torch_dtype} on {self.device} "
                f"tags={tags}{path}>")
