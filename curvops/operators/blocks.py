r"""Blocks of parameter-space operators: ``submatrix`` and the cross Hessian between two groups.

For an operator :math:`A` whose domain and range are parameter spaces (``A.domain``,
``A.range`` are :class:`~curvops.ParamLayout`), the block of rows ``r`` and columns ``c`` is

.. math:: A_{rc} = S_r^\top A\, S_c,

with :math:`S_r, S_c` the coordinate embeddings of the parameter groups.  Its adjoint is the
swapped block of :math:`A^\top` (for a symmetric :math:`A`: :math:`A_{cr}`).  Groups are sets of
parameter names: repetition is ignored and the block follows the operator's layout order, as
for :func:`~curvops.restrict`.  Rows and columns may overlap (``rows == cols`` is the diagonal
block, which keeps the operator's tags); empty groups are refused.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..layout import ParamLayout
from ..objective import Objective
from .base import Operator
from .hessian import Hessian


def _names_in(api: str, which: str, group, layout: ParamLayout) -> ParamLayout:
    """Validate a group of parameter names against a layout → the sub-layout (layout order)."""
    items = [group] if isinstance(group, str) else group
    try:
        items = list(items)
    except TypeError:
        raise TypeError(
            f"{api}: expected {which}= as a parameter name or a list of names, got {type(group).__name__}."
        ) from None
    bad = [type(n).__name__ for n in items if not isinstance(n, str)]
    if bad:
        raise TypeError(f"{api}: expected {which}= to hold parameter names (str), got entries of type {bad}.")
    if not items:
        raise ValueError(f"{api}: expected a non-empty {which}= group, got no names. Name at least one parameter.")
    unknown = [n for n in items if n not in layout.names]
    if unknown:
        raise ValueError(
            f"{api}: expected {which}= names among {list(layout.names)}, got unknown parameter names {unknown}. "
            f"Use the operator's parameter names (A.domain.names / A.range.names)."
        )
    return layout.subset(items)


def _indices(layout: ParamLayout, sub: ParamLayout, device) -> Tensor:
    offsets = layout.offsets()
    return torch.cat([torch.arange(*offsets[n], device=device) for n in sub.names])


class _Submatrix(Operator):
    """``S_rowsᵀ A S_cols``: rows ``rows`` of A's range, columns ``cols`` of A's domain."""

    def __init__(self, A: Operator, rows, cols, api: str = "submatrix"):
        if not isinstance(A, Operator):
            raise TypeError(f"{api}: expected a curvops Operator, got {type(A).__name__}. Wrap it with as_operator.")
        if A.domain is None or A.range is None:
            side = "domain" if A.domain is None else "range"
            raise TypeError(
                f"{api}: expected an operator whose domain and range are parameter spaces, got {A!r} with no "
                f"{side} layout. Select blocks of a plain matrix by indexing its dense form."
            )
        row_layout = _names_in(api, "rows", rows, A.range)
        col_layout = _names_in(api, "cols", cols, A.domain)
        diagonal = row_layout == col_layout and A.domain == A.range
        super().__init__((row_layout.size, col_layout.size), A.torch_dtype, A.device,
                         tags=A.tags if diagonal else (), domain=col_layout, range=row_layout)
        self.operator = A
        self.rows, self.cols = row_layout.names, col_layout.names
        self._row_idx = _indices(A.range, row_layout, A.device)
        self._col_idx = _indices(A.domain, col_layout, A.device)

    def _matmat_torch(self, V: Tensor) -> Tensor:  # [n_cols, K] -> [n_rows, K]
        full = V.new_zeros(self.operator.shape[1], V.shape[1])
        full[self._col_idx] = V
        return self.operator._matmat_torch(full)[self._row_idx]

    def _rmatmat_torch(self, W: Tensor) -> Tensor:  # [n_rows, K] -> [n_cols, K]
        full = W.new_zeros(self.operator.shape[0], W.shape[1])
        full[self._row_idx] = W
        return self.operator._rmatmat_torch(full)[self._col_idx]

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} {self.shape[0]}×{self.shape[1]} rows={list(self.rows)} "
                f"cols={list(self.cols)} of {self.operator!r}>")


def submatrix(A: Operator, rows, cols) -> Operator:
    r"""The block of a parameter-space operator between two parameter groups.

    .. math:: A_{rc} = S_r^\top A\, S_c \in \mathbb{R}^{P_r \times P_c}

    where :math:`S_r` embeds the parameters ``rows`` (of ``A.range``) and :math:`S_c` the
    parameters ``cols`` (of ``A.domain``).  The result has ``range``/``domain`` layouts of the
    row/column groups, so parameter dicts work on both sides; ``A_rc.T`` is the swapped block
    of ``A.T`` (``submatrix(A, cols, rows)`` for a symmetric ``A``).

    **Cost**: one product with ``A`` per block of columns (the input is zero-padded to A's
    domain); the adjoint one adjoint product with ``A``.

    **Tags**: ``A``'s tags when ``rows`` and ``cols`` name the same group of a square operator with
    one layout (a diagonal block); none otherwise.

    Args:
        A: an :class:`~curvops.Operator` with ``domain`` and ``range`` parameter layouts (e.g. a
            :class:`~curvops.Hessian`).
        rows: parameter names of the block's rows (a name or a list; order and repetition ignored:
            the block follows A's layout order).  May overlap ``cols``.
        cols: parameter names of the block's columns (likewise).

    Returns:
        The rectangular operator :math:`A_{rc}` (``shape == (P_r, P_c)``).

    Raises:
        TypeError: ``A`` is not an Operator or has no parameter layout; names that are not strings.
        ValueError: an empty group; names not in A's layout.

    Example:
        >>> H = Hessian(model, "mse", (X, y))                           # doctest: +SKIP
        >>> B = submatrix(H, rows=["0.weight"], cols=["2.weight", "2.bias"])  # doctest: +SKIP
        >>> B @ {"2.weight": v_w, "2.bias": v_b}     # -> {"0.weight": ...}   # doctest: +SKIP
    """
    return _Submatrix(A, rows, cols)


# ---- CrossHessian -----------------------------------------------------------------------
def _group_names(api: str, which: str, group, all_names: Sequence[str], model) -> list[str]:
    """Names and/or submodules → parameter names (layout order, no repetition)."""
    if isinstance(group, (str, nn.Module)):
        items = [group]
    else:
        try:
            items = list(group)
        except TypeError:
            raise TypeError(
                f"{api}: expected {which}= as parameter names and/or submodules, got {type(group).__name__}."
            ) from None
    chosen: list[str] = []
    for item in items:
        if isinstance(item, str):
            if item not in all_names:
                raise ValueError(
                    f"{api}: expected {which}= names among {list(all_names)}, got unknown parameter name {item!r}. "
                    f"Use names from model.named_parameters() or pass submodules."
                )
            chosen.append(item)
        elif isinstance(item, nn.Module):
            if not isinstance(model, nn.Module) or not any(m is item for m in model.modules()):
                raise ValueError(
                    f"{api}: expected the modules in {which}= to be submodules of the model, got a "
                    f"{type(item).__name__} that is not. Pass the model's own submodule or parameter names."
                )
            ids = {id(p) for p in item.parameters()}
            chosen.extend(n for n, p in model.named_parameters() if id(p) in ids)
        else:
            raise TypeError(f"{api}: expected {which}= entries to be names or modules, got {type(item).__name__}.")
    if not chosen:
        raise ValueError(
            f"{api}: expected a non-empty {which}= group, got no parameters from {group!r}. Name at least one "
            f"parameter (a module without parameters selects none)."
        )
    order = {n: i for i, n in enumerate(all_names)}
    return sorted(set(chosen), key=order.__getitem__)


class CrossHessian(_Submatrix):
    r"""Mixed second derivatives of the loss between two parameter groups.

    .. math:: H_{ab} = \frac{\partial^2 L}{\partial \theta_a\, \partial \theta_b^\top}
              \in \mathbb{R}^{P_a \times P_b}

    for the whole-data loss ``L`` of :class:`~curvops.Objective`, rows ``a`` and columns ``b``.
    Built as a :class:`~curvops.Hessian` over the union of both groups (only those parameters are
    differentiated; the others are constants) followed by :func:`submatrix`.  Its adjoint is the
    swapped block ``H_ba``.  The groups may overlap (``rows == cols`` gives the Hessian restricted to
    that group, with its symmetric tag); empty groups are refused.

    **Cost**: per block of columns, one Hessian product over the union of the groups (one pass over
    the data; per batch one forward + backward graph and one double-backward per column), for
    products and adjoint products alike.

    **Tags**: symmetric when ``rows`` and ``cols`` select the same parameters; none otherwise.

    Args:
        model_or_objective: a model (``nn.Module`` or a plain function) followed by ``loss`` and
            ``data``, or an :class:`~curvops.Objective` (the groups must then lie among its
            parameters, and the Hessian runs over all of them).
        rows: the row group: a parameter name, a submodule, or a list of names and submodules.
        cols: the column group (likewise).
        **kwargs: passed to :class:`~curvops.Hessian` and :class:`~curvops.Objective`
            (``reduction=``, ``batch_size=``, ``keep_graphs=``, …; for a plain function the dict of
            all its parameters as ``params=``).  Not ``select=`` (nor ``params=`` for a module):
            ``rows``/``cols`` choose the parameters.

    Raises:
        TypeError: ``params=``/``select=`` that compete with the groups; entries that are neither
            names nor modules; modules with a plain-function model.
        ValueError: unknown names, modules outside the model, empty groups, names outside a given
            Objective's parameters.

    Example:
        >>> C = CrossHessian(model, "cross_entropy", (X, y), rows=model[0], cols=model[2])  # doctest: +SKIP
        >>> C.shape   # (P of layer 0, P of layer 2)                                      # doctest: +SKIP
    """

    def __init__(self, model_or_objective, loss=None, data=None, *, rows, cols, **kwargs):
        api = "CrossHessian"
        if "select" in kwargs:
            raise TypeError(f"{api}: expected the parameters to come from rows= and cols=, got select= as well. "
                            f"Drop select=.")
        if isinstance(model_or_objective, Objective):
            obj = model_or_objective
            model = obj.model
            all_names = list(dict(model.named_parameters())) if isinstance(model, nn.Module) else list(obj.names)
            row_names = _group_names(api, "rows", rows, all_names, model)
            col_names = _group_names(api, "cols", cols, all_names, model)
            outside = [n for n in dict.fromkeys(row_names + col_names) if n not in obj.names]
            if outside:
                raise ValueError(
                    f"{api}: expected rows/cols among the Objective's parameters {list(obj.names)}, got {outside}. "
                    f"Build the Objective with params= covering both groups."
                )
            H = Hessian(obj, loss, data, **kwargs)
        else:
            model = model_or_objective
            if isinstance(model, nn.Module):
                if "params" in kwargs:
                    raise TypeError(f"{api}: expected the parameters to come from rows= and cols=, got params= "
                                    f"as well. Drop params=.")
                all_names = [n for n, _ in model.named_parameters()]
            else:
                params = kwargs.get("params")
                if not isinstance(params, dict) or not params:
                    raise TypeError(f"{api}: expected params= as the dict of all parameters of the plain-function "
                                    f"model, got {type(params).__name__}.")
                all_names = list(params)
            row_names = _group_names(api, "rows", rows, all_names, model)
            col_names = _group_names(api, "cols", cols, all_names, model)
            order = {n: i for i, n in enumerate(all_names)}
            union = sorted(set(row_names) | set(col_names), key=order.__getitem__)
            chosen = {"params": union} if isinstance(model, nn.Module) else {"select": union}
            H = Hessian(model, loss, data, **chosen, **kwargs)
        super().__init__(H, row_names, col_names, api=api)
        self.hessian = H
        self.objective = H.objective
