r"""Data parallelism on ``torch.distributed`` for the objective (core; docs/distributed.md).

Each rank holds a shard of the data.  A pass (a product, the gradient, the loss) runs on the
rank's shard, then **one** ``all_reduce`` (sum) adds, over the ranks, the accumulated block *and*
the total weight ``Σ_b d_b`` packed behind it (``K·P + 1`` numbers for ``K`` columns), so the
whole-data normalization uses the global count: the result equals the single-process full-data
result on every rank, whatever the shard sizes and however many targets each shard ignores.

No rank hangs on a local error: a rank whose pass raises still joins the all-reduce, with the
total weight ``−∞``, and re-raises its error; the others see ``−∞`` and raise a RuntimeError
that says another rank failed.  Before the first reduction of an objective one ``all_gather``
compares the number of selected parameters and their dtype across ranks.
"""

from __future__ import annotations

import math
import sys
from typing import Callable

import torch
from torch import Tensor

_INIT_HINT = ("Call torch.distributed.init_process_group(backend='gloo' or 'nccl') first (torchrun sets "
              "MASTER_ADDR, RANK and WORLD_SIZE for it).")
_DTYPE_CODES = {torch.float64: 0, torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}


def resolve_group(process_group, distributed: bool, api: str):
    """``None`` (one process), or the process group: ``process_group=`` or, with ``distributed=True``,
    the default group.  Raises when torch.distributed is not initialized."""
    if isinstance(distributed, bool) is False:
        raise TypeError(f"{api}: expected True or False for distributed, got {type(distributed).__name__}.")
    if process_group is None and not distributed:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        which = "process_group=" if process_group is not None else "distributed=True"
        raise RuntimeError(f"{api}: {which} needs an initialized torch.distributed, but it is not initialized. "
                           f"{_INIT_HINT}")
    return dist.group.WORLD if process_group is None else process_group


def unwrap(model):
    """The module inside ``DistributedDataParallel`` (products never run DDP's forward or its hooks).

    A model whose parameters are sharded over the ranks (FSDP1 ``FullyShardedDataParallel``, FSDP2
    ``fully_shard``, DTensor parameters) is refused with a ValueError that says what to do: curvops
    needs every selected parameter in full on every rank (docs/distributed.md, "FSDP").
    """
    from torch.nn.parallel import DistributedDataParallel

    model = model.module if isinstance(model, DistributedDataParallel) else model
    _refuse_sharded(model)
    return model


def _refuse_sharded(model) -> None:
    if not isinstance(model, torch.nn.Module):
        return
    # FSDP and DTensor classes exist only if their modules were imported (a wrapped model imported them)
    fsdp, dtensor = sys.modules.get("torch.distributed.fsdp"), sys.modules.get("torch.distributed.tensor")
    kinds = tuple(k for k in (getattr(fsdp, "FullyShardedDataParallel", None), getattr(fsdp, "FSDPModule", None))
                  if k is not None)
    wrapped = [name or "<root>" for name, m in model.named_modules() if kinds and isinstance(m, kinds)]
    DTensor = getattr(dtensor, "DTensor", None)
    sharded = [n for n, p in model.named_parameters() if DTensor is not None and isinstance(p, DTensor)]
    if not (wrapped or sharded):
        return
    what = (f"FSDP-wrapped modules {wrapped[:4]}" if wrapped else f"DTensor (sharded) parameters {sharded[:4]}")
    raise ValueError(
        f"Objective: the model has {what}: each rank holds only a shard of its parameters, but curvops needs every "
        f"selected parameter in full on every rank (a product's vectors are full P-vectors; the data, not the "
        f"model, is split over the ranks). Gather the full weights into a plain copy of the model on every rank — "
        f"torch.distributed.checkpoint.state_dict.get_model_state_dict(model, "
        f"options=StateDictOptions(full_state_dict=True)), then load_state_dict into an unwrapped model — or wrap "
        f"the model in DistributedDataParallel instead (docs/distributed.md, FSDP).")


def rank_of(group) -> int:
    import torch.distributed as dist

    return 0 if group is None else dist.get_rank(group)


def _comm_device(group, device: torch.device) -> torch.device:
    """Where a collective's tensor must live: a CUDA device for NCCL, the data's device otherwise."""
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl" and device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def check_ranks(group, num_params: int, dtype: torch.dtype, device: torch.device, api: str) -> None:
    """One ``all_gather`` of (P, dtype code): a mismatch raises the same ValueError on every rank."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    mine = torch.tensor([num_params, _DTYPE_CODES.get(dtype, 9)], dtype=torch.int64,
                        device=_comm_device(group, device))
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine, group=group)
    seen = [tuple(int(v) for v in p.cpu()) for p in parts]
    if len(set(seen)) > 1:
        names = {c: str(d).replace("torch.", "") for d, c in _DTYPE_CODES.items()}
        listed = ", ".join(f"rank {r}: {p} parameters ({names.get(c, 'other')})" for r, (p, c) in enumerate(seen))
        raise ValueError(f"{api}: expected the same selected parameters (count and dtype) on every rank, got "
                         f"{listed}. Build the same model and params= on every rank.")


def sum_over_ranks(group, run: Callable[[], tuple[Tensor, float]], like: Callable[[], Tensor],
                   api: str) -> tuple[Tensor, float]:
    """``run()`` on this rank's shard → ``(acc, total)``; the sums over ranks, by one all-reduce.

    ``like()`` gives a zero accumulator of the right shape for a rank whose ``run`` failed.
    """
    import torch.distributed as dist

    error = None
    try:
        acc, total = run()
    except Exception as err:  # join the collective anyway, so that no rank waits forever
        error, acc, total = err, None, -math.inf
    if acc is None:  # a failed pass, or an empty shard: zeros of the block's shape
        try:
            acc = like()
        except Exception:  # noqa: BLE001 - the shape is unknown here: this rank cannot join the all-reduce
            why = (f"this rank's pass failed ({type(error).__name__}: {error})" if error is not None
                   else "this rank's shard produced no batch")
            raise RuntimeError(f"{api}: {why}, and the pass does not give the shape of its result, so this rank "
                               f"cannot join the all-reduce (the other ranks wait until their timeout). Give every "
                               f"rank at least one sample.") from error
    with torch.inference_mode(False), torch.no_grad():
        flat = torch.cat([acc.reshape(-1), acc.new_tensor([total])])
        dev = _comm_device(group, flat.device)
        buf = flat.to(dev)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
        flat = buf.to(flat.device)
    if error is not None:
        raise error
    total = float(flat[-1])
    if math.isnan(total) or total == -math.inf:
        raise RuntimeError(f"{api}: another rank failed during this pass over its shard (its own error says "
                           f"why); every rank stops here.")
    return flat[:-1].reshape(acc.shape), total


def max_over_ranks(group, measure: Callable[[], int], device: torch.device, api: str) -> int:
    """The largest of ``measure()`` over the ranks (one all-reduce); a rank whose ``measure`` fails
    still joins, then raises its error, and the others stop too."""
    import torch.distributed as dist

    error, value = None, -1
    try:
        value = int(measure())
    except Exception as err:  # join the collective anyway, so that no rank waits forever
        error = err
    buf = torch.tensor([value, 0 if error is None else 1], dtype=torch.int64, device=_comm_device(group, device))
    dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=group)
    if error is not None:
        raise error
    if int(buf[1]):
        raise RuntimeError(f"{api}: another rank failed while measuring (its own error says why); every rank "
                           f"stops here.")
    return int(buf[0])


def broadcast_seed(group, device: torch.device) -> int:
    """A seed drawn on rank 0 (from its default generator) and broadcast: the same on every rank."""
    import torch.distributed as dist

    src = dist.get_global_rank(group, 0) if group is not dist.group.WORLD else 0
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64) if dist.get_rank(group) == 0 \
        else torch.zeros(1, dtype=torch.int64)
    buf = seed.to(_comm_device(group, device))
    dist.broadcast(buf, src=src, group=group)
    return int(buf.cpu())


class Sharded:
    """Mixin of :class:`~curvops.Objective`: its process group and the reduction over ranks."""

    process_group = None

    def _init_distributed(self, process_group, distributed: bool) -> None:
        self.process_group = resolve_group(process_group, distributed, "Objective")
        self._ranks_checked = False

    @property
    def rank(self) -> int:
        """This process's rank in the objective's group (0 without one)."""
        return rank_of(self.process_group)

    def reduce_pass(self, run: Callable[[], tuple[Tensor, float]], like: Callable[[], Tensor],
                    api: str = "Objective") -> tuple[Tensor, float]:
        """``run()`` → ``(acc, total)`` on this shard; with a process group, summed over the ranks."""
        if self.process_group is None:
            return run()
        if not self._ranks_checked:
            check_ranks(self.process_group, self.num_params, self.dtype, self.device, api)
            self._ranks_checked = True
        acc, total = sum_over_ranks(self.process_group, run, like, api)
        if total == 0 and self.reduction == "sum":
            raise ValueError(f"{api}: no rank has any data (every shard is empty).")
        return acc, total
