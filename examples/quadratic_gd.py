"""Gradient descent on the quadratic toy model: simulation against the closed form, per eigen-axis.

f(w) = ½ wᵀAw + bᵀw with A = Q diag(a) Qᵀ separates into independent axes u = Qᵀw, and gradient
descent u_j ← u_j − α(a_j u_j + b̃_j) has a closed form on each (seeds/001).  The five axes below
cover every case: a curved axis that converges smoothly (0 < αa < 1), one that converges while
oscillating (1 < αa < 2), a negative-curvature axis that escapes (a saddle), a flat axis with a
slope that drifts forever (a = 0, b̃ ≠ 0), and a flat axis that is never updated (a = 0, b̃ = 0).

Run:  python examples/quadratic_gd.py [--quick] [--out quadratic_gd.png]
"""

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import curvops  # noqa: E402
from curvops.analysis.quadratic import QuadraticModel  # noqa: E402


#: the sizes ``--quick`` runs (seconds; CI runs the example this way)
QUICK = dict(steps=30)


def main(path: str = "quadratic_gd.png", steps: int = 30) -> dict:
    a = torch.tensor([-0.3, 0.0, 0.0, 0.5, 2.0], dtype=torch.float64)
    b_rot = torch.tensor([0.2, 0.4, 0.0, -0.5, 1.0], dtype=torch.float64)  # b̃ = Qᵀb
    Q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    model = QuadraticModel(Q @ torch.diag(a) @ Q.T, Q @ b_rot)
    lr, w0 = 0.8, Q @ torch.tensor([0.05, 0.0, 0.5, -1.0, 1.0], dtype=torch.float64)

    simulated = model.gd_simulate(w0, lr, steps)
    closed = model.gd_closed_form(w0, lr, steps)
    gap = float((simulated - closed).abs().max() / closed.abs().max())
    stability = model.stability(lr)
    points = model.stationary_points()

    # The operator view of the same matrix: curvops' Lanczos finds the saddle's escape direction.
    H = model.hessian()
    low = curvops.eigsh(H, k=1, which="SA")
    shown = [0.0 if abs(v) <= model.zero_threshold else v for v in stability.eigenvalues.tolist()]
    fates = ", ".join(f"a={v:+.2f}: {lab}" for v, lab in zip(shown, stability.labels))
    print(f"step size {lr}, per-axis fate: {fates}")
    print(f"stationary point: exists={points.exists}, kind={points.kind}")
    print(f"simulated vs closed-form GD over {steps} steps: max relative difference {gap:.1e}")
    print(f"most negative curvature (Lanczos): {float(low.eigenvalues[0]):.6f}")

    # Plot each eigen-axis u_j(t) = Q_jᵀ w(t): closed form as lines, the simulation as dots.
    ev, Qm = model.eig()
    U_sim, U_cf = simulated @ Qm, closed @ Qm
    fig, axes = plt.subplots(1, 5, figsize=(16, 3.2), sharex=True)
    t = torch.arange(steps + 1)
    for j, ax in enumerate(axes):
        ax.plot(t, U_cf[:, j], "-", color="C0", label="closed form")
        ax.plot(t, U_sim[:, j], "o", ms=3, color="C1", label="simulated GD")
        a_j = 0.0 if abs(float(ev[j])) <= model.zero_threshold else float(ev[j])
        ax.set_title(f"a = {a_j:.2g}: {stability.labels[j]}", fontsize=10)
        lo, hi = float(U_cf[:, j].min()), float(U_cf[:, j].max())
        pad = max(0.5, 0.1 * (hi - lo))  # a flat line stays flat (round-off is not magnified)
        ax.set_ylim(lo - pad, hi + pad)
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.set_xlabel("step t")
    axes[0].set_ylabel(r"$u_j(t) = q_j^\top w(t)$")
    axes[0].legend(fontsize=8)
    fig.suptitle(rf"Gradient descent on $\frac{{1}}{{2}}w^\top A w + b^\top w$, $\alpha$ = {lr}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return {"gap": gap, "labels": stability.labels, "kind": points.kind, "eigenvalues": ev,
            "lowest": float(low.eigenvalues[0])}


def cli(argv=None) -> dict:
    """The command line: ``--help`` prints this and exits, ``--quick`` runs small, ``--out`` the figure's path."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="quadratic_gd.png", help="the figure's path (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="small sizes, a few seconds (as CI runs it)")
    args = parser.parse_args(argv)
    return main(args.out, **(QUICK if args.quick else {}))


if __name__ == "__main__":
    cli()
