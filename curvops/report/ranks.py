r"""The report on ``torch.distributed`` (``curvops report`` under ``torchrun``; docs/distributed.md).

Every rank gets the same arguments and the *whole* data set; :func:`shard_data` gives each rank
its contiguous shard (sizes differ by at most one sample, rank 0 first).  Each section runs in
one of three modes (:data:`MODES`):

* ``"all"``: every rank runs it on its shard with the distributed Hessian/GGN/objective; each
  product ends with one all-reduce, so every rank gets the single-process numbers;
* ``"rank0"``: the section works on the first samples of the data (NTK, active subspace,
  architecture): rank 0 runs it alone, on one process, on the whole data set's first samples,
  exactly as a single-process report would; the others wait;
* ``"skip"``: the section is not data-parallel and would be slow or wrong on one rank: it is
  recorded as ``skipped`` with the reason.  A section not listed in :data:`MODES` is skipped
  too (it has not been checked under torch.distributed).

After each section one ``all_gather_object`` compares the ranks' statuses and a hash of their
results, so a failure on one rank fails the section on every rank (no rank goes on alone into a
collective the others never join) and a rank that computed different numbers is reported.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import Tensor

#: section name → "all" (data-parallel), "rank0" (first samples, one process on rank 0) or "skip"
MODES = {"overview": "all", "eigenvalues": "all", "hessian_matrix": "all", "density": "all", "trace": "all",
         "condition": "all", "rank": "all", "stationary": "all",
         "ntk": "rank0", "active_subspace": "rank0", "architecture": "rank0",
         "active_subspace_prior": "rank0",  # report/sections_prior.py: on the first samples, one process
         "landscape": "all"}  # loss_along/loss_plane sum over every rank's shard (one all-reduce per pass)

#: why a section is skipped under torch.distributed (shown in the report); none at present
SKIP_REASONS: dict[str, str] = {}

#: environment variables torchrun sets for every process
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_TIMEOUT = 1800.0


def skip_message(name: str) -> str:
    why = SKIP_REASONS.get(name, "this section has not been checked under torch.distributed")
    return f"skipped under torch.distributed: {why}; run without torchrun for it"


@dataclass
class Ranks:
    """The process group of a distributed report, this rank, and how the data was sharded."""

    group: Any
    rank: int
    world: int
    backend: str
    shard_sizes: list[int] = field(default_factory=list)
    unit: str = "samples"

    def mode(self, section: str) -> str:
        return MODES.get(section, "skip")

    def describe(self) -> str:
        sizes = "/".join(str(s) for s in self.shard_sizes)
        return f"{self.backend}, {self.world} ranks, contiguous shards of {sizes} {self.unit}"

    def record(self, sections) -> dict:
        """What ``summary["distributed"]`` holds: the group, the shards and how each of ``sections`` ran."""
        modes = {s: self.mode(s) for s in sections}
        return {"world_size": self.world, "backend": self.backend, "sharding": "contiguous",
                "shard_sizes": list(self.shard_sizes), "shard_unit": self.unit,
                "modes": {"all ranks (data-parallel)": [s for s, m in modes.items() if m == "all"],
                          "rank 0 alone (first samples of the whole data)":
                              [s for s, m in modes.items() if m == "rank0"],
                          "skipped": [s for s, m in modes.items() if m == "skip"]}}

    # ---- collectives of the driver ------------------------------------------------------------
    def gather(self, obj) -> list:
        """``obj`` of every rank (one ``all_gather_object``)."""
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        import torch.distributed as dist

        box = [obj if self.rank == 0 else None]
        src = 0 if self.group is dist.group.WORLD else dist.get_global_rank(self.group, 0)
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]


def setup(process_group, distributed: bool) -> Ranks | None:
    """``None`` (one process) or the :class:`Ranks` of ``process_group`` / the default group."""
    from .._distributed import resolve_group

    group = resolve_group(process_group, distributed, "build_report")
    if group is None:
        return None
    import torch.distributed as dist

    return Ranks(group, dist.get_rank(group), dist.get_world_size(group), str(dist.get_backend(group)))


# ---- sharding -----------------------------------------------------------------------------------
def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s contiguous shard of ``n`` items (sizes differ by ≤ 1)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def _slice(x, start: int, stop: int):
    from .._data import tree_map

    return tree_map(lambda t: t[start:stop] if t.dim() > 0 else t, x)


def shard_data(data, rank: int, world: int, *, target_key: str | None = "labels"):
    """This rank's contiguous shard of the whole data set, with the shard sizes of every rank.

    Args:
        data: ``(X, y)`` (inputs a tensor, tuple or dict of tensors), a dict of tensors, a list of
            batches, or a ``DataLoader`` over a map-style dataset with the default sequential
            sampler and a ``batch_size``.
        rank, world: this rank and the number of ranks.

    Returns:
        ``(shard, sizes, unit)``: the shard in the same form as ``data`` (a DataLoader becomes a
        DataLoader over a ``Subset`` with the same batch size, collate function and workers), the
        size of every rank's shard, and ``"samples"`` or ``"batches"`` (a list of batches is
        sharded by whole batches).  With ``drop_last`` only the samples a one-process pass uses
        are sharded, so the shards together are exactly that pass's data.

    Raises:
        TypeError: a data source that cannot be sharded without a pass over it (an iterable
            dataset, a custom sampler or batch sampler, a generator), with what to pass instead.
    """
    from torch.utils.data import DataLoader, IterableDataset, SequentialSampler, Subset

    from .._data import leading_dim, split_dict

    def bounds(n):
        sizes = [b - a for a, b in (shard_bounds(n, r, world) for r in range(world))]
        return shard_bounds(n, rank, world), sizes

    if isinstance(data, Mapping):
        x, y = split_dict(data, target_key)
        (a, b), sizes = bounds(leading_dim(x, y))
        return _slice(dict(data), a, b), sizes, "samples"
    if isinstance(data, Tensor) or (isinstance(data, tuple) and len(data) == 2 and isinstance(data[1], Tensor)):
        x, y = (data, None) if isinstance(data, Tensor) else data
        (a, b), sizes = bounds(leading_dim(x, y))
        return _slice(data, a, b), sizes, "samples"
    if isinstance(data, DataLoader):
        ds, B = data.dataset, data.batch_size
        if isinstance(ds, IterableDataset) or B is None or not isinstance(data.sampler, SequentialSampler):
            raise TypeError(
                "build_report: under torch.distributed the data is sharded over the ranks by sample index, which "
                "needs a DataLoader over a map-style dataset with the default sequential sampler and a batch_size; "
                f"got a DataLoader with {type(ds).__name__} and {type(data.sampler).__name__}. Return (X, y) "
                "tensors or such a DataLoader, or run without torchrun.")
        n = len(ds) if not data.drop_last else (len(ds) // B) * B
        (a, b), sizes = bounds(n)
        shard = DataLoader(Subset(ds, range(a, b)), batch_size=B, shuffle=False, num_workers=data.num_workers,
                           collate_fn=data.collate_fn, pin_memory=data.pin_memory, drop_last=False,
                           timeout=data.timeout, worker_init_fn=data.worker_init_fn)
        return shard, sizes, "samples"
    if isinstance(data, list):
        (a, b), sizes = bounds(len(data))
        return data[a:b], sizes, "batches"
    raise TypeError(f"build_report: under torch.distributed expected data as (X, y), a dict of tensors, a list of "
                    f"batches or a DataLoader (to shard over the ranks), got {type(data).__name__}.")


# ---- the same model and data on every rank --------------------------------------------------------
def fingerprint(tensors) -> list[float]:
    """Three float64 sums over ``tensors`` (values, squares, position-weighted): equal on ranks that hold
    the same numbers; a different weight or sample changes them."""
    s = torch.zeros(3, dtype=torch.float64)
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor) or not (t.is_floating_point() or t.dtype in (torch.int64, torch.int32)):
            continue
        v = t.detach().to("cpu", torch.float64).reshape(-1)
        pos = torch.arange(1, v.numel() + 1, dtype=torch.float64) / max(v.numel(), 1)
        s += torch.stack([v.sum(), (v * v).sum(), (v * pos).sum() * (i + 1)])
    return s.tolist()


def check_same(ranks: Ranks, model, data) -> None:
    """Raise the same ValueError on every rank when the model's parameters and buffers, or the data
    tensors, differ across ranks (one ``all_gather_object``; a DataLoader's data is not read)."""
    from torch.utils.data import DataLoader

    from .._data import tree_leaves

    mine = {"model": fingerprint(list(model.parameters()) + list(model.buffers()))
            if isinstance(model, torch.nn.Module) else None,
            "data": None if isinstance(data, DataLoader) else fingerprint(tree_leaves(data))}
    seen = ranks.gather(mine)
    for key, what, fix in (("model", "model parameters and buffers", "load the same checkpoint on every "
                            "rank (or seed the model's construction)"),
                           ("data", "the data", "seed the data's construction or load it from a file, so that "
                            "every rank holds the same whole data set (build_report shards it)")):
        values = [s[key] for s in seen]
        if any(v != values[0] for v in values):
            differ = [r for r, v in enumerate(values) if v != values[0]]
            raise ValueError(f"build_report: expected the same {what} on every rank, but ranks {differ} differ "
                             f"from rank 0; {fix}.")


def broadcast_model(model, group=None) -> None:
    """Rank 0's parameters and buffers into ``model`` on every rank (as DistributedDataParallel does)."""
    import torch.distributed as dist

    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0, group=group)


def result_hash(result: dict) -> str:
    """A hash of a section's numbers (what the ranks compare after each section)."""
    from .summary import to_jsonable

    text = json.dumps(to_jsonable(result), sort_keys=True, allow_nan=False)
    return hashlib.sha1(text.encode()).hexdigest()


# ---- torchrun ---------------------------------------------------------------------------------------
def launched_by_torchrun() -> bool:
    """True when the environment describes a process group of more than one process (torchrun's variables)."""
    return all(v in os.environ for v in TORCHRUN_VARS) and int(os.environ["WORLD_SIZE"]) > 1


def init_from_env(device: str, timeout: float) -> tuple[bool, str]:
    """Join the process group torchrun describes, unless one is initialized already.

    Backend ``nccl`` for a CUDA device (each rank on ``cuda:LOCAL_RANK``), ``gloo`` on the CPU;
    every collective gives up after ``timeout`` seconds.  Returns ``(initialized_here, device)``.
    """
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device)
    if dev.type == "cuda":
        if dev.index is not None:
            raise ValueError(f"--device: under torchrun each rank uses cuda:LOCAL_RANK; pass --device cuda, "
                             f"got {device!r}.")
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    if dist.is_initialized():
        return False, device
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=timeout))
    return True, device
