r"""Layers of the Kronecker-factored operators: which modules have blocks, and how a block's
parameters map onto the flat parameter vector.

A supported layer computes ``z = W a + b`` on every *row* ``a`` of its input:

* ``nn.Linear``: the input ``[n, *pos, d_in]`` has rows ``a ∈ R^{d_in}`` at every position;
* ``nn.Conv2d`` (``groups=1``, zero padding): the rows are the unfolded patches
  ``a ∈ R^{c_in·k_h·k_w}`` (channel-major, then kernel row, then kernel column — the order of the
  flattened weight), one per output pixel;
* HuggingFace ``transformers``' ``Conv1D`` (GPT-2's linear layers): ``z = a W + b`` with ``W`` stored
  ``[d_in, d_out]``, i.e. a Linear whose weight is stored transposed.

**The block matrix of a layer.**  The layer's selected parameters are arranged as one matrix
``Θ = [W | b] ∈ R^{d_out × (d_in + 1)}`` (``W`` in the Linear orientation ``[d_out, d_in]``, the conv
kernel flattened to ``[c_out, c_in·k_h·k_w]``, the bias as the last column; a layer whose bias is not
selected, or has none, has no bias column; a layer whose weight is not selected has ``Θ = b``).
The curvature block of the layer is ``A ⊗ B`` acting on ``Θ`` as ``Θ ↦ B Θ A`` (``A`` the input side,
``B`` the output side), i.e. on ``vec_row(Θ)`` (row-major) the matrix is ``B ⊗ A``.  The flat
parameter vector keeps each parameter's own row-major flattening (``weight`` then ``bias`` in
``model.parameters()`` order); :class:`LayerBlock` moves between the two.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layout import ParamLayout

SUPPORTED = "nn.Linear, nn.Conv2d (groups=1, padding_mode='zeros') and transformers' Conv1D"


def _hf_conv1d_type():
    mod = sys.modules.get("transformers.pytorch_utils")
    return getattr(mod, "Conv1D", None) if mod is not None else None


def layer_kind(module: nn.Module) -> str | None:
    """'linear', 'conv2d', 'conv1d_hf' for supported modules, else None."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros":
        return "conv2d"
    hf = _hf_conv1d_type()
    if hf is not None and isinstance(module, hf):
        return "conv1d_hf"
    return None


def _why_unsupported(module: nn.Module) -> str:
    if isinstance(module, nn.Conv2d):
        return (f"Conv2d with groups={module.groups}, padding_mode={module.padding_mode!r} "
                f"(supported: groups=1, padding_mode='zeros')")
    return type(module).__name__


@dataclass
class LayerBlock:
    """One layer's block: its module, its selected parameters and the shape of ``Θ``."""

    module: str                 # the module's name in model.named_modules()
    kind: str                   # 'linear' | 'conv2d' | 'conv1d_hf'
    weight: str | None          # selected weight's parameter name (None: not selected)
    bias: str | None            # selected bias's parameter name (None: not selected or no bias)
    d_out: int
    d_in: int                   # input features per row (c_in·k_h·k_w for Conv2d)

    @property
    def a_dim(self) -> int:
        """Size of the input-side factor A: d_in (+1 with a bias column), or 1 for a bias alone."""
        if self.weight is None:
            return 1
        return self.d_in + (1 if self.bias is not None else 0)

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(n for n in (self.weight, self.bias) if n is not None)

    def to_matrix(self, V: Tensor, offsets: dict) -> Tensor:
        """Flat block [P, K] → this layer's Θ-shaped columns [d_out, a_dim, K] (columns last)."""
        K = V.shape[1]
        parts = []
        if self.weight is not None:
            s, e = offsets[self.weight]
            if self.kind == "conv1d_hf":
                parts.append(V[s:e].reshape(self.d_in, self.d_out, K).transpose(0, 1))
            else:
                parts.append(V[s:e].reshape(self.d_out, self.d_in, K))
        if self.bias is not None:
            s, e = offsets[self.bias]
            parts.append(V[s:e].reshape(self.d_out, 1, K))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def from_matrix(self, X: Tensor, out: Tensor, offsets: dict) -> None:
        """Write Θ-shaped columns [d_out, a_dim, K] into the flat block ``out`` [P, K]."""
        K = X.shape[2]
        if self.weight is not None:
            s, e = offsets[self.weight]
            Xw = X[:, :self.d_in]
            if self.kind == "conv1d_hf":
                Xw = Xw.transpose(0, 1)
            out[s:e] = Xw.reshape(-1, K)
        if self.bias is not None:
            s, e = offsets[self.bias]
            out[s:e] = X[:, -1]


def find_blocks(model: nn.Module, layout: ParamLayout, layers, skip_unsupported: bool,
                api: str) -> tuple[list[LayerBlock], list[str]]:
    """The blocks of the selected parameters → (blocks in layout order, names of skipped parameters).

    Raises a ValueError naming every selected parameter outside a supported layer (unless
    ``skip_unsupported``), a parameter used by several modules, and unknown or unsupported ``layers``.
    """
    modules = dict(model.named_modules())
    if layers is not None:
        layers = [layers] if isinstance(layers, str) else list(layers)
        unknown = [n for n in layers if not isinstance(n, str) or n not in modules]
        if unknown:
            raise ValueError(f"{api}: layers= names {unknown} are not modules of the model; expected names from "
                             f"model.named_modules(), e.g. {[n for n, m in modules.items() if layer_kind(m)][:5]}.")
        bad = [f"{n} ({_why_unsupported(modules[n])})" for n in layers if layer_kind(modules[n]) is None]
        if bad:
            raise ValueError(f"{api}: layers= names unsupported modules {bad}; supported are {SUPPORTED}.")
        chosen = set(layers)
    else:
        chosen = {n for n, m in modules.items() if layer_kind(m) is not None}

    # every module that holds each parameter (weight sharing shows up as several owners)
    owners: dict[int, list[tuple[str, str, nn.Module]]] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((mname, pname, mod))
    named = dict(model.named_parameters())
    blocks: dict[str, LayerBlock] = {}
    skipped, problems = [], []
    for name in layout.names:
        own = owners.get(id(named[name]), [])
        mods = {o[0] for o in own}
        if len(mods) > 1:
            why = f"{name} (shared by modules {sorted(mods)})"
        elif not own:
            why = f"{name} (not found in any module)"
        else:
            mname, pname, mod = own[0]
            kind = layer_kind(mod)
            if kind is None or mname not in chosen or pname not in ("weight", "bias"):
                why = (f"{name} (in {mname or '<root>'}: {_why_unsupported(mod)})" if kind is None
                       else f"{name} (layer {mname!r} not in layers=)")
            else:
                why = None
                blk = blocks.get(mname)
                if blk is None:
                    w = mod.weight
                    if kind == "linear":
                        d_out, d_in = w.shape
                    elif kind == "conv2d":
                        d_out, d_in = w.shape[0], w[0].numel()
                    else:
                        d_in, d_out = w.shape
                    blk = blocks[mname] = LayerBlock(mname, kind, None, None, int(d_out), int(d_in))
                setattr(blk, pname, name)
        if why is not None:
            (skipped if skip_unsupported else problems).append(why)
    if problems:
        raise ValueError(
            f"{api}: parameters outside a supported layer: {problems}. Kronecker factors exist for {SUPPORTED}. "
            f"Select only their parameters (params=, layers=), or pass skip_unsupported=True to give the other "
            f"parameters zero blocks.")
    if not blocks:
        raise ValueError(f"{api}: none of the selected parameters is in a supported layer ({SUPPORTED}).")
    order = {n: i for i, n in enumerate(layout.names)}
    return sorted(blocks.values(), key=lambda b: order[b.params[0]]), skipped


# ---- rows of a layer's input and output gradient --------------------------------------------------
def _same_padding(module: nn.Conv2d, x: Tensor) -> Tensor:
    pads = []
    for k, d in zip(reversed(module.kernel_size), reversed(module.dilation)):
        total = d * (k - 1)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


def _patches(module: nn.Conv2d, x: Tensor) -> Tensor:
    """The conv's input patches [n, L, c_in·k_h·k_w] (channel, kernel row, kernel column: the order of the
    flattened kernel), one per output pixel, by strided views (several times faster than F.unfold on CPU)."""
    padding = module.padding
    if padding == "same":
        x = _same_padding(module, x)
    elif isinstance(padding, tuple) and any(padding):
        x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    for dim, k, d, st in zip((2, 3), module.kernel_size, module.dilation, module.stride):
        x = x.unfold(dim, (k - 1) * d + 1, st)  # [..., k_eff] appended
        if d > 1:
            x = x[..., ::d]
    n, c, Ho, Wo, kh, kw = x.shape
    return x.permute(0, 2, 3, 1, 4, 5).reshape(n, Ho * Wo, c * kh * kw)


def input_rows(blk: LayerBlock, module: nn.Module, x: Tensor) -> Tensor:
    """The layer's input → rows [n, T, d_in] (T positions per sample; T = 1 without weight sharing)."""
    if blk.kind == "conv2d":
        if x.dim() != 4:
            raise ValueError(f"KFAC: layer {blk.module!r} (Conv2d) got an input of shape {tuple(x.shape)}; "
                             f"expected a batch [n, C, H, W].")
        return _patches(module, x)
    if x.dim() < 2:
        raise ValueError(f"KFAC: layer {blk.module!r} got an input of shape {tuple(x.shape)}; expected "
                         f"[n, ..., {blk.d_in}] with the samples in dimension 0.")
    return x.reshape(x.shape[0], -1, x.shape[-1])


def grad_rows(blk: LayerBlock, g: Tensor) -> Tensor:
    """Gradients w.r.t. the layer's output [K, n, ...] → rows [K, n, T, d_out]."""
    if blk.kind == "conv2d":
        return g.flatten(3).transpose(2, 3)  # [K, n, C_out, H, W] → [K, n, HW, C_out]
    return g.reshape(g.shape[0], g.shape[1], -1, g.shape[-1])


def with_bias_column(blk: LayerBlock, rows: Tensor) -> Tensor:
    """Input rows [n, T, d_in] → the rows of the A factor [n, T, a_dim] (bias column of ones)."""
    if blk.weight is None:
        return rows.new_ones(*rows.shape[:-1], 1)
    if blk.bias is not None:
        return torch.cat([rows, rows.new_ones(*rows.shape[:-1], 1)], dim=-1)
    return rows
