"""Top Hessian eigenvalues, trace and condition number of a small built-in model.

Run:  python examples/hessian_summary.py [--quick] [--out hessian_summary.png]

Prints the top of the Hessian spectrum (ARPACK through scipy, on the operator as it is), checks it
against the dense matrix, estimates the trace with Hutchinson probes, and writes the full spectrum
of the Hessian and the GGN as a figure.
"""

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import scipy.sparse.linalg as spla  # noqa: E402
import torch  # noqa: E402

import curvops  # noqa: E402
from curvops.demo import demo_problem  # noqa: E402
from curvops.plotting import plot_eigenvalues  # noqa: E402

#: the sizes ``--quick`` runs (seconds; CI runs the example this way)
QUICK = dict(num_samples=256, num_probes=50)


def main(out: str = "hessian_summary.png", num_samples: int = 512, num_probes: int = 100) -> dict:
    model, X, y = demo_problem(num_samples=num_samples)
    H = curvops.Hessian(model, "cross_entropy", (X, y), batch_size=128)
    G = curvops.GGN(model, "cross_entropy", (X, y), batch_size=128)
    print(f"model: 2-16-16-3 tanh MLP, {H.shape[0]} parameters, {len(X)} samples, "
          f"loss {curvops.Objective(model, 'cross_entropy', (X, y)).loss_value():.4f}")

    # Our operators are scipy LinearOperators: ARPACK runs on them as they are.
    top = np.sort(spla.eigsh(H, k=5, which="LA", return_eigenvectors=False))[::-1]
    print("top-5 Hessian eigenvalues:", np.array2string(top, precision=5))

    # The model is small (371 parameters), so the exact answers are affordable: densify with
    # P products in blocks and compare.  (Matrix-free estimators: curvops.eigsh, curvops.trace, ...)
    Hd, Gd = H.to_dense(), G.to_dense()
    evals = torch.linalg.eigvalsh(Hd)
    print("exact top-5 (dense check):", np.array2string(evals.flip(0)[:5].numpy(), precision=5))

    gen = torch.Generator().manual_seed(0)
    Z = torch.randint(0, 2, (H.shape[0], num_probes), generator=gen).to(torch.float64) * 2 - 1
    hutch = float((Z * (H @ Z)).sum(0).mean())
    print(f"trace: exact {float(Hd.trace()):.5f}, Hutchinson estimate ({num_probes} Rademacher probes) {hutch:.5f}")

    # Condition numbers: the Hessian is indefinite here (|λ|max / |λ|min over nonzero |λ| is huge),
    # so we report the damped GGN's, (λmax + δ)/(λmin + δ), the quantity that governs CG on G + δI.
    gev = torch.linalg.eigvalsh(Gd).clamp_min(0)
    for damping in (1e-2, 1e-4):
        print(f"condition number of GGN + {damping:g}·I: {float((gev[-1] + damping) / (gev[0] + damping)):.4g}")
    print(f"Hessian: {int((evals < -1e-8).sum())} negative and {int((evals > 1e-8).sum())} positive eigenvalues")

    ax = plot_eigenvalues({"Hessian": evals, "GGN": gev}, save=out,
                          title=f"Spectra of a 2-16-16-3 MLP ({H.shape[0]} parameters)")
    plt.close(ax.figure)
    print(f"figure: {out}")
    return {"top": top, "eigenvalues": evals, "hutchinson": hutch, "trace": float(Hd.trace())}


def cli(argv=None) -> dict:
    """The command line: ``--help`` prints this and exits, ``--quick`` runs small, ``--out`` the figure's path."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="hessian_summary.png", help="the figure's path (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="small sizes, a few seconds (as CI runs it)")
    args = parser.parse_args(argv)
    return main(args.out, **(QUICK if args.quick else {}))


if __name__ == "__main__":
    cli()
