"""Tests that catch realistic one-line bugs the rest of the suite let through (issue 10's mutation
spot-check): the double-VJP fallback for layers without forward-mode AD, and the normalization of
the Monte-Carlo Fisher at small sample counts."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvops import GGN, EmpiricalFisher, Fisher
from curvops.testing import contract, oracles
from curvops.testing.zoo import CASES

D = torch.float64


# ---- a layer with a backward formula but no forward-mode (jvp) formula ---------------------------
class _CubicNoJvp(torch.autograd.Function):
    """x ↦ x + 0.1 x³ with forward, setup_context and a (twice-differentiable) backward, no jvp:
    forward-mode AD through it raises, so J V must come from the double-VJP fallback."""

    @staticmethod
    def forward(x):
        return x + 0.1 * x ** 3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (1 + 0.3 * x ** 2)


class _Cubic(nn.Module):
    def forward(self, x):
        return _CubicNoJvp.apply(x)


def _no_jvp_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), _Cubic(), nn.Linear(4, 3)).to(D)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(10, 3, generator=g, dtype=D)
    y = torch.randint(0, 3, (10,), generator=g)
    return model, X, y


def _dense_jacobian_and_per_sample_gradients(model, X, y):
    """Reverse-mode only (the layer has no jvp): J [N·C, P] row by row, per-sample CE gradients [N, P]."""
    params = list(model.parameters())
    flat = lambda ts: torch.cat([t.reshape(-1) for t in ts])  # noqa: E731
    out = model(X)
    J = torch.stack([flat(torch.autograd.grad(out[i, c], params, retain_graph=True))
                     for i in range(out.shape[0]) for c in range(out.shape[1])])
    G = torch.stack([flat(torch.autograd.grad(F.cross_entropy(model(X[i:i + 1]), y[i:i + 1]), params))
                     for i in range(X.shape[0])])
    return J, G, out.detach()


def test_double_vjp_fallback_gives_every_column_its_own_jvp():
    # A bug that reuses column 0 (or any one column) for every column of J V passes any test
    # with K = 1 or with equal columns: here K ≥ 2 distinct columns against a dense oracle.
    model, X, y = _no_jvp_problem()
    with pytest.raises((RuntimeError, NotImplementedError)):  # the premise: no forward mode through it
        torch.func.jvp(model, (X,), (torch.ones_like(X),))
    J, G, out = _dense_jacobian_and_per_sample_gradients(model, X, y)
    N = X.shape[0]
    p = torch.softmax(out, dim=1)
    H_out = torch.block_diag(*[torch.diag(pi) - torch.outer(pi, pi) for pi in p]) / N  # ∇²_f of the mean CE
    ggn, ef = J.T @ H_out @ J, G.T @ G / N
    for cls, dense in ((GGN, ggn), (Fisher, ggn), (EmpiricalFisher, ef)):
        A = cls(model, "cross_entropy", (X, y), batch_size=4)
        V = contract.probes(A.shape[1], 4, seed=3)
        contract.assert_matches(A @ V, dense @ V, what=f"{cls.__name__} @ V (4 columns)")
        assert A.last_path.startswith("double-VJP"), A.last_path
        contract.check_products(A, dense)  # one column, three columns, numpy
        # columns that differ only in scale: each must be scaled, not copied
        W = V[:, :1] * torch.tensor([[1.0, -2.0, 0.5]], dtype=D)
        contract.assert_matches(A @ W, (dense @ V[:, :1]) * torch.tensor([[1.0, -2.0, 0.5]], dtype=D),
                                what=f"{cls.__name__} @ scaled columns")


# ---- Monte-Carlo Fisher: the mean over seeds at small S is the exact Fisher -----------------------
@pytest.mark.parametrize("case, S", [("mlp_ce", 1), ("mlp_ce", 2), ("linear_mse", 2), ("mlp_bce", 2)])
def test_mc_fisher_mean_over_seeds_is_the_exact_fisher(case, S):
    # Fisher(mc_samples=S) is an unbiased estimate of the exact Fisher for every S; a wrong
    # normalization (1/(S−1), 1/(S+1), none) is a bias of order 1/S, invisible at S = 2000 but a
    # factor 2 at S = 2. Error target from the seeds themselves: R independent estimates Y_r of
    # F V, mean Ȳ, standard error se = std(Y_r, ddof=1)/√R; every entry within 5 se (Bonferroni
    # over ≤ 200 entries, two-sided normal tail 6e-7 each), plus a rounding floor.
    problem = CASES[case].build("mean")
    exact_F = oracles.fisher_dense(problem)  # Jᵀ E[∇ℓ∇ℓᵀ] J with closed-form output Fisher
    V = contract.probes(exact_F.shape[0], 4, seed=5)
    exact = exact_F @ V
    R = 150
    Y = torch.stack([problem.build(Fisher, mc_samples=S, seed=r) @ V for r in range(R)])  # [R, P, 4]
    mean, se = Y.mean(0), Y.std(0) / R ** 0.5
    floor = 1e-12 * float(exact.abs().max())
    z = (mean - exact).abs() / (se + floor)
    assert float(z.max()) < 5.0, f"entry {int(z.argmax())} is {float(z.max()):.1f} standard errors off"
    # The overall scale, the quantity a normalization bug changes: α_r = ⟨Y_r, F V⟩ / ‖F V‖².
    alpha = (Y * exact).sum((1, 2)) / exact.square().sum()
    a_mean, a_se = float(alpha.mean()), float(alpha.std() / R ** 0.5)
    assert abs(a_mean - 1.0) < 4.5 * a_se, f"scale {a_mean:.4f} ± {a_se:.4f}, expected 1"
    assert a_se < 0.05  # power: any normalization error of 25 % or more is > 5 se away
