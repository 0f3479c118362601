"""Shared plumbing for the plots: axes creation, saving, input conversion, colours, block labels.

Every plot draws on the Axes it is given (or on a new figure when ``ax`` is None), never calls
``plt.show()``, never changes ``rcParams`` and never closes a figure.  ``matplotlib.pyplot`` is
imported only when a new figure is created.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib import transforms

#: Okabe & Ito (2008) colour-blind-safe palette (black omitted): blue, vermillion, bluish green,
#: orange, reddish purple, sky blue, yellow, grey.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#E69F00", "#CC79A7", "#56B4E9", "#F0E442", "#7F7F7F")
POSITIVE = "#0072B2"
NEGATIVE = "#D55E00"
NEUTRAL = "#4D4D4D"
#: diverging (signed data, centred at 0) and sequential colormaps; both are colour-blind safe
DIVERGING = "RdBu_r"
SEQUENTIAL = "viridis"
#: dots per inch of saved figures
DPI = 120
#: gid of the lines that mark parameter-tensor boundaries (tests and users can find them)
BOUNDARY_GID = "curvops-boundary"


def new_axes(ax, figsize: tuple[float, float] = (6.0, 4.0)):
    """``(fig, ax)``: the given Axes and its figure, or a new constrained-layout figure."""
    if ax is None:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=figsize, layout="constrained")
        return fig, ax
    if not hasattr(ax, "figure") or not hasattr(ax, "plot"):
        raise TypeError(f"plot: expected a matplotlib Axes for ax, got {type(ax).__name__}.")
    return ax.figure, ax


def finish(fig, save, api: str) -> None:
    """Save ``fig`` to ``save`` (a path; parent folders are created) when given."""
    if save is None:
        return
    if not isinstance(save, (str, Path)):
        raise TypeError(f"{api}: expected a file path for save, got {type(save).__name__}.")
    path = Path(save)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")


def as_array(x, api: str, name: str, *, ndim: int | tuple[int, ...] | None = None,
             finite: bool = True) -> np.ndarray:
    """Tensor / array / list → float64 numpy array with checks on the number of dimensions."""
    if isinstance(x, torch.Tensor):
        if x.is_sparse:
            x = x.to_dense()
        arr = x.detach().to("cpu", torch.float64).numpy()
    elif isinstance(x, (np.ndarray, list, tuple, float, int, np.floating, np.integer)):
        try:
            arr = np.asarray(x, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise TypeError(f"{api}: expected {name} as numbers, got {type(x).__name__} ({err}).") from None
    else:
        raise TypeError(f"{api}: expected {name} as a torch tensor or numpy array, got {type(x).__name__}.")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if arr.ndim not in allowed:
            want = " or ".join(f"{d}-D" for d in allowed)
            raise ValueError(f"{api}: expected {name} to be {want}, got shape {tuple(arr.shape)}.")
    if arr.size == 0:
        raise ValueError(f"{api}: expected a non-empty {name}, got shape {tuple(arr.shape)}.")
    if finite and not np.all(np.isfinite(arr)):
        raise ValueError(f"{api}: expected finite values in {name}, got {int((~np.isfinite(arr)).sum())} "
                         f"NaN/inf entries. Remove or replace them before plotting.")
    return arr


def named_series(values, api: str, name: str, *, ndim: int | tuple[int, ...] = 1,
                 labels=None) -> list[tuple[str | None, np.ndarray]]:
    """A tensor or a dict name → tensor as ``[(label, array), ...]``; ``labels`` override names."""
    if isinstance(values, Mapping):
        if not values:
            raise ValueError(f"{api}: expected a non-empty dict of {name}, got an empty dict.")
        items = [(str(k), as_array(v, api, f"{name}[{k!r}]", ndim=ndim)) for k, v in values.items()]
    else:
        items = [(None, as_array(values, api, name, ndim=ndim))]
    if labels is not None:
        if isinstance(labels, str):
            labels = [labels]
        labels = list(labels)
        if len(labels) != len(items):
            raise ValueError(f"{api}: expected {len(items)} labels (one per series), got {len(labels)}.")
        items = [(str(lab), arr) for lab, (_, arr) in zip(labels, items)]
    return items


def series_colors(count: int) -> list:
    """``count`` distinguishable colour-blind-safe colours (Okabe-Ito, then viridis samples)."""
    if count <= len(PALETTE):
        return list(PALETTE[:count])
    import matplotlib

    cmap = matplotlib.colormaps[SEQUENTIAL]
    return [cmap(t) for t in np.linspace(0.0, 0.92, count)]


def auto_yscale(values: np.ndarray, positive_only: bool = False) -> tuple[str, dict]:
    """Pick ``linear``, ``log`` or ``symlog`` (with its ``linthresh``) for the finite ``values``.

    ``log`` when every value is > 0 and they span more than two decades; ``symlog`` when values
    of both signs (or zeros) span more than two decades in magnitude; ``linear`` otherwise.
    ``linthresh`` is the power of ten at or below ``max(min |v| > 0, 1e-4 · max |v|)``.
    """
    v = values[np.isfinite(values)]
    mag = np.abs(v)
    nonzero = mag[mag > 0]
    if nonzero.size == 0:
        return "linear", {}
    hi, lo = float(nonzero.max()), float(nonzero.min())
    decades = hi / lo > 100.0
    if np.all(v > 0) or positive_only:
        return ("log", {}) if decades else ("linear", {})
    if not decades:
        return "linear", {}
    linthresh = 10.0 ** np.floor(np.log10(max(lo, 1e-4 * hi)))
    return "symlog", {"linthresh": float(linthresh), "linscale": 0.5}


def apply_yscale(ax, values: np.ndarray, yscale: str | None, api: str, *, positive_only: bool = False) -> str:
    """Set the y scale: ``"auto"``/None picks with :func:`auto_yscale`; returns the scale used."""
    if yscale in (None, "auto"):
        scale, kw = auto_yscale(values, positive_only)
    elif yscale in ("linear", "log", "symlog"):
        scale, kw = yscale, {}
        if yscale == "symlog":
            _, kw = auto_yscale(values)
            kw = kw or {"linthresh": 1.0}
    else:
        raise ValueError(f"{api}: expected yscale 'auto', 'linear', 'log' or 'symlog', got {yscale!r}.")
    ax.set_yscale(scale, **kw)
    return scale


def set_title(ax, title, default: str) -> None:
    text = default if title is None else title
    if text:
        ax.set_title(text)


# ---- parameter-tensor boundaries --------------------------------------------------------------
def block_edges(layout, boundaries, n: int, api: str) -> tuple[np.ndarray, list[str]] | None:
    """Block starts/ends and names from a layout or a ``[(start, label), ...]`` list.

    Returns ``(edges [B + 1], names [B])`` with ``edges[0] = 0`` … ``edges[-1] = n``, or None.
    """
    if layout is not None and boundaries is not None:
        raise ValueError(f"{api}: expected either layout or boundaries, got both. Pass one of them.")
    if layout is not None:
        if not (hasattr(layout, "names") and hasattr(layout, "numels")):
            raise TypeError(f"{api}: expected a curvops.ParamLayout (with .names and .numels) for layout, "
                            f"got {type(layout).__name__}.")
        sizes = [int(k) for k in layout.numels]
        if sum(sizes) != n:
            raise ValueError(f"{api}: expected a layout of {n} parameters (the matrix size), got a layout "
                             f"of {sum(sizes)} ({len(sizes)} tensors). Pass the layout of the same parameters.")
        return np.concatenate([[0], np.cumsum(sizes)]).astype(float), [str(s) for s in layout.names]
    if boundaries is None:
        return None
    try:
        pairs = [(float(p), str(lab)) for p, lab in boundaries]
    except (TypeError, ValueError):
        raise TypeError(f"{api}: expected boundaries as a list of (position, label) pairs, "
                        f"got {boundaries!r}.") from None
    if not pairs:
        return None
    starts = [p for p, _ in pairs]
    if any(b <= a for a, b in zip(starts, starts[1:])) or starts[0] < 0 or starts[-1] >= n:
        raise ValueError(f"{api}: expected strictly increasing boundary positions in [0, {n}), got {starts}.")
    edges = np.array(([0.0] if starts[0] > 0 else []) + starts + [float(n)])
    names = ([""] if starts[0] > 0 else []) + [lab for _, lab in pairs]
    return edges, names


def spread(centres: np.ndarray, gap: float, lo: float, hi: float) -> np.ndarray:
    """Move sorted label positions apart to at least ``gap`` while staying near ``centres``."""
    pos = np.array(centres, dtype=float)
    if pos.size < 2 or gap <= 0:
        return pos
    gap = min(gap, (hi - lo) / pos.size)
    for i in range(1, pos.size):
        pos[i] = max(pos[i], pos[i - 1] + gap)
    pos[-1] = min(pos[-1], hi - gap / 2)
    for i in range(pos.size - 2, -1, -1):
        pos[i] = min(pos[i], pos[i + 1] - gap)
    pos[0] = max(pos[0], lo + gap / 2)
    for i in range(1, pos.size):
        pos[i] = max(pos[i], pos[i - 1] + gap)
    return pos


def draw_blocks(ax, edges: np.ndarray, names: list[str], axis: str, *, fontsize: float = 7.5) -> None:
    """Boundary lines at the inner ``edges`` and the block names as tick labels.

    Rows (``axis="y"``) are labelled on the left, columns (``"x"``) on top.  Labels that would
    overlap are moved apart; a short leader line then joins each label to its block's centre.
    """
    for e in edges[1:-1]:
        line = (ax.axhline if axis == "y" else ax.axvline)(e, color="k", lw=0.7, alpha=0.75)
        line.set_gid(BOUNDARY_GID)
    keep = [i for i, n in enumerate(names) if n]
    centres = (0.5 * (edges[:-1] + edges[1:]))[keep]
    labels = [names[i] for i in keep]
    lo, hi = float(edges[0]), float(edges[-1])
    bbox = ax.get_position()
    fig_w, fig_h = ax.figure.get_size_inches()
    length_pt = 72.0 * (bbox.height * fig_h if axis == "y" else bbox.width * fig_w)
    pos = spread(centres, (hi - lo) * 1.3 * fontsize / max(length_pt, 1.0), lo, hi)
    moved = bool(np.any(np.abs(pos - centres) > 1e-9 * max(hi - lo, 1.0)))
    lead = 7.0 if moved else 0.0  # points
    fig = ax.figure
    if axis == "y":
        ax.set_yticks(pos, labels, fontsize=fontsize)
        ax.tick_params(axis="y", length=0, pad=lead + 2.0)
        shifted = transforms.blended_transform_factory(
            ax.transAxes + transforms.ScaledTranslation(-lead / 72.0, 0.0, fig.dpi_scale_trans), ax.transData)
        base = transforms.blended_transform_factory(ax.transAxes, ax.transData)
        ends = [((0.0, c), (0.0, p)) for c, p in zip(centres, pos)]
    else:
        ax.xaxis.tick_top()
        ax.xaxis.set_label_position("top")
        ax.set_xticks(pos, labels, fontsize=fontsize, rotation=90)
        ax.tick_params(axis="x", length=0, pad=lead + 2.0)
        shifted = transforms.blended_transform_factory(
            ax.transData, ax.transAxes + transforms.ScaledTranslation(0.0, lead / 72.0, fig.dpi_scale_trans))
        base = transforms.blended_transform_factory(ax.transData, ax.transAxes)
        ends = [((c, 1.0), (p, 1.0)) for c, p in zip(centres, pos)]
    if moved:
        for a, b in ends:
            ax.annotate("", xy=a, xycoords=base, xytext=b, textcoords=shifted, annotation_clip=False,
                        arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.4", "shrinkA": 0, "shrinkB": 0})


def index_labels(ax, labels, n: int, axis: str, api: str) -> None:
    """One tick label per row/column (pixel centres at ``i + 0.5``)."""
    labels = [str(s) for s in labels]
    if len(labels) != n:
        raise ValueError(f"{api}: expected {n} labels (one per {'row' if axis == 'y' else 'column'}), "
                         f"got {len(labels)}.")
    ticks = np.arange(n) + 0.5
    if axis == "y":
        ax.set_yticks(ticks, labels, fontsize=8)
    else:
        ax.set_xticks(ticks, labels, fontsize=8, rotation=90)


def is_sequence_of_str(x) -> bool:
    return isinstance(x, Sequence) and not isinstance(x, str) and all(isinstance(s, str) for s in x)
