"""Notation shared by the architecture table/formula and its drawing (private).

The arrow labels and formula functions of parameter-free calls (:func:`_op`) and the names of
the activations (:func:`strip_names`), used by :mod:`curvops.plotting.architecture` (the formula)
and :mod:`curvops.plotting._diagram` (the drawing), so neither imports the other's internals.
"""

from __future__ import annotations

#: module classes → (arrow label, formula function in mathtext; None = identity in the formula)
_OPS = {
    "Tanh": ("tanh", r"\tanh"), "ReLU": ("relu", r"\mathrm{relu}"), "ReLU6": ("relu6", r"\mathrm{relu6}"),
    "Sigmoid": ("sigmoid", r"\sigma"), "GELU": ("gelu", r"\mathrm{gelu}"), "SiLU": ("silu", r"\mathrm{silu}"),
    "ELU": ("elu", r"\mathrm{elu}"), "SELU": ("selu", r"\mathrm{selu}"), "CELU": ("celu", r"\mathrm{celu}"),
    "LeakyReLU": ("leaky relu", r"\mathrm{lrelu}"), "Softplus": ("softplus", r"\mathrm{softplus}"),
    "Mish": ("mish", r"\mathrm{mish}"), "Hardtanh": ("hardtanh", r"\mathrm{hardtanh}"),
    "Softmax": ("softmax", r"\mathrm{softmax}"), "LogSoftmax": ("log softmax", r"\log\mathrm{softmax}"),
    "Flatten": ("flatten", r"\mathrm{vec}"), "Unflatten": ("reshape", r"\mathrm{reshape}"),
    "Identity": (None, None),
}


def _op(row: dict) -> tuple[str | None, str | None]:
    """(arrow label, formula function) of a parameter-free call."""
    t = row["type"]
    if t in _OPS:
        return _OPS[t]
    if row["kind"] == "dropout":
        return "dropout", None
    if row["kind"] == "pool":
        short = t.replace("Adaptive", "adaptive ").replace("Max", "max ").replace("Avg", "avg ").replace("LP", "lp ")
        label = short.replace("Pool", "pool").rstrip("123dD").strip()
        return label, r"\mathrm{" + label.replace("adaptive ", "").replace(" ", "") + "}"
    return t.lower(), r"\mathrm{" + t + "}"


def strip_names(n_groups: int) -> list[str]:
    """Mathtext names of the activations: x, h_1, …, \\hat{y}."""
    return ["x"] + [f"h_{{{j}}}" for j in range(1, n_groups)] + [r"\hat{y}"]
