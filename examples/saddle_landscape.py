"""A saddle point of a real network, plotted along its negative-curvature eigenvector.

A tanh MLP whose weights are all zero (and whose output bias is the mean target) is a stationary
point of the MSE loss: every hidden unit outputs tanh(0) = 0, so no weight receives a gradient.
It is not a minimum: the first- and second-layer weights of a unit couple through the residual,
and the Hessian's cross block gives eigenvalue pairs ±σ.  Lanczos finds both ends of the
spectrum, ``classify_stationary_point`` says "saddle", and the loss along the bottom eigenvector
bends down like ½ λ_min t² while along the top one it bends up (seeds/000, seeds/001).

Run:  python examples/saddle_landscape.py [--quick] [--out saddle_landscape.png]
"""

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import curvops  # noqa: E402
from curvops.plotting import plot_landscape_1d, plot_landscape_2d  # noqa: E402


#: the sizes ``--quick`` runs (seconds; CI runs the example this way)
QUICK = dict(num_steps=21)


def saddle_problem(num_samples: int = 256, hidden: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(num_samples, 2, generator=gen, dtype=torch.float64)
    y = (torch.sin(2 * X[:, :1]) + 0.5 * X[:, 1:]).to(torch.float64)
    model = nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, 1)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model[2].bias.fill_(float(y.mean()))  # the output bias at its optimum: the gradient vanishes
    return model, X, y


def main(path: str = "saddle_landscape.png", num_steps: int = 41) -> dict:
    model, X, y = saddle_problem()
    H = curvops.Hessian(model, "mse", (X, y))
    grad = H.objective.gradient()
    verdict = curvops.classify_stationary_point(H, grad, generator=torch.Generator().manual_seed(0))
    ends = curvops.eigsh(H, k=2, which="BE", generator=torch.Generator().manual_seed(1))
    lam_min, lam_max = (float(v) for v in ends.eigenvalues)

    steps = torch.linspace(-2.0, 2.0, num_steps, dtype=torch.float64)
    along = {name: curvops.loss_along(model, "mse", (X, y), direction=ends, index=i, steps=steps)
             for name, i in (("bottom", 0), ("top", 1))}
    plane = curvops.loss_plane(model, "mse", (X, y), directions=ends, index=(0, 1),
                               steps=(steps[::2], steps[::2]))

    # Near t = 0 the curves are ½ λ t²: the second difference recovers the eigenvalues.
    h = float(steps[1] - steps[0])
    mid = num_steps // 2
    curv = {name: float((r.loss[mid + 1] - 2 * r.loss[mid] + r.loss[mid - 1]) / h**2) for name, r in along.items()}
    base = float(along["top"].loss[mid])
    print(f"model: 2-8-1 tanh MLP at all-zero weights, {H.shape[0]} parameters, loss {base:.4f}, "
          f"‖∇L‖ = {float(grad.norm()):.1e}")
    print(f"verdict: {verdict.kind} ({verdict.explanation})")
    print(f"extreme Hessian eigenvalues: λ_min = {lam_min:.5f}, λ_max = {lam_max:.5f}")
    print(f"curvature of the loss along the eigenvectors (second difference): bottom {curv['bottom']:.5f}, "
          f"top {curv['top']:.5f}")
    low = int(along["bottom"].loss.argmin())
    print(f"along the bottom eigenvector the loss falls from {base:.4f} to {float(along['bottom'].loss[low]):.4f} "
          f"at t = {float(steps[low]):+.1f}: two symmetric valleys (a double well)")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    top_label, bottom_label = f"top eigenvector (λ = {lam_max:.3g})", f"bottom eigenvector (λ = {lam_min:.3g})"
    plot_landscape_1d(steps, {top_label: along["top"].loss, bottom_label: along["bottom"].loss},
                      xlabel="step t along the eigenvector", ax=axes[0], title="Loss along Hessian eigenvectors")
    plot_landscape_2d(plane.steps[0], plane.steps[1], plane.loss,
                      xlabel=bottom_label, ylabel=top_label, ax=axes[1],
                      title="Loss on the plane of both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return {"kind": verdict.kind, "lam_min": lam_min, "lam_max": lam_max, "curvature": curv, "base": base,
            "grad_norm": float(grad.norm()), "bottom": along["bottom"].loss, "top": along["top"].loss}


def cli(argv=None) -> dict:
    """The command line: ``--help`` prints this and exits, ``--quick`` runs small, ``--out`` the figure's path."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="saddle_landscape.png", help="the figure's path (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="small sizes, a few seconds (as CI runs it)")
    args = parser.parse_args(argv)
    return main(args.out, **(QUICK if args.quick else {}))


if __name__ == "__main__":
    cli()
