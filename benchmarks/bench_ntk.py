"""NTK of the MLP 784-256-256-10 on 256 inputs (a 2560×2560 kernel), in one process.

    python benchmarks/bench_ntk.py [--skip-naive] [--json out.json]

Rows: one full-data gradient (2048 samples, the baseline of every ratio), one NTK-vector
product, the explicit kernel by curvops (also ``curvops-grouped``: a 2 MB ``memory_budget`` that
the features exceed, so they are collected for groups of batches and the kernel assembled block
by block — the fallback that replaced products with identity blocks), by per-sample Jacobians (vmap(jacrev), the naive
route), and by curvlinops' ``J @ J.adjoint()`` composition applied to the identity.
Memory: rise of peak RSS, each explicit kernel in a fresh subprocess (Linux VmHWM).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import workloads  # noqa: E402

import curvops  # noqa: E402

N_KERNEL = 256


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    return float("nan")


def setup():
    w = workloads.build("mlp", scale=1.0)
    X = torch.cat([x for x, _ in w.batches])[:N_KERNEL]
    return w, X


def explicit(method: str, w, X) -> torch.Tensor:
    model = w.model
    if method == "curvops":
        return curvops.NTK(model, X, batch_size=256).to_dense()
    if method == "curvops-grouped":
        return curvops.NTK(model, X, batch_size=64, memory_budget=2_000_000).to_dense()
    if method == "naive":
        from torch.func import functional_call, jacrev, vmap

        params = {n: p.detach() for n, p in model.named_parameters()}
        jac = vmap(jacrev(lambda p, x: functional_call(model, p, (x[None],))[0]), in_dims=(None, 0))(params, X)
        J = torch.cat([j.reshape(X.shape[0] * 10, -1) for j in jac.values()], dim=1)
        return J @ J.T
    if method == "curvlinops":
        from curvlinops import JacobianLinearOperator

        J = JacobianLinearOperator(model, list(model.parameters()), [(X, torch.zeros(len(X)))],
                                   check_deterministic=False)
        K = J @ J.adjoint()
        eye = torch.eye(J.shape[0])
        return torch.cat([K @ eye[:, s:s + 256] for s in range(0, J.shape[0], 256)], dim=1)
    raise ValueError(method)


def timed(fn, repeats: int = 3) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def child(method: str) -> None:
    w, X = setup()
    base = _peak_rss_mb()
    t = time.perf_counter()
    K = explicit(method, w, X)
    elapsed = time.perf_counter() - t
    peak = _peak_rss_mb() - base
    kernel_mb = K.numel() * K.element_size() / 2**20
    print(json.dumps({"seconds": elapsed, "peak_mb": peak, "peak_over_kernel": peak / kernel_mb,
                      "trace": float(K.trace())}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--skip-naive", action="store_true")
    p.add_argument("--json")
    p.add_argument("--child")
    a = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    if a.child:
        return child(a.child)
    w, X = setup()
    loss = torch.nn.CrossEntropyLoss()

    def gradient():
        for x, y in w.batches:
            w.model.zero_grad(set_to_none=True)
            (loss(w.model(x), y) * len(x) / w.num_data).backward()

    K = curvops.NTK(w.model, X, batch_size=256)
    v = torch.randn(K.shape[0], generator=torch.Generator().manual_seed(0))
    rows = {"gradient (2048 samples)": timed(gradient, 7)}
    rows["curvops NTK @ v"] = timed(lambda: K @ v, 7)
    try:
        from curvlinops import JacobianLinearOperator

        J = JacobianLinearOperator(w.model, list(w.model.parameters()), [(X, torch.zeros(len(X)))],
                                   check_deterministic=False)
        KC = J @ J.adjoint()
        rows["curvlinops (J @ J.adjoint()) @ v"] = timed(lambda: KC @ v, 7)
    except ImportError:
        pass
    g = rows["gradient (2048 samples)"]
    results = {"products": {k: {"seconds": s, "ratio": s / g} for k, s in rows.items()}, "explicit": {}}
    methods = ["curvops", "curvops-grouped", "curvlinops"] + ([] if a.skip_naive else ["naive"])
    for m in methods:
        out = subprocess.run([sys.executable, __file__, "--child", m], capture_output=True, text=True)
        if out.returncode != 0:
            results["explicit"][m] = {"error": out.stderr.strip().splitlines()[-1]}
            continue
        results["explicit"][m] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"NTK of MLP 784-256-256-10 on {N_KERNEL} inputs (2560×2560), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    print("| product | time | ratio to a full-data gradient |\n| --- | --- | --- |")
    for k, r in results["products"].items():
        print(f"| {k} | {r['seconds'] * 1e3:.1f} ms | {r['ratio']:.2f} |")
    print("\n| explicit kernel | time | extra peak memory | × kernel | trace |\n| --- | --- | --- | --- | --- |")
    for k, r in results["explicit"].items():
        if "error" in r:
            print(f"| {k} | error: {r['error']} | | | |")
        else:
            print(f"| {k} | {r['seconds']:.2f} s | {r['peak_mb']:.0f} MB | {r['peak_over_kernel']:.2f} | "
                  f"{r['trace']:.6g} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
