"""The active subspace of a 1-35-35-35-35-35-1 tanh MLP (5146 parameters), as in seeds/002.

The active-subspace matrix C = (1/N) Σ_i ∇ℓ_i ∇ℓ_iᵀ of the per-sample loss gradients, estimated
from N = 10 000 samples of a network fitted to a 1-D function.  The script measures the seed's
three findings with numbers and figures:

1. how fast the eigenvalues decay: figure ``*_decay.png``, with a bootstrap band on the top ones;
2. where the dominant eigenvectors live: figure ``*_eigenvectors.png`` (log10 |coefficient|,
   parameter tensors marked) and the per-tensor shares, in total and per parameter;
3. how many samples a reliable estimate needs: the distance between the top-r subspace from N
   samples and from all samples, for growing N.

What it shows (full size, about 40 s on 2 cores), which differs from the seed on findings 1 and 2:
with the samples x drawn from the data (the issue's definition), the eigenvalues decay fast —
λ₁₀/λ₁ = 3e-7, 3 directions hold 99 % of the trace — because the per-sample gradient of a smooth
network is a smooth function of a 1-D input.  The top-10 directions put 40 % and 24 % of their
weight in the second and third weight matrices (hidden → hidden) in total; per parameter they
concentrate most on the output layer (9 % of the weight on 35 of 5146 parameters).  Finding 3
holds in kind: the top-5 subspace moves by 0.08 (sine) at N/P = 0.05 and by 0.01 at N/P ≈ 1.
The seed's text also reads as averaging over parameters drawn from a standard normal prior rather
than over data; that is a different matrix, not computed here.

Run:  python examples/active_subspace_seed.py [--quick] [--out PREFIX]   (full size: about a minute on 2 cores)
"""

import argparse
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from curvops.analysis.active_subspace import active_subspace, active_subspace_convergence  # noqa: E402
from curvops.plotting import plot_eigenvalue_decay, plot_eigenvector_heatmap  # noqa: E402


#: the sizes ``--quick`` runs (seconds; CI runs the example this way)
QUICK = dict(num_samples=400, width=8, depth=3, train_steps=100, bootstrap=5, top=10, sample_sizes=[100, 200, 400])


def seed_network(width: int = 35, depth: int = 5, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers, fan_in = [], 1
    for _ in range(depth):
        layers += [nn.Linear(fan_in, width), nn.Tanh()]
        fan_in = width
    layers.append(nn.Linear(fan_in, 1))
    return nn.Sequential(*layers).double()


def fit(model: nn.Module, X, y, steps: int, lr: float = 3e-3) -> float:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(X), y)
        loss.backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return float(nn.functional.mse_loss(model(X), y).detach())


def main(prefix: str = "active_subspace", num_samples: int = 10_000, width: int = 35, depth: int = 5,
         train_steps: int = 300, bootstrap: int = 20, top: int = 20, sample_sizes=None) -> dict:
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    X = 2 * torch.rand(num_samples, 1, generator=gen, dtype=torch.float64) - 1
    y = torch.sin(3 * X) + 0.3 * X**2
    model = seed_network(width, depth)
    fit_loss = fit(model, X, y, train_steps)
    P = sum(p.numel() for p in model.parameters())

    # 1. the full spectrum (snapshot path: per-sample gradients, one dense factorization)
    full = active_subspace(model, "mse", (X, y), generator=torch.Generator().manual_seed(1))
    lam = full.eigenvalues
    share = torch.cumsum(lam, 0) / lam.sum()
    r90, r99 = int((share < 0.90).sum()) + 1, int((share < 0.99).sum()) + 1
    # bootstrap intervals on the top eigenvalues (resampling the samples)
    boot = active_subspace(model, "mse", (X, y), k=top, bootstrap=bootstrap,
                           generator=torch.Generator().manual_seed(2))
    # 2. where the dominant directions live
    frac = boot.layer_sensitivity()  # [tensors, top]
    names = list(boot.layout.names)
    lead = frac[:, :10].mean(1)
    # 3. convergence with the number of samples
    sizes = sample_sizes or [n for n in (250, 500, 1000, 2500, 5000, num_samples) if n <= num_samples]
    conv = active_subspace_convergence(model, "mse", (X, y), sample_sizes=sizes, k=10,
                                       generator=torch.Generator().manual_seed(3))
    seconds = time.perf_counter() - t0

    print(f"network: 1-{'-'.join([str(width)] * depth)}-1 tanh MLP, {P} parameters; {num_samples} samples; "
          f"fit MSE {fit_loss:.2e}")
    print(f"spectrum: {full.k} eigenvalues ({full.algorithm}); λ₁ = {float(lam[0]):.3e}; "
          f"λ₁₀/λ₁ = {float(lam[9] / lam[0]):.2e}, λ₁₀₀/λ₁ = {float(lam[min(99, full.k - 1)] / lam[0]):.2e}")
    print(f"decay: {r90} directions hold 90% of the trace, {r99} hold 99% (of {full.k})")
    print(f"bootstrap ({bootstrap} resamples, {int(100 * boot.confidence)}%): λ₁ in "
          f"[{float(boot.eigenvalue_lower[0]):.3e}, {float(boot.eigenvalue_upper[0]):.3e}]")
    order = torch.argsort(lead, descending=True)
    per_param = boot.layer_sensitivity(by_size=True)[:, :10].mean(1)
    print("share of the top-10 eigenvectors' squared norm per parameter tensor (mean), largest first:")
    for t in order[:4].tolist():
        print(f"  {names[t]:<12} {float(lead[t]):6.1%}   ({boot.layout.numels[t]} of {P} parameters; "
              f"{float(per_param[t]):.1f}× its size share)")
    print("subspace distance of the top-r subspace to the all-sample estimate (sine of the largest angle):")
    for i, n in enumerate(conv.sample_sizes.tolist()):
        d = conv.subspace_distances[i]
        print(f"  N = {int(n):>6} (N/P = {int(n) / P:4.2f}): r=1 {float(d[0]):.3f}, r=5 {float(d[4]):.3f}, "
              f"r=10 {float(d[9]):.3f}")
    print(f"total {seconds:.1f} s")

    ax = plot_eigenvalue_decay(lam, title=f"Active-subspace eigenvalues ({P} parameters, N = {num_samples})",
                               label="all eigenvalues")
    plot_eigenvalue_decay(boot.eigenvalues, lower=boot.eigenvalue_lower, upper=boot.eigenvalue_upper, ax=ax,
                          label=f"top {top}, {int(100 * boot.confidence)}% bootstrap band",
                          save=f"{prefix}_decay.png", title=f"Active-subspace eigenvalues ({P} parameters, "
                                                            f"N = {num_samples})")
    plt.close(ax.figure)
    ax = plot_eigenvector_heatmap(full.eigenvectors, layout=full.layout, save=f"{prefix}_eigenvectors.png",
                                  title="log10 |eigenvector coefficient|")
    plt.close(ax.figure)
    return {"P": P, "eigenvalues": lam, "r90": r90, "r99": r99, "boot": boot, "lead": dict(zip(names, lead.tolist())),
            "convergence": conv, "seconds": seconds, "full": full}


def cli(argv=None) -> dict:
    """The command line: ``--help`` prints this and exits, ``--quick`` runs small, ``--out`` the prefix of the two figures (PREFIX_decay.png, PREFIX_eigenvectors.png)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="active_subspace", help="the prefix of the two figures (PREFIX_decay.png, PREFIX_eigenvectors.png) (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="small sizes, a few seconds (as CI runs it)")
    args = parser.parse_args(argv)
    return main(args.out, **(QUICK if args.quick else {}))


if __name__ == "__main__":
    cli()
