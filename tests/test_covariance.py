"""GradientCovariance (the active-subspace matrix) against per-sample gradients formed densely."""

import pytest
import torch
from torch.func import jacrev

import curvops
from curvops import EmpiricalFisher, GradientCovariance
from curvops.testing import contract, oracles
from curvops.testing.zoo import CASES

D = torch.float64


def per_sample_gradients(problem, g=None):
    """G [N, P]: rows ∇g_i, from the oracle's flat-parameter forward (shares no operator code)."""
    theta = oracles.flat_params(problem)

    def values(th):
        out = oracles.forward(problem, th, problem.X)
        if g is not None:
            return g(out, problem.y)
        return torch.stack([oracles.loss_fn(problem, out[i:i + 1], problem.y[i:i + 1]) for i in range(problem.N)])

    return jacrev(values)(theta).detach()


@pytest.mark.parametrize("case", ["linear_mse", "mlp_ce", "conv_ce", "dict_mse", "function_ce", "mlp_bce"])
def test_matches_dense_and_equals_empirical_fisher_for_the_mean_loss(case):
    problem = CASES[case].build("mean")
    G = per_sample_gradients(problem)
    C = G.T @ G / problem.N
    A = problem.build(GradientCovariance, batch_size=5)
    assert A.tags == {"symmetric", "psd"}
    contract.check_products(A, C)
    contract.check_tags(A)
    torch.testing.assert_close(A.to_dense(), problem.build(EmpiricalFisher).to_dense())


def test_weights_centering_and_custom_g():
    problem = CASES["mlp_ce"].build("mean")
    N = problem.N
    w = torch.linspace(0.1, 2.0, N, dtype=D)
    g = lambda out, y: out[:, 0] - out[:, 1]  # noqa: E731 - a logit margin per sample
    G = per_sample_gradients(problem, g)
    mu = (w[:, None] * G).sum(0) / w.sum()
    Cc = ((G - mu).T * w) @ (G - mu) / w.sum()
    A = problem.build(GradientCovariance, g=g, weights=w, center=True, batch_size=4)
    contract.check_products(A, Cc)
    torch.testing.assert_close(A.mean_gradient(), mu)
    # batch split invariance with weights in data order
    B = problem.build(GradientCovariance, g=g, weights=w, center=True, batch_size=7)
    V = contract.probes(A.shape[0], 2)
    torch.testing.assert_close(A @ V, B @ V)


def test_model_untouched_and_bad_input():
    problem = CASES["mlp_ce"].build("mean")
    before = contract.snapshot(problem.model)
    A = problem.build(GradientCovariance, center=True)
    contract.exercise(A)
    contract.assert_unchanged(before, contract.snapshot(problem.model))
    with pytest.raises(ValueError, match=r"expected weights of shape \(16,\)|expected weights of shape"):
        problem.build(GradientCovariance, weights=torch.ones(3, dtype=D))
    with pytest.raises(ValueError, match="non-negative"):
        problem.build(GradientCovariance, weights=-torch.ones(problem.N, dtype=D))
    with pytest.raises(ValueError, match="g must be 'loss' or a callable"):
        problem.build(GradientCovariance, g="output")
    bad = problem.build(GradientCovariance, g=lambda out, y: out)
    with pytest.raises(ValueError, match="g must return one value per sample"):
        bad @ torch.zeros(bad.shape[0], dtype=D)


def test_top_eigenvectors_are_the_active_subspace():
    problem = CASES["linear_mse"].build("mean")
    G = per_sample_gradients(problem)
    C = G.T @ G / problem.N
    res = curvops.eigsh(problem.build(GradientCovariance), k=3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(res.eigenvalues.sort().values, torch.linalg.eigvalsh(C)[-3:], rtol=1e-6, atol=1e-9)
