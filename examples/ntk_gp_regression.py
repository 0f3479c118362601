"""Exact GP regression with the empirical NTK of a small network as the kernel (GPyTorch).

Run:  python examples/ntk_gp_regression.py [--quick] [--out out/ntk_gp_regression.png]

The kernel k(x, x') = ∇θ f(x)ᵀ ∇θ f(x') of a 1-32-32-1 tanh MLP at its (random) initial
parameters is wrapped by ``curvops.interop.gpytorch.NTKKernel``: GPyTorch never sees a
matrix, only the lazy NTK operator and its cross-kernel blocks. The GP posterior mean
K_*X (K_XX + σ²I)⁻¹ y is checked against the same formula computed densely from per-sample
gradients taken directly with torch.func (no curvops involved), and once more with GPyTorch
forced onto its CG path (products with the NTK only) and with curvops' own CG.
"""

import argparse
import os

import matplotlib

matplotlib.use("Agg")
import gpytorch  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import curvops  # noqa: E402
from curvops.interop.gpytorch import NTKKernel, to_linear_operator  # noqa: E402
from curvops.linalg.solve import solve  # noqa: E402

DTYPE = torch.float64


class NTKGP(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, network):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ZeroMean()
        self.covar_module = NTKKernel(network)

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


#: the sizes ``--quick`` runs (seconds; CI runs the example this way)
QUICK = dict(n_train=20, n_test=25)


def dense_ntk(network: nn.Module, X1: torch.Tensor, X2: torch.Tensor) -> torch.Tensor:
    """Oracle: J(X1) J(X2)ᵀ from per-sample gradients by torch.func (scalar output)."""
    params = {k: v.detach() for k, v in network.named_parameters()}

    def f(p, x):
        return torch.func.functional_call(network, p, (x[None],))[0, 0]

    def jac(X):
        g = torch.func.vmap(torch.func.grad(f), in_dims=(None, 0))(params, X)
        return torch.cat([t.reshape(X.shape[0], -1) for t in g.values()], dim=1)

    return jac(X1) @ jac(X2).T


def main(out: str | None = None, n_train: int = 60, n_test: int = 100, noise: float = 1e-2, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    network = nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1)).to(DTYPE)
    x = (torch.rand(n_train, 1, generator=gen, dtype=DTYPE) * 2 - 1).sort(dim=0).values
    y = torch.sin(3 * x[:, 0]) + 0.3 * x[:, 0] ** 2 + 0.05 * torch.randn(n_train, generator=gen, dtype=DTYPE)
    x_test = torch.linspace(-1.3, 1.3, n_test, dtype=DTYPE)[:, None]

    likelihood = gpytorch.likelihoods.GaussianLikelihood().to(DTYPE)
    likelihood.noise = noise
    gp = NTKGP(x, y, likelihood, network).to(DTYPE)
    gp.eval()
    likelihood.eval()
    with torch.no_grad():
        pred = likelihood(gp(x_test))  # small N: GPyTorch forms K (via NTK.to_dense) and uses Cholesky
        mean, var = pred.mean, pred.variance

    # The closed form, densely, from an independent oracle.
    K = dense_ntk(network, x, x)
    K_star = dense_ntk(network, x_test, x)
    alpha = torch.linalg.solve(K + noise * torch.eye(n_train, dtype=DTYPE), y)
    mean_exact = K_star @ alpha
    err_dense = float((mean - mean_exact).abs().max() / mean_exact.abs().max())

    # GPyTorch on products only (CG + Lanczos), and curvops' own CG on the same operator.
    gp_cg = NTKGP(x, y, likelihood, network).to(DTYPE)
    gp_cg.eval()
    with torch.no_grad(), gpytorch.settings.max_cholesky_size(0), gpytorch.settings.cg_tolerance(1e-9), \
            gpytorch.settings.max_cg_iterations(2000), gpytorch.settings.fast_pred_var(False):
        mean_cg = likelihood(gp_cg(x_test)).mean
    err_cg = float((mean_cg - mean_exact).abs().max() / mean_exact.abs().max())

    K_op = curvops.NTK(network, x)
    res = solve(K_op, y, method="cg", damping=noise, rtol=1e-10, max_iters=2000)
    mean_curvops = curvops.NTK(network, x_test, x) @ res.x
    err_curvops = float((mean_curvops - mean_exact).abs().max() / mean_exact.abs().max())

    # The bridge itself: the wrapped NTK is the oracle kernel.
    err_kernel = float((to_linear_operator(K_op).to_dense() - K).abs().max() / K.abs().max())

    print(f"NTK GP: {sum(p.numel() for p in network.parameters())} parameters, {n_train} training points, "
          f"noise σ² = {noise}")
    print(f"posterior mean vs dense closed form: GPyTorch (Cholesky) {err_dense:.2e}, "
          f"GPyTorch (CG, products only) {err_cg:.2e}, curvops CG ({res.iterations} iterations) {err_curvops:.2e}")
    print(f"wrapped NTK vs torch.func oracle: {err_kernel:.2e}")

    if out:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        sd = var.clamp_min(0).sqrt()
        ax.fill_between(x_test[:, 0], mean - 2 * sd, mean + 2 * sd, alpha=0.25, label="±2 sd")
        ax.plot(x_test[:, 0], mean, label="posterior mean (NTK GP)")
        ax.plot(x_test[:, 0], mean_exact, "--", label="closed form (dense)")
        ax.plot(x[:, 0], y, "k.", ms=4, label="data")
        ax.set_xlabel("x")
        ax.legend(fontsize=8)
        ax.set_title("Exact GP regression with the empirical NTK")
        fig.tight_layout()
        fig.savefig(out, dpi=120)
        plt.close(fig)
    return dict(err_dense=err_dense, err_cg=err_cg, err_curvops=err_curvops, err_kernel=err_kernel,
                cg_iterations=res.iterations)


def cli(argv=None) -> dict:
    """The command line: ``--help`` prints this and exits, ``--quick`` runs small, ``--out`` the figure's path."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/ntk_gp_regression.png", help="the figure's path (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="small sizes, a few seconds (as CI runs it)")
    args = parser.parse_args(argv)
    return main(args.out, **(QUICK if args.quick else {}))


if __name__ == "__main__":
    cli()
