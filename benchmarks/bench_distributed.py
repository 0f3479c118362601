"""The cost of a data-parallel product: local pass + one all-reduce of K·P + 1 numbers (docs/distributed.md).

Run:  python benchmarks/bench_distributed.py [--quick] [--backend gloo] [--out bench_distributed.json]
      (spawns 2 processes on this machine; under torchrun it uses torchrun's processes instead)

Workload: float32 MLP 32 → w → w → 10 with tanh, cross-entropy, 4096 samples split evenly over
the ranks, batches of 256, ``GGN @ V`` with K columns.  For each (width, K), best of ``--repeats``
on every rank, the slowest rank's time reported (the ranks finish a product together):

* **local**: the product on the rank's shard alone (an objective without a process group);
* **distributed**: the same product on the distributed objective (local pass + all-reduce);
* **all-reduce**: ``dist.all_reduce`` of K·P + 1 numbers alone (what a product adds).

Each process runs torch with one thread (two processes on a two-core machine).  NCCL needs GPUs:
``--backend nccl`` under ``torchrun`` on a machine with one GPU per rank.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import time

import torch
import torch.distributed as dist

N, D, C, BATCH = 4096, 32, 10, 256
FULL = [(256, 1), (256, 8), (1024, 1), (1024, 8)]
QUICK = [(64, 1), (64, 8)]


def _model(width: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(D, width), torch.nn.Tanh(), torch.nn.Linear(width, width),
                               torch.nn.Tanh(), torch.nn.Linear(width, C))


def _best(fn, repeats: int, device) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


def _slowest(seconds: float, device) -> float:
    t = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def measure(cases, repeats: int, device) -> list[dict]:
    import curvops

    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(N, D, generator=g), torch.randint(0, C, (N,), generator=g)
    lo, hi = rank * N // world, (rank + 1) * N // world
    shard = (X[lo:hi].to(device), y[lo:hi].to(device))
    rows = []
    for width, K in cases:
        model = _model(width).to(device)
        local = curvops.GGN(model, "cross_entropy", shard, batch_size=BATCH)
        distributed = curvops.GGN(model, "cross_entropy", shard, batch_size=BATCH, distributed=True)
        P = local.shape[0]
        V = torch.randn(P, K, generator=torch.Generator().manual_seed(2)).to(device)
        distributed @ V  # warm-up (and the one-time parameter check across ranks)
        local @ V
        buf = torch.zeros(K * P + 1, device=device)
        t_local = _slowest(_best(lambda: local @ V, repeats, device), device)
        t_dist = _slowest(_best(lambda: distributed @ V, repeats, device), device)
        t_ar = _slowest(_best(lambda: dist.all_reduce(buf), repeats, device), device)
        rows.append({"width": width, "P": P, "K": K, "local_ms": 1e3 * t_local, "distributed_ms": 1e3 * t_dist,
                     "allreduce_ms": 1e3 * t_ar, "allreduce_share": t_ar / t_local,
                     "numbers_reduced": K * P + 1})
    return rows


def table(rows, backend: str, world: int) -> str:
    lines = [f"{backend}, {world} processes, GGN @ V, best of repeats, slowest rank",
             "| width | P | K | local product (one shard) | distributed product | all-reduce of K·P + 1 alone |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['width']} | {r['P']:,} | {r['K']} | {r['local_ms']:.1f} ms | {r['distributed_ms']:.1f} ms | "
                     f"{r['allreduce_ms']:.2f} ms ({100 * r['allreduce_share']:.1f} %) |".replace(",", " "))
    return "\n".join(lines)


def run(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    if args.backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    rows = measure(QUICK if args.quick else FULL, args.repeats, device)
    if dist.get_rank() == 0:
        print(table(rows, args.backend, dist.get_world_size()))
        if args.out:
            with open(args.out, "w") as fh:
                json.dump({"backend": args.backend, "world_size": dist.get_world_size(), "rows": rows}, fh, indent=1)
    return rows


def _spawned(rank: int, port: int, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(args.backend, rank=rank, world_size=args.nproc,
                            timeout=datetime.timedelta(seconds=600))
    try:
        run(args)
    finally:
        dist.destroy_process_group()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small widths, a few seconds")
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    parser.add_argument("--nproc", type=int, default=2, help="processes to spawn without torchrun (default 2)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    parser.add_argument("--out", default=None, help="rank 0 writes the rows here as JSON")
    args = parser.parse_args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun
        dist.init_process_group(args.backend, timeout=datetime.timedelta(seconds=600))
        try:
            run(args)
        finally:
            dist.destroy_process_group()
        return
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_spawned, args=(port, args), nprocs=args.nproc, join=True)


if __name__ == "__main__":
    main()
