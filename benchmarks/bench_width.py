"""Where a wider MLP's Hessian product spends its time (issue 15, cost problem 5).

    python benchmarks/bench_width.py --width 256 --width 2048 [--samples 1024] [--threads 1]

For each width: the MLP 784-w-w-10 (tanh, cross-entropy, batches of 256), one full-data gradient
(the plain loop) and, as ratios to it, Hessian @ v recomputed (``keep_graphs=False``), on kept
graphs (the default) and GGN @ v on kept graphs; then ``torch.profiler``'s self time per operator
for each, in units of the gradient's profiled total, so the matrix products (``aten::mm``,
``aten::addmm``) can be compared with their count (docs/performance.md).
"""

from __future__ import annotations

import argparse
import collections

import torch
from torch.profiler import ProfilerActivity, profile

import curvops
import workloads as W
from methods import median_seconds


def _profile(fn, repeats: int = 2) -> collections.Counter:
    with profile(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(repeats):
            fn()
    agg: collections.Counter = collections.Counter()
    for e in p.key_averages():
        agg[e.key] += e.self_cpu_time_total / repeats
    return agg


def run(width: int, samples: int) -> None:
    torch.manual_seed(0)
    model = W._tanh_mlp([784, width, width, 10])
    gen = torch.Generator().manual_seed(0)
    X, y = torch.randn(samples, 784, generator=gen), torch.randint(0, 10, (samples,), generator=gen)
    batches = list(zip(X.split(256), y.split(256)))
    loss = torch.nn.CrossEntropyLoss()

    def gradient():
        model.zero_grad(set_to_none=True)
        for a, b in batches:
            (loss(model(a), b) * (a.shape[0] / samples)).backward()

    ops = {"Hessian, recomputed": curvops.Hessian(model, loss, batches, keep_graphs=False),
           "Hessian, kept graphs": curvops.Hessian(model, loss, batches),
           "GGN, kept graphs": curvops.GGN(model, loss, batches)}
    v = torch.randn(ops["Hessian, kept graphs"].shape[0])
    for op in ops.values():
        op @ v  # builds the kept graphs
    gradient()
    g = median_seconds(gradient)
    print(f"# width {width}: P = {v.numel()}, one gradient {g * 1e3:.0f} ms")
    pg = _profile(gradient)
    total_g = sum(pg.values())
    mm = ("aten::mm", "aten::addmm")
    print(f"  gradient: matrix products {sum(pg[k] for k in mm) / total_g:.2f} of it")
    for name, op in ops.items():
        ratio = median_seconds(lambda: op @ v) / g
        ph = _profile(lambda: op @ v)
        top = ", ".join(f"{k} {t / total_g:.2f}" for k, t in sorted(ph.items(), key=lambda kv: -kv[1])[:5])
        print(f"  {name}: {ratio:.2f} gradients; profiled {sum(ph.values()) / total_g:.2f}, matrix products "
              f"{sum(ph[k] for k in mm) / total_g:.2f} (in gradient units); top: {top}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, action="append", help="hidden width (repeatable; default 256, 2048)")
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for width in args.width or [256, 2048]:
        run(width, args.samples)


if __name__ == "__main__":
    main()
