r"""Data handling of the objective: batches as ``(inputs, target)``, dict batches, splitting.

Conventions (documented in docs/conventions.md):

* ``(X, y)``: inputs (a tensor, a tuple or a dict of tensors) and targets; ``batch_size=``
  splits them along the first dimension.
* a list of batches, a ``DataLoader`` or any re-iterable of batches, each ``(inputs, target)``
  or a **dict** ``{name: tensor}``.  A dict batch holds its targets under ``target_key``
  (default ``"labels"``, HuggingFace's name): the targets are ``batch[target_key]`` and the
  inputs are the other entries.  A dict without that key is inputs only (allowed for loss-free
  quantities: Jacobians, NTK).
* inputs-only data (a tensor or a dict of tensors) for loss-free quantities.

A data source whose order changes between passes (a shuffling sampler) is refused: every product
of an operator must see the same batches, or the products are not one matrix.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from torch import Tensor
from torch.utils.data import DataLoader


def tree_leaves(x) -> list[Tensor]:
    if isinstance(x, Tensor):
        return [x]
    if isinstance(x, Mapping):
        return [t for v in x.values() for t in tree_leaves(v)]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in tree_leaves(v)]
    return []


def tree_map(fn, x):
    if isinstance(x, Tensor):
        return fn(x)
    if isinstance(x, Mapping):
        return {k: tree_map(fn, v) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(tree_map(fn, v) for v in x)
    if isinstance(x, list):
        return [tree_map(fn, v) for v in x]
    return x


@dataclass
class Batch:
    """One batch on the objective's device: inputs, target, number of samples, index."""

    x: Any
    y: Any
    n: int
    index: int


def leading_dim(x, y) -> int:
    leaves = tree_leaves(y) + tree_leaves(x)
    if not leaves:
        raise TypeError("Objective: a batch must hold tensors (inputs, target); found none.")
    return int(leaves[0].shape[0]) if leaves[0].dim() > 0 else 1


class SplitBatches:
    """An (X, y) pair split into batches of ``batch_size`` (re-iterable, lazy)."""

    def __init__(self, X, y, batch_size: int | None):
        self.X, self.y, self.batch_size = X, y, batch_size
        self.n = leading_dim(X, y)

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
            yield (tree_map(lambda t: t[sl], self.X), tree_map(lambda t: t[sl], self.y))


def split_dict(batch: Mapping, target_key: str | None):
    """A dict batch → (inputs dict, targets or None)."""
    if target_key is not None and target_key in batch:
        return {k: v for k, v in batch.items() if k != target_key}, batch[target_key]
    return dict(batch), None


def shuffling_sampler(data) -> str | None:
    """The name of the sampler that makes a DataLoader's order change between passes, or None."""
    if not isinstance(data, DataLoader):
        return None
    from torch.utils.data import RandomSampler, SubsetRandomSampler, WeightedRandomSampler
    from torch.utils.data.distributed import DistributedSampler

    samplers = [getattr(data, "sampler", None), getattr(getattr(data, "batch_sampler", None), "sampler", None)]
    for s in samplers:
        if isinstance(s, (RandomSampler, SubsetRandomSampler, WeightedRandomSampler)):
            return type(s).__name__
        if isinstance(s, DistributedSampler) and s.shuffle:
            return "DistributedSampler(shuffle=True)"
    return None


def as_batches(data, batch_size, *, has_loss: bool, target_key: str | None, allow_stochastic: bool,
               sharded: bool = False):
    """Validate the data's kind (no pass over it) and return a re-iterable of raw batches."""
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"Objective: batch_size must be a positive integer, got {batch_size!r}.")
    if isinstance(data, Mapping):
        x, y = split_dict(data, target_key)
        if y is None and has_loss:
            raise ValueError(
                f"Objective: the data is a dict of inputs without targets (no key {target_key!r}), but the loss "
                f"needs targets. Put the targets under {target_key!r}, pass target_key= naming their key, or "
                f"pass data=(inputs, y)."
            )
        return _split_checked(x, y, batch_size, sharded)
    if isinstance(data, Tensor):
        if has_loss:
            raise ValueError(
                "Objective: the data is a single tensor (inputs only), but the loss needs targets. "
                "Pass data=(X, y), a list of (inputs, target) batches or a DataLoader."
            )
        return _split_checked(data, None, batch_size, sharded)
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[1], Tensor):
        return _split_checked(data[0], data[1], batch_size, sharded)
    if batch_size is not None:
        raise ValueError("Objective: batch_size= only applies to data given as an (X, y) pair of tensors "
                         "(or a dict of tensors); a list of batches or a DataLoader is already batched.")
    if isinstance(data, DataLoader):
        sampler = shuffling_sampler(data)
        if sampler is not None and not allow_stochastic:
            raise ValueError(
                f"Objective: the DataLoader shuffles ({sampler}), so every product would see the batches in "
                f"another order — with drop_last or batch-dependent models another matrix, and Lanczos or CG "
                f"then converge to nonsense. Build it with shuffle=False (the curvature of the whole data set "
                f"does not depend on the order), or pass allow_stochastic=True to accept a random operator."
            )
        _warn_padding(data)
        try:
            if len(data) == 0 and not sharded:  # a rank's empty shard adds nothing to the sums over ranks
                raise ValueError("Objective: the DataLoader is empty (0 batches).")
        except TypeError:  # iterable datasets have no length
            pass
        return data
    if isinstance(data, (list, tuple)):
        if len(data) == 0 and not sharded:
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


def _split_checked(x, y, batch_size, sharded: bool = False) -> SplitBatches:
    split = SplitBatches(x, y, batch_size)
    if split.n == 0 and not sharded:
        raise ValueError("Objective: the data is empty (0 samples).")
    return split


def dict_style_for(model, keys: frozenset) -> str:
    """How ``call='auto'`` passes dict inputs with these keys to ``model.forward``."""
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return "kwargs"
    params = list(sig.parameters.values())
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return "kwargs"
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if keys <= named:
        return "kwargs"
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    if len(required) <= 1 and positional:
        return "positional"
    raise TypeError(
        f"Objective: dict inputs with keys {sorted(map(str, keys))} fit neither model(**inputs) nor model(inputs) "
        f"for forward{sig}. Pass call='kwargs' or call='positional'."
    )


def _warn_padding(data: DataLoader) -> None:
    """DistributedSampler(drop_last=False) repeats samples so that every rank gets as many: say so."""
    import warnings

    from torch.utils.data.distributed import DistributedSampler

    s = getattr(data, "sampler", None)
    if isinstance(s, DistributedSampler) and not s.drop_last:
        try:
            n = len(s.dataset)
        except TypeError:
            return
        if n % s.num_replicas:
            warnings.warn(f"Objective: DistributedSampler pads {n} samples to {s.total_size} over {s.num_replicas} "
                          f"ranks by repeating {s.total_size - n} of them, so the operator counts those twice. "
                          f"For the exact whole-data matrix shard the data yourself (e.g. X[rank::world_size]).",
                          stacklevel=4)
