r"""The data passes of KFAC and EKFAC: Kronecker factors (and EKFAC's eigenvalues) from forward
hooks on the layers and one batched backward of the loss's output-space factor per batch.

Per batch ``b`` the output-space matrix of the approximated curvature is written as
``Σ_c s_c s_cᵀ`` (the *columns* ``s_c``, shaped like the model output):

* ``"type-2"``: the loss Hessian of the per-sample *sum-form* loss, ``∇²_f S_b``, by a closed-form
  square root (MSE: ``√2 e_c``; BCE-with-logits: ``√(σ(1−σ)) e_c``; cross-entropy:
  ``√p_c (e_c − p)`` along the class dimension), ignored targets masked; divided by
  ``D = Σ_b d_b`` ('mean') at the end;
* ``"mc"``: ``mc_samples`` gradients ``∇_f S(f, ŷ)`` with labels ``ŷ ~ p(·|f)`` drawn from a
  generator seeded by the seed and the batch index, scaled by ``1/√S``; divided by ``D``;
* ``"empirical"``: the per-sample loss gradients ``∇_f ℓ_i`` (``ℓ_i`` the loss of sample ``i`` alone,
  as :class:`~curvops.EmpiricalFisher` defines it); divided by the number of counted samples.

Each column is backpropagated to every layer's output ``z`` (one ``autograd.grad`` with
``is_grads_batched`` over a chunk of columns), giving the rows ``g`` of the output-side factor.
Columns are shaped like the whole model output, so for outputs with positions (sequences,
``[n, C, T]`` cross-entropy) every position's column is backpropagated *together* with the others
(as if each position were a row of its own, the curvlinops convention).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .._losses import kept_targets
from ..objective import Batch
from ._kfac_layers import LayerBlock, grad_rows, input_rows, with_bias_column
from .fisher import _Likelihood, per_sample_loss_grads

def factor_dtype(dtype: torch.dtype) -> torch.dtype:
    """Factors of bf16/fp16 models are accumulated and kept in float32 (eigh has no half precision, and a
    running sum in the format would add one rounding per batch); float32/float64 models keep their own."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


#: entries of the per-sample rotated gradients EKFAC forms at once (chunks of samples beyond it)
EKFAC_CHUNK_ENTRIES = 2**24


class Recorder:
    """Forward hooks on the layers for one forward: inputs handed to ``on_input``, outputs kept.

    The model continues with a *copy* of each layer's output, so in-place operations after the
    layer (``ReLU(inplace=True)``, ``x += …``) never touch the tensor the gradients are taken for.
    Hooks are removed on exit, also after an error.
    """

    def __init__(self, model, blocks: list[LayerBlock], on_input: Callable[[int, Tensor], None]):
        self.outputs: dict[int, Tensor] = {}
        self.handles = []
        for i, blk in enumerate(blocks):
            module = model.get_submodule(blk.module)
            self.handles.append(module.register_forward_hook(self._hook(i, blk, on_input), with_kwargs=True))

    def _hook(self, i: int, blk: LayerBlock, on_input):
        def fn(module, args, kwargs, output):
            if i in self.outputs:
                raise ValueError(f"KFAC: layer {blk.module!r} ran more than once in one forward (weight sharing "
                                 f"across calls); its factors are not defined. Leave it out with layers= or params=.")
            x = args[0] if args else next(iter(kwargs.values()))
            on_input(i, x.detach())
            if not isinstance(output, Tensor):
                raise TypeError(f"KFAC: layer {blk.module!r} returned {type(output).__name__}; expected a tensor.")
            self.outputs[i] = output
            return output.clone()
        return fn

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []
        return False


def batch_weight(op, batch: Batch) -> float:
    """What the batch adds to the normalization total: d_b (type-2, mc), counted samples (empirical);
    1 per batch for 'sum' (no normalization)."""
    obj = op.objective
    if obj.reduction == "sum":
        return 1.0
    if op.fisher_type == "empirical":
        d = obj.sample_weights(batch)
        return float(batch.n) if d is None else float((d > 0).sum())
    return obj.batch_weight(batch)


def loss_columns(op, batch: Batch, out: Tensor) -> tuple[int, Callable[[int, int], Tensor]]:
    """The columns ``s_c`` of the batch's output-space matrix (un-normalized): their number K and
    ``columns(start, stop) -> [stop − start, *out.shape]``, built chunk by chunk (a type-2
    cross-entropy over C classes has C columns, each the size of the whole output)."""
    obj = op.objective
    if op.fisher_type == "empirical":
        o = out.detach().requires_grad_()
        with torch.enable_grad():
            value = obj.loss(o, batch.y, batch.index)
            (E,) = torch.autograd.grad(value, o)
        if obj.reduction == "mean":
            E = per_sample_loss_grads(obj, batch, E)
        return 1, lambda s, e: E[None]
    lik: _Likelihood = op._likelihood
    o = out.detach()
    keep = kept_targets(obj.loss_kind, obj.loss_module, batch.y)
    if keep is not None:
        keep = keep.unsqueeze(1).to(o.dtype)
    masked = (lambda c: c) if keep is None else (lambda c: c * keep)
    if op.fisher_type == "mc":
        gen = torch.Generator(device=o.device)
        gen.manual_seed(op._seed * 1_000_003 + batch.index + obj.rank * 2**40)
        cols = masked(lik.sample_grads(o, op.mc_samples, gen) / math.sqrt(op.mc_samples))
        return cols.shape[0], lambda s, e: cols[s:e]
    if lik.kind in ("mse", "bce_with_logits"):  # diagonal Hessian: √h e_c along the last dimension
        scale = math.sqrt(2.0) * torch.ones_like(o) if lik.kind == "mse" else \
            torch.sqrt(torch.sigmoid(o) * torch.sigmoid(-o))
        if o.dim() == 1:
            return 1, lambda s, e: masked(scale[None])
        C = o.shape[-1]

        def diagonal(s, e):
            eye = torch.eye(C, dtype=o.dtype, device=o.device)[s:e]
            return masked(scale[None] * eye.reshape(e - s, *([1] * (o.dim() - 1)), C))
        return C, diagonal
    # cross-entropy: diag(p) − ppᵀ = Σ_c p_c (e_c − p)(e_c − p)ᵀ along the class dimension 1
    p = torch.softmax(o, dim=1)
    C = o.shape[1]
    root = torch.sqrt(p)

    def categorical(s, e):
        onehot = torch.eye(C, dtype=o.dtype, device=o.device)[s:e].reshape(e - s, 1, C, *([1] * (o.dim() - 2)))
        return masked(root[:, s:e].movedim(1, 0).unsqueeze(2) * (onehot - p[None]))
    return C, categorical


def backprop(out: Tensor, zs: list[Tensor | None], cols: Tensor) -> list[Tensor | None]:
    """∂⟨out, s_c⟩/∂z for every kept layer output and every column: [k, *z.shape] each (None: unused)."""
    live = [i for i, z in enumerate(zs) if z is not None and z.requires_grad]
    res: list[Tensor | None] = [None] * len(zs)
    if not live or not out.requires_grad:
        return res
    targets = [zs[i] for i in live]
    k = cols.shape[0]
    if k == 1:
        gs = torch.autograd.grad(out, targets, cols[0], retain_graph=True, allow_unused=True)
        gs = [None if g is None else g[None] for g in gs]
    else:
        try:
            gs = torch.autograd.grad(out, targets, cols, retain_graph=True, allow_unused=True,
                                     is_grads_batched=True)
        except (RuntimeError, NotImplementedError):  # an op without a batching rule: one column at a time
            per = [torch.autograd.grad(out, targets, c, retain_graph=True, allow_unused=True) for c in cols]
            gs = [None if per[0][j] is None else torch.stack([p[j] for p in per]) for j in range(len(targets))]
    for i, g in zip(live, gs):
        res[i] = g
    return res


def data_pass(op, on_input: Callable[[int, Tensor], None], on_grads: Callable[[int, Tensor], None]) -> float:
    """One pass over this rank's shard: ``on_input(i, x)`` per layer input, ``on_grads(i, g)`` per chunk
    of columns ([k, n, ...] gradients w.r.t. layer i's output); → the normalization total."""
    obj = op.objective
    total = 0.0
    with obj.session():
        for batch in obj.batches():
            w = batch_weight(op, batch)
            if w == 0:
                continue  # every target ignored: the batch adds nothing
            theta = [t.detach().requires_grad_() for t in obj.theta()]
            with Recorder(obj.model, op.blocks, on_input) as rec:
                out = obj.forward(theta, batch.x)
            obj.check_target(out, batch.y, batch.index)
            K, columns = loss_columns(op, batch, out)
            zs = [rec.outputs.get(i) for i in range(len(op.blocks))]
            missing = [op.blocks[i].module for i, z in enumerate(zs) if z is None]
            if missing:
                raise ValueError(f"KFAC: layers {missing} did not run in the forward of batch {batch.index}; "
                                 f"leave them out with layers= or params=.")
            for s in range(0, K, op.max_columns):
                gs = backprop(out, zs, columns(s, min(s + op.max_columns, K)))
                for i, g in enumerate(gs):
                    if g is not None:
                        on_grads(i, g.detach())
            total += w
            del rec, out, zs
    return total


def kfac_factors(op) -> tuple[list[Tensor], list[Tensor]]:
    """(A, B) per layer: ``A = mean over rows of [a;1][a;1]ᵀ``, ``B = Σ g gᵀ / total`` (see KFAC)."""
    obj, blocks = op.objective, op.blocks
    dt, dev = factor_dtype(obj.dtype), obj.device
    expand = op.kfac_approx == "expand"

    def run():
        A = [torch.zeros(b.a_dim, b.a_dim, dtype=dt, device=dev) for b in blocks]
        B = [torch.zeros(b.d_out, b.d_out, dtype=dt, device=dev) for b in blocks]
        counts = torch.zeros(len(blocks), dtype=dt, device=dev)

        def on_input(i, x):
            blk = blocks[i]
            if blk.weight is None:  # a bias alone: A = [[1]]
                counts[i] += 1
                return
            rows = input_rows(blk, obj.model.get_submodule(blk.module), x.to(dt))
            rows = rows.reshape(-1, rows.shape[-1]) if expand else rows.mean(1)
            d = blk.d_in
            A[i][:d, :d].addmm_(rows.T, rows)
            if blk.bias is not None:  # the bias column of ones, without concatenating it
                col = rows.sum(0)
                A[i][:d, d] += col
                A[i][d, :d] += col
                A[i][d, d] += rows.shape[0]
            counts[i] += rows.shape[0]

        def on_grads(i, g):
            rows = grad_rows(blocks[i], g.to(dt))
            rows = rows.reshape(-1, rows.shape[-1]) if expand else rows.sum(2).reshape(-1, rows.shape[-1])
            B[i].addmm_(rows.T, rows)

        total = data_pass(op, on_input, on_grads)
        flat = torch.cat([t.reshape(-1) for t in A + B] + [counts])
        return flat, total

    like = lambda: torch.zeros(sum(b.a_dim**2 + b.d_out**2 for b in blocks) + len(blocks), dtype=dt, device=dev)  # noqa: E731
    flat, total = obj.reduce_pass(run, like, type(op).__name__)
    sizes = [b.a_dim**2 for b in blocks] + [b.d_out**2 for b in blocks] + [len(blocks)]
    parts = list(torch.split(flat, sizes))
    counts = parts[-1]
    As, Bs = [], []
    for i, blk in enumerate(blocks):
        if blk.weight is None:
            As.append(torch.ones(1, 1, dtype=dt, device=dev))
        else:
            As.append(parts[i].reshape(blk.a_dim, blk.a_dim) / counts[i].clamp(min=1))
        Bs.append(obj.normalize(parts[len(blocks) + i].reshape(blk.d_out, blk.d_out), total))
    return As, Bs


def ekfac_eigenvalues(op, bases: list[tuple[Tensor, Tensor]]) -> list[Tensor]:
    r"""EKFAC's corrected eigenvalues per layer, ``Λ[o, j] = Σ_{i,c} (q_B,oᵀ G_ic q_A,j)² / total`` [d_out, a_dim],
    with ``G_ic = Σ_t g_ict a_itᵀ`` the per-sample gradient of the layer's Θ for column c."""
    obj, blocks = op.objective, op.blocks
    dt, dev = factor_dtype(obj.dtype), obj.device
    lams_like = lambda: [torch.zeros(b.d_out, b.a_dim, dtype=dt, device=dev) for b in blocks]  # noqa: E731

    def run():
        lam = lams_like()
        rotated: dict[int, Tensor] = {}

        def on_input(i, x):
            blk = blocks[i]
            QA = bases[i][0]
            if blk.weight is None:  # a bias alone: its per-sample gradient is Σ_t g_t (one row per sample)
                rows = torch.ones(x.shape[0], 1, 1, dtype=dt, device=dev)
            else:
                rows = with_bias_column(blk, input_rows(blk, obj.model.get_submodule(blk.module), x.to(dt)))
            rotated[i] = rows @ QA  # [n, T, a_dim]

        def on_grads(i, g):
            blk, QB = blocks[i], bases[i][1]
            gr = grad_rows(blk, g.to(dt)) @ QB  # [k, n, T, d_out]
            a = rotated[i]
            if a.shape[1] == 1:  # one row per sample: (q_Bᵀ g)² (q_Aᵀ a)ᵀ² without forming G
                lam[i].add_(torch.einsum("kno,ni->oi", gr.sum(2).square(), a[:, 0].square()))
                return
            k, n, T, o = gr.shape
            step = max(1, EKFAC_CHUNK_ENTRIES // max(1, k * o * a.shape[2]))
            for s in range(0, n, step):
                G = torch.einsum("knto,nti->knoi", gr[:, s:s + step], a[s:s + step])
                lam[i].add_(G.square().sum((0, 1)))

        total = data_pass(op, on_input, on_grads)
        return torch.cat([t.reshape(-1) for t in lam]), total

    like = lambda: torch.zeros(sum(b.d_out * b.a_dim for b in blocks), dtype=dt, device=dev)  # noqa: E731
    flat, total = obj.reduce_pass(run, like, type(op).__name__)
    parts = torch.split(flat, [b.d_out * b.a_dim for b in blocks])
    return [obj.normalize(p.reshape(b.d_out, b.a_dim), total) for p, b in zip(parts, blocks)]
