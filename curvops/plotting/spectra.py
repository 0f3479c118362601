r"""Spectra: signed eigenvalue plots, spectral densities, eigenvalue decay, spectra over training.

All functions take plain tensors/arrays (or :class:`curvops.linalg.density.DensityResult`),
draw on ``ax`` (a new figure when None), save to ``save`` when given and return the Axes.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from matplotlib import transforms
from matplotlib.lines import Line2D

from ._common import (
    NEGATIVE, NEUTRAL, POSITIVE, SEQUENTIAL, apply_yscale, as_array, finish, named_series, new_axes,
    series_colors, set_title,
)

#: gid of the rug of Ritz nodes in :func:`plot_density`
RUG_GID = "curvops-rug"


def _sorted(values: np.ndarray, signed: bool) -> np.ndarray:
    """Descending by value (signed) or by magnitude (unsigned)."""
    key = values if signed else np.abs(values)
    return values[np.argsort(-key, kind="stable")]


def _value_label(signed: bool, scale: str) -> str:
    text = "eigenvalue $\\lambda_i$" if signed else "$|\\lambda_i|$"
    return text + (f"  ({scale})" if scale != "linear" else "")


def plot_eigenvalues(eigenvalues, *, signed: bool = True, labels=None, sort: bool = True,
                     yscale: str | None = "auto", ax=None, save=None, title=None):
    r"""Eigenvalues against their index, positive and negative ones marked differently.

    Each series is sorted in decreasing order ($\lambda_1 \ge \lambda_2 \ge \dots$; by
    $|\lambda|$ when ``signed=False``) and drawn as a line through its points.  With one series the
    markers are coloured by sign (blue ≥ 0, vermillion < 0); with several (a dict, e.g. Hessian
    vs GGN) each series has its own colour and negative eigenvalues get hollow down-triangles.
    The y scale is ``symlog`` when the values have both signs and span more than two decades,
    ``log`` when all are positive and span more than two decades, linear otherwise.

    Args:
        eigenvalues: ``[k]`` tensor/array, or a dict name → ``[k]`` (lengths may differ).
        signed: plot λ (True) or |λ| (False, colours still give the sign).
        labels: legend labels: one string, or one per series (overrides dict keys).
        sort: sort each series (False keeps the given order).
        yscale: ``"auto"`` (above), ``"linear"``, ``"log"`` or ``"symlog"``.
        ax, save, title: Axes to draw on (new figure when None); path to save to; title
            (None: a default, ``""``: none).

    Returns:
        The Axes; ``ax.lines[i]`` is series i (y data = the sorted values, index 1…k on x).

    Raises:
        TypeError: eigenvalues not a tensor/array/dict.
        ValueError: not 1-D, empty, NaN/inf, or a wrong number of labels.

    Example:
        >>> res = curvops.eigsh(curvops.Hessian(model, "mse", (X, y)), k=20, which="BE")
        >>> plot_eigenvalues({"Hessian": res.eigenvalues, "GGN": ggn.eigenvalues}, save="eig.png")
    """
    api = "plot_eigenvalues"
    series = named_series(eigenvalues, api, "eigenvalues", labels=labels)
    fig, ax = new_axes(ax)
    many = len(series) > 1
    colors = series_colors(len(series))
    plotted = []
    for (label, lam), color in zip(series, colors):
        lam = _sorted(lam, signed) if sort else lam
        y = lam if signed else np.abs(lam)
        idx = np.arange(1, lam.size + 1)
        neg = lam < 0
        line_color = color if many else NEUTRAL
        ax.plot(idx, y, color=line_color, lw=1.0, alpha=0.8 if many else 0.5, zorder=2,
                label=label if many else "_nolegend_")
        if many:
            ax.scatter(idx[~neg], y[~neg], s=18, marker="o", color=color, zorder=3)
            ax.scatter(idx[neg], y[neg], s=26, marker="v", facecolors="none", edgecolors=color, zorder=3)
        else:
            ax.scatter(idx[~neg], y[~neg], s=18, color=POSITIVE, zorder=3, label=f"λ ≥ 0 ({int((~neg).sum())})")
            if neg.any():
                ax.scatter(idx[neg], y[neg], s=18, color=NEGATIVE, marker="s", zorder=3,
                           label=f"λ < 0 ({int(neg.sum())})")
        plotted.append(y)
    values = np.concatenate(plotted)
    scale = apply_yscale(ax, values, yscale, api)
    if signed and (values < 0).any() and (values > 0).any():
        ax.axhline(0.0, color="0.5", lw=0.6, ls="--", zorder=1)
    if many:
        handles, names = ax.get_legend_handles_labels()
        if any((s[1] < 0).any() for s in series):
            handles += [Line2D([], [], ls="none", marker="o", color="0.3"),
                        Line2D([], [], ls="none", marker="v", markerfacecolor="none", color="0.3")]
            names += ["λ ≥ 0", "λ < 0"]
        ax.legend(handles, names, frameon=False, fontsize=8)
    else:
        ax.legend(frameon=False, fontsize=8, title=series[0][0])
    ax.set_xlabel("index i (sorted, largest first)" if sort else "index i")
    ax.set_ylabel(_value_label(signed, scale))
    ax.grid(True, which="major", alpha=0.3, lw=0.5)
    set_title(ax, title, "Eigenvalues")
    finish(fig, save, api)
    return ax


def _density_parts(item, density, nodes, api: str):
    """(grid, density, nodes or None, weights or None) from a result or arrays."""
    if hasattr(item, "grid") and hasattr(item, "density"):
        if density is not None:
            raise ValueError(f"{api}: expected no density argument with a DensityResult, got one.")
        g = as_array(item.grid, api, "grid", ndim=1)
        d = as_array(item.density, api, "density", ndim=1)
        n = getattr(item, "nodes", None) if nodes is None else nodes
        w = getattr(item, "weights", None) if nodes is None else None
    elif isinstance(item, tuple) and len(item) == 2 and density is None:
        g = as_array(item[0], api, "grid", ndim=1)
        d = as_array(item[1], api, "density", ndim=1)
        n, w = nodes, None
    else:
        if density is None:
            raise TypeError(f"{api}: expected a DensityResult, or grid and density arrays, got "
                            f"{type(item).__name__} and no density. Pass plot_density(grid, density).")
        g = as_array(item, api, "grid", ndim=1)
        d = as_array(density, api, "density", ndim=1)
        n, w = nodes, None
    if g.shape != d.shape:
        raise ValueError(f"{api}: expected grid and density of the same length, got {g.size} and {d.size}.")
    if (d < 0).any():
        raise ValueError(f"{api}: expected a non-negative density, got a minimum of {d.min():.3g}.")
    if n is not None:
        n = as_array(n, api, "nodes", ndim=(1, 2)).ravel()
        if w is not None:
            w = as_array(w, api, "weights", ndim=(1, 2)).ravel()
            n = n[w > 1e-12] if w.shape == n.shape else n
    return g, d, n


def plot_density(result_or_grid, density=None, *, nodes=None, rug: bool = True, log: bool = False,
                 labels=None, ax=None, save=None, title=None):
    r"""A spectral density $\phi(t)$ with the quadrature (Ritz) nodes as a rug.

    Accepts a :class:`~curvops.linalg.density.DensityResult` (its ``grid``, ``density``, and
    ``nodes`` with non-negligible Gauss ``weights`` for the rug), plain ``grid`` and ``density``
    arrays (plus optional ``nodes``), or a dict name → result / ``(grid, density)`` to compare
    densities (e.g. Hessian vs GGN) on one Axes.

    Args:
        result_or_grid: a DensityResult, a ``[G]`` grid, or a dict of results.
        density: ``[G]`` density values when the first argument is a grid.
        nodes: Ritz nodes for the rug when plain arrays are given (any shape, flattened).
        rug: draw the nodes as ticks at the bottom of the Axes.
        log: log-scaled density axis (the bottom is set 10 decades below the peak).
        labels: legend labels (one per density; overrides dict keys).
        ax, save, title: as in :func:`plot_eigenvalues`.

    Returns:
        The Axes; ``ax.lines[0]`` is the (first) density curve.  Rug lines have gid ``"curvops-rug"``.

    Raises:
        TypeError: a grid without a density, or wrong kinds.
        ValueError: lengths differ, negative density values, NaN/inf.

    Example:
        >>> plot_density(curvops.spectral_density(H, num_probes=4, num_steps=60), log=True)
    """
    api = "plot_density"
    if isinstance(result_or_grid, Mapping):
        if density is not None:
            raise ValueError(f"{api}: expected no density argument with a dict of densities, got one.")
        items = [(str(k), _density_parts(v, None, None, api)) for k, v in result_or_grid.items()]
        if not items:
            raise ValueError(f"{api}: expected a non-empty dict of densities, got an empty dict.")
    else:
        items = [(None, _density_parts(result_or_grid, density, nodes, api))]
    if labels is not None:
        labels = [labels] if isinstance(labels, str) else list(labels)
        if len(labels) != len(items):
            raise ValueError(f"{api}: expected {len(items)} labels (one per density), got {len(labels)}.")
        items = [(str(lab), parts) for lab, (_, parts) in zip(labels, items)]
    fig, ax = new_axes(ax)
    colors = series_colors(len(items))
    peak = max(float(parts[1].max()) for _, parts in items)
    floor = peak * 1e-10 if peak > 0 else 1e-300
    rug_trans = transforms.blended_transform_factory(ax.transData, ax.transAxes)
    for (label, (g, d, n)), color in zip(items, colors):
        ax.plot(g, d, color=color, lw=1.4, label=label if label is not None else "_nolegend_", zorder=3)
        ax.fill_between(g, np.maximum(d, floor) if log else d, floor if log else 0.0,
                        color=color, alpha=0.18, lw=0, zorder=2)
    if rug:
        for i, ((_, (_, _, n)), color) in enumerate(zip(items, colors)):
            if n is None or n.size == 0:
                continue
            line, = ax.plot(n, np.full(n.shape, 0.03 + 0.045 * i), ls="none", marker="|", ms=9, mew=0.8,
                            color=color, alpha=0.55, transform=rug_trans, clip_on=False, zorder=4)
            line.set_gid(RUG_GID)
    if log:
        ax.set_yscale("log")
        ax.set_ylim(bottom=floor, top=peak * 3.0 if peak > 0 else None)
    else:
        ax.set_ylim(bottom=0.0)
    lo = min(float(parts[0].min()) for _, parts in items)
    hi = max(float(parts[0].max()) for _, parts in items)
    ax.set_xlim(lo, hi)
    if lo < 0 < hi:
        ax.axvline(0.0, color="0.5", lw=0.6, ls="--", zorder=1)
    if any(label is not None for label, _ in items):
        ax.legend(frameon=False, fontsize=8)
    ax.set_xlabel("eigenvalue $t$")
    ax.set_ylabel("spectral density $\\phi(t)$" + (" (log)" if log else ""))
    ax.grid(True, alpha=0.3, lw=0.5)
    set_title(ax, title, "Spectral density")
    finish(fig, save, api)
    return ax


def plot_eigenvalue_decay(eigenvalues, *, lower=None, upper=None, normalize: bool = False, label=None,
                          ax=None, save=None, title=None):
    r"""Eigenvalues in decreasing order on a log scale, with an optional (bootstrap) band.

    The active-subspace decay plot: $\lambda_i$ (or $\lambda_i/\lambda_1$ with ``normalize``)
    against $i$.  ``lower``/``upper`` are per-rank bounds (e.g. bootstrap percentiles of the
    i-th largest eigenvalue); each is sorted in decreasing order like the eigenvalues and drawn
    with ``fill_between``.

    **Non-positive values are masked, not raised on**: a log axis cannot show them, so
    eigenvalues (and band bounds) ≤ 0 become gaps (NaN) and the legend says how many were
    hidden.  Only when *no* eigenvalue is positive is a ValueError raised.

    Args:
        eigenvalues: ``[k]`` tensor/array (any order).
        lower, upper: ``[k]`` band bounds (both or neither).
        normalize: divide everything by the largest eigenvalue.
        label: legend label of the curve.
        ax, save, title: as in :func:`plot_eigenvalues`.

    Returns:
        The Axes; ``ax.lines[0]`` is the decay curve (x = 1…k, y = sorted values with NaN where
        ≤ 0); ``ax.collections[0]`` is the band when given.

    Raises:
        ValueError: only one of lower/upper, lengths differ, no positive eigenvalue, NaN/inf.

    Example:
        >>> plot_eigenvalue_decay(lam, lower=lam_lo, upper=lam_hi, save="decay.png")
    """
    api = "plot_eigenvalue_decay"
    lam = -np.sort(-as_array(eigenvalues, api, "eigenvalues", ndim=1))
    if (lower is None) != (upper is None):
        raise ValueError(f"{api}: expected both lower and upper (a band) or neither, got only "
                         f"{'lower' if upper is None else 'upper'}.")
    if not (lam > 0).any():
        raise ValueError(f"{api}: expected at least one positive eigenvalue for a log scale, got a "
                         f"maximum of {lam.max():.3g}. Plot with plot_eigenvalues (symlog) instead.")
    band = None
    if lower is not None:
        lo = -np.sort(-as_array(lower, api, "lower", ndim=1))
        hi = -np.sort(-as_array(upper, api, "upper", ndim=1))
        if lo.shape != lam.shape or hi.shape != lam.shape:
            raise ValueError(f"{api}: expected lower and upper of length {lam.size} (like eigenvalues), "
                             f"got {lo.size} and {hi.size}.")
        band = (lo, hi)
    scale = lam[0] if normalize else 1.0

    def masked(v):
        return np.where(v > 0, v / scale, np.nan)

    fig, ax = new_axes(ax)
    idx = np.arange(1, lam.size + 1)
    hidden = int((lam <= 0).sum())
    text = label or ("$\\lambda_i/\\lambda_1$" if normalize else "$\\lambda_i$")
    if hidden:
        text += f" ({hidden} ≤ 0 not shown)"
    ax.plot(idx, masked(lam), color=series_colors(1)[0], lw=1.5, marker="o" if lam.size <= 60 else None,
            ms=3, label=text, zorder=3)
    if band is not None:
        ax.fill_between(idx, masked(band[0]), masked(band[1]), color=series_colors(1)[0], alpha=0.22, lw=0,
                        label="band", zorder=2)
    ax.set_yscale("log")
    ax.set_xlim(0.5, lam.size + 0.5)
    ax.set_xlabel("index i (largest first)")
    ax.set_ylabel("$\\lambda_i / \\lambda_1$" if normalize else "eigenvalue $\\lambda_i$")
    ax.grid(True, which="both", alpha=0.25, lw=0.5)
    ax.legend(frameon=False, fontsize=8)
    set_title(ax, title, "Eigenvalue decay")
    finish(fig, save, api)
    return ax


def plot_spectrum_evolution(steps, eigenvalues, *, signed: bool = True, sort: bool = True,
                            yscale: str | None = "auto", xlabel: str = "step", ax=None, save=None, title=None):
    r"""Eigenvalues over checkpoints: one line per eigenvalue rank.

    Row t of ``eigenvalues`` holds the k eigenvalues at ``steps[t]``; rows are sorted in
    decreasing order (by |λ| when ``signed=False``) so line i follows the i-th largest
    eigenvalue.  One series: lines coloured by rank (viridis, λ₁ darkest).  A dict of series
    (e.g. Hessian vs GGN, or several runs): one colour per series.  Scale as in
    :func:`plot_eigenvalues` (``symlog`` for signed values spanning decades).

    Args:
        steps: ``[T]`` checkpoint steps (x axis).
        eigenvalues: ``[T, k]`` (or ``[T]`` for one eigenvalue), or a dict name → ``[T, k]``.
        signed: plot λ (True) or |λ| (False).
        sort: sort each row (False keeps the columns as given).
        yscale, xlabel: y scale (``"auto"``, ``"linear"``, ``"log"``, ``"symlog"``); x-axis label.
        ax, save, title: as in :func:`plot_eigenvalues`.

    Returns:
        The Axes; for a single series ``ax.lines[i]`` is rank i (y = column i of the sorted rows).

    Raises:
        ValueError: the number of rows differs from ``len(steps)``, wrong dimensions, NaN/inf.

    Example:
        >>> plot_spectrum_evolution(checkpoints, top_eigs, save="evolution.png")
    """
    api = "plot_spectrum_evolution"
    t = as_array(steps, api, "steps", ndim=1)
    series = named_series(eigenvalues, api, "eigenvalues", ndim=(1, 2))
    fig, ax = new_axes(ax)
    many = len(series) > 1
    colors = series_colors(len(series))
    plotted = []
    for (name, lam), color in zip(series, colors):
        lam = lam[:, None] if lam.ndim == 1 else lam
        if lam.shape[0] != t.size:
            raise ValueError(f"{api}: expected {t.size} rows of eigenvalues (one per step), got shape "
                             f"{tuple(lam.shape)}{'' if name is None else f' for {name!r}'}.")
        if sort:
            lam = np.stack([_sorted(row, signed) for row in lam])
        y = lam if signed else np.abs(lam)
        k = y.shape[1]
        if many:
            cols = [color] * k
        else:
            import matplotlib

            cmap = matplotlib.colormaps[SEQUENTIAL]
            cols = [cmap(v) for v in np.linspace(0.0, 0.85, k)]
        for i in range(k):
            if many:
                lab = name if i == 0 else "_nolegend_"
            elif k <= 6 or i in (0, k - 1):
                lab = f"$\\lambda_{{{i + 1}}}$"
            else:
                lab = "_nolegend_"
            ax.plot(t, y[:, i], color=cols[i], lw=1.3 if i == 0 else 1.0,
                    alpha=(1.0 - 0.5 * i / max(k - 1, 1)) if many else 0.95, marker="o" if t.size <= 30 else None,
                    ms=2.5, label=lab)
        plotted.append(y.ravel())
    values = np.concatenate(plotted)
    scale = apply_yscale(ax, values, yscale, api)
    if signed and (values < 0).any() and (values > 0).any():
        ax.axhline(0.0, color="0.5", lw=0.6, ls="--", zorder=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(_value_label(signed, scale))
    ax.grid(True, alpha=0.3, lw=0.5)
    ax.legend(frameon=False, fontsize=8, ncol=1)
    set_title(ax, title, "Spectrum over training")
    finish(fig, save, api)
    return ax
