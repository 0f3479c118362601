"""Influence functions find planted mislabelled training points in a small classifier.

Run:  python examples/influence_mislabelled.py [--quick] [--out out/influence_mislabelled.png]
                                              [--curvature ggn|kfac|ekfac]

Three 2-D Gaussian blobs; a few training points deep inside one blob get the label of another
(planted mislabels). An MLP is trained to a minimum of the cross-entropy plus weight decay
(δ/2)‖θ‖², so that the GGN + δI is the curvature of the very objective that was minimized. Then

* ``curvops.analysis.influence`` scores every training point by how much up-weighting it raises
  the loss of the clean test points (row sums of the train × test scores), and
* ``curvops.analysis.self_influence`` scores each training point by ∇ℓᵀ(GGN + δI)⁻¹∇ℓ;

with the exact GGN (block CG solves) or, with ``--curvature kfac``/``ekfac``, its Kronecker-factored
approximation through its exact damped inverse (EK-FAC influence, much cheaper);

the planted points should head both rankings. The script prints how many of them are in each
top-k (k = twice the number planted) and fails if fewer than ``--required`` are.
"""

import argparse
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import curvops  # noqa: E402

#: the sizes ``--quick`` runs (seconds; CI runs the example this way)
QUICK = dict(num_train=150, num_test=60, planted=6, steps=300)

DT = torch.float64
CENTRES = torch.tensor([[0.0, 2.0], [-1.8, -1.0], [1.8, -1.0]], dtype=DT)


def blobs(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.arange(n) % 3
    X = CENTRES[y] + 0.55 * torch.randn(n, 2, generator=gen, dtype=DT)
    return X, y


def plant(X: torch.Tensor, y: torch.Tensor, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Relabel the k points closest to their own centre (unambiguous ones) as the next class."""
    dist = (X - CENTRES[y]).norm(dim=1)
    order = torch.argsort(dist)[: 4 * k]
    idx = order[torch.randperm(order.numel(), generator=gen)[:k]]
    y = y.clone()
    y[idx] = (y[idx] + 1) % 3
    return y, idx


def train(model: nn.Module, X, y, weight_decay: float, steps: int) -> float:
    """Full-batch L-BFGS on the mean cross-entropy + (δ/2)‖θ‖²; returns the final gradient norm."""
    opt = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=steps, tolerance_grad=1e-10,
                            tolerance_change=1e-14, history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(X), y)
        loss = loss + 0.5 * weight_decay * sum((p ** 2).sum() for p in model.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    closure()
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm()
    for p in model.parameters():
        p.grad = None
    return float(grad)


def main(out: str, num_train: int = 300, num_test: int = 150, planted: int = 10, steps: int = 600,
         weight_decay: float = 1e-3, required: int | None = None, seed: int = 0, curvature: str = "ggn") -> dict:
    gen = torch.Generator().manual_seed(seed)
    X, y_clean = blobs(num_train, gen)
    y, idx = plant(X, y_clean, planted, gen)
    Xt, yt = blobs(num_test, gen)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)).to(DT)
    t0 = time.perf_counter()
    grad_norm = train(model, X, y, weight_decay, steps)
    fit = (model(X).argmax(1) == y)[idx].float().mean().item()
    t_train = time.perf_counter() - t0

    t0 = time.perf_counter()
    C = {"ggn": None, "kfac": curvops.KFAC, "ekfac": curvops.EKFAC}[curvature]
    C = C if C is None else C(model, "cross_entropy", (X, y))  # None: the GGN of the training data
    res = curvops.analysis.influence(model, "cross_entropy", (X, y), (Xt, yt), curvature=C, damping=weight_decay)
    selfinf = curvops.analysis.self_influence(model, "cross_entropy", (X, y), curvature=C, damping=weight_decay)
    t_inf = time.perf_counter() - t0

    k = 2 * planted
    planted_set = set(idx.tolist())
    top_test = res.harmful(k)  # up-weighting these raises the clean test loss most
    top_self = selfinf.top_k(k)[1]
    found_test = len(planted_set & set(top_test.tolist()))
    found_self = len(planted_set & set(top_self.tolist()))
    required = required if required is not None else (planted + 1) // 2 + planted // 4  # 3/4 of them, rounded down
    print(f"{num_train} training points ({planted} mislabelled), {num_test} test points, "
          f"{sum(p.numel() for p in model.parameters())} parameters; L-BFGS: ‖∇‖ = {grad_norm:.1e}, "
          f"{fit:.0%} of the planted labels memorized ({t_train:.1f} s)")
    how = f"{res.solver}: {res.solve.iterations} iterations" if res.solve is not None else res.solver
    print(f"influence ({res.curvature}, damping {weight_decay:g}, {how}) and self-influence: {t_inf:.2f} s")
    print(f"test-loss influence: {found_test} of the {planted} planted points in the top {k}")
    print(f"self-influence:      {found_self} of the {planted} planted points in the top {k}")
    print(f"planted: {sorted(planted_set)}")
    print(f"top-{k} self-influence: {top_self.tolist()}")
    _figure(out, X, y, idx, top_self, top_test)
    if min(found_test, found_self) < required:
        raise SystemExit(f"influence_mislabelled: expected at least {required} planted points in each top-{k}, "
                         f"found {found_test} (test loss) and {found_self} (self-influence).")
    return dict(planted=planted, k=k, found_test=found_test, found_self=found_self, required=required,
                grad_norm=grad_norm, seconds=t_inf, curvature=res.curvature)


def _figure(out: str, X, y, idx, top_self, top_test) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5), sharex=True, sharey=True)
    for ax, top, title in ((axes[0], top_test, "that raise the test loss most"),
                            (axes[1], top_self, "with the largest self-influence")):
        ax.scatter(X[:, 0], X[:, 1], c=y, cmap="viridis", s=12, alpha=0.6)
        ax.scatter(X[idx, 0], X[idx, 1], s=120, facecolors="none", edgecolors="red", linewidths=1.5, label="planted")
        ax.scatter(X[top, 0], X[top, 1], marker="x", s=50, c="black", label=f"top {len(top)}")
        ax.set_title(f"training points {title}")
        ax.legend(loc="lower center", fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def cli(argv=None) -> dict:
    """The command line: ``--help`` prints this and exits, ``--quick`` runs small, ``--out`` the figure's path."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/influence_mislabelled.png", help="the figure's path (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="small sizes, a few seconds (as CI runs it)")
    parser.add_argument("--required", type=int, default=None,
                        help="planted points each top-k must contain (default: three quarters of them)")
    parser.add_argument("--curvature", choices=("ggn", "kfac", "ekfac"), default="ggn",
                        help="the curvature: the exact GGN (CG solves) or its Kronecker factorization (default: %(default)s)")
    args = parser.parse_args(argv)
    return main(args.out, required=args.required, curvature=args.curvature, **(QUICK if args.quick else {}))


if __name__ == "__main__":
    cli()
