r"""Loss landscapes along one or two directions: $\alpha \mapsto L(\theta + \alpha d)$ and
$(\alpha, \beta) \mapsto L(\theta + \alpha d_1 + \beta d_2)$ (curves, filled contours)."""

from __future__ import annotations

import numpy as np

from ._common import SEQUENTIAL, as_array, finish, named_series, new_axes, series_colors, set_title


def direction_label(index: int, eigenvalue=None, *, name: str = "eigenvector", digits: int = 3) -> str:
    r"""Axis label of a direction, e.g. ``direction_label(1, 3.21)`` → ``"eigenvector 1 (λ = 3.21)"``.

    Args:
        index: the direction's number as shown (1 = first).
        eigenvalue: its eigenvalue (a float or 0-d tensor), or None to omit.
        name: what the direction is (``"eigenvector"``, ``"random direction"``, …).
        digits: significant digits of the eigenvalue.
    """
    text = f"{name} {index}"
    if eigenvalue is not None:
        text += f" (λ = {float(eigenvalue):.{digits}g})"
    return text


def plot_landscape_1d(steps, values, *, xlabel: str | None = None, ylabel: str = "loss", labels=None,
                      logy: bool = False, ax=None, save=None, title=None):
    r"""Loss (or any quantity) along one direction: one curve per series.

    A dotted vertical line marks $\alpha = 0$ (the current parameters) when it is in range.

    Args:
        steps: ``[S]`` step sizes α.
        values: ``[S]`` values, or a dict name → ``[S]`` (e.g. one curve per eigenvector, or
            train vs test loss).
        xlabel: x-axis label (default ``"step size α"``; see :func:`direction_label`).
        ylabel: y-axis label.
        labels: legend labels (one per series; overrides dict keys).
        logy: log-scaled y axis (values must be > 0).
        ax, save, title: Axes to draw on (new figure when None); path to save to; title.

    Returns:
        The Axes; ``ax.lines[i]`` is series i (x = steps, y = values).

    Raises:
        ValueError: lengths differ, NaN/inf, non-positive values with ``logy``.

    Example:
        >>> plot_landscape_1d(alphas, {"λ₁": l1, "λ₂": l2}, xlabel="step along eigenvector")
    """
    api = "plot_landscape_1d"
    a = as_array(steps, api, "steps", ndim=1)
    series = named_series(values, api, "values", labels=labels)
    for name, v in series:
        if v.shape != a.shape:
            raise ValueError(f"{api}: expected {a.size} values (one per step), got {v.size}"
                             f"{'' if name is None else f' for {name!r}'}.")
        if logy and (v <= 0).any():
            raise ValueError(f"{api}: expected positive values for logy=True, got a minimum of {v.min():.3g}.")
    fig, ax = new_axes(ax)
    for (name, v), color in zip(series, series_colors(len(series))):
        ax.plot(a, v, color=color, lw=1.6, label=name if name is not None else "_nolegend_")
    if a.min() <= 0 <= a.max():
        ax.axvline(0.0, color="0.4", lw=0.8, ls=":", zorder=1)
    if logy:
        ax.set_yscale("log")
    ax.set_xlim(a.min(), a.max())
    ax.set_xlabel(xlabel or "step size $\\alpha$")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3, lw=0.5)
    if any(name is not None for name, _ in series):
        ax.legend(frameon=False, fontsize=8)
    set_title(ax, title, "Loss landscape (1-D)")
    finish(fig, save, api)
    return ax


def plot_landscape_2d(alphas, betas, values, *, xlabel: str | None = None, ylabel: str | None = None,
                      levels=20, log: bool = False, cmap=None, mark_minimum: bool = True,
                      ax=None, save=None, title=None):
    r"""Filled contours of a 2-D landscape with contour lines and the origin marked.

    ``values[i, j]`` is the value at $(\alpha_i, \beta_j)$; α runs along x, β along y.  The
    origin (current parameters) is a white star; the grid minimum a cross (``mark_minimum``).

    Args:
        alphas: ``[A]`` steps along the first direction (x).
        betas: ``[B]`` steps along the second direction (y).
        values: ``[A, B]``.
        xlabel, ylabel: axis labels (see :func:`direction_label`).
        levels: number of contour levels or their values.
        log: contour ``log10(values)`` (values must be > 0).
        cmap: colormap (default viridis).
        mark_minimum: mark the smallest grid value.
        ax, save, title: as in :func:`plot_landscape_1d`.

    Returns:
        The Axes; ``ax.collections`` holds the filled ContourSet (first) and the line ContourSet;
        their ``levels`` span the values (of ``log10(values)`` with ``log``).

    Raises:
        ValueError: ``values`` not ``[len(alphas), len(betas)]``, NaN/inf, non-positive with ``log``.

    Example:
        >>> ax = plot_landscape_2d(a, b, L, xlabel=direction_label(1, lam[0]), ylabel=direction_label(2, lam[1]))
    """
    api = "plot_landscape_2d"
    a = as_array(alphas, api, "alphas", ndim=1)
    b = as_array(betas, api, "betas", ndim=1)
    Z = as_array(values, api, "values", ndim=2)
    if Z.shape != (a.size, b.size):
        raise ValueError(f"{api}: expected values of shape ({a.size}, {b.size}) = (len(alphas), len(betas)), "
                         f"got {tuple(Z.shape)}.")
    if a.size < 2 or b.size < 2:
        raise ValueError(f"{api}: expected at least 2 alphas and 2 betas for contours, got {a.size} and {b.size}.")
    if log:
        if (Z <= 0).any():
            raise ValueError(f"{api}: expected positive values for log=True, got a minimum of {Z.min():.3g}.")
        Z = np.log10(Z)
    fig, ax = new_axes(ax, figsize=(5.6, 4.6))
    import matplotlib

    cm = matplotlib.colormaps[cmap] if isinstance(cmap, str) else (cmap or matplotlib.colormaps[SEQUENTIAL])
    filled = ax.contourf(a, b, Z.T, levels=levels, cmap=cm)
    ax.contour(a, b, Z.T, levels=filled.levels, colors="k", linewidths=0.4, alpha=0.55)
    fig.colorbar(filled, ax=ax, pad=0.02).set_label("$\\log_{10}$ loss" if log else "loss")
    if a.min() <= 0 <= a.max() and b.min() <= 0 <= b.max():
        ax.plot([0.0], [0.0], marker="*", ms=13, color="white", mec="k", mew=0.8, ls="none",
                label="origin", zorder=5)
    if mark_minimum:
        i, j = np.unravel_index(np.argmin(Z), Z.shape)
        ax.plot([a[i]], [b[j]], marker="X", ms=8, color="#D55E00", mec="white", mew=0.8, ls="none",
                label="grid minimum", zorder=5)
    ax.set_xlabel(xlabel or "step $\\alpha$ along direction 1")
    ax.set_ylabel(ylabel or "step $\\beta$ along direction 2")
    ax.legend(frameon=True, framealpha=0.85, fontsize=8, loc="upper right")
    set_title(ax, title, "Loss landscape (2-D)")
    finish(fig, save, api)
    return ax
