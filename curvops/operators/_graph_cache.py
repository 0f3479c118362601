r"""Per-batch autograd graphs kept between products (``keep_graphs``), within a memory budget.

A curvature product on a kept graph skips the forward and first backward of every batch (e.g. a
Hessian product costs one double backward instead of forward + backward + double backward).  The
graphs are kept per batch index, as long as the model holds the values they were built from
(``objective.state_matches``: checked by value before every product, contract rule 9), and as long
as they fit a byte budget.

**What is counted** (:class:`SavedBytes`): every tensor autograd saves while a batch's graph is
built, once per storage, except the storages of the model's parameters and buffers (the graph only
references them); a tensor that views part of a larger storage (a batch sliced from one input
tensor) is charged the bytes its view spans, not the whole storage; plus the tensors the entry
itself holds (outputs, cotangent leaves).  The parameter-sized gradients of a Hessian graph are
not held at all: the entry keeps their autograd edges (``GradientEdge``) only.

**The budget**: ``max_graph_bytes`` bytes, or by default :data:`DEFAULT_MEMORY_FRACTION` of the
memory available when the cache (re)fills — free device memory on CUDA (plus what torch's
allocator holds unused), ``MemAvailable`` (and the cgroup limit) on CPU — shared by every
operator's automatic cache in the process.  After the first batch, the whole data's need is
estimated (its bytes × the number of batches); every later batch is measured and kept while it
fits.  When the budget stops graphs from being kept, one warning per operator says so; the other
batches are recomputed in every product (exact, only slower).
"""

from __future__ import annotations

import os
import sys
import warnings
import weakref
from typing import Callable

import torch
from torch import Tensor

from .._data import SplitBatches, shuffling_sampler, tree_leaves

#: share of the available memory that automatic kept graphs may hold (all operators together)
DEFAULT_MEMORY_FRACTION = 0.25
_FALLBACK_BUDGET = 2**30  # when the available memory can't be read
_LIVE: "weakref.WeakSet[GraphCache]" = weakref.WeakSet()


def available_memory(device: torch.device) -> int | None:
    """Bytes that could still be allocated on ``device`` (None when unknown)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type != "cpu":
        return None
    candidates = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    candidates.append(int(line.split()[1]) * 1024)
                    break
    except OSError:
        pass
    try:  # a container's limit (cgroup v2)
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
        if limit != "max":
            candidates.append(max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    if not candidates and hasattr(os, "sysconf"):
        try:
            candidates.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError):
            pass
    return min(candidates) if candidates else None


def _span(t: Tensor) -> tuple[int, int]:
    """Byte range [lo, hi) of ``t``'s storage that its view covers."""
    size = t.element_size()
    if t.numel() == 0:
        return 0, 0
    extent = 1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))
    lo = t.storage_offset() * size
    return lo, lo + extent * size


class SavedBytes:
    """Counts the bytes autograd saves inside the ``with`` block (see the module docstring).

    Args:
        exclude: storage pointers not to count (the model's parameters and buffers).
    """

    def __init__(self, exclude: set[int]):
        self.exclude = exclude
        self.spans: dict[int, list[int]] = {}  # storage pointer → [lo, hi, storage bytes]
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t):
        if isinstance(t, Tensor) and t.device.type != "meta":
            self.add(t)
        return t

    def add(self, t: Tensor) -> None:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self.exclude or ptr == 0:
            return
        lo, hi = _span(t)
        s = self.spans.get(ptr)
        if s is None:
            self.spans[ptr] = [lo, hi, storage.nbytes()]
        else:
            s[0], s[1] = min(s[0], lo), max(s[1], hi)

    @property
    def nbytes(self) -> int:
        return sum(min(hi - lo, total) for lo, hi, total in self.spans.values())

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)


def _fixed_data(objective) -> bool:
    """Whether every pass sees the same batch tensors (a list/tuple of batches or a split pair)."""
    return isinstance(objective.data, (list, tuple, SplitBatches))


def _data_storages(objective) -> set[int]:
    """Storage pointers of the user's data tensors (a fixed list of batches or a split pair): the
    graphs reference them, but they exist anyway (a copy made for another dtype or device is new
    memory and is charged)."""
    data = objective.data
    if isinstance(data, SplitBatches):
        leaves = tree_leaves(data.X) + tree_leaves(data.y)
    elif isinstance(data, (list, tuple)):
        leaves = tree_leaves(list(data))
    else:
        return set()
    return {t.untyped_storage().data_ptr() for t in leaves if isinstance(t, Tensor) and t.device.type != "meta"}


def _fingerprint(objective) -> tuple | None:
    """Identity and version of every data tensor of a fixed data set: replacing a batch, appending
    one or writing into a data tensor in place changes it (the graphs are then rebuilt)."""
    data = objective.data
    if isinstance(data, SplitBatches):
        leaves = tree_leaves(data.X) + tree_leaves(data.y)
    elif isinstance(data, (list, tuple)):
        leaves = [len(data), *(id(b) for b in data), *tree_leaves(list(data))]
    else:
        return None
    return tuple((id(t), t._version) if isinstance(t, Tensor) else t for t in leaves)


def _num_batches(objective) -> int | None:
    try:
        return len(objective.data)
    except TypeError:
        return None


def _mb(n: float) -> str:
    if n < 2**20:
        return f"{n / 2**10:.1f} kB"
    return f"{n / 2**20:.1f} MB" if n < 2**30 else f"{n / 2**30:.2f} GB"


def _stacklevel() -> int:
    """The warning's stack level: the first frame outside the curvops package (the user's call)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


class GraphCache:
    """Kept per-batch graphs of one operator.

    Args:
        owner: the operator's name (for messages).
        objective: the operator's objective.
        keep: ``True`` (keep within the budget), ``False`` (never), or ``"auto"`` (the default of the
            operators: keep when the data is a fixed list of batches or a split ``(X, y)`` pair and the
            model has no stochastic modules; never for a DataLoader or other iterable, whose batches
            may differ between passes).
        max_bytes: the budget in bytes, or None for :data:`DEFAULT_MEMORY_FRACTION` of the available
            memory (shared by all automatic caches).
    """

    def __init__(self, owner: str, objective, keep, max_bytes: int | None):
        if keep not in (True, False, "auto"):
            raise ValueError(f"{owner}: keep_graphs must be True, False or 'auto', got {keep!r}.")
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int)
                                      or max_bytes < 0):
            raise ValueError(f"{owner}: max_graph_bytes must be None (a share of the available memory) or a "
                             f"number of bytes ≥ 0, got {max_bytes!r}.")
        if keep is True and shuffling_sampler(objective.data) is not None:
            raise ValueError(
                f"{owner}(keep_graphs=True): the DataLoader shuffles, so kept per-batch graphs would not match "
                f"the batches of later passes. Use shuffle=False (the operator does not depend on the order)."
            )
        self.owner, self.objective = owner, objective
        self.keep, self.max_bytes = keep, max_bytes
        self.enabled = keep is True or (keep == "auto" and _fixed_data(objective)
                                        and not (objective.allow_stochastic and objective.stochastic_modules()))
        self.entries: dict[int, object] = {}
        self.weights: dict[int, float] = {}  # each kept batch's weight w_b in the whole-data loss
        self.theta: list[Tensor] | None = None  # the θ leaves shared by every kept graph
        self.complete = False  # a whole pass found every batch kept: products may skip the data
        self.fingerprint: tuple | None = None
        self.nbytes = 0
        self.budget = 0
        self.stamp: tuple | None = None  # the parameter and buffer values the graphs were built from
        self.full = False
        self.warned = False
        self._exclude: set[int] = set()
        self._stamp_bytes = 0
        _LIVE.add(self)

    def clear(self) -> None:
        self.entries.clear()
        self.weights.clear()
        self.nbytes, self.full, self.stamp, self.theta, self.complete = 0, False, None, None, False

    def _resolve_budget(self) -> int:
        if self.max_bytes is not None:
            return self.max_bytes
        avail = available_memory(self.objective.device)
        if avail is None:
            return _FALLBACK_BUDGET
        others = sum(c.nbytes for c in list(_LIVE) if c is not self and c.max_bytes is None)
        return max(0, int(DEFAULT_MEMORY_FRACTION * (avail + others)) - others)

    def sync(self) -> None:
        """Before a product: drop the graphs if the model changed since they were built."""
        if not self.enabled:
            return
        obj = self.objective
        fingerprint = _fingerprint(obj)
        if self.stamp is not None and fingerprint == self.fingerprint and obj.state_matches(self.stamp):
            return
        # the model changed (in place, through .data, reassigned, load_state_dict) or the data did: rebuild
        self.clear()
        self.stamp, self.fingerprint = obj.state_stamp(), fingerprint
        self.theta = [t.detach().requires_grad_() for t in obj.theta()]
        self._exclude = {t.untyped_storage().data_ptr() for t in obj._state_tensors()} | _data_storages(obj)
        self._stamp_bytes = sum(t.numel() * t.element_size() for t in self.stamp)
        self.budget = self._resolve_budget()

    def get(self, index: int):
        return self.entries.get(index) if self.enabled else None

    def build(self, index: int, make: Callable[[], tuple[object, list[Tensor]]], weight: float = 1.0):
        """``make() -> (entry, held tensors)`` for batch ``index`` (of weight ``weight``), kept if it
        fits the budget."""
        if not self.enabled or self.full:
            return make()[0]
        with SavedBytes(self._exclude) as counter:
            entry, held = make()
        for t in held:
            if isinstance(t, Tensor):
                counter.add(t)
        nbytes = counter.nbytes
        if not self.entries:
            self._estimate(nbytes)
            nbytes += self._stamp_bytes  # the copy of the model's state that keys the graphs
        if self.nbytes + nbytes <= self.budget:
            self.entries[index] = entry
            self.weights[index] = weight
            self.nbytes += nbytes
        else:
            self.full = True
            self._warn(f"the budget is full after {len(self.entries)} batches ({_mb(self.nbytes)} kept; the next "
                       f"needs {_mb(nbytes)}, the budget is {_mb(self.budget)})")
        return entry

    def pass_done(self) -> None:
        """After a product's pass over the data: were all its batches kept?  (Half-precision models
        keep the per-batch pass, whose sum over batches is in float32; autograd would sum in half.)"""
        half = self.objective.dtype in (torch.bfloat16, torch.float16)
        self.complete = self.enabled and not self.full and bool(self.entries) and not half
        if self.full and not self.entries:  # not even one batch fits: stop keeping (and the state copy)
            self.clear()
            self.enabled = False

    def _estimate(self, first: int) -> None:
        n = _num_batches(self.objective)
        need = first * (n or 1) + self._stamp_bytes
        if n is not None and need > self.budget:
            fit = max(0, self.budget - self._stamp_bytes) // first if first else n
            self._warn(f"all {n} batches need about {_mb(need)} ({_mb(first)} per batch) but the budget is "
                       f"{_mb(self.budget)}: about {min(fit, n)} of {n} batches are kept")

    def _warn(self, what: str) -> None:
        if self.warned:
            return
        self.warned = True
        origin = ("max_graph_bytes" if self.max_bytes is not None
                  else f"default: {DEFAULT_MEMORY_FRACTION:.0%} of the available memory")
        warnings.warn(
            f"{self.owner}: kept graphs: {what} (budget from {origin}). The other batches are recomputed in "
            f"every product: exact, but slower. Pass a larger max_graph_bytes= to keep more, or "
            f"keep_graphs=False to keep none and silence this.", stacklevel=_stacklevel())


class KeptGraphsMixin:
    """The public face of an operator's :class:`GraphCache` (``self._cache``), shared by the
    Hessian and the output-space operators (GGN, Fisher, EmpiricalFisher)."""

    _cache: GraphCache

    def clear_cache(self) -> None:
        """Drop the kept graphs (frees their memory)."""
        self._cache.clear()

    @property
    def cache_bytes(self) -> int:
        """Bytes held by kept graphs (0 when none are kept)."""
        return self._cache.nbytes

    @property
    def kept_batches(self) -> int:
        """How many batches' graphs are kept."""
        return len(self._cache.entries)
