r"""The objective adapter: model + loss + data → pure functions over a parameter vector.

This is the only module that knows :class:`torch.nn.Module`.  An :class:`Objective`
holds

* a pure forward ``f(theta, x)`` built with :func:`torch.func.functional_call`
  (selected parameters are arguments; the other parameters and buffers are constants),
* the loss ``loss(output, target)`` and its reduction (``"mean"`` or ``"sum"``),
* the data as a re-iterable sequence of ``(inputs, target)`` batches.

The loss of the whole data set is defined once:

.. math::
    L(\theta) = \frac{1}{N}\sum_b n_b\,\ell_b(\theta) \quad(\text{mean}),\qquad
    L(\theta) = \sum_b \ell_b(\theta) \quad(\text{sum}),

where ``ℓ_b`` is the user's loss on batch ``b`` of ``n_b`` samples and ``N = Σ n_b``.
For a mean-reduced loss that averages over samples (the usual case) this is the
mean over the whole data set, whatever the batch split.  ``N`` is counted during
each pass, so construction never touches the data.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader

from ._compile import Compilable
from ._distributed import Sharded, unwrap
from ._data import Batch, SplitBatches, as_batches, dict_style_for, leading_dim, split_dict, tree_leaves, tree_map
from ._losses import (TOKEN_LOSSES, check_target, denominator, resolve_loss, sample_denominators, token_layout,
                      token_targets)
from ._modes import product_mode, usable
from ._params import ModelState, _select_params
from .layout import ParamLayout

# Old private names, still imported by other modules.
_tree_leaves, _tree_map, _SplitBatches, _leading_dim = tree_leaves, tree_map, SplitBatches, leading_dim
_resolve_loss = resolve_loss
__all__ = ["Objective", "Batch"]


class Objective(ModelState, Sharded, Compilable):
    r"""Model, loss and data as pure functions of the selected parameters.

    The objective always uses the parameters and buffers the model has *now*: every pass
    re-reads them from the model, so in-place updates, ``p.data = …``, ``load_state_dict`` and
    ``vector_to_parameters`` are followed (contract rule 9); a parameter that changed shape or
    disappeared is an error.  Every pass runs with gradients enabled, outside inference mode and
    with autocast off, whatever the caller's context (rule 8).

    Args:
        model: an ``nn.Module`` or a plain function ``f(params: dict, x)``.
        loss: ``"mse"``, ``"cross_entropy"``, ``"bce_with_logits"``, a torch loss module with
            ``reduction`` ``"mean"``/``"sum"`` (``ignore_index``, class ``weight`` and
            ``label_smoothing`` of cross-entropy are honoured exactly), any callable
            ``loss(output, target)`` together with ``reduction=``, or a language model's token-level
            cross-entropy over ``[B, T, V]`` logits with -100 ignored: ``"causal_lm"`` (logits at
            position t against the label at t+1, as HuggingFace's causal-LM loss shifts them) or
            ``"token_cross_entropy"`` (every position against its own label: masked LM, token
            classification).  The mean is over the counted tokens of the whole data set.
            A model output that is not a tensor but has ``logits`` (a HuggingFace ``ModelOutput``)
            is reduced to its logits.
        data: ``(X, y)`` tensors (``X`` may be a tensor, a tuple or a dict of tensors), a dict of
            tensors holding the targets under ``target_key``, a list of such batches, a
            ``DataLoader`` (not shuffling), or any re-iterable of batches.
        params: which parameters to differentiate: ``None`` (all trainable), names, submodules,
            parameter tensors (e.g. ``model.parameters()``), or a predicate ``(name, param) -> bool``.
            For a plain function: a dict ``{name: tensor}`` of all its parameters (``select=`` then
            picks a subset).
        reduction: the loss's reduction, needed when it can't be read off the loss.
        batch_size: split an ``(X, y)`` pair into batches of this size.
        output: optional ``output(model_output) -> prediction`` (e.g. ``lambda o: o.logits``).
        target_key: the key of the targets in dict batches (default ``"labels"``); the other
            entries are the model's inputs.
        call: how dict inputs reach an ``nn.Module``: ``"kwargs"`` (``model(**inputs)``),
            ``"positional"`` (``model(inputs)``) or ``"auto"``: keyword arguments when the
            forward's signature takes every key (or ``**kwargs``), else the dict as its one
            positional argument.
        allow_stochastic: accept dropout / BatchNorm in train mode and shuffling DataLoaders (the
            operator then changes from product to product; see :func:`curvops.check_deterministic`).
        process_group, distributed: shard the data over ``torch.distributed`` ranks (a group, or
            ``distributed=True`` for the default one): each rank passes its own shard, and every
            pass ends with one all-reduce, so each rank gets the full-data result (docs/distributed.md).
        compile: ``True`` (or a ``torch.compile`` mode such as ``"reduce-overhead"``, or a dict of its
            keywords) runs each batch's gradient, Hessian and GGN product as one compiled torch.func
            graph (docs/compile.md); a model torch.compile cannot handle warns once and runs eagerly.

    **Normalization** (defined once, used by every operator; docs/conventions.md has the table).
    The whole-data loss is

    .. math:: L(\theta) = \frac{\sum_b w_b\, \ell_b(\theta)}{\sum_b w_b} \ (\text{mean}),\qquad
        L(\theta) = \sum_b \ell_b(\theta) \ (\text{sum})

    where ``ℓ_b`` is the loss of batch ``b`` exactly as torch reduces it and ``w_b`` the batch's
    **weight**: for ``"mean"``, ``w_b = d_b``, what torch's mean divides the batch's summed loss by
    (the number of elements for MSE/BCE; the number of non-ignored targets, or the sum of their
    class weights, for cross-entropy; the number of samples for a callable); ``w_b = 0`` for a batch
    whose targets are all ignored.  For ``"sum"``, ``w_b = 1``.  So ``L`` is torch's loss on the
    concatenated data whatever the batch split, and every curvature operator built on this
    objective is the derivative of this ``L`` (the ``w_b`` in their docstrings are these).

    Floating data (inputs and targets) is cast to the parameters' dtype, which sets the precision
    of every product: float32 data for a float64 model is used exactly; float64 data for a float32
    model is rounded to float32, as ``model(X.float())`` would compute it.  (Plain torch refuses the
    mix; an operator's precision is its model's, so curvops converts instead.)  Integer data
    (class targets, token ids) is never cast.

    Raises:
        ValueError / TypeError: for every bad input listed above, before any pass over the data.

    Example:
        >>> import torch, curvops
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
        >>> X, y = torch.randn(10, 3, dtype=torch.float64), torch.tensor([0, 1, -100, 1, 0, 0, -100, 1, 1, 0])
        >>> obj = curvops.Objective(model, "cross_entropy", (X, y), batch_size=4)   # batches of 4, 4, 2
        >>> full = torch.nn.functional.cross_entropy(model(X), y)                 # torch, all data at once
        >>> abs(obj.loss_value() - full.item()) < 1e-12       # w_b = non-ignored targets per batch
        True
        >>> H = curvops.Hessian(obj)                          # operators take an Objective too
        >>> H.shape
        (26, 26)
    """

    def __init__(
        self,
        model,
        loss,
        data,
        *,
        params=None,
        select=None,
        reduction: str | None = None,
        batch_size: int | None = None,
        output: Callable | None = None,
        target_key: str | None = "labels",
        call: str = "auto",
        allow_stochastic: bool = False,
        process_group=None,
        distributed: bool = False,
        compile=False,
    ):
        self._init_distributed(process_group, distributed)
        model = unwrap(model)  # DistributedDataParallel: its module (no DDP forward, no hooks)
        self.loss_fn, self.reduction, self.loss_kind, self.loss_module = resolve_loss(loss, reduction)
        self.output = output
        self._layout = self._targets = None
        if isinstance(loss, str) and loss in TOKEN_LOSSES:
            self._layout, self._targets = token_layout(TOKEN_LOSSES[loss]), token_targets(TOKEN_LOSSES[loss])
        self.allow_stochastic = allow_stochastic
        if call not in ("auto", "kwargs", "positional"):
            raise ValueError(f"Objective: call must be 'auto', 'kwargs' or 'positional', got {call!r}.")
        if target_key is not None and not isinstance(target_key, str):
            raise TypeError(f"Objective: target_key must be a string or None, got {type(target_key).__name__}.")
        self.call, self.target_key = call, target_key
        self._styles: dict = {}
        if isinstance(model, nn.Module):
            self.model = model
            names = _select_params(model, params if select is None else select)
            self._source = None
            self._check_modes()
        elif callable(model):
            if not isinstance(params, Mapping) or not params:
                raise TypeError(
                    "Objective: a plain function model needs params= as a non-empty dict {name: tensor} "
                    "of its parameters."
                )
            self.model = model
            self._source = params
            all_params = {n: torch.as_tensor(t) for n, t in params.items()}
            if select is None:
                names = list(all_params)
            elif callable(select):
                names = [n for n, t in all_params.items() if select(n, t)]
            else:
                names = [select] if isinstance(select, str) else list(select)
                unknown = [n for n in names if n not in all_params]
                if unknown:
                    raise ValueError(f"Objective: unknown parameter names {unknown}; expected among {list(all_params)}.")
            if not names:
                raise ValueError("Objective: no parameters selected; check select=.")
            names = [n for n in all_params if n in names]
        else:
            raise TypeError(f"Objective: expected an nn.Module or a function f(params, x), got {type(model).__name__}.")

        self._names = tuple(names)
        self.layout = None
        self._depth = 0
        self._refresh()
        values = list(self._values.values())
        self.dtype = values[0].dtype
        self.device = values[0].device
        for n, v in self._values.items():
            if v.is_meta:
                raise ValueError(f"Objective: parameter {n!r} is on the meta device (a shape without values); "
                                 f"expected a materialized model. Load its weights first (e.g. "
                                 f"model.to_empty(device=...) and load_state_dict).")
            if not v.is_floating_point():
                raise TypeError(f"Objective: parameter {n!r} has dtype {v.dtype}; expected a floating dtype.")
            if v.dtype != self.dtype or v.device != self.device:
                raise ValueError(
                    f"Objective: parameters must share one dtype and device; {n!r} is {v.dtype} on {v.device}, "
                    f"expected {self.dtype} on {self.device}."
                )
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"Objective: parameter {n!r} contains NaN or Inf; fix the model before measuring curvature.")
        self.layout = ParamLayout(self._names, tuple(v.shape for v in values))
        self.data = as_batches(data, batch_size, has_loss=self.loss_fn is not None, target_key=target_key,
                               allow_stochastic=allow_stochastic, sharded=self.process_group is not None)
        # Value checks (NaN/Inf, target shapes and ranges) run on every pass over a DataLoader or
        # other iterable (its batches may change), but only on the first full pass over fixed
        # tensors (a list of batches or an (X, y) pair): later passes skip the scans.
        self._fixed_data = isinstance(self.data, (list, tuple, SplitBatches))
        self._validated = False
        self._checking = True
        self._bn_training = True  # refreshed by session() before every pass
        self._init_compile(compile)

    # ---- set-up helpers -----------------------------------------------------------
    def _check_modes(self) -> None:
        stochastic = self.stochastic_modules()
        if stochastic and not self.allow_stochastic:
            raise ValueError(
                f"Objective: the model has modules that make the loss random or batch-dependent in train mode: "
                f"{stochastic}. Call model.eval() first, or pass allow_stochastic=True if this is what you want."
            )

    # ---- what operators use -------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        return self.layout.names

    @property
    def num_params(self) -> int:
        return self.layout.size

    def theta(self) -> list[Tensor]:
        """Current values of the selected parameters (detached views, shared with the model)."""
        if self._depth == 0:
            self._refresh()
        return list(self._values.values())

    def forward(self, theta: Sequence[Tensor], x) -> Tensor:
        """Pure forward pass ``f(theta, x)`` with ``theta`` in layout order."""
        p = dict(zip(self.layout.names, theta))
        p.update(self._constants)
        if isinstance(self.model, nn.Module):
            p.update(self._buffers_for_call())
        return self._call_model(p, x)

    def _call_model(self, p: dict, x) -> Tensor:
        """The model on inputs ``x`` with the tensors ``p`` (every parameter and buffer by name)."""
        if isinstance(self.model, nn.Module):
            if isinstance(x, Mapping):
                if self._dict_style(x) == "kwargs":
                    out = functional_call(self.model, p, (), dict(x))
                else:
                    out = functional_call(self.model, p, (dict(x),))
            elif isinstance(x, tuple):
                out = functional_call(self.model, p, x)
            else:
                out = functional_call(self.model, p, (x,))
        else:
            out = self.model(p, x)
        if self.output is not None:
            out = self.output(out)
        if self._layout is not None:
            return self._layout(out)
        if isinstance(out, Tensor):
            return out
        logits = getattr(out, "logits", None)  # a ModelOutput (or a dict with logits): its logits
        if logits is None and isinstance(out, Mapping):
            logits = out.get("logits")
        return logits if isinstance(logits, Tensor) else out  # anything else: the callers name the problem

    def _dict_style(self, x: Mapping) -> str:
        """'kwargs' or 'positional' for dict inputs (see ``call=``), decided once per set of keys."""
        if self.call != "auto":
            return self.call
        keys = frozenset(x)
        if keys not in self._styles:
            self._styles[keys] = dict_style_for(self.model, keys)
        return self._styles[keys]

    def _buffers_for_call(self) -> dict[str, Tensor]:
        if self._bn_training:
            return {n: b.clone() for n, b in self._buffers.items()}  # train-mode BN writes running stats
        return self._buffers

    def loss(self, out: Tensor, y, index: int) -> Tensor:
        """The user's loss on one batch, with shape checks that name the batch."""
        if self.loss_fn is None:
            raise ValueError("Objective: this quantity needs a loss; pass loss= (a name, a torch loss or a callable).")
        self.check_target(out, y, index)
        try:
            value = self.loss_fn(out, y)
        except Exception as err:  # re-raise with context; the original stays chained
            raise type(err)(f"Objective: the loss failed on batch {index}: {err}") from err
        if not isinstance(value, Tensor) or value.numel() != 1:
            raise ValueError(
                f"Objective: the loss must return a scalar tensor, got "
                f"{tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__} on batch {index}. "
                f"Use reduction='mean' or 'sum'."
            )
        return value.reshape(())

    def check_target(self, out: Tensor, y, index: int) -> None:
        if self._checking:
            check_target(self.loss_kind, self.loss_module, out, y, index)

    def batch_weight(self, batch: Batch) -> float:
        """The weight of batch b in the whole-data loss: ``d_b`` (mean; see ``curvops._losses``), 1 (sum).

        ``L = Σ_b w_b ℓ_b / Σ_b w_b`` for 'mean' and ``Σ_b ℓ_b`` for 'sum'; ``w_b = 0`` for a batch
        whose targets are all ignored.
        """
        if self.reduction == "sum":
            return 1.0
        if self.loss_fn is None:
            return float(batch.n)
        return denominator(self.loss_kind, self.loss_module, batch.y, batch.n)

    def sample_weights(self, batch: Batch) -> Tensor | None:
        """``d_i`` per sample (what the mean of sample i alone divides by), or None when all equal."""
        return sample_denominators(self.loss_kind, self.loss_module, batch.y, batch.n)

    def normalize(self, acc, total: float):
        """Apply the whole-data normalization to a sum of ``w_b``-weighted batch terms."""
        if self.reduction == "sum":
            return acc
        if not total > 0:
            raise ValueError("Objective: every target of the data is ignored (ignore_index) or has zero class "
                             "weight, so the mean loss is 0/0; check the targets.")
        return acc / total

    def batches(self) -> Iterator[Batch]:
        """One pass over the data: validated batches moved to the device one at a time."""
        count = 0
        self._checking = check = not (self._fixed_data and self._validated)
        for index, batch in enumerate(self.data):
            x, y = self._split(batch, index)
            if self._targets is not None and y is not None:
                y = self._targets(y)
            n = leading_dim(x, y)
            for t in tree_leaves(x) + tree_leaves(y):
                if t.is_meta:
                    raise ValueError(f"Objective: batch {index} holds a meta tensor (a shape without data); "
                                     f"expected real data. Load or materialize the data first.")
                if t.dim() > 0 and t.shape[0] != n:
                    raise ValueError(
                        f"Objective: batch {index} has tensors with different numbers of samples "
                        f"({t.shape[0]} vs {n})."
                    )
                if check and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise ValueError(f"Objective: batch {index} contains NaN or Inf values.")
            if n == 0:
                continue  # an empty batch adds nothing to any sum over samples
            x = tree_map(lambda t: self._to_device(t, index), x)
            y = tree_map(lambda t: self._to_device(t, index), y)
            count += 1
            yield Batch(x, y, n, index)
        if count == 0 and self.process_group is None:  # an empty shard adds nothing
            raise ValueError("Objective: the data produced no batches with samples in them (every batch is empty).")
        self._validated = True

    def _split(self, batch, index: int):
        """A raw batch → (inputs, target)."""
        if isinstance(batch, Mapping):
            x, y = split_dict(batch, self.target_key)
            if y is None and self.loss_fn is not None:
                raise ValueError(
                    f"Objective: batch {index} is a dict without targets: expected a key {self.target_key!r} "
                    f"among {sorted(map(str, batch))}. Pass target_key= naming the key of the targets, or give "
                    f"batches as (inputs, target) pairs."
                )
            return x, y
        if self.loss_fn is None and isinstance(batch, Tensor):
            return batch, None
        if not isinstance(batch, (list, tuple)) or len(batch) != 2:
            raise TypeError(
                f"Objective: batch {index} must be a pair (inputs, target) or a dict, got {type(batch).__name__}"
                + (f" of length {len(batch)}" if isinstance(batch, (list, tuple)) else "") + "."
            )
        return batch[0], batch[1]

    def num_samples(self) -> int:
        """N without a pass: from tensor shapes, a list's batches, or a sized DataLoader's dataset."""
        data = self.data
        if isinstance(data, SplitBatches):
            return data.n
        if isinstance(data, (list, tuple)):
            total = 0
            for i, b in enumerate(data):
                if isinstance(b, Mapping):
                    x, y = split_dict(b, self.target_key)
                elif isinstance(b, Tensor):
                    x, y = b, None
                else:
                    x, y = self._split(b, i)
                total += leading_dim(x, y)
            return total
        if isinstance(data, DataLoader):
            try:
                n = len(data.dataset)
            except TypeError:
                n = None
            if n is not None:
                if data.drop_last and data.batch_size:
                    n = (n // data.batch_size) * data.batch_size
                return n
        raise TypeError(
            "Objective: the number of samples can't be known without a pass over this data; pass a list of "
            "batches, an (X, y) pair or a DataLoader over a sized dataset."
        )

    def first_sample(self) -> Batch:
        """The first sample of the first batch (for shape probes; loads one batch)."""
        with product_mode():
            batch = next(iter(self.batches()))
        x = tree_map(lambda t: t[:1], batch.x)
        y = None if batch.y is None else tree_map(lambda t: t[:1] if t.dim() > 0 else t, batch.y)
        return Batch(x, y, 1, 0)

    def _to_device(self, t: Tensor, index: int = 0) -> Tensor:
        t = usable(t)
        if t.is_floating_point():  # the parameters' dtype sets the precision of every product
            return t.to(device=self.device, dtype=self.dtype, non_blocking=True)
        return t.to(device=self.device, non_blocking=True)

    def accumulate(self, per_batch: Callable[[Batch], Tensor], shape: tuple | None = None) -> Tensor:
        """Σ_b w_b · per_batch(b) with the whole-data normalization (one pass; summed over ranks)."""
        def run():
            acc, total = None, 0.0
            for batch in self.batches():
                w = self.batch_weight(batch)
                if w == 0:
                    continue  # every target of the batch is ignored
                r = per_batch(batch)
                r = r * w if self.reduction == "mean" else r
                acc = r if acc is None else acc.add_(r)
                total += w
            return (self.zeros(shape) if acc is None and shape is not None else acc), total

        acc, total = self.reduce_pass(run, lambda: self.zeros(shape))
        return self.normalize(acc, total)

    def zeros(self, shape) -> Tensor:
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    @contextlib.contextmanager
    def session(self):
        """One pass's context: the model's current parameters, grad mode on (whatever the caller's
        mode), and the model left as found (train/eval flags; the global RNG for stochastic models)."""
        modes = [(m, m.training) for m in self.model.modules()] if isinstance(self.model, nn.Module) else []
        self._bn_training = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and mode for m, mode in modes)
        rng = torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []) \
            if self.allow_stochastic else contextlib.nullcontext()
        if self._depth == 0:
            self._refresh()
        self._depth += 1
        try:
            with product_mode(), rng:
                yield self
        finally:
            self._depth -= 1
            for m, mode in modes:
                if m.training != mode:
                    m.train(mode)

    # ---- conveniences -------------------------------------------------------------
    def loss_value(self) -> float:
        """The whole-data loss L(θ) (one pass)."""
        with self.session(), torch.no_grad():
            theta = self.theta()
            return float(self.accumulate(lambda b: self.loss(self.forward(theta, b.x), b.y, b.index), ()))

    def gradient(self) -> Tensor:
        """∇L(θ) as a flat vector (one pass; compiled with ``compile=True``)."""
        compiled = None if self.compiled is None else self.compiled.gradient()
        if compiled is not None:
            return compiled

        def per_batch(b: Batch) -> Tensor:
            theta = [t.detach().requires_grad_() for t in self.theta()]
            with torch.enable_grad():
                value = self.loss(self.forward(theta, b.x), b.y, b.index)
                grads = torch.autograd.grad(value, theta, allow_unused=True)
            return torch.cat([(torch.zeros_like(t) if g is None else g).reshape(-1) for g, t in zip(grads, theta)])

        with self.session():
            return self.accumulate(per_batch, (self.num_params,))
