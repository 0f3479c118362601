r"""The architecture view: a network drawn as strips (vectors) and blocks (matrices), with the
forward formula beside it.

One forward pass with forward hooks on the leaf modules records, in call order, every leaf's
input and output shapes and its parameter shapes (:func:`architecture_table`).  When every
leaf consumes exactly the tensor the previous leaf produced (a chain, e.g. an ``nn.Sequential``
MLP or a small conv net), the network is drawn as activations $h_l$ (vertical strips, height
∝ log of the width), weight matrices $W_l$ / conv kernels $K_l$ (blocks, rows ∝ log of the
output size, columns ∝ log of the input size; biases as thin strips) and activation functions
as labelled arrows, and the forward formula is built from the same sequence, e.g.

.. math:: f(x) = W_3 \tanh(W_2 \tanh(W_1 x + b_1) + b_2) + b_3 .

Any other model (skip connections, functional calls between modules, several inputs) is drawn
as one generic box per leaf call, in call order, without a formula.

The recording pass runs in ``torch.no_grad()``, in eval mode and with a forked RNG; hooks are
always removed and modes restored, so the model is left exactly as found.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ._common import finish, new_axes, set_title
from ._notation import _op, strip_names

_POOL = ("MaxPool", "AvgPool", "AdaptiveAvgPool", "AdaptiveMaxPool", "LPPool")
_NORM_SYMBOL = {"BatchNorm": "BN", "LayerNorm": "LN", "GroupNorm": "GN", "InstanceNorm": "IN", "RMSNorm": "RMS"}


def _kind(m: nn.Module) -> str:
    name = type(m).__name__
    if isinstance(m, nn.Linear):
        return "linear"
    if isinstance(m, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(m, (nn.modules.dropout._DropoutNd, nn.AlphaDropout, nn.FeatureAlphaDropout)):
        return "dropout"
    if isinstance(m, nn.Identity):
        return "identity"
    if isinstance(m, (nn.Flatten, nn.Unflatten)):
        return "reshape"
    if name.startswith(_POOL):
        return "pool"
    if any(name.startswith(k) for k in _NORM_SYMBOL):
        return "norm"
    if isinstance(m, nn.Embedding):
        return "embedding"
    if type(m).__module__ == "torch.nn.modules.activation" and not any(True for _ in m.parameters()):
        return "activation"
    return "other"


def _first_tensor(obj):
    if isinstance(obj, Tensor):
        return obj
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, (tuple, list)):
        for o in obj:
            t = _first_tensor(o)
            if t is not None:
                return t
    return None


def _call(model: nn.Module, example_input):
    """Call the model the way :class:`curvops.Objective` does: dict → kwargs, tuple → args."""
    if isinstance(example_input, Mapping):
        return model(**example_input)
    if isinstance(example_input, tuple):
        return model(*example_input)
    return model(example_input)


def architecture_table(model: nn.Module, example_input) -> list[dict]:
    r"""Record the leaf modules of one forward pass: names, kinds, shapes and parameter shapes.

    **Cost**: one forward pass on ``example_input`` (no gradients).  The model is left exactly as
    found: the pass runs in ``torch.no_grad()``, with every module in eval mode (so BatchNorm
    statistics are not updated and dropout is off) and a forked RNG; hooks are removed and modes
    restored in a ``finally``.

    Args:
        model: an ``nn.Module``.
        example_input: a batch as the model takes it (a tensor; a tuple → positional arguments;
            a dict → keyword arguments), e.g. ``X[:2]``.

    Returns:
        One dict per leaf-module call, in call order (a module called twice appears twice):
        ``index``, ``name`` (qualified module name, ``""`` for the root), ``type`` (class name),
        ``kind`` (``linear``, ``conv``, ``activation``, ``norm``, ``pool``, ``dropout``,
        ``reshape``, ``identity``, ``embedding``, ``other``), ``input_shape`` and
        ``output_shape`` (full shapes with the batch dimension, of the first tensor in/out; None if
        none), ``param_shapes`` ({local name: shape}), ``num_params``, and ``input_from``: the
        index of the call that produced this call's input, ``"input"`` for the model input, or None
        (produced outside any leaf module, e.g. by a functional call or a skip-connection sum).
        Modules that hold parameters directly and also have children are recorded too (after
        their children).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: the model has lazy (uninitialized) parameters.

    Example:
        >>> rows = architecture_table(nn.Sequential(nn.Linear(1, 35), nn.Tanh(), nn.Linear(35, 1)), torch.zeros(2, 1))
        >>> [r["output_shape"] for r in rows]
        [(2, 35), (2, 35), (2, 1)]
    """
    api = "architecture_table"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{api}: expected an nn.Module, got {type(model).__name__}. "
                        f"Wrap a plain function in an nn.Module to draw it.")
    if any(nn.parameter.is_lazy(p) for p in model.parameters()):
        raise ValueError(f"{api}: expected initialized parameters, got lazy (uninitialized) ones, which a "
                         f"forward pass would create. Run one forward pass yourself first.")
    rows: list[dict] = []
    keep: list[Tensor] = []  # keeps recorded tensors alive so their ids stay unique during the pass
    producer: dict[int, int | str] = {}
    first = _first_tensor(example_input)
    if first is not None:
        producer[id(first)] = "input"
        keep.append(first)

    def make_hook(name: str):
        def hook(module, args, kwargs, output):
            x = _first_tensor(args)
            x = _first_tensor(kwargs) if x is None else x
            y = _first_tensor(output)
            params = {n: tuple(p.shape) for n, p in module.named_parameters(recurse=False)}
            rows.append({
                "index": len(rows), "name": name, "type": type(module).__name__, "kind": _kind(module),
                "input_shape": None if x is None else tuple(x.shape),
                "output_shape": None if y is None else tuple(y.shape),
                "param_shapes": params, "num_params": sum(int(torch.Size(s).numel()) for s in params.values()),
                "input_from": None if x is None else producer.get(id(x)),
            })
            if y is not None:
                producer[id(y)] = len(rows) - 1
                keep.append(y)
        return hook

    modes = [(m, m.training) for m in model.modules()]
    handles = []
    devices = sorted({t.device.index or 0 for t in list(model.parameters()) + list(model.buffers())
                      if t.device.type == "cuda"})
    try:
        for name, m in model.named_modules():
            leaf = next(m.children(), None) is None
            if leaf or next(m.parameters(recurse=False), None) is not None:
                handles.append(m.register_forward_hook(make_hook(name), with_kwargs=True))
        model.eval()
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            out = _first_tensor(_call(model, example_input))
        if rows:
            rows[-1]["is_output"] = out is not None and producer.get(id(out)) == len(rows) - 1
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            if m.training != mode:
                m.train(mode)
        keep.clear()
    for r in rows:
        r.setdefault("is_output", False)
    return rows


def is_chain(table: list[dict]) -> bool:
    """True when each recorded call consumes the previous call's output and the last call's output
    is the model's output (so the strips-and-blocks drawing and the formula are exact)."""
    if not table or not table[-1].get("is_output", False):
        return False
    return table[0]["input_from"] == "input" and all(r["input_from"] == i for i, r in enumerate(table[1:]))


# ---- grouping and the formula ------------------------------------------------------------------
def groups(table: list[dict]) -> list[dict]:
    """Split a chain into groups: a parameterized call followed by its parameter-free calls.

    Each group: ``layer`` (the row with parameters, or None for leading parameter-free calls),
    ``symbol`` (e.g. ``W``, ``K``, ``\\mathrm{BN}``), ``number`` (1, 2, … per distinct module),
    ``ops`` (rows), ``output_shape``.
    """
    out: list[dict] = []
    numbers: dict[str, int] = {}
    for row in table:
        if row["num_params"] > 0:
            number = numbers.setdefault(row["name"], len(numbers) + 1)
            out.append({"layer": row, "number": number, "symbol": _symbol(row), "ops": [],
                        "output_shape": row["output_shape"]})
        else:
            if not out:
                out.append({"layer": None, "number": None, "symbol": None, "ops": [], "output_shape": None})
            out[-1]["ops"].append(row)
            out[-1]["output_shape"] = row["output_shape"]
    return out


def _symbol(row: dict) -> str:
    if row["kind"] == "linear":
        return "W"
    if row["kind"] == "conv":
        return "K"
    if row["kind"] == "embedding":
        return "E"
    for prefix, sym in _NORM_SYMBOL.items():
        if row["type"].startswith(prefix):
            return r"\mathrm{" + sym + "}"
    return r"\mathrm{" + row["type"] + "}"


def _apply_layer(g: dict, expr: str, is_sum: bool) -> tuple[str, bool]:
    row, i = g["layer"], g["number"]
    sym = f"{g['symbol']}_{{{i}}}"
    has_bias = "bias" in row["param_shapes"]
    if row["kind"] in ("linear", "conv"):
        arg = f"({expr})" if is_sum else expr
        prod = f"{sym} {arg}" if row["kind"] == "linear" else f"{sym} \\ast {arg}"
        return (f"{prod} + b_{{{i}}}", True) if has_bias else (prod, False)
    if row["kind"] == "embedding":
        return f"{sym}[{expr}]", False
    return f"{sym}({expr})", False


def _apply_ops(g: dict, expr: str, is_sum: bool) -> tuple[str, bool]:
    for row in g["ops"]:
        _, fn = _op(row)
        if fn is not None:
            expr, is_sum = f"{fn}({expr})", False
    return expr, is_sum


def forward_formula(table: list[dict], *, nested: bool | None = None) -> list[str] | None:
    r"""The forward formula of a chain as mathtext lines (without ``$``), or None for non-chains.

    ``nested=True``: one line ``f(x) = W_{3} \tanh(W_{2} \tanh(W_{1} x + b_{1}) + b_{2}) + b_{3}``;
    ``nested=False``: one line per layer, ``h_{1} = \tanh(W_{1} x + b_{1})``, …,
    ``\hat{y} = W_{3} h_{2} + b_{3}``; None: nested for up to 6 parameterized layers.
    Dropout and identity calls are left out (the recording runs in eval mode).
    """
    if not is_chain(table):
        return None
    gs = groups(table)
    if nested is None:
        nested = sum(g["layer"] is not None for g in gs) <= 6
    if nested:
        expr, is_sum = "x", False
        for g in gs:
            if g["layer"] is not None:
                expr, is_sum = _apply_layer(g, expr, is_sum)
            expr, is_sum = _apply_ops(g, expr, is_sum)
        return [f"f(x) = {expr}"]
    names, lines = strip_names(len(gs)), []
    for j, g in enumerate(gs):
        expr, is_sum = names[j], False
        if g["layer"] is not None:
            expr, is_sum = _apply_layer(g, expr, is_sum)
        expr, _ = _apply_ops(g, expr, is_sum)
        lines.append(f"{names[j + 1]} = {expr}")
    return lines


def plot_architecture(model: nn.Module, example_input, *, formula: bool = True, batched: bool = True,
                      ax=None, save=None, title=None):
    r"""Draw a network as strips (activations) and blocks (weights) with its forward formula.

    Strips are activations $h_l$ (height ∝ log of the number of entries, annotated
    ``h₁ ∈ ℝ³⁵``); blocks are weight matrices ``W₁ ∈ ℝ³⁵ˣ¹`` (rows ∝ log of outputs, columns ∝
    log of inputs; a conv kernel ``K₁ ∈ ℝ⁸ˣ³ˣ³ˣ³`` is drawn with depth) with the bias as a thin
    green strip; arrows carry the activation functions (and pooling, flattening, dropout); other
    parameterized layers (normalization, embeddings, …) are boxes listing their parameter shapes.
    Models that are not a chain of leaf modules are drawn as one box per leaf call in call order
    (dashed arrows where the data flows outside leaf modules) and get no formula.

    **Cost**: one forward pass on ``example_input`` (see :func:`architecture_table`; the model is
    left exactly as found).

    Args:
        model: an ``nn.Module``.
        example_input: a small batch as the model takes it (e.g. ``X[:2]``).
        formula: write the forward formula below the drawing (nested for ≤ 6 layers, one line per
            layer otherwise; see :func:`forward_formula`).
        batched: the first dimension of recorded shapes is the batch and is left out of labels.
        ax, save, title: Axes to draw on (a new, suitably sized figure when None); path to save
            to; title (None: a default, ``""``: none).

    Returns:
        The Axes.  The recorded table is available from :func:`architecture_table`.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: lazy parameters; the forward pass calls no module with a tensor output.

    Example:
        >>> model = nn.Sequential(nn.Linear(1, 35), nn.Tanh(), nn.Linear(35, 35), nn.Tanh(), nn.Linear(35, 1))
        >>> plot_architecture(model, torch.zeros(4, 1), save="architecture.png")
    """
    api = "plot_architecture"
    table = architecture_table(model, example_input)
    if not table or all(r["output_shape"] is None for r in table):
        raise ValueError(f"{api}: expected the forward pass to call at least one module with a tensor "
                         f"output, got {len(table)} recorded calls. Pass a model built from nn.Modules.")
    from . import _diagram

    lines = forward_formula(table) if formula else None
    if is_chain(table):
        scene = _diagram.chain_scene(groups(table), table, batched)
    else:
        scene = _diagram.generic_scene(table, batched)
    if ax is None:
        import matplotlib.pyplot as plt

        w, h = _diagram.figsize(scene, lines)
        fig = plt.figure(figsize=(w, h + 0.45))
        ax = fig.add_axes((0.0, 0.0, 1.0, h / (h + 0.45)))
    else:
        fig, ax = new_axes(ax)
    _diagram.draw(ax, scene, lines, note=None if (lines or not formula or is_chain(table)) else
                  "no formula: the data flow leaves the leaf modules (functional calls, skips, …)")
    set_title(ax, title, f"{type(model).__name__}: {sum(p.numel() for p in model.parameters()):,} parameters")
    finish(fig, save, api)
    return ax
