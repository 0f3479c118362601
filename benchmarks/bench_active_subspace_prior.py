"""The active subspace over a parameter prior (seed 002 as written) at the seed's size, as ratios to the floor.

    python benchmarks/bench_active_subspace.py --prior [--num-samples 10000] [--repeat 2] [--json PATH]
    python benchmarks/bench_active_subspace_prior.py [same options]

C = (1/N) Σ_j ∇L(θ_j)∇L(θ_j)ᵀ, θ_j ~ N(0, I) over all 5146 parameters of the 1-35-35-35-35-35-1 tanh
MLP (float64), L the MSE on the seed's 100 points (``examples/active_subspace_prior.py``), N = 10 000.
Every row runs in a fresh subprocess, one after the other, all rows once per repetition (so a
repetition's ratios are measured under the same load); each reports its wall time and the rise of
the process's peak resident set size (``VmHWM``) over the one that has built the model.

Rows:

* ``floor``: the N whole-data gradients alone, by the plain method a user writes — per chunk of
  ``FLOOR_CHUNK`` draws, ``torch.randn`` for θ and ``vmap(grad)`` of the loss through
  ``functional_call`` (this file's own code, not curvops), G kept;
* ``floor.given``: the same with the draws made before the clock starts (the gradient work alone:
  torch's float64 normal sampler runs on one thread, ≈ 1 s of the floor);
* ``floor.loop``: the same by a Python loop of ``torch.autograd.grad`` over the first
  ``--loop-samples`` draws, scaled to N (the other plain method);
* ``gradients``: curvops' ``PriorGradientCovariance.gradients`` (the gradient pass the estimators run;
  ``prior_gradients`` also returns the N×P draws);
* ``top``: ``active_subspace(prior=..., k=20, tol=1e-6)`` with the default plan, plus the
  layer-mass summary (``layer_sensitivity``, both forms);
* ``top.bounded``: the same forced onto the one-pass plan whose memory is bounded by P² + chunks,
  never N·P (C accumulated chunk by chunk, block Krylov on C);
* ``values``: ``active_subspace(prior=..., return_eigenvectors=False)``: all eigenvalues (figure 1);
* ``naive.values``: the plain gradients (as ``floor``), C = GᵀG/N, ``eigvalsh``;
* ``naive``: the same with ``eigh`` (all eigenpairs; the dense reference of the top-20 rows).

The curvops rows and the reference rows (``naive*``, ``floor.given``) use the same N draws (the
built-in prior's blocks, regenerated from the same generator); ``floor`` draws its own, as a user would.
Accuracy: the top-20 eigenvalues (max relative error) and the top-20 subspace distance against
``naive``; all eigenvalues (max |Δλ| / λ₁) against it too.  Targets (issue 13): ``top`` ≤ 1.25×
the floor at 1e-6; ``values`` ≤ 2× the floor; ``top.bounded`` holds no N·P array: its peak memory
(P² + one vmapped chunk's workspace, independent of N) below the floor's, which holds G.  The
vmapped chunk's workspace (512 draws × 100 points × 5 layers of activations) is the largest term of
every row's memory.  Every row imports ``torch._dynamo`` before the clock (the first
``torch.func.grad`` of a process imports it: 1.3 s once, not gradient work).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

ROWS = ("floor", "floor.given", "floor.loop", "gradients", "top", "top.bounded", "values", "naive.values", "naive")
K, TOL = 20, 1e-6
#: draws per vmapped chunk of the plain floor (256 and 512 measured equal, 815 about 35 % slower)
FLOOR_CHUNK = 512
TARGETS = {"top": 1.25, "values": 2.0}


def build(num_samples: int, width: int = 35, depth: int = 5, num_points: int = 100):
    """The seed's network and data (as in examples/active_subspace_prior.py) and the prior operator."""
    from torch import nn

    import torch._dynamo  # noqa: F401  (torch.func's first grad imports it: 1.3 s once per process, not gradient work)

    from curvops.analysis.active_subspace import PriorGradientCovariance

    torch.manual_seed(0)
    layers, fan_in = [], 1
    for _ in range(depth):
        layers += [nn.Linear(fan_in, width), nn.Tanh()]
        fan_in = width
    model = nn.Sequential(*layers, nn.Linear(fan_in, 1)).double()
    X = torch.linspace(-1, 1, num_points, dtype=torch.float64)[:, None]
    data = (X, torch.sin(3 * X) + 0.3 * X**2)
    A = PriorGradientCovariance(model, "mse", data, num_samples=num_samples, generator=_gen())
    return model, data, A


def _gen():
    return torch.Generator().manual_seed(0)


def _plain_gradients(model, data, A, chunk: int = FLOOR_CHUNK, draws: str = "same") -> torch.Tensor:
    """G [N, P] by vmap(grad) through functional_call, draws in chunks (no curvops in the gradient).

    ``draws``: ``"same"`` — the rows of ``A``'s draws (the reference rows, same θ as curvops');
    ``"plain"`` — ``torch.randn(chunk, P)`` per chunk from one seeded generator, as a user writes
    it (the floor); ``"given"`` — the draws made before the clock starts (see ``run_row``).
    """
    from torch.func import functional_call, grad, vmap

    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    numels = [p.numel() for p in model.parameters()]
    X, y = data

    def loss(flat):
        theta = {n: t.reshape(s) for n, t, s in zip(names, torch.split(flat, numels), shapes)}
        return torch.nn.functional.mse_loss(functional_call(model, theta, (X,)), y)

    fn = vmap(grad(loss))
    N, P = A.num_samples, A.shape[0]
    G = torch.empty(N, P, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    for s in range(0, N, chunk):
        e = min(N, s + chunk)
        if draws == "plain":
            Theta = torch.randn(e - s, P, generator=gen, dtype=torch.float64)
        elif isinstance(draws, torch.Tensor):
            Theta = draws[s:e]
        else:
            Theta = A.draws.rows(s, e)
        G[s:e] = fn(Theta)
    return G


def _loop_gradients(model, data, A, n: int) -> torch.Tensor:
    import copy

    from torch import nn

    m = copy.deepcopy(model)
    ps = list(m.parameters())
    X, y = data
    rows = []
    for theta in A.draws.rows(0, n):
        nn.utils.vector_to_parameters(theta, ps)
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(nn.functional.mse_loss(m(X), y), ps)]))
    return torch.stack(rows)


def run_row(key: str, num_samples: int, loop_samples: int) -> dict:
    """One row in this process: ``{seconds, mem_mb, values, vectors, note}``."""
    from curvops.analysis.active_subspace import active_subspace

    model, data, A = build(num_samples)
    N, P = A.num_samples, A.shape[0]
    kw = dict(prior="standard_normal", num_samples=N, generator=_gen())
    values = vectors = None
    note, scale = "", 1.0
    before = _peak_rss_mb()
    start = time.perf_counter()
    if key == "floor":
        _plain_gradients(model, data, A, draws="plain")
        note = f"torch.randn + vmap(grad) over functional_call, chunks of {FLOOR_CHUNK} draws"
    elif key == "floor.given":
        Theta = A.draws.rows(0, N)
        start = time.perf_counter()
        _plain_gradients(model, data, A, draws=Theta)
        note = f"vmap(grad) over functional_call, chunks of {FLOOR_CHUNK} draws, the draws made before the clock"
    elif key == "floor.loop":
        n = min(loop_samples, N)
        _loop_gradients(model, data, A, n)
        scale, note = N / n, f"autograd.grad loop over {n} draws, time × {N / n:g}"
    elif key == "gradients":
        A.gradients()
        note = "curvops PriorGradientCovariance.gradients (the estimators' gradient pass)"
    elif key == "top.bounded" and N <= P:
        note = "skipped: N ≤ P, C (P²) is no smaller than G (N·P)"
    elif key in ("top", "top.bounded"):
        extra = {} if key == "top" else dict(method="snapshot", memory_budget=_bounded_budget(N, P))
        res = active_subspace(model, "mse", data, k=K, tol=TOL, **kw, **extra)
        res.layer_sensitivity(), res.layer_sensitivity(by_size=True)
        values, vectors = res.eigenvalues, res.eigenvectors
        note = (f"{res.algorithm}; {res.iterations} Krylov iterations; plan memory "
                f"{res.memory_estimate / 2**20:.0f} MB; {res.num_passes} gradient pass(es); {_split(res)}")
    elif key == "values":
        res = active_subspace(model, "mse", data, return_eigenvectors=False, **kw)
        values, note = res.eigenvalues, f"{res.algorithm}; {_split(res)}"
    elif key in ("naive", "naive.values"):
        G = _plain_gradients(model, data, A)
        C = G.T @ G / N
        if key == "naive":
            lam, W = torch.linalg.eigh(C)
            values, vectors, note = lam.flip(0), W.flip(1)[:, :K].contiguous(), "plain gradients, GᵀG/N, eigh"
        else:
            values, note = torch.linalg.eigvalsh(C).flip(0), "plain gradients, GᵀG/N, eigvalsh"
    else:
        raise ValueError(f"bench_active_subspace_prior: unknown row {key!r}; expected one of {ROWS}.")
    seconds = (time.perf_counter() - start) * scale
    return {"seconds": seconds, "mem_mb": _peak_rss_mb() - before, "values": values, "vectors": vectors,
            "note": note, "num_params": P, "num_samples": N, "threads": torch.get_num_threads()}


def _split(res) -> str:
    """Where the time went: the gradient pass and the decomposition (C accumulated inside it, for streamed plans)."""
    t = res.timings
    c = f" (forming C {t['covariance']:.1f} s)" if "covariance" in t else ""
    return f"gradients {t.get('gradients', 0):.1f} s + decomposition {t.get('decomposition', 0):.1f} s{c}"


def _bounded_budget(N: int, P: int) -> int:
    """A memory budget that holds C (P²) and the chunks but not G (N·P): forces the one-pass plan."""
    from curvops.analysis.active_subspace.prior import default_chunk_size

    return int(min(N * P * 8 - 1, 1.5 * P * P * 8 + 64 * 2**20 + 3 * default_chunk_size(P) * P * 8))


def _peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return float("nan")


def _child(key: str, args, tmp: str) -> dict:
    out = os.path.join(tmp, f"{key}.pt")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", key, "--out", out,
           "--num-samples", str(args.num_samples), "--loop-samples", str(args.loop_samples)]
    print(f"# {key} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    return torch.load(out)


def _accuracy(found: dict, ref: dict) -> dict:
    from curvops.analysis.active_subspace import subspace_distance

    out = {}
    if found.get("values") is None or ref.get("values") is None:
        return out
    lam, r = found["values"].to(torch.float64), ref["values"]
    out["top_relerr"] = float(((lam[:K] - r[:K]).abs() / r[:K]).max())
    if lam.shape[0] > K:
        n = min(lam.shape[0], r.shape[0])
        out["all_normwise"] = float((lam[:n] - r[:n]).abs().max() / r[0])
    if found.get("vectors") is not None and ref.get("vectors") is not None:
        out["top_distance"] = float(subspace_distance(found["vectors"][:, :K].to(torch.float64), ref["vectors"][:, :K]))
    return out


def run(args) -> dict:
    reps: list[dict] = []
    ref = None
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeat):
            load = os.getloadavg()[0]
            found = {}
            for key in ROWS:
                if key in args.skip or (key == "naive" and rep > 0 and ref is not None):
                    continue
                found[key] = _child(key, args, tmp)
                if key == "naive" and "error" not in found[key]:
                    ref = found[key]
            reps.append({"load_before": load, "found": found})
    P, N = next(f["num_params"] for r in reps for f in r["found"].values() if "num_params" in f), args.num_samples
    rows = []
    for key in ROWS:
        times, ratios, mems, notes, acc = [], [], [], [], {}
        for r in reps:
            f, floor = r["found"].get(key), r["found"].get("floor")
            if not f or "error" in f:
                if f:
                    notes.append("error: " + f["error"])
                continue
            times.append(f["seconds"])
            mems.append(f["mem_mb"])
            notes.append(f["note"])
            if floor and "error" not in floor:
                ratios.append(f["seconds"] / floor["seconds"])
            if ref is not None and key != "naive":
                acc = _accuracy(f, ref)
        row = {"key": key, "seconds": times, "ratio_to_floor": ratios, "ratio_median": statistics.median(ratios)
               if ratios else None, "mem_mb": max(mems) if mems else None, "note": notes[-1] if notes else "", **acc}
        if key in TARGETS and row["ratio_median"] is not None:
            row["target"] = f"≤ {TARGETS[key]}×: " + ("✓" if row["ratio_median"] <= TARGETS[key] else "✗")
            if key == "top" and acc.get("top_relerr") is not None and acc["top_relerr"] > TOL:
                row["target"] += f" (accuracy ✗: {acc['top_relerr']:.1e} > {TOL:g})"
        floor_mem = next((r["mem_mb"] for r in rows if r["key"] == "floor"), None)
        if key == "top.bounded" and row["mem_mb"] is not None and floor_mem is not None:
            row["target"] = (f"holds no N·P array (G = {N * P * 8 / 2**20:.0f} MB): peak below the floor's, which "
                             f"holds G: " + ("✓" if row["mem_mb"] < floor_mem else "✗"))
        rows.append(row)
    return {"workload": f"1-35-35-35-35-35-1 tanh MLP (float64), {P} parameters, 100 points, θ ~ N(0, I), N = {N}",
            "num_params": P, "num_samples": N, "k": K, "tol": TOL, "repeat": args.repeat,
            "threads": torch.get_num_threads(), "loads_before": [r["load_before"] for r in reps], "rows": rows}


def table(result: dict) -> str:
    lines = [f"{result['workload']}; {result['threads']} threads; {result['repeat']} repetition(s), load average "
             f"before each {', '.join(f'{x:.1f}' for x in result['loads_before'])}",
             "", "| row | seconds (each repetition) | × floor (each) | × floor (median) | peak memory rise (MB) | "
                 "top-20 max rel. err | top-20 subspace dist. | all λ: max err / λ₁ | target | note |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def f(x, spec):
        return "—" if x is None else format(x, spec)

    for r in result["rows"]:
        lines.append(f"| {r['key']} | {', '.join(f'{s:.1f}' for s in r['seconds']) or '—'} | "
                     f"{', '.join(f'{s:.2f}' for s in r['ratio_to_floor']) or '—'} | {f(r['ratio_median'], '.2f')} | "
                     f"{f(r['mem_mb'], '.0f')} | {f(r.get('top_relerr'), '.1e')} | {f(r.get('top_distance'), '.1e')} | "
                     f"{f(r.get('all_normwise'), '.1e')} | {r.get('target', '')} | {r['note']} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prior", action="store_true", help=argparse.SUPPRESS)  # from bench_active_subspace.py
    parser.add_argument("--num-samples", type=int, default=10_000)
    parser.add_argument("--loop-samples", type=int, default=500, help="draws the autograd loop row times (scaled to N)")
    parser.add_argument("--repeat", type=int, default=2, help="repetitions of all rows (naive eigh runs once)")
    parser.add_argument("--skip", nargs="*", default=(), help="row keys to skip")
    parser.add_argument("--json", default=os.path.join(os.path.dirname(HERE), "docs", "bench-active-subspace-prior.json"),
                        help="where to write the result (default docs/bench-active-subspace-prior.json; '' for none)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        torch.save(run_row(args.child, args.num_samples, args.loop_samples), args.out)
        return
    result = run(args)
    print(table(result))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2, ensure_ascii=False)


if __name__ == "__main__":
    main()
