r"""Matrix pictures: heatmaps of small matrices/operators, eigenvector magnitudes, layer shares.

Parameter-space axes can carry the tensor structure: pass a :class:`curvops.ParamLayout`
(``layout=``) or ``boundaries=[(start, label), ...]``; lines are drawn at the cumulative sizes
(gid ``"curvops-boundary"``) and the blocks are labelled with the tensor names.
"""

from __future__ import annotations

import numpy as np
import torch
from matplotlib import colors as mcolors

from ._common import (
    DIVERGING, SEQUENTIAL, as_array, block_edges, draw_blocks, finish, index_labels, is_sequence_of_str,
    new_axes, series_colors, set_title,
)

#: largest side of an operator that :func:`plot_heatmap` densifies by default
MAX_HEATMAP_SIZE = 4096


def _matrix(matrix, max_size: int, api: str) -> tuple[np.ndarray, object, object]:
    """(dense float64 array, row layout, column layout); operators are densified after a size check
    and bring their own layouts (``range`` for the rows, ``domain`` for the columns)."""
    rows = cols = None
    if not isinstance(matrix, (torch.Tensor, np.ndarray, list)) and hasattr(matrix, "to_dense") \
            and hasattr(matrix, "shape"):
        M, N = (int(s) for s in matrix.shape)
        if max(M, N) > max_size:
            raise ValueError(f"{api}: expected an operator of at most {max_size}×{max_size} to densify, got "
                             f"{M}×{N}. Plot a submatrix (curvops.submatrix / restrict) or pass a larger "
                             f"max_size if you really want {M * N:,} entries.")
        rows, cols = getattr(matrix, "range", None), getattr(matrix, "domain", None)
        try:
            dense = matrix.to_dense(max_entries=max(M * N, 1))
        except TypeError:
            dense = matrix.to_dense()
        matrix = dense
    return as_array(matrix, api, "matrix", ndim=2), rows, cols


def plot_heatmap(matrix, *, layout=None, boundaries=None, labels=None, log: bool = False,
                 symmetric: bool = True, cmap=None, colorbar: bool = True, max_size: int = MAX_HEATMAP_SIZE,
                 ax=None, save=None, title=None):
    r"""``imshow`` of a small matrix or operator, with parameter-tensor blocks marked.

    Signed data (any entry < 0) with ``symmetric=True`` use a diverging colormap centred at 0
    with limits $\pm\max|A_{ij}|$; otherwise a sequential colormap over the data range.
    ``log=True`` keeps the image data equal to the matrix and changes only the colour scale:
    symmetric-log for signed data (linear below $10^{-4}\max|A|$), log for non-negative data
    (zeros shown grey).  Pixel (i, j) covers $[j, j+1] \times [i, i+1]$, so block boundaries
    sit exactly at the cumulative tensor sizes.

    **Cost**: an operator is densified with ``A.to_dense()`` (N products); sides larger than
    ``max_size`` are refused before any product.

    Args:
        matrix: ``[M, N]`` tensor/array, or a :class:`curvops.Operator` (densified).
        layout: a :class:`curvops.ParamLayout` for the axes of length ``layout.size`` (default for
            an operator: its own parameter layouts, ``A.range`` for rows and ``A.domain`` for columns).
        boundaries: alternatively ``[(start, label), ...]`` block starts (increasing) and names.
        labels: one tick label per row/column for small matrices (e.g. sample or class names).
        log: logarithmic colour scale (above).
        symmetric: diverging colours centred at 0 for signed data.
        cmap: colormap name or object (default ``RdBu_r`` for signed, ``viridis`` otherwise).
        colorbar: draw a colour bar.
        max_size: the largest operator side densified.
        ax, save, title: Axes to draw on (new figure when None); path to save to; title.

    Returns:
        The Axes; ``ax.images[0].get_array()`` equals the matrix.

    Raises:
        TypeError: not a matrix/operator; a layout without ``names``/``numels``.
        ValueError: an operator above ``max_size``; a layout/labels that fit neither axis; not 2-D.

    Example:
        >>> H = curvops.Hessian(model, "mse", (X, y))
        >>> plot_heatmap(H, layout=H.layout, save="hessian.png")
    """
    api = "plot_heatmap"
    name = "Matrix" if isinstance(matrix, (torch.Tensor, np.ndarray, list)) else type(matrix).__name__
    A, row_layout, col_layout = _matrix(matrix, max_size, api)
    M, N = A.shape
    signed = bool((A < 0).any())
    diverging = signed and symmetric
    top = float(np.abs(A).max())
    if log:
        if signed:
            lim = top if top > 0 else 1.0
            norm = mcolors.SymLogNorm(linthresh=1e-4 * lim, linscale=0.5,
                                      vmin=-lim if diverging else float(A.min()),
                                      vmax=lim if diverging else float(A.max()))
        else:
            positive = A[A > 0]
            vmin = max(float(positive.min()), top * 1e-12) if positive.size else 1e-12
            norm = mcolors.LogNorm(vmin=vmin, vmax=max(top, vmin * 10))
    elif diverging:
        lim = top if top > 0 else 1.0
        norm = mcolors.Normalize(vmin=-lim, vmax=lim)
    else:
        norm = mcolors.Normalize(vmin=float(A.min()), vmax=float(A.max()) if A.max() > A.min() else float(A.min()) + 1)
    import matplotlib

    cm = matplotlib.colormaps[cmap] if isinstance(cmap, str) else cmap
    cm = cm or matplotlib.colormaps[DIVERGING if diverging else SEQUENTIAL]
    cm = cm.with_extremes(bad="0.85")
    side = 5.2 if M == N else 6.0
    fig, ax = new_axes(ax, figsize=(side + (0.9 if colorbar else 0), side * min(max(M / N, 0.4), 2.0)))
    data = np.ma.masked_less_equal(A, 0) if (log and not signed) else A
    im = ax.imshow(data, cmap=cm, norm=norm, extent=(0, N, M, 0), interpolation="nearest",
                   aspect="equal" if 0.2 < M / N < 5 else "auto")
    if colorbar:
        cb = fig.colorbar(im, ax=ax, shrink=0.85, pad=0.02)
        cb.set_label("entry" + (" (log scale)" if log else ""))
    blocks_on = []
    if layout is None and boundaries is None:  # an operator's own parameter layouts
        for axis, n, own in (("y", M, row_layout), ("x", N, col_layout)):
            if own is not None and getattr(own, "size", None) == n:
                draw_blocks(ax, *block_edges(own, None, n, api), axis)
                blocks_on.append(axis)
    for axis, n in _block_axes(layout, boundaries, M, N, api):
        draw_blocks(ax, *block_edges(layout, boundaries, n, api), axis)
        blocks_on.append(axis)
    if labels is not None:
        if is_sequence_of_str(labels) or not isinstance(labels, tuple):
            row_labels = col_labels = list(labels)
        else:
            row_labels, col_labels = labels
        placed = False
        for axis, n, labs in (("y", M, row_labels), ("x", N, col_labels)):
            if axis not in blocks_on and labs is not None and len(labs) == n:
                index_labels(ax, labs, n, axis, api)
                placed = True
        if not placed:
            want = f"{M}" if M == N else f"{M} or {N}"
            raise ValueError(f"{api}: expected {want} labels (one per row/column), got {len(row_labels)}.")
    if not blocks_on:
        ax.set_xlabel("column j")
        ax.set_ylabel("row i")
    set_title(ax, title, f"{name} ({M}×{N})")
    finish(fig, save, api)
    return ax


def _block_axes(layout, boundaries, M: int, N: int, api: str) -> list[tuple[str, int]]:
    """The axes (``"y"`` rows, ``"x"`` columns) that the layout/boundaries fit."""
    if layout is None and boundaries is None:
        return []
    if layout is not None and boundaries is None and hasattr(layout, "numels"):
        size = sum(int(k) for k in layout.numels)
        fit = [(a, n) for a, n in (("y", M), ("x", N)) if n == size]
    elif layout is None:
        last = max((float(p) for p, _ in boundaries), default=-1.0)
        fit = [(a, n) for a, n in (("y", M), ("x", N)) if last < n]
        fit = fit if M == N else fit[-1:]
    else:
        fit = []
    if not fit:
        block_edges(layout, boundaries, M, api)  # raises the explanatory error
        block_edges(layout, boundaries, N, api)
    return fit


def _eigenvectors(eigenvectors, api: str) -> np.ndarray:
    """``[P, k]`` array; a result object with ``eigenvectors``/``eigenvalues`` is sorted descending."""
    if hasattr(eigenvectors, "eigenvectors"):
        V = eigenvectors.eigenvectors
        if V is None:
            raise ValueError(f"{api}: expected a result with eigenvectors, got eigenvectors=None. "
                             f"Compute them (e.g. eigsh(..., return_eigenvectors=True)).")
        V = as_array(V, api, "eigenvectors", ndim=2)
        lam = getattr(eigenvectors, "eigenvalues", None)
        if lam is not None:
            V = V[:, np.argsort(-as_array(lam, api, "eigenvalues", ndim=1), kind="stable")]
        return V
    V = as_array(eigenvectors, api, "eigenvectors", ndim=(1, 2))
    return V[:, None] if V.ndim == 1 else V


def plot_eigenvector_heatmap(eigenvectors, *, layout=None, boundaries=None, floor: float = 1e-8,
                             cmap=None, colorbar: bool = True, ax=None, save=None, title=None):
    r"""Image of $\log_{10}|V_{pj}|$: x = eigenvector index j, y = parameter index p.

    Shows which parameters (and, with ``layout``/``boundaries``, which tensors) each
    eigenvector lives on — the active-subspace eigenvector figure.  Entries below ``floor``
    are shown at ``log10(floor)``; the colours span the data's range.  Columns are plotted in
    the given order; a result object
    with ``eigenvectors`` and ``eigenvalues`` (e.g. an ``EighResult``) is reordered largest
    eigenvalue first.

    Args:
        eigenvectors: ``[P, k]`` tensor/array (columns = eigenvectors), or a result with
            ``.eigenvectors`` (and ``.eigenvalues``).
        layout: :class:`curvops.ParamLayout` of the P parameters, or
        boundaries: ``[(start, label), ...]``.
        floor: smallest magnitude shown (> 0).
        cmap, colorbar: colormap (default viridis) and whether to draw a colour bar.
        ax, save, title: as in :func:`plot_heatmap`.

    Returns:
        The Axes; ``ax.images[0].get_array()`` equals ``log10(max(|V|, floor))``; pixel row p
        covers ``[p, p+1]`` so boundaries are at the cumulative tensor sizes.

    Raises:
        ValueError: ``floor`` ≤ 0, a layout of another size, NaN/inf.

    Example:
        >>> res = curvops.eigsh(C, k=50)
        >>> plot_eigenvector_heatmap(res, layout=C.layout, save="eigenvectors.png")
    """
    api = "plot_eigenvector_heatmap"
    if not (isinstance(floor, (int, float)) and floor > 0):
        raise ValueError(f"{api}: expected floor > 0 (log10 of it is the colour minimum), got {floor!r}.")
    V = _eigenvectors(eigenvectors, api)
    P, k = V.shape
    blocks = block_edges(layout, boundaries, P, api)
    image = np.log10(np.maximum(np.abs(V), floor))
    fig, ax = new_axes(ax, figsize=(5.5 + 0.02 * min(k, 100), 6.0))
    import matplotlib

    cm = matplotlib.colormaps[cmap] if isinstance(cmap, str) else (cmap or matplotlib.colormaps[SEQUENTIAL])
    im = ax.imshow(image, cmap=cm, extent=(0.5, k + 0.5, P, 0), aspect="auto", interpolation="nearest",
                   vmin=float(image.min()), vmax=max(float(image.max()), float(image.min()) + 1e-12))
    if colorbar:
        fig.colorbar(im, ax=ax, shrink=0.9, pad=0.02).set_label("$\\log_{10}|v_{pj}|$")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ordered = hasattr(eigenvectors, "eigenvalues")
    ax.set_xlabel("eigenvector index j" + (" (largest eigenvalue first)" if ordered else ""))
    if blocks is not None:
        draw_blocks(ax, *blocks, "y")
        ax.set_ylabel("parameter (by tensor)")
    else:
        ax.set_ylabel("parameter index p")
    set_title(ax, title, "Eigenvector magnitudes")
    finish(fig, save, api)
    return ax


def plot_layer_sensitivity(fractions, names, *, kind: str = "bars", ax=None, save=None, title=None):
    r"""Share of each eigenvector's squared norm per parameter tensor.

    ``fractions[t, j]`` $= \sum_{p \in \text{tensor } t} V_{pj}^2 / \sum_p V_{pj}^2$ — for
    unit eigenvectors the columns sum to 1.  ``kind="bars"``: one stacked bar per eigenvector;
    ``kind="heatmap"``: an image with tensors as rows.

    Args:
        fractions: ``[num_tensors, k]`` non-negative shares (columns need not sum to 1, e.g. for a
            subset of tensors).
        names: ``num_tensors`` tensor names (e.g. ``layout.names``), or a ParamLayout.
        kind: ``"bars"`` or ``"heatmap"``.
        ax, save, title: as in :func:`plot_heatmap`.

    Returns:
        The Axes; for bars ``ax.containers[t]`` holds tensor t's bars (heights = ``fractions[t]``,
        bottoms = the cumulative sum of the rows before it).

    Raises:
        ValueError: ``len(names) != num_tensors``, negative shares, unknown ``kind``.

    Example:
        >>> shares = torch.stack([(V[a:b] ** 2).sum(0) for a, b in layout.offsets().values()])
        >>> plot_layer_sensitivity(shares, layout.names)
    """
    api = "plot_layer_sensitivity"
    F = as_array(fractions, api, "fractions", ndim=(1, 2))
    F = F[:, None] if F.ndim == 1 else F
    if hasattr(names, "names") and hasattr(names, "numels"):
        names = names.names
    names = [str(n) for n in names]
    T, k = F.shape
    if len(names) != T:
        raise ValueError(f"{api}: expected {T} names (one per row of fractions), got {len(names)}.")
    if (F < 0).any():
        raise ValueError(f"{api}: expected non-negative shares, got a minimum of {F.min():.3g}.")
    if kind not in ("bars", "heatmap"):
        raise ValueError(f"{api}: expected kind 'bars' or 'heatmap', got {kind!r}.")
    fig, ax = new_axes(ax, figsize=(max(5.0, 3.5 + 0.18 * k), 4.0 if kind == "bars" else max(3.0, 0.3 * T + 1.5)))
    idx = np.arange(1, k + 1)
    if kind == "bars":
        bottom = np.zeros(k)
        for t, (name, color) in enumerate(zip(names, series_colors(T))):
            ax.bar(idx, F[t], bottom=bottom, color=color, width=0.8, label=name, edgecolor="white", lw=0.3)
            bottom = bottom + F[t]
        ax.set_xlim(0.4, k + 0.6)
        ax.set_ylim(0.0, max(1.0, float(bottom.max())) * 1.02)
        ax.set_ylabel("share of $\\|v_j\\|^2$")
        handles, labels = ax.get_legend_handles_labels()  # listed top to bottom, like the stack
        ax.legend(handles[::-1], labels[::-1], frameon=False, fontsize=8, loc="upper left",
                  bbox_to_anchor=(1.01, 1.0), title="tensor")
        ax.grid(True, axis="y", alpha=0.3, lw=0.5)
    else:
        import matplotlib

        im = ax.imshow(F, cmap=matplotlib.colormaps[SEQUENTIAL], aspect="auto", interpolation="nearest",
                       extent=(0.5, k + 0.5, T, 0), vmin=0.0, vmax=max(1.0, float(F.max())))
        ax.set_yticks(np.arange(T) + 0.5, names, fontsize=8)
        fig.colorbar(im, ax=ax, pad=0.02).set_label("share of $\\|v_j\\|^2$")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("eigenvector index j")
    set_title(ax, title, "Where the top eigenvectors live")
    finish(fig, save, api)
    return ax
