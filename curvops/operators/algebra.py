"""Composition of operators: sum, scale, product, adjoint, restriction, block diagonal.

The classes are private; build composites with the operators (``A + B``, ``c * A``,
``A @ B``, ``A.T``) or the functions :func:`restrict`, :func:`block_diag`, :func:`tag`.
Shape, dtype and device mismatches raise when the composite is built.
"""

from __future__ import annotations

import sys
from typing import Callable, Iterable, Sequence

import numpy as np
import scipy.sparse.linalg as spla
import torch
from torch import Tensor

from . import tags as _tags
from .base import Operator, ParamLayout, register_algebra


def _check_compatible(api: str, ops: Sequence[Operator]) -> None:
    dtypes = {op.torch_dtype for op in ops}
    devices = {op.device for op in ops}
    if len(dtypes) > 1:
        raise TypeError(f"{api}: operators have different dtypes {sorted(map(str, dtypes))}; convert one of them.")
    if len(devices) > 1:
        raise ValueError(f"{api}: operators live on different devices {sorted(map(str, devices))}.")


class _ScipyWrapped(Operator):
    """A foreign scipy LinearOperator seen through the torch protocol (host round trip)."""

    def __init__(self, A: spla.LinearOperator, torch_dtype, device):
        super().__init__(A.shape, torch_dtype, device)
        self.inner = A

    def _matmat_torch(self, V: Tensor) -> Tensor:
        out = self.inner.matmat(V.detach().cpu().numpy())
        return torch.as_tensor(np.asarray(out), dtype=self.torch_dtype, device=self.device)

    def _rmatmat_torch(self, W: Tensor) -> Tensor:
        out = self.inner.rmatmat(W.detach().cpu().numpy())
        return torch.as_tensor(np.asarray(out), dtype=self.torch_dtype, device=self.device)


def as_operator(A, like: Operator | None = None) -> Operator:
    """Wrap a torch tensor, numpy array or scipy LinearOperator as an :class:`Operator`."""
    from .dense import Dense

    if isinstance(A, Operator):
        return A
    dtype = like.torch_dtype if like is not None else torch.float64
    device = like.device if like is not None else torch.device("cpu")
    if isinstance(A, Tensor):
        return Dense(A)
    if isinstance(A, np.ndarray):
        return Dense(torch.as_tensor(A, dtype=dtype, device=device))
    if isinstance(A, spla.LinearOperator):
        return _ScipyWrapped(A, dtype, device)
    raise TypeError(f"as_operator: expected an Operator, tensor, array or scipy LinearOperator, got {type(A).__name__}.")


def _common_layout(api: str, layouts) -> ParamLayout | None:
    """The parameter layout the operands agree on (None where none has one)."""
    known = {l for l in layouts if l is not None}
    if len(known) > 1:
        raise ValueError(f"{api}: the operands are over different parameter sets; restrict them to the same one.")
    return next(iter(known), None)



def _group_of(ops):
    """The process group of the first distributed operand (None when none is)."""
    return next((op.process_group for op in ops if getattr(op, "process_group", None) is not None), None)

class _Sum(Operator):
    def __init__(self, terms: Sequence[Operator]):
        first = terms[0]
        super().__init__(
            first.shape, first.torch_dtype, first.device,
            tags=_tags.sum_tags(t.tags for t in terms),
            domain=_common_layout("A + B", (t.domain for t in terms)),
            range=_common_layout("A + B", (t.range for t in terms)),
        )
        self.terms = tuple(terms)
        self.process_group = _group_of(terms)

    def _matmat_torch(self, V):
        out = self.terms[0]._matmat_torch(V)
        for t in self.terms[1:]:
            out = out + t._matmat_torch(V)
        return out

    def _rmatmat_torch(self, W):
        out = self.terms[0]._rmatmat_torch(W)
        for t in self.terms[1:]:
            out = out + t._rmatmat_torch(W)
        return out


def add(*ops: Operator) -> Operator:
    """Sum of operators of one shape (nested sums are flattened)."""
    terms: list[Operator] = []
    for op in ops:
        terms.extend(op.terms if isinstance(op, _Sum) else [op])
    shapes = {t.shape for t in terms}
    if len(shapes) > 1:
        raise ValueError(f"A + B: expected operators of one shape, got shapes {sorted(shapes)}.")
    _check_compatible("A + B", terms)
    return _Sum(terms)


class _Scaled(Operator):
    def __init__(self, op: Operator, c: float):
        super().__init__(op.shape, op.torch_dtype, op.device, tags=_tags.scale_tags(op.tags, c),
                         domain=op.domain, range=op.range)
        self.op, self.c = op, float(c)
        self.process_group = op.process_group

    def _matmat_torch(self, V):
        return self.c * self.op._matmat_torch(V)

    def _rmatmat_torch(self, W):
        return self.c * self.op._rmatmat_torch(W)


def scale(op: Operator, c: float) -> Operator:
    """``c · A`` (nested scalings are merged)."""
    if not np.isfinite(c):
        raise ValueError(f"c * A: expected a finite scalar, got {c}.")
    if isinstance(op, _Scaled):
        return scale(op.op, op.c * c)
    return _Scaled(op, c)


class _Adjoint(Operator):
    def __init__(self, op: Operator):
        M, N = op.shape
        super().__init__((N, M), op.torch_dtype, op.device, domain=op.range, range=op.domain)
        self.op = op
        self.process_group = op.process_group

    @property
    def _name(self) -> str:
        return f"{self.op._name}.T"

    def _matmat_torch(self, V):
        return self.op._rmatmat_torch(V)

    def _rmatmat_torch(self, W):
        return self.op._matmat_torch(W)


def adjoint(op: Operator) -> Operator:
    """``Aᵀ``: the operator itself when symmetric, the original when already an adjoint,
    and ``Bᵀ Aᵀ`` for a product ``A B`` (so chains stay recognizable for the tag rules)."""
    if op.is_symmetric:
        return op
    if isinstance(op, _Adjoint):
        return op.op
    if isinstance(op, _Product):
        return _Product([adjoint(f) for f in reversed(op.factors)])
    return _Adjoint(op)


def _are_adjoints(X: Operator, Y: Operator) -> bool:
    if X is Y:
        return X.is_symmetric
    return (isinstance(X, _Adjoint) and X.op is Y) or (isinstance(Y, _Adjoint) and Y.op is X)


def _product_tags(factors: Sequence[Operator]) -> frozenset[str]:
    """Bᵀ B is PSD; Bᵀ M B keeps M's tags; other products promise nothing.

    The chain is flattened, so B may itself be a product: the rule holds for any chain whose
    factors mirror each other as adjoints around the middle (even length: PSD; odd length: the
    middle factor's tags).
    """
    n = len(factors)
    if not all(_are_adjoints(factors[i], factors[n - 1 - i]) for i in range(n // 2)):
        return frozenset()
    if n % 2 == 0:
        return frozenset({_tags.SYMMETRIC, _tags.PSD})
    return factors[n // 2].tags


class _Product(Operator):
    def __init__(self, factors: Sequence[Operator]):
        super().__init__(
            (factors[0].shape[0], factors[-1].shape[1]), factors[0].torch_dtype, factors[0].device,
            tags=_product_tags(factors), domain=factors[-1].domain, range=factors[0].range,
        )
        self.factors = tuple(factors)
        self.process_group = _group_of(factors)

    def _matmat_torch(self, V):
        for f in reversed(self.factors):
            V = f._matmat_torch(V)
        return V

    def _rmatmat_torch(self, W):
        for f in self.factors:
            W = f._rmatmat_torch(W)
        return W


def product(*ops: Operator) -> Operator:
    """``A @ B @ …`` as one flattened chain; inner shapes must agree."""
    factors: list[Operator] = []
    for op in ops:
        factors.extend(op.factors if isinstance(op, _Product) else [op])
    for a, b in zip(factors[:-1], factors[1:]):
        if a.shape[1] != b.shape[0]:
            raise ValueError(f"A @ B: inner dimensions differ: {a.shape} @ {b.shape}.")
    _check_compatible("A @ B", factors)
    return _Product(factors)


class _Restricted(Operator):
    """``Aᵀ``-congruence by a coordinate selection: rows and columns ``idx`` of A."""

    def __init__(self, op: Operator, idx: Tensor, layout: ParamLayout | None):
        n = int(idx.numel())
        super().__init__((n, n), op.torch_dtype, op.device, tags=op.tags, domain=layout, range=layout)
        self.op, self.idx = op, idx
        self.process_group = op.process_group

    def _embed(self, V):
        full = V.new_zeros(self.op.shape[1], V.shape[1])
        full[self.idx] = V
        return full

    def _matmat_torch(self, V):
        return self.op._matmat_torch(self._embed(V))[self.idx]

    def _rmatmat_torch(self, W):
        return self.op._rmatmat_torch(self._embed(W))[self.idx]


def restrict(A: Operator, params: Sequence[str] | None = None, *, U=None) -> Operator:
    """The sub-operator ``Uᵀ A U`` on a parameter subset (``params``) or a basis ``U`` [N, r].

    Tags: symmetric and PSD are kept (congruence preserves both).

    Raises:
        ValueError: for unknown parameter names, or when A is not square.
    """
    if A.shape[0] != A.shape[1]:
        raise ValueError(f"restrict: expected a square operator, got shape {A.shape}.")
    if (params is None) == (U is None):
        raise ValueError("restrict: pass exactly one of params=[names] or U=basis.")
    if params is not None:
        if A.domain is None:
            raise TypeError("restrict(params=...): the operator's domain is not a parameter space; pass U=.")
        if isinstance(params, str):
            params = [params]
        sub = A.domain.subset(list(params))
        offsets = A.domain.offsets()
        idx = torch.cat([torch.arange(*offsets[n], device=A.device) for n in sub.names])
        return _Restricted(A, idx, sub)
    Uop = as_operator(U, like=A)
    if Uop.shape[0] != A.shape[0]:
        raise ValueError(f"restrict(U=...): expected U with {A.shape[0]} rows, got shape {Uop.shape}.")
    out = product(adjoint(Uop), A, Uop)
    out.tags = A.tags  # congruence keeps symmetry and semi-definiteness, whatever the chain looks like
    return out


class _BlockDiag(Operator):
    def __init__(self, blocks: Sequence[Operator]):
        M = sum(b.shape[0] for b in blocks)
        N = sum(b.shape[1] for b in blocks)
        super().__init__((M, N), blocks[0].torch_dtype, blocks[0].device,
                         tags=_tags.sum_tags(b.tags for b in blocks) if M == N else ())
        self.blocks = tuple(blocks)
        self.process_group = _group_of(blocks)

    def _apply_blocks(self, V, adj: bool):
        outs, start = [], 0
        for b in self.blocks:
            n = b.shape[0] if adj else b.shape[1]
            part = V[start:start + n]
            outs.append(b._rmatmat_torch(part) if adj else b._matmat_torch(part))
            start += n
        return torch.cat(outs, dim=0)

    def _matmat_torch(self, V):
        return self._apply_blocks(V, False)

    def _rmatmat_torch(self, W):
        return self._apply_blocks(W, True)


def block_diag(*blocks: Operator) -> Operator:
    """Block-diagonal operator ``diag(A₁, A₂, …)``; keeps the tags every block has."""
    if not blocks:
        raise ValueError("block_diag: expected at least one operator.")
    blocks = tuple(as_operator(b) for b in blocks)
    _check_compatible("block_diag", blocks)
    return _BlockDiag(blocks)


class _Tagged(Operator):
    def __init__(self, op: Operator, tags: Iterable[str]):
        super().__init__(op.shape, op.torch_dtype, op.device, tags=tags, domain=op.domain, range=op.range)
        self.op = op
        self.process_group = op.process_group

    def _matmat_torch(self, V):
        return self.op._matmat_torch(V)

    def _rmatmat_torch(self, W):
        return self.op._matmat_torch(W) if self.is_symmetric else self.op._rmatmat_torch(W)


def tag(A: Operator, *tags: str) -> Operator:
    """Promise structure the author knows (e.g. ``tag(A, "psd")``); nothing is checked numerically."""
    return _Tagged(A, set(A.tags) | set(tags))


def func_operator(
    shape: tuple[int, int], matmat: Callable[[Tensor], Tensor], rmatmat: Callable[[Tensor], Tensor] | None = None,
    *, dtype: torch.dtype = torch.float64, device="cpu", tags: Iterable[str] = (),
) -> Operator:
    """An operator from plain torch functions ``V [N, K] -> [M, K]`` (and optional adjoint)."""

    class _Func(Operator):
        def _matmat_torch(self, V):
            return matmat(V)

        def _rmatmat_torch(self, W):
            if rmatmat is None:
                return super()._rmatmat_torch(W)
            return rmatmat(W)

    return _Func(shape, dtype, device, tags=tags)


register_algebra(sys.modules[__name__])  # the protocol's operators (+, *, @, .T) use these rules
