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
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader

from .layout import ParamLayout

_LOSSES = {
    "mse": nn.MSELoss,
    "cross_entropy": nn.CrossEntropyLoss,
    "bce_with_logits": nn.BCEWithLogitsLoss,
}
_KIND_OF = {nn.MSELoss: "mse", nn.CrossEntropyLoss: "cross_entropy", nn.BCEWithLogitsLoss: "bce_with_logits"}
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def _tree_leaves(x) -> list[Tensor]:
    if isinstance(x, Tensor):
        return [x]
    if isinstance(x, Mapping):
        return [t for v in x.values() for t in _tree_leaves(v)]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _tree_leaves(v)]
    return []


def _tree_map(fn, x):
    if isinstance(x, Tensor):
        return fn(x)
    if isinstance(x, Mapping):
        return {k: _tree_map(fn, v) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(_tree_map(fn, v) for v in x)
    if isinstance(x, list):
        return [_tree_map(fn, v) for v in x]
    return x


@dataclass
class Batch:
    """One batch on the objective's device: inputs, target, number of samples, index."""

    x: Any
    y: Any
    n: int
    index: int


class _SplitBatches:
    """An (X, y) pair split into batches of ``batch_size`` (re-iterable, lazy)."""

    def __init__(self, X, y, batch_size: int | None):
        self.X, self.y, self.batch_size = X, y, batch_size
        self.n = _leading_dim(X, y)

    def __len__(self):
        if self.batch_size is None:
            return 1
        return -(-self.n // self.batch_size)

    def __iter__(self):
        if self.batch_size is None:
            yield (self.X, self.y)
            return
        for start in range(0, self.n, self.batch_size):
            sl = slice(start, start + self.batch_size)
            yield (_tree_map(lambda t: t[sl], self.X), _tree_map(lambda t: t[sl], self.y))


def _leading_dim(x, y) -> int:
    leaves = _tree_leaves(y) + _tree_leaves(x)
    if not leaves:
        raise TypeError("Objective: a batch must hold tensors (inputs, target); found none.")
    return int(leaves[0].shape[0]) if leaves[0].dim() > 0 else 1


def _resolve_loss(loss, reduction: str | None) -> tuple[Callable | None, str, str | None, nn.Module | None]:
    """→ (callable, reduction, kind, module); ``loss=None`` for loss-free quantities (Jacobians, NTK)."""
    if loss is None:
        return None, reduction or "sum", None, None
    if isinstance(loss, str):
        if loss not in _LOSSES:
            raise ValueError(f"Objective: unknown loss name {loss!r}; expected one of {sorted(_LOSSES)} or a callable.")
        loss = _LOSSES[loss](reduction=reduction or "mean")
    if isinstance(loss, nn.Module) and hasattr(loss, "reduction"):
        red = loss.reduction
        if reduction is not None and reduction != red:
            raise ValueError(
                f"Objective: reduction={reduction!r} contradicts the loss module's reduction={red!r}; "
                f"set it on the module only."
            )
        if red not in ("mean", "sum"):
            raise ValueError(
                f"Objective: expected a loss with reduction 'mean' or 'sum', got reduction={red!r}. "
                f"Construct the loss with reduction='mean' or 'sum'."
            )
        kind = _KIND_OF.get(type(loss))
        return loss, red, kind, loss
    if not callable(loss):
        raise TypeError(f"Objective: expected a loss name, a torch loss module or a callable, got {type(loss).__name__}.")
    if reduction not in ("mean", "sum"):
        raise ValueError(
            "Objective: the reduction of this loss can't be known; pass reduction='mean' if it averages "
            "over samples or reduction='sum' if it sums them (got "
            f"reduction={reduction!r})."
        )
    return loss, reduction, None, None


def _select_params(model: nn.Module, params) -> list[str]:
    named = [(n, p) for n, p in model.named_parameters()]
    names_all = [n for n, _ in named]
    if params is None:
        chosen = [n for n, p in named if p.requires_grad]
    elif callable(params) and not isinstance(params, nn.Module):
        chosen = [n for n, p in named if params(n, p)]
    else:
        items = [params] if isinstance(params, (str, nn.Module)) else list(params)
        chosen = []
        for item in items:
            if isinstance(item, str):
                if item not in names_all:
                    raise ValueError(
                        f"Objective: unknown parameter name {item!r}; expected one of {names_all}."
                    )
                chosen.append(item)
            elif isinstance(item, nn.Module):
                prefix = next((mn for mn, m in model.named_modules() if m is item), None)
                if prefix is None:
                    raise ValueError("Objective: the module given in params= is not a submodule of the model.")
                ids = {id(p) for p in item.parameters()}
                chosen.extend(n for n, p in named if id(p) in ids)
            else:
                raise TypeError(
                    f"Objective: params entries must be names or modules, got {type(item).__name__}."
                )
        order = {n: i for i, n in enumerate(names_all)}
        chosen = sorted(set(chosen), key=order.__getitem__)
    if not chosen:
        raise ValueError("Objective: no parameters selected; check params= (or requires_grad flags).")
    return chosen


class Objective:
    r"""Model, loss and data as pure functions of the selected parameters.

    Args:
        model: an ``nn.Module`` or a plain function ``f(params: dict, x)``.
        loss: ``"mse"``, ``"cross_entropy"``, ``"bce_with_logits"``, a torch loss module with
            ``reduction`` ``"mean"``/``"sum"``, or any callable ``loss(output, target)`` together with
            ``reduction=``.
        data: ``(X, y)`` tensors (``X`` may be a tensor, a tuple or a dict of tensors), a list of such
            batches, a ``DataLoader``, or any re-iterable of batches.
        params: which parameters to differentiate: ``None`` (all trainable), names, submodules, or a
            predicate ``(name, param) -> bool``.  For a plain function: a dict ``{name: tensor}`` of all
            its parameters (``select=`` then picks a subset).
        reduction: the loss's reduction, needed when it can't be read off the loss.
        batch_size: split an ``(X, y)`` pair into batches of this size.
        output: optional ``output(model_output) -> prediction`` (e.g. ``lambda o: o.logits``).
        allow_stochastic: accept dropout / BatchNorm in train mode (the operator then changes from
            product to product; see :func:`curvops.check_deterministic`).

    Raises:
        ValueError / TypeError: for every bad input listed above, before any pass over the data.
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
        allow_stochastic: bool = False,
    ):
        self.loss_fn, self.reduction, self.loss_kind, self.loss_module = _resolve_loss(loss, reduction)
        self.output = output
        self.allow_stochastic = allow_stochastic
        if isinstance(model, nn.Module):
            self.model = model
            names = _select_params(model, params if select is None else select)
            all_params = dict(model.named_parameters())
            self._values = {n: all_params[n].detach() for n in names}
            self._constants = {n: p.detach() for n, p in all_params.items() if n not in self._values}
            self._buffers = {n: b for n, b in model.named_buffers()}
            self._check_modes()
        elif callable(model):
            if not isinstance(params, Mapping) or not params:
                raise TypeError(
                    "Objective: a plain function model needs params= as a non-empty dict {name: tensor} "
                    "of its parameters."
                )
            self.model = model
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
            self._values = {n: all_params[n].detach() for n in all_params if n in names}
            self._constants = {n: t.detach() for n, t in all_params.items() if n not in self._values}
            self._buffers = {}
        else:
            raise TypeError(f"Objective: expected an nn.Module or a function f(params, x), got {type(model).__name__}.")

        values = list(self._values.values())
        self.dtype = values[0].dtype
        self.device = values[0].device
        for n, v in self._values.items():
            if not v.is_floating_point():
                raise TypeError(f"Objective: parameter {n!r} has dtype {v.dtype}; expected a floating dtype.")
            if v.dtype != self.dtype or v.device != self.device:
                raise ValueError(
                    f"Objective: parameters must share one dtype and device; {n!r} is {v.dtype} on {v.device}, "
                    f"expected {self.dtype} on {self.device}."
                )
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"Objective: parameter {n!r} contains NaN or Inf; fix the model before measuring curvature.")
        self.layout = ParamLayout(tuple(self._values), tuple(v.shape for v in values))
        self.data = self._as_batches(data, batch_size)
        # Value checks (NaN/Inf, target shapes and ranges) run on every pass over a DataLoader or
        # other iterable (its batches may change), but only on the first full pass over fixed
        # tensors (a list of batches or an (X, y) pair): later passes skip the scans.
        self._fixed_data = isinstance(self.data, (list, tuple, _SplitBatches))
        self._validated = False
        self._checking = True
        self._bn_training = True  # refreshed by session() before every pass

    # ---- set-up helpers -----------------------------------------------------------
    def _check_modes(self) -> None:
        stochastic = self.stochastic_modules()
        if stochastic and not self.allow_stochastic:
            raise ValueError(
                f"Objective: the model has modules that make the loss random or batch-dependent in train mode: "
                f"{stochastic}. Call model.eval() first, or pass allow_stochastic=True if this is what you want."
            )

    def stochastic_modules(self) -> list[str]:
        """Names of dropout / train-mode BatchNorm modules (empty for plain functions)."""
        if not isinstance(self.model, nn.Module):
            return []
        out = []
        for name, m in self.model.named_modules():
            if not m.training:
                continue
            if isinstance(m, _DROPOUT) and m.p > 0:
                out.append(f"{name or '<root>'} ({type(m).__name__})")
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                out.append(f"{name or '<root>'} ({type(m).__name__} in train mode)")
        return out

    @staticmethod
    def _as_batches(data, batch_size):
        if isinstance(data, (Tensor, Mapping)):  # inputs only (Jacobians, NTK): no targets
            split = _SplitBatches(data, None, batch_size)
            if split.n == 0:
                raise ValueError("Objective: the data is empty (0 samples).")
            return split
        if isinstance(data, tuple) and len(data) == 2 and isinstance(data[1], Tensor):
            if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
                raise ValueError(f"Objective: batch_size must be a positive integer, got {batch_size!r}.")
            split = _SplitBatches(data[0], data[1], batch_size)
            if split.n == 0:
                raise ValueError("Objective: the data is empty (0 samples).")
            return split
        if batch_size is not None:
            raise ValueError("Objective: batch_size= only applies to data given as an (X, y) pair of tensors.")
        if isinstance(data, DataLoader):
            try:
                if len(data) == 0:
                    raise ValueError("Objective: the DataLoader is empty (0 batches).")
            except TypeError:  # iterable datasets have no length
                pass
            return data
        if isinstance(data, (list, tuple)):
            if len(data) == 0:
                raise ValueError("Objective: the data is empty (0 batches).")
            return data
        if isinstance(data, Iterable):
            if iter(data) is data:
                raise TypeError(
                    "Objective: the data is a one-shot iterator (e.g. a generator); every product needs a fresh "
                    "pass. Pass a list of batches or a DataLoader."
                )
            return data
        raise TypeError(f"Objective: expected data as (X, y), a list of batches or a DataLoader, got {type(data).__name__}.")

    # ---- what operators use -------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        return self.layout.names

    @property
    def num_params(self) -> int:
        return self.layout.size

    def theta(self) -> list[Tensor]:
        """Current values of the selected parameters (detached views, shared with the model)."""
        return list(self._values.values())

    def state_versions(self) -> tuple[int, ...]:
        """In-place version counters of every parameter and buffer the forward reads.

        They change when an optimizer steps or anything writes into the model's tensors, which
        is how caches built from earlier values know they are stale.
        """
        tensors = [*self._values.values(), *self._constants.values(), *self._buffers.values()]
        return tuple(t._version for t in tensors)

    def forward(self, theta: Sequence[Tensor], x) -> Tensor:
        """Pure forward pass ``f(theta, x)`` with ``theta`` in layout order."""
        p = dict(zip(self.layout.names, theta))
        p.update(self._constants)
        if isinstance(self.model, nn.Module):
            p.update(self._buffers_for_call())
            if isinstance(x, Mapping):
                out = functional_call(self.model, p, (), dict(x))
            elif isinstance(x, tuple):
                out = functional_call(self.model, p, x)
            else:
                out = functional_call(self.model, p, (x,))
        else:
            out = self.model(p, x)
        return self.output(out) if self.output is not None else out

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
        if not self._checking:
            return
        if not isinstance(out, Tensor):
            raise TypeError(
                f"Objective: the model returned {type(out).__name__}, expected a tensor; pass output= to pick "
                f"the prediction (e.g. output=lambda o: o.logits)."
            )
        kind = self.loss_kind
        if kind in ("mse", "bce_with_logits"):
            if not isinstance(y, Tensor) or y.shape != out.shape:
                raise ValueError(
                    f"Objective: targets do not match outputs on batch {index}: output shape {tuple(out.shape)}, "
                    f"target shape {tuple(getattr(y, 'shape', ()))}; {kind} needs equal shapes."
                )
        elif kind == "cross_entropy":
            if out.dim() < 2:
                raise ValueError(
                    f"Objective: cross_entropy needs outputs [n, C, ...], got shape {tuple(out.shape)} on batch {index}."
                )
            want = (out.shape[0],) + tuple(out.shape[2:])
            if y.is_floating_point():
                ok = y.shape == out.shape
            else:
                ok = tuple(y.shape) == want
                if ok and y.numel() and (int(y.min()) < 0 or int(y.max()) >= out.shape[1]):
                    raise ValueError(
                        f"Objective: class targets on batch {index} must lie in [0, {out.shape[1]}), got range "
                        f"[{int(y.min())}, {int(y.max())}]."
                    )
            if not ok:
                raise ValueError(
                    f"Objective: targets do not match outputs on batch {index}: output shape {tuple(out.shape)}, "
                    f"target shape {tuple(y.shape)}; expected class indices of shape {want} or probabilities "
                    f"of shape {tuple(out.shape)}."
                )

    def batches(self) -> Iterator[Batch]:
        """One pass over the data: validated batches moved to the device one at a time."""
        count = 0
        self._checking = check = not (self._fixed_data and self._validated)
        for index, batch in enumerate(self.data):
            if self.loss_fn is None and (isinstance(batch, (Tensor, Mapping)) or (
                    isinstance(batch, (list, tuple)) and len(batch) == 2 and batch[1] is None)):
                batch = (batch, None) if isinstance(batch, (Tensor, Mapping)) else batch
            if isinstance(batch, Mapping) or not isinstance(batch, (list, tuple)) or len(batch) != 2:
                raise TypeError(
                    f"Objective: batch {index} must be a pair (inputs, target), got {type(batch).__name__}"
                    + (f" of length {len(batch)}" if isinstance(batch, (list, tuple)) else "") + "."
                )
            x, y = batch
            n = _leading_dim(x, y)
            for t in _tree_leaves(x) + _tree_leaves(y):
                if t.dim() > 0 and t.shape[0] != n:
                    raise ValueError(
                        f"Objective: batch {index} has tensors with different numbers of samples "
                        f"({t.shape[0]} vs {n})."
                    )
                if check and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise ValueError(f"Objective: batch {index} contains NaN or Inf values.")
            x = _tree_map(self._to_device, x)
            y = _tree_map(self._to_device, y)
            count += 1
            yield Batch(x, y, n, index)
        if count == 0:
            raise ValueError("Objective: the data produced no batches.")
        self._validated = True

    def num_samples(self) -> int:
        """N without a pass: from tensor shapes, a list's batches, or a sized DataLoader's dataset."""
        data = self.data
        if isinstance(data, _SplitBatches):
            return data.n
        if isinstance(data, (list, tuple)):
            total = 0
            for b in data:
                x, y = (b, None) if isinstance(b, (Tensor, Mapping)) else b
                total += _leading_dim(x, y)
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
        batch = next(iter(self.batches()))
        x = _tree_map(lambda t: t[:1], batch.x)
        y = None if batch.y is None else _tree_map(lambda t: t[:1] if t.dim() > 0 else t, batch.y)
        return Batch(x, y, 1, 0)

    def _to_device(self, t: Tensor) -> Tensor:
        if t.is_floating_point():
            return t.to(device=self.device, dtype=self.dtype, non_blocking=True)
        return t.to(device=self.device, non_blocking=True)

    def accumulate(self, per_batch: Callable[[Batch], Tensor]) -> Tensor:
        """Σ_b w_b · per_batch(b) with the whole-data normalization (one pass)."""
        acc, total = None, 0
        for batch in self.batches():
            r = per_batch(batch)
            if self.reduction == "mean":
                r = r * batch.n
            acc = r if acc is None else acc.add_(r)
            total += batch.n
        return acc / total if self.reduction == "mean" else acc

    @contextlib.contextmanager
    def session(self):
        """Leave the model as found: train/eval flags and, for stochastic models, the global RNG."""
        modes = [(m, m.training) for m in self.model.modules()] if isinstance(self.model, nn.Module) else []
        self._bn_training = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and mode for m, mode in modes)
        rng = torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []) \
            if self.allow_stochastic else contextlib.nullcontext()
        try:
            with rng:
                yield self
        finally:
            for m, mode in modes:
                if m.training != mode:
                    m.train(mode)

    # ---- conveniences -------------------------------------------------------------
    def loss_value(self) -> float:
        """The whole-data loss L(θ) (one pass)."""
        with self.session(), torch.no_grad():
            theta = self.theta()
            return float(self.accumulate(lambda b: self.loss(self.forward(theta, b.x), b.y, b.index)))

    def gradient(self) -> Tensor:
        """∇L(θ) as a flat vector (one pass)."""
        def per_batch(b: Batch) -> Tensor:
            theta = [t.detach().requires_grad_() for t in self.theta()]
            with torch.enable_grad():
                value = self.loss(self.forward(theta, b.x), b.y, b.index)
                grads = torch.autograd.grad(value, theta, allow_unused=True)
            return torch.cat([(torch.zeros_like(t) if g is None else g).reshape(-1) for g, t in zip(grads, theta)])

        with self.session():
            return self.accumulate(per_batch)
