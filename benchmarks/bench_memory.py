"""Peak memory of wide blocks, trace estimators and the explicit NTK (issue 15, costs 3 and 4).

    python benchmarks/bench_memory.py [--rows hessian-block ggn-block ...] [--json out.json]

Each row runs in a fresh subprocess (one torch thread); the figure is how far the peak resident set
size (Linux ``VmHWM``) rises during the measured call, over the process that has already built the
model, the data and the input block — so it counts the output and every temporary, and (as for
``run.py``) memory freed earlier and reused may make it a lower bound.  Each is given as a multiple
of the array that the call cannot avoid:

* ``hessian-block`` / ``ggn-block``: ``A @ V`` with V [P, 256] (P = 269 322, the MLP 784-256-256-10 on
  256 samples), × the size of V; the output alone is 1×.
* ``trace-hutchinson-100`` / ``-400``, ``trace-xtrace-100``: ``trace(H, num_matvecs=m)``, × the float32
  block of 100 probes [P, 100] (Hutchinson now holds one ``max_columns`` block at a time, so its peak
  does not grow with m).
* ``ntk-dense`` / ``ntk-dense-grouped``: ``NTK(...).to_dense()`` on 1024 inputs (a 10240 × 10240
  kernel), × the kernel; ``-grouped`` forces a 4 MB ``memory_budget`` (features in batch groups).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

ROWS = ("hessian-block", "ggn-block", "trace-hutchinson-100", "trace-hutchinson-400", "trace-xtrace-100",
        "ntk-dense", "ntk-dense-grouped")


def _hwm_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(row: str) -> dict:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    import curvops
    import workloads as W

    if row.startswith("ntk"):
        torch.manual_seed(0)
        model = W._tanh_mlp([784, 256, 256, 10])
        X = torch.randn(1024, 784, generator=torch.Generator().manual_seed(0))
        budget = 4_000_000 if row.endswith("grouped") else 2**28
        K = curvops.NTK(model, X, batch_size=256, memory_budget=budget)
        base, start = _hwm_mb(), time.perf_counter()
        out = K.to_dense(max_entries=K.shape[0] * K.shape[1])
        ref = out.numel() * out.element_size() / 2**20
        what = "kernel"
    else:
        w = W.build("mlp", scale=0.125)
        if row.endswith("block"):
            A = (curvops.Hessian if row.startswith("hessian") else curvops.GGN)(w.model, w.loss, w.batches)
            V = torch.randn(A.shape[0], 256, generator=torch.Generator().manual_seed(0))
            A @ V[:, :2]
            ref, what = V.numel() * 4 / 2**20, "V"
            base, start = _hwm_mb(), time.perf_counter()
            out = A @ V
        else:
            _, method, m = row.split("-")
            A = curvops.Hessian(w.model, w.loss, w.batches)
            A @ torch.randn(A.shape[0], 2)
            ref, what = A.shape[0] * 100 * 4 / 2**20, "100 float32 probes"
            base, start = _hwm_mb(), time.perf_counter()
            out = curvops.trace(A, method=method, num_matvecs=int(m), generator=0)
    seconds = time.perf_counter() - start
    peak = _hwm_mb() - base
    del out
    return {"row": row, "seconds": seconds, "extra_peak_mb": peak, "reference_mb": ref, "reference": what,
            "ratio": peak / ref}


def main(argv=None) -> None:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=ROWS)
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child)))
        return
    results = []
    print("| row | extra peak | × reference | reference | time |\n| --- | --- | --- | --- | --- |")
    for row in args.rows:
        proc = subprocess.run([sys.executable, __file__, "--child", row], capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"| {row} | error: {proc.stderr.strip().splitlines()[-1]} | | | |")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(r)
        print(f"| {row} | {r['extra_peak_mb']:.0f} MB | {r['ratio']:.2f} | {r['reference']} "
              f"({r['reference_mb']:.0f} MB) | {r['seconds']:.1f} s |", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
