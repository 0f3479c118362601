"""Top Hessian eigenvalues and trace of a model whose data is sharded over torch.distributed ranks.

Run:  torchrun --nproc-per-node 2 examples/distributed_spectrum.py [--quick] [--out spectrum.json]
      (plain ``python examples/distributed_spectrum.py`` runs it as one process)

Each rank holds every ``world_size``-th sample of the built-in demo data; every product is the
product on the rank's shard plus one all-reduce, so every rank gets the whole-data Hessian's
spectrum (docs/distributed.md). Rank 0 prints the results and writes them as JSON to ``--out``;
with ``--check`` it also computes them on the whole data in one process and compares.
"""

import argparse
import datetime
import json
import os
import socket

import torch
import torch.distributed as dist

import curvops
from curvops.demo import demo_problem

#: the sizes ``--quick`` runs (seconds; CI runs the example this way)
QUICK = dict(num_samples=256, num_probes=20)


def _init() -> None:
    """The process group torchrun describes, or a group of one process without torchrun."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))


def main(out: str = "spectrum.json", num_samples: int = 1024, num_probes: int = 50, check: bool = False) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    model, X, y = demo_problem(num_samples=num_samples)  # the same weights and data on every rank
    obj = curvops.Objective(model, "cross_entropy", (X[rank::world], y[rank::world]), batch_size=64,
                            distributed=True)
    H = curvops.Hessian(obj)
    top = curvops.eigsh(H, k=3, tol=1e-8)                       # the same on every rank
    tr = curvops.trace(H, method="hutchinson", num_matvecs=num_probes, generator=0)
    result = dict(world_size=world, num_params=H.shape[0], num_samples=len(X), loss=obj.loss_value(),
                  top_eigenvalues=top.eigenvalues.flip(0).tolist(), trace=tr.value)
    if check:  # the same on the whole data, one process (every rank does it; cheap here)
        one = curvops.Hessian(model, "cross_entropy", (X, y), batch_size=64)
        result["one_process_top_eigenvalues"] = curvops.eigsh(one, k=3, tol=1e-8).eigenvalues.flip(0).tolist()
    if rank == 0:
        print(f"{world} rank(s), {H.shape[0]} parameters, {len(X)} samples: loss {result['loss']:.5f}, "
              f"top-3 Hessian eigenvalues {[round(v, 5) for v in result['top_eigenvalues']]}, "
              f"Hutchinson trace ({num_probes} probes) {tr.value:.4f}")
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
    return result


def cli(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="spectrum.json", help="rank 0 writes the results here (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="small sizes, a few seconds (as CI runs it)")
    parser.add_argument("--check", action="store_true", help="also compute the spectrum on one process and compare")
    args = parser.parse_args(argv)
    _init()
    try:
        return main(out=args.out, check=args.check, **(QUICK if args.quick else {}))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    cli()
