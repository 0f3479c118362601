"""Trace estimation: relative error versus number of products, on real Hessians and flat spectra.

    python benchmarks/bench_trace.py                      # the tables (≈3 min on 2 idle cores once cached)
    python benchmarks/bench_trace.py --device cuda --repeats 10 --json out/trace.json
    python benchmarks/bench_trace.py --reference-only     # only build/cache the exact traces

1. **seed002 Hessians** (5146×5146), two networks: ``seed002`` exactly as ``workloads.py``
   builds it (500 Adam steps, loss ≈ 2e-5: about 500 eigenvalues of size ±0.01 remain besides
   the 6 large ones), and ``seed002-fit``, the same network trained 1500 Adam steps further
   (learning rate 1e-3 → 1e-5, cosine; loss ≈ 2e-6, the regime of the measured anchors, whose
   spectrum decays fast: 76.7, 44.5, 6.0, 2.4, 0.21, …).  Hutchinson, Hutch++ and XTrace with
   10/30/100 products, seeds 0…R-1, on the Hessian in float64 (float64 copies of the model and
   data, so rounding stays far below the errors measured).  curvlinops' ``hutchpp_trace`` and
   ``xtrace`` on its own Hessian operator (same float64 model and batches) at 99/100 products,
   if curvlinops is installed.  The exact trace is the sum of the float64 diagonal from 5146
   products with unit vectors (≈9 min per network on 2 CPU cores, ≈15 s on an H100): computed
   once and cached in ``benchmarks/.cache/`` (ignored by git) under a hash of the parameters
   and data.
2. **Flat spectra** (designed, random eigenbasis): eigenvalues uniform on [0, 1] (PSD) and on
   [-1, 1] (indefinite); root-mean-square error over many seeds at 100 products, as a ratio to
   Hutchinson's.

Targets (issue 4): XTrace ≤ 1e-6 relative error at 100 products on the seed002 Hessian (the
anchors' fast-decaying one); no worse than Hutchinson (within 20 %) on a flat spectrum.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import pathlib
import statistics
import sys
import time

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import workloads as W  # noqa: E402

import curvops  # noqa: E402
from curvops.linalg.diagonal import diagonal  # noqa: E402
from curvops.linalg.trace import trace  # noqa: E402

CACHE = HERE / ".cache"
METHODS = ("hutchinson", "hutch++", "xtrace")
BUDGETS = (10, 30, 100)
WORKLOADS = ("seed002", "seed002-fit")
FIT_STEPS = 1500
TARGET_XTRACE = 1e-6
TARGET_FLAT = 1.2


# ---- the networks ----------------------------------------------------------------------------
def _fit_further(w: W.Workload, steps: int = FIT_STEPS) -> None:
    """Adam, learning rate 1e-3 → 1e-5 (cosine), batches in turn, one thread (deterministic)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        opt = torch.optim.Adam(w.model.parameters(), lr=1e-3)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=1e-5)
        for step in range(steps):
            X, y = w.batches[step % len(w.batches)]
            opt.zero_grad(set_to_none=True)
            w.loss(w.model(X), y).backward()
            opt.step()
            sched.step()
    finally:
        torch.set_num_threads(threads)
        w.model.zero_grad(set_to_none=True)


def build_workload(name: str, state: dict | None = None) -> W.Workload:
    """``seed002`` (as workloads.py builds it) or ``seed002-fit`` (trained further); ``state``
    (from ``--state``) replaces parameters and data, e.g. to reproduce another machine's network."""
    if name not in WORKLOADS:
        raise ValueError(f"bench_trace: unknown workload {name!r}; expected one of {WORKLOADS}.")
    w = W.build("seed002", train=state is None)
    if state is not None:
        w.model.load_state_dict(state[name]["state"])
        w.batches = state[name]["batches"]
    elif name == "seed002-fit":
        _fit_further(w)
    w.name = name
    return w


def loss_value(w: W.Workload) -> float:
    with torch.no_grad():
        return sum(float(w.loss(w.model(X), y)) * X.shape[0] for X, y in w.batches) / w.num_data


# ---- the exact reference ----------------------------------------------------------------
def workload_key(w: W.Workload) -> str:
    """A hash of everything the Hessian depends on: parameters, data, loss, batch split."""
    h = hashlib.sha256(f"{w.name}|{type(w.loss).__name__}|{w.model}".encode())
    for p in w.model.parameters():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    for X, y in w.batches:
        h.update(X.cpu().contiguous().numpy().tobytes())
        h.update(y.cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def hessian64(w: W.Workload, device: str | torch.device = "cpu"):
    """The workload's Hessian in float64 (a float64 copy of the model and data)."""
    model = copy.deepcopy(w.model).double().to(device)
    batches = [(X.double().to(device), y.double().to(device)) for X, y in w.batches]
    return curvops.Hessian(model, w.loss, batches), model, batches


def exact_diagonal(w: W.Workload, device: str = "cpu", block_size: int = 256, verbose: bool = True) -> dict:
    """The float64 Hessian diagonal (and trace), cached in ``benchmarks/.cache``."""
    CACHE.mkdir(exist_ok=True)
    (CACHE / ".gitignore").write_text("*\n")
    path = CACHE / f"{w.name}_hessian_diag_{workload_key(w)}.pt"
    if path.exists():
        return torch.load(path) | {"cached": True}
    H, _, _ = hessian64(w, device)
    if verbose:
        print(f"exact Hessian diagonal: {H.shape[0]} products with unit vectors in float64 on {device} "
              f"(once; cached in {path.relative_to(HERE.parent)}) ...", flush=True)
    start = time.perf_counter()
    d = diagonal(H, method="exact", block_size=block_size).value.cpu()
    seconds = time.perf_counter() - start
    out = {"diag": d, "trace": float(d.sum()), "seconds": seconds, "device": str(device), "products": H.shape[0]}
    torch.save(out, path)
    return out | {"cached": False}


# ---- estimators on the Hessian -------------------------------------------------------------
def run_seed002(H, exact: float, budgets=BUDGETS, repeats: int = 3, methods=METHODS) -> list[dict]:
    rows = []
    for method in methods:
        for m in budgets:
            errs, secs = [], []
            for seed in range(repeats):
                gen = torch.Generator().manual_seed(seed)
                start = time.perf_counter()
                res = trace(H, method=method, num_matvecs=m, generator=gen)
                secs.append(time.perf_counter() - start)
                errs.append(abs(res.value - exact) / abs(exact))
            rows.append(dict(library="curvops", method=method, num_matvecs=m, median_rel_err=statistics.median(errs),
                             max_rel_err=max(errs), seconds=statistics.median(secs), repeats=repeats))
            _progress(rows[-1])
    return rows


def _progress(row: dict) -> None:
    print(f"  {row['library']:10s} {row['method']:10s} {row['num_matvecs']:4d} products: median relative error "
          f"{row['median_rel_err']:.2e}, {row['seconds']:.1f} s per estimate", flush=True)


def run_curvlinops(w: W.Workload, exact: float, repeats: int = 1) -> list[dict]:
    try:
        import curvlinops
    except ImportError:
        return []
    _, model, batches = hessian64(w)
    params = [p for p in model.parameters() if p.requires_grad]
    H = curvlinops.HessianLinearOperator(model, w.loss, params, batches, check_deterministic=False,
                                         num_data=w.num_data)
    rows = []
    for name, fn, m in (("hutch++", curvlinops.hutchpp_trace, 99), ("xtrace", curvlinops.xtrace, 100)):
        errs, secs = [], []
        for seed in range(repeats):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)  # curvlinops draws from the global generator
                start = time.perf_counter()
                value = float(fn(H, num_matvecs=m))
                secs.append(time.perf_counter() - start)
            errs.append(abs(value - exact) / abs(exact))
        rows.append(dict(library="curvlinops", method=name, num_matvecs=m, median_rel_err=statistics.median(errs),
                         max_rel_err=max(errs), seconds=statistics.median(secs), repeats=repeats))
        _progress(rows[-1])
    return rows


# ---- flat spectrum -------------------------------------------------------------------------
def flat_matrix(kind: str, n: int = 2000, seed: int = 0) -> tuple[torch.Tensor, float, float]:
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    lam = torch.rand(n, generator=gen, dtype=torch.float64)
    if kind == "indefinite":
        lam = 2 * lam - 1
    A = (Q * lam) @ Q.T
    return (A + A.T) / 2, float(lam.sum()), float(lam.norm())


def run_flat(num_matvecs: int = 100, repeats: int = 100, n: int = 1000) -> list[dict]:
    rows = []
    for kind in ("psd", "indefinite"):
        A, exact, fro = flat_matrix(kind, n)
        op = curvops.Dense(A, tags=("psd",) if kind == "psd" else ("symmetric",))
        cases = [("hutchinson", "rademacher"), ("hutchinson", "gaussian"), ("hutch++", "rademacher"),
                 ("xtrace", "sphere"), ("xtrace", "rademacher")]
        if kind == "psd":
            cases.append(("xnystrace", "sphere"))
        rms = {}
        for method, dist in cases:
            errs = [trace(op, method=method, num_matvecs=num_matvecs, distribution=dist,
                          generator=torch.Generator().manual_seed(seed)).value - exact for seed in range(repeats)]
            rms[method, dist] = math.sqrt(sum(e * e for e in errs) / len(errs))
        base = rms["hutchinson", "rademacher"]
        for (method, dist), r in rms.items():
            rows.append(dict(spectrum=kind, method=method, distribution=dist, num_matvecs=num_matvecs,
                             rms_err_over_fro=r / fro, ratio_to_hutchinson=r / base, repeats=repeats))
    return rows


# ---- report ---------------------------------------------------------------------------------
def table_seed002(rows: list[dict], budgets) -> str:
    lines = ["| library | method | " + " | ".join(f"{m} products" for m in budgets) + " |",
             "| --- | --- | " + " | ".join("---" for _ in budgets) + " |"]
    keys = sorted({(r["library"], r["method"]) for r in rows}, key=lambda k: (k[0] != "curvops", k[1]))
    for lib, method in keys:
        cells = []
        for m in budgets:
            hit = [r for r in rows if r["library"] == lib and r["method"] == method
                   and (r["num_matvecs"] == m or (lib != "curvops" and abs(r["num_matvecs"] - m) <= 1))]
            cells.append(f"{hit[0]['median_rel_err']:.1e} (max {hit[0]['max_rel_err']:.1e})" if hit else "—")
        lines.append(f"| {lib} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table_flat(rows: list[dict]) -> str:
    lines = ["| spectrum | method | test vectors | rms error / ‖A‖_F | ratio to Hutchinson (Rademacher) |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['spectrum']} | {r['method']} | {r['distribution']} | {r['rms_err_over_fro']:.3e} | "
                     f"{r['ratio_to_hutchinson']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--flat-repeats", type=int, default=100)
    parser.add_argument("--flat-n", type=int, default=1000)
    parser.add_argument("--device", default="cpu", help="device of the Hessian products")
    parser.add_argument("--state", default=None, help="torch file {name: {state, batches}} overriding the networks")
    parser.add_argument("--reference-only", action="store_true")
    parser.add_argument("--no-curvlinops", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    budgets = tuple(int(b) for b in args.budgets.split(","))
    names = tuple(args.workloads.split(","))
    state = torch.load(args.state) if args.state else None

    torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    print(f"threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.2f}, device {args.device}", flush=True)
    start = time.perf_counter()
    result: dict = {"workloads": {}}
    rows: list[dict] = []
    for name in names:
        w = build_workload(name, state)
        ref = exact_diagonal(w, args.device)
        exact = ref["trace"]
        info = dict(key=workload_key(w), loss=loss_value(w), exact_trace=exact, reference=ref["device"])
        result["workloads"][name] = info
        print(f"{name}: loss {info['loss']:.2e}, exact trace {exact:.10g} "
              f"({'cached' if ref['cached'] else 'computed'}: {ref['products']} products, {ref['seconds']:.0f} s on "
              f"{ref['device']})", flush=True)
        if args.reference_only:
            continue
        H, _, _ = hessian64(w, args.device)
        part = run_seed002(H, exact, budgets, args.repeats)
        if not args.no_curvlinops and args.device == "cpu":
            part += run_curvlinops(w, exact)
        for r in part:
            r["workload"] = name
        rows += part
    if args.reference_only:
        return result
    flat = run_flat(repeats=args.flat_repeats, n=args.flat_n)
    elapsed = time.perf_counter() - start

    for name in names:
        print(f"\nRelative error of the trace of the {name} Hessian (float64, loss "
              f"{result['workloads'][name]['loss']:.1e}), median (max) over seeds 0..{args.repeats - 1}; "
              f"curvlinops: seed 0, Hutch++ at 99 products:\n")
        print(table_seed002([r for r in rows if r["workload"] == name], budgets))
    print(f"\nFlat spectra (n = {args.flat_n}, random eigenbasis), 100 products, {args.flat_repeats} seeds:\n")
    print(table_flat(flat))
    print()
    for name in names:
        xt = [r for r in rows if r["workload"] == name and r["library"] == "curvops" and r["method"] == "xtrace"
              and r["num_matvecs"] == 100]
        if xt:
            ok = xt[0]["max_rel_err"] <= TARGET_XTRACE
            print(f"target XTrace ≤ {TARGET_XTRACE:g} at 100 products ({name}): max over seeds "
                  f"{xt[0]['max_rel_err']:.1e} {'✓' if ok else '✗'}")
    for r in flat:
        if r["method"] in ("xtrace", "xnystrace") and r["distribution"] == "sphere":
            mark = "✓" if r["ratio_to_hutchinson"] <= TARGET_FLAT else "✗"
            print(f"target {r['method']} within {TARGET_FLAT - 1:.0%} of Hutchinson's rms error on a flat spectrum "
                  f"({r['spectrum']}): {r['ratio_to_hutchinson']:.2f}× {mark}")
    print(f"\n(total {elapsed:.0f} s)")
    result.update(rows=rows, flat=flat, seconds=elapsed)
    if args.json:
        pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
