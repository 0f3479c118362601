"""Layout and drawing of the architecture view (private; see :mod:`curvops.plotting.architecture`).

A *scene* is a list of primitives in data units (1 unit = ``UNIT`` inches at the base font size)
plus its bounds.  Labels live in three horizontal bands per row — above the shapes (weight
labels), in the middle (arrow labels) and below (activation labels) — and are packed greedily so
that no two labels of a band overlap; long networks wrap onto several rows.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from matplotlib.patches import FancyArrowPatch, Rectangle
from matplotlib.textpath import TextPath

from ._notation import _op, strip_names

UNIT = 0.42            # inches per data unit in a figure made here
FS, FS_OP, FS_BOX, FS_FORMULA = 9.0, 8.5, 7.5, 11.0
STRIP_W, BIAS_W, GAP, BIAS_GAP, PAD = 0.28, 0.12, 0.3, 0.08, 0.3
ROW_MAX = 24.0         # units before wrapping
COLORS = {
    "strip": ("#56B4E9", "#0072B2"), "matrix": ("#E69F00", "#9A5B00"), "bias": ("#009E73", "#00664A"),
    "box": ("#EDEDED", "#555555"), "arrow": "#333333",
}


@lru_cache(maxsize=512)
def text_w(s: str, fs: float = FS) -> float:
    """Width of (multi-line, mathtext) text in data units."""
    widths = [TextPath((0, 0), line, size=fs).get_extents().width if line.strip() else 0.0
              for line in s.split("\n")]
    return max(widths) / 72.0 / UNIT


def text_h(s: str, fs: float = FS) -> float:
    return (s.count("\n") + 1) * fs * 1.45 / 72.0 / UNIT


def height(numel: int) -> float:
    """Drawn size of a dimension of ``numel`` entries: ∝ log, at least 0.5."""
    return 0.5 + 0.42 * math.log(max(int(numel), 1))


def _dims(shape, batched: bool) -> tuple[int, ...]:
    shape = tuple(shape or ())
    return shape[1:] if batched and len(shape) >= 1 else shape


def _space(dims: tuple[int, ...]) -> str:
    if not dims:
        return r"\mathbb{R}"
    return r"\mathbb{R}^{" + r" \times ".join(str(d) for d in dims) + "}"


# ---- scenes ------------------------------------------------------------------------------------
class _Rows:
    """Greedy row packing with three label bands; produces primitives with row-relative y."""

    def __init__(self):
        self.rows: list[list[dict]] = [[]]
        self.reset()

    def reset(self):
        self.free = {"above": -math.inf, "below": -math.inf}
        self.right = None  # right edge of the last shape in the row

    def new_row(self):
        self.rows.append([])
        self.reset()

    def place(self, left_min: float, parts: list[tuple[float, float, str | None]]) -> float:
        """Smallest left ≥ left_min such that each part's label clears the previous labels of its band.

        ``parts``: (offset of the labelled shape's centre from left, label width, band).
        """
        left = left_min
        for centre, lw, band in parts:
            if band in self.free and lw > 0:
                left = max(left, self.free[band] + PAD + lw / 2 - centre)
        for centre, lw, band in parts:
            if band in self.free and lw > 0:
                self.free[band] = left + centre + lw / 2
        return left

    def add(self, item: dict):
        self.rows[-1].append(item)


def chain_scene(gs: list[dict], table: list[dict], batched: bool) -> dict:
    """Strips, blocks, biases, boxes and arrows of a chain (see the module docstring)."""
    names = strip_names(len(gs))
    shapes = [table[0]["input_shape"]] + [g["output_shape"] for g in gs]
    R = _Rows()
    pending = None  # (arrow label, left x) of the arrow into the next strip
    for j in range(len(gs) + 1):
        dims = _dims(shapes[j], batched)
        n = int(np.prod(dims)) if dims else 1
        s_h = height(n)
        s_label = f"${names[j]} \\in {_space(dims)}$"
        strip = {"kind": "strip", "w": STRIP_W, "h": s_h, "cells": min(n, 8), "depth": len(dims) >= 2,
                 "label": s_label, "band": "below"}
        block = _layer_item(gs[j], batched) if j < len(gs) and gs[j]["layer"] is not None else None
        unit = [strip] + ([block] if block is not None else [])
        offsets = [0.0]
        if block is not None:
            offsets.append(STRIP_W + GAP)
        unit_w = offsets[-1] + unit[-1]["w"]
        arrow_min = 0.0 if pending is None else max(0.75, text_w(pending[0], FS_OP) + 0.4 if pending[0] else 0.75)
        left_min = (R.right + arrow_min) if R.right is not None else 0.0
        parts = [(o + it["w"] / 2, text_w(it["label"]) if it.get("label") else 0.0, it.get("band"))
                 for o, it in zip(offsets, unit)]
        free_before = dict(R.free)
        left = R.place(left_min, parts)
        if pending is not None and left + unit_w > ROW_MAX and len(R.rows[-1]) >= 3:
            R.free = free_before  # end the row with this strip alone, repeat it on the next row
            left = R.place(left_min, parts[:1])
            R.add({**strip, "x": left})
            R.add({"kind": "arrow", "x0": pending[1], "x1": left - 0.05, "label": pending[0]})
            R.new_row()
            pending = None
            left = R.place(0.0, parts)
        if pending is not None:
            R.add({"kind": "arrow", "x0": pending[1], "x1": left - 0.05, "label": pending[0]})
        for o, it in zip(offsets, unit):
            R.add({**it, "x": left + o})
        R.right = left + unit_w
        if j < len(gs):
            ops = [_op(r)[0] for r in gs[j]["ops"]]
            pending = (", ".join(o for o in ops if o), R.right + 0.05)
    return _stack(R.rows)


def _layer_item(g: dict, batched: bool) -> dict:
    row, i, sym = g["layer"], g["number"], g["symbol"]
    params = row["param_shapes"]
    w = params.get("weight")
    if row["kind"] in ("linear", "conv") and w is not None and len(w) >= 2:
        out_n, in_n = w[0], int(np.prod(w[1:]))
        label = f"${sym}_{{{i}}} \\in {_space(w)}$"
        bias = params.get("bias")
        if bias is not None:
            label += f"\n$b_{{{i}}} \\in {_space(bias)}$"
        bw = height(in_n)
        return {"kind": "matrix", "w": bw + (BIAS_GAP + BIAS_W if bias is not None else 0.0), "mw": bw,
                "h": height(out_n), "rows": min(out_n, 8), "cols": min(in_n, 8), "depth": len(w) > 2,
                "bias": bias is not None, "label": label, "band": "above"}
    title = f"${sym}_{{{i}}}$" if sym.startswith("\\") or len(sym) == 1 else sym
    return _box(title, row["type"], [f"{k} $\\in {_space(s)}$" for k, s in params.items()])


def _box(title: str, subtitle: str, lines: list[str]) -> dict:
    body = "\n".join([subtitle] + lines)
    w = max(text_w(title, FS), text_w(body, FS_BOX)) + 0.4
    h = text_h(title, FS) + text_h(body, FS_BOX) + 0.3
    return {"kind": "box", "w": w, "h": h, "title": title, "body": body}


def generic_scene(table: list[dict], batched: bool) -> dict:
    """One box per recorded call, in call order; dashed arrows where data flows outside modules."""
    R = _Rows()
    first_dims = _dims(table[0]["input_shape"], batched)
    strip = {"kind": "strip", "w": STRIP_W, "h": height(int(np.prod(first_dims)) if first_dims else 1),
             "cells": 1, "depth": len(first_dims) >= 2, "label": f"$x \\in {_space(first_dims)}$", "band": "below"}
    left = R.place(0.0, [(STRIP_W / 2, text_w(strip["label"]), "below")])
    R.add({**strip, "x": left})
    R.right = left + STRIP_W
    for r in table:
        dims = _dims(r["output_shape"], batched)
        params = [f"{k} {'×'.join(map(str, s)) or 'scalar'}" for k, s in r["param_shapes"].items()]
        box = _box(r["type"], r["name"] or "(model)", params + [f"→ {'×'.join(map(str, dims)) or 'scalar'}"])
        direct = r["input_from"] == ("input" if r["index"] == 0 else r["index"] - 1)
        left = R.right + 0.7
        if left + box["w"] > ROW_MAX and len(R.rows[-1]) >= 2:  # continue on the next row
            R.add({"kind": "arrow", "x0": R.right + 0.05, "x1": R.right + 0.45, "label": "", "dashed": not direct})
            R.new_row()
            left = 0.4
            R.add({"kind": "arrow", "x0": -0.3, "x1": left - 0.05, "label": "", "dashed": not direct})
        else:
            R.add({"kind": "arrow", "x0": R.right + 0.05, "x1": left - 0.05, "label": "", "dashed": not direct})
        R.add({**box, "x": left})
        R.right = left + box["w"]
    return _stack(R.rows)


def _stack(rows: list[list[dict]]) -> dict:
    """Give each row a centre y (top to bottom) and compute the bounds."""
    y, prims = 0.0, []
    x_max = 0.0
    for k, row in enumerate(rows):
        if not row:
            continue
        half = max(it["h"] / 2 + (0.16 if it.get("depth") else 0.0) for it in row if "h" in it)
        above = max([text_h(it["label"]) for it in row if it.get("band") == "above"] + [0.0])
        below = max([text_h(it["label"]) for it in row if it.get("band") == "below"] + [0.0])
        yc = y - above - 0.15 - half
        for it in row:
            prims.append({**it, "y": yc, "above_y": yc + half + 0.15, "below_y": yc - half - 0.15})
            x_max = max(x_max, it.get("x", 0.0) + it.get("w", 0.0), it.get("x1", 0.0))
            if it.get("band") == "below" and it.get("label"):
                x_max = max(x_max, it["x"] + it["w"] / 2 + text_w(it["label"]) / 2)
            if it.get("band") == "above" and it.get("label"):
                x_max = max(x_max, it["x"] + it["w"] / 2 + text_w(it["label"]) / 2)
        y = yc - half - 0.15 - below - (0.8 if k < len(rows) - 1 else 0.1)
    x_min = min([0.0] + [it["x"] + it["w"] / 2 - text_w(it["label"]) / 2 for it in prims
                         if it.get("band") and it.get("label")]
                + [it["x0"] for it in prims if it["kind"] == "arrow"])
    return {"prims": prims, "x_min": x_min, "x_max": x_max, "y_min": y, "y_max": 0.0, "rows": len(rows)}


# ---- drawing -----------------------------------------------------------------------------------
def figsize(scene: dict, formula: list[str] | None) -> tuple[float, float]:
    w, h = _extent(scene, formula)
    return (w * UNIT, h * UNIT)


LINE_H = FS_FORMULA * 1.9 / 72.0 / UNIT  # formula line pitch in units
COL_GAP, MAX_LINES = 1.2, 5


def _formula_columns(formula: list[str] | None) -> tuple[list[str], list[float], float]:
    """Formula lines as mathtext column strings (≤ MAX_LINES lines each), their widths, the height."""
    if not formula:
        return [], [], 0.0
    per = math.ceil(len(formula) / math.ceil(len(formula) / MAX_LINES))
    cols = ["\n".join(f"${line}$" for line in formula[i:i + per]) for i in range(0, len(formula), per)]
    return cols, [text_w(c, FS_FORMULA) for c in cols], per * LINE_H + 0.4


def _extent(scene, formula):
    _, widths, fh = _formula_columns(formula)
    fw = sum(widths) + COL_GAP * max(len(widths) - 1, 0)
    width = max(scene["x_max"] - scene["x_min"], fw) + 1.0
    return width, (scene["y_max"] - scene["y_min"]) + fh + 0.6


def draw(ax, scene: dict, formula: list[str] | None, note: str | None = None) -> None:
    """Draw a scene (and the formula lines below it) on ``ax`` with equal aspect and no axis."""
    width, total_h = _extent(scene, formula)
    x_lo = min(scene["x_min"], (scene["x_min"] + scene["x_max"]) / 2 - width / 2 + 0.5) - 0.5
    x_hi, y_hi, y_lo = x_lo + width, scene["y_max"] + 0.3, scene["y_max"] + 0.3 - total_h
    ax.set_xlim(x_lo, x_hi)
    ax.set_ylim(y_lo, y_hi)
    ax.set_aspect("equal")
    ax.set_axis_off()
    scale = _font_scale(ax, width, total_h)
    for it in scene["prims"]:
        _DRAW[it["kind"]](ax, it, scale)
    y = scene["y_min"] - 0.2
    centre = (scene["x_min"] + scene["x_max"]) / 2
    cols, widths, fh = _formula_columns(formula)
    x = centre - (sum(widths) + COL_GAP * max(len(widths) - 1, 0)) / 2
    for col, w in zip(cols, widths):
        ax.text(x + w / 2 if len(cols) == 1 else x, y, col, ha="center" if len(cols) == 1 else "left", va="top",
                fontsize=FS_FORMULA * scale, color="#111111", linespacing=1.9, multialignment="left")
        x += w + COL_GAP
    y -= fh
    if note:
        ax.text(centre, y, note, ha="center", va="top", fontsize=FS_BOX * scale, color="0.35", style="italic")


def _font_scale(ax, width: float, height: float) -> float:
    fig_w, fig_h = ax.figure.get_size_inches()
    pos = ax.get_position()
    inch_per_unit = min(pos.width * fig_w / width, pos.height * fig_h / height)
    return float(np.clip(inch_per_unit / UNIT, 0.4, 1.6))


def _cells(ax, x, y0, w, h, rows, cols, color, lw=0.4):
    for k in range(1, rows):
        yy = y0 + h * k / rows
        ax.plot([x, x + w], [yy, yy], color=color, lw=lw, alpha=0.6, solid_capstyle="butt")
    for k in range(1, cols):
        xx = x + w * k / cols
        ax.plot([xx, xx], [y0, y0 + h], color=color, lw=lw, alpha=0.6, solid_capstyle="butt")


def _rect(ax, x, y0, w, h, kind, depth=False, alpha=0.45):
    face, edge = COLORS[kind]
    if depth:
        for k in (2, 1):
            ax.add_patch(Rectangle((x + 0.08 * k, y0 + 0.08 * k), w, h, facecolor=face, edgecolor=edge,
                                   lw=0.6, alpha=0.25))
    ax.add_patch(Rectangle((x, y0), w, h, facecolor=face, edgecolor=edge, lw=1.0, alpha=alpha))
    ax.add_patch(Rectangle((x, y0), w, h, facecolor="none", edgecolor=edge, lw=1.0))


def _draw_strip(ax, it, scale):
    x, h = it["x"], it["h"]
    y0 = it["y"] - h / 2
    _rect(ax, x, y0, it["w"], h, "strip", it.get("depth", False))
    _cells(ax, x, y0, it["w"], h, it.get("cells", 1), 1, COLORS["strip"][1])
    ax.text(x + it["w"] / 2, it["below_y"], it["label"], ha="center", va="top", fontsize=FS * scale)


def _draw_matrix(ax, it, scale):
    x, h, mw = it["x"], it["h"], it["mw"]
    y0 = it["y"] - h / 2
    _rect(ax, x, y0, mw, h, "matrix", it.get("depth", False))
    _cells(ax, x, y0, mw, h, it["rows"], it["cols"], COLORS["matrix"][1])
    if it.get("bias"):
        _rect(ax, x + mw + BIAS_GAP, y0, BIAS_W, h, "bias", alpha=0.55)
    ax.text(x + it["w"] / 2, it["above_y"], it["label"], ha="center", va="bottom", fontsize=FS * scale,
            linespacing=1.25)


def _draw_box(ax, it, scale):
    x, h, w = it["x"], it["h"], it["w"]
    y0 = it["y"] - h / 2
    face, edge = COLORS["box"]
    ax.add_patch(Rectangle((x, y0), w, h, facecolor=face, edgecolor=edge, lw=1.0))
    top = y0 + h - 0.15
    ax.text(x + w / 2, top, it["title"], ha="center", va="top", fontsize=FS * scale, fontweight="bold")
    ax.text(x + w / 2, top - text_h(it["title"], FS), it["body"], ha="center", va="top",
            fontsize=FS_BOX * scale, linespacing=1.3, color="#222222")


def _draw_arrow(ax, it, scale):
    y = it["y"]
    style = "--" if it.get("dashed") else "-"
    ax.add_patch(FancyArrowPatch((it["x0"], y), (it["x1"], y), arrowstyle="-|>", mutation_scale=10 * scale,
                                 color=COLORS["arrow"], lw=1.0, linestyle=style, shrinkA=0, shrinkB=0))
    if it.get("label"):
        ax.text((it["x0"] + it["x1"]) / 2, y + 0.1, it["label"], ha="center", va="bottom",
                fontsize=FS_OP * scale, style="italic", color="#222222")


_DRAW = {"strip": _draw_strip, "matrix": _draw_matrix, "box": _draw_box, "arrow": _draw_arrow}
