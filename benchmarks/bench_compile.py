"""Eager against compiled (``Objective(compile=True)``) products, as multiples of one gradient.

    python benchmarks/bench_compile.py [--workload mlp|seed002|conv|all] [--repeats N]
                                       [--threads N] [--quick] [--json PATH]

Workloads: ``mlp`` and ``seed002`` from ``workloads.py`` (the main benchmark's), and ``conv``: a
small conv net written here (3→16→32 channels, 3×3 kernels, ReLU, max-pool, a linear head;
22 k parameters) on 512 random 3×16×16 images in batches of 128, cross-entropy.

Rows (median over interleaved rounds, ratio to the median of one full-data gradient by a loop
of ``loss.backward()`` timed in the same rounds): Hessian @ v, GGN @ v and a 16-column Hessian
block (per column), each eager (the operators' default path) and compiled (the objective's
compiled pass: one torch.func graph per batch under ``torch.compile``), plus the compiled
gradient.  The first compiled call (tracing + compilation; inductor's on-disk cache may
shorten it on a rerun) is reported apart, in seconds.  Every compiled result is checked
against the eager one (‖a − b‖/‖b‖, float32).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workloads as W  # noqa: E402

import curvops  # noqa: E402

BLOCK = 16
warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")


def conv_workload(scale: float = 1.0) -> W.Workload:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    n = max(128, int(512 * scale))
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(32 * 4 * 4, 10)).eval()
    X = torch.randn(n, 3, 16, 16, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    batches = list(zip(X.split(128), y.split(128)))
    return W.Workload("conv", model, nn.CrossEntropyLoss(), batches,
                      f"conv net 3-16-32 (3×3, ReLU, max-pool) + linear, cross-entropy, N={n}, batches of 128")


def build(name: str, scale: float) -> W.Workload:
    return conv_workload(scale) if name == "conv" else W.build(name, scale=scale)


def methods(w: W.Workload):
    """key → (label, columns, run) after one warm-up run each; compile times and outputs aside."""
    n = w.num_data

    def gradient():
        w.model.zero_grad(set_to_none=True)
        for X, y in w.batches:
            (w.loss(w.model(X), y) * (X.shape[0] / n)).backward()

    gen = torch.Generator().manual_seed(1)
    P = w.num_params
    v, V = torch.randn(P, 1, generator=gen), torch.randn(P, BLOCK, generator=gen)
    eager = curvops.Objective(w.model, w.loss, w.batches)
    comp = curvops.Objective(w.model, w.loss, w.batches, compile=True)
    H, G = curvops.Hessian(eager), curvops.GGN(eager)
    rows = {
        "grad": ("one gradient (loop of loss.backward())", 0, gradient),
        "grad.c": ("compiled Objective.gradient()", 0, comp.gradient),
        "H": ("Hessian @ v, eager", 1, lambda: H @ v),
        "H.c": ("Hessian @ v, compiled", 1, lambda: comp.compiled.matmat("hessian", v)),
        "GGN": ("GGN @ v, eager", 1, lambda: G @ v),
        "GGN.c": ("GGN @ v, compiled", 1, lambda: comp.compiled.matmat("ggn", v)),
        "H16": (f"Hessian @ V[P,{BLOCK}], eager, per column", BLOCK, lambda: H @ V),
        "H16.c": (f"Hessian @ V[P,{BLOCK}], compiled, per column", BLOCK,
                  lambda: comp.compiled.matmat("hessian", V)),
    }
    first, outs = {}, {}
    for key, (_, _, run) in rows.items():
        start = time.perf_counter()
        outs[key] = run()
        first[key] = time.perf_counter() - start
        if comp.compiled.failure:
            raise RuntimeError(f"bench_compile: the compiled path failed: {comp.compiled.failure}")
    errors = {k: float((outs[k] - outs[k[:-2]]).norm() / outs[k[:-2]].norm())
              for k in rows if k.endswith(".c") and k != "grad.c"}
    errors["grad.c"] = float((outs["grad.c"] - eager.gradient()).norm() / eager.gradient().norm())
    return rows, first, errors


def measure(name: str, args) -> dict:
    w = build(name, args.scale)
    print(f"# {name}: {w.description}; P={w.num_params}", file=sys.stderr, flush=True)
    rows, first, errors = methods(w)
    times = {k: [] for k in rows}
    for r in range(args.repeats):
        for key, (_, _, run) in rows.items():
            start = time.perf_counter()
            run()
            times[key].append(time.perf_counter() - start)
            if key != "grad":
                start = time.perf_counter()
                rows["grad"][2]()
                times["grad"].append(time.perf_counter() - start)
    grad_s = statistics.median(times["grad"])
    out = {"description": w.description, "num_params": w.num_params, "gradient_s": grad_s, "rows": {}}
    for key, (label, cols, _) in rows.items():
        med = statistics.median(times[key])
        out["rows"][key] = {"label": label, "median_s": med, "ratio": med / grad_s / max(cols, 1),
                            "first_call_s": first[key], "rel_err_vs_eager": errors.get(key)}
    return out


def markdown(results: dict, meta: dict) -> str:
    names = list(results)
    lines = [f"bench_compile — {meta['date']}, torch {meta['torch']}, {meta['threads']} threads, load average "
             f"{meta['load']}", ""]
    for n in names:
        lines.append(f"- **{n}**: {results[n]['description']}; P = {results[n]['num_params']}; one gradient "
                     f"{results[n]['gradient_s'] * 1e3:.1f} ms")
    lines += ["", "| method | " + " | ".join(names) + " |", "|" + " --- |" * (len(names) + 1)]
    for key, row in results[names[0]]["rows"].items():
        cells = []
        for n in names:
            r = results[n]["rows"][key]
            cell = f"{r['ratio']:.2f}" if key != "grad" else f"{r['median_s'] * 1e3:.1f} ms"
            if key.endswith(".c"):
                speed = results[n]["rows"][key[:-2]]["median_s"] / r["median_s"]
                cell += f" ({speed:.2f}× faster; first call {r['first_call_s']:.1f} s; err {r['rel_err_vs_eager']:.0e})"
            cells.append(cell)
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", default="all", choices=["mlp", "seed002", "conv", "all"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="N × 0.1, 2 rounds (a smoke run)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    args.scale = 0.1 if args.quick else 1.0
    if args.quick:
        args.repeats = min(args.repeats, 2)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = ["mlp", "seed002", "conv"] if args.workload == "all" else [args.workload]
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "load": " ".join(f"{x:.2f}" for x in os.getloadavg()), "repeats": args.repeats}
    results = {n: measure(n, args) for n in names}
    table = markdown(results, meta)
    print(table)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "results": results}, fh, indent=1)
    return {"meta": meta, "results": results, "table": table}


if __name__ == "__main__":
    main()
