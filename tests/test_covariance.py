"""GradientCovariance (the active-subspace matrix) against per-sample gradients formed densely."""

import pytest
import torch

import curvops
from curvops import EmpiricalFisher, GradientCovariance
from curvops.testing import contract, oracles
from curvops.testing import zoo
from curvops.testing.zoo import CASES

D = torch.float64


per_sample_gradients = oracles.per_sample_gradients  # G [N, P] from the dense oracle


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


# ---- subsets, classes, per-sample gradients and the factor --------------------------------------------
def _restricted(G, w, keep, center):
    """Dense C over the kept rows, normalized by their weight (the oracle)."""
    Gk, wk = G[keep], w[keep]
    mu = (wk[:, None] * Gk).sum(0) / wk.sum()
    A = Gk - mu if center else Gk
    return (A.T * wk) @ A / wk.sum(), mu


@pytest.mark.parametrize("center", [False, True])
def test_subset_index_and_mask_match_dense(center):
    problem = CASES["mlp_ce"].build("mean")
    N = problem.N
    G = per_sample_gradients(problem)
    w = torch.linspace(0.5, 2.0, N, dtype=D)
    idx = torch.tensor([0, 3, 4, 9, 10, 15])
    keep = torch.zeros(N, dtype=torch.bool)
    keep[idx] = True
    C, mu = _restricted(G, w, keep, center)
    for subset in (idx, keep, idx.tolist()):
        A = problem.build(GradientCovariance, weights=w, center=center, subset=subset, batch_size=5)
        contract.check_products(A, C)
        if center:
            torch.testing.assert_close(A.mean_gradient(), mu)
    # a batch with no kept sample is skipped (batch 2 of size 3 holds samples 6, 7, 8)
    A = problem.build(GradientCovariance, subset=idx, batch_size=3)
    contract.assert_matches(A.to_dense(), _restricted(G, torch.ones(N, dtype=D), keep, False)[0])


def test_classes_with_a_dataloader_match_dense():
    problem = CASES["mlp_ce"].build("mean")
    G = per_sample_gradients(problem)
    keep = (problem.y == 0) | (problem.y == 2)
    assert 0 < int(keep.sum()) < problem.N
    C, _ = _restricted(G, torch.ones(problem.N, dtype=D), keep, True)
    loader = zoo.as_dataloader(problem, batch_size=5)
    A = GradientCovariance(problem.model, "cross_entropy", loader, classes=[0, 2], center=True)
    contract.check_products(A, C)
    # classes and subset together keep the intersection
    sub = torch.arange(0, problem.N, 2)
    both = keep.clone()
    both[1::2] = False
    A = problem.build(GradientCovariance, classes=torch.tensor([2, 0]), subset=sub, batch_size=4)
    contract.assert_matches(A.to_dense(), _restricted(G, torch.ones(problem.N, dtype=D), both, False)[0])
    w = A.kept_weights()
    assert w.shape == (int(both.sum()),)


def test_sample_gradients_match_torch_func():
    problem = CASES["dict_mse"].build("mean")
    G = per_sample_gradients(problem)
    cov = problem.build(GradientCovariance, batch_size=4)
    for chunk in (None, 1, 3):
        Gs, w = cov.sample_gradients(chunk)
        contract.assert_matches(Gs, G)
        torch.testing.assert_close(w, torch.ones(problem.N, dtype=D))
    g = lambda out, y: out[:, 1]  # noqa: E731 - one model output per sample
    cov = problem.build(GradientCovariance, g=g, subset=torch.tensor([1, 5, 6]), batch_size=4)
    contract.assert_matches(cov.sample_gradients(2)[0], per_sample_gradients(problem, g)[[1, 5, 6]])
    # a plain function model and class targets
    problem = CASES["function_ce"].build("sum")
    cov = problem.build(GradientCovariance, classes=1, batch_size=6)
    keep = problem.y == 1
    contract.assert_matches(cov.sample_gradients(4)[0], per_sample_gradients(problem)[keep])


@pytest.mark.parametrize("center", [False, True])
def test_factor_is_a_square_root_of_the_covariance(center):
    problem = CASES["mlp_bce"].build("mean")
    N = problem.N
    G = per_sample_gradients(problem)
    w = torch.linspace(0.2, 1.5, N, dtype=D)
    keep = torch.ones(N, dtype=torch.bool)
    keep[[2, 11]] = False
    Gk, wk = G[keep], w[keep]
    m = torch.arange(int(keep.sum()), dtype=D) % 3  # multipliers, e.g. bootstrap counts (some zero)
    for mult in (None, m):
        ww = wk if mult is None else wk * mult
        mu = (ww[:, None] * Gk).sum(0) / ww.sum()
        F_dense = (ww / ww.sum()).sqrt()[:, None] * ((Gk - mu) if center else Gk)
        cov = problem.build(GradientCovariance, weights=w, center=center, subset=keep, batch_size=5)
        F = cov.factor(mult)
        assert F.shape == (int(keep.sum()), G.shape[1]) and not F.tags
        contract.check_products(F, F_dense)
        contract.check_adjoint(F)
        contract.assert_matches(F.T @ (F @ torch.eye(G.shape[1], dtype=D)), F_dense.T @ F_dense)
        if mult is None:
            contract.assert_matches(F_dense.T @ F_dense, cov.to_dense())


def test_loss_free_covariance_with_inputs_only():
    problem = CASES["mlp_ce"].build("mean")
    g = lambda out, y: out[:, 0] - out[:, 2]  # noqa: E731 - y is None: the data has inputs only
    G = per_sample_gradients(problem, g)
    A = GradientCovariance(problem.model, data=problem.X, g=g, batch_size=6)
    contract.check_products(A, G.T @ G / problem.N)
    with pytest.raises(TypeError, match="g='loss' needs a loss"):
        GradientCovariance(problem.model, data=problem.X)


def test_subset_and_classes_errors_and_untouched_model():
    problem = CASES["mlp_ce"].build("mean")
    N = problem.N
    before = contract.snapshot(problem.model)
    with pytest.raises(ValueError, match=r"boolean mask of shape \(16,\)"):
        problem.build(GradientCovariance, subset=torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"indices in \[0, 16\)"):
        problem.build(GradientCovariance, subset=torch.tensor([0, 16]))
    with pytest.raises(ValueError, match="distinct indices"):
        problem.build(GradientCovariance, subset=torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="subset is empty"):
        problem.build(GradientCovariance, subset=torch.zeros(N, dtype=torch.bool))
    with pytest.raises(TypeError, match="integer index tensor or a boolean mask"):
        problem.build(GradientCovariance, subset=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="weights of the samples in subset= are all zero"):
        problem.build(GradientCovariance, subset=[0, 1], weights=torch.cat([torch.zeros(2), torch.ones(N - 2)]))
    with pytest.raises(TypeError, match="integer class"):
        problem.build(GradientCovariance, classes=[0.5])
    with pytest.raises(ValueError, match="at least one class"):
        problem.build(GradientCovariance, classes=[])
    A = problem.build(GradientCovariance, classes=[7])  # no sample has class 7
    with pytest.raises(ValueError, match="no sample is kept"):
        A @ torch.zeros(A.shape[0], dtype=D)
    reg = CASES["linear_mse"].build("mean")  # float targets are not classes
    A = reg.build(GradientCovariance, classes=0)
    with pytest.raises(ValueError, match="expected integer class targets"):
        A @ torch.zeros(A.shape[0], dtype=D)
    with pytest.raises(ValueError, match="positive integer chunk_size"):
        problem.build(GradientCovariance).sample_gradients(0)
    with pytest.raises(ValueError, match="multipliers of shape"):
        problem.build(GradientCovariance).factor(torch.ones(3, dtype=D))
    A = problem.build(GradientCovariance, classes=[0, 1], center=True, batch_size=5)
    contract.exercise(A)
    A.sample_gradients(3)
    F = A.factor()
    F.T @ (F @ contract.probes(F.shape[1], 2))
    contract.assert_unchanged(before, contract.snapshot(problem.model))


# ---- the cached mean follows the model ---------------------------------------------------------------
def _centred_dense(problem):
    """(C, μ, G): the centred covariance (1/N) Σ (g_i − μ)(g_i − μ)ᵀ at the model's current parameters."""
    G = per_sample_gradients(problem)
    mu = G.mean(0)
    return (G - mu).T @ (G - mu) / problem.N, mu, G


def _parameter_changes(model):
    """The ways a user changes parameters after building an operator, each applied in turn."""
    p = list(model.parameters())
    g = torch.Generator().manual_seed(9)

    def in_place():  # an optimizer step: bumps p._version
        with torch.no_grad():
            p[0].add_(0.3 * torch.randn(p[0].shape, generator=g, dtype=D))

    def data_mul():  # through .data: p._version does not change
        p[2].data.mul_(1.5)

    def data_reassign():  # new storage behind the same Parameter
        p[1].data = -0.7 * p[1].data + 0.1

    def vector_to_parameters():
        v = torch.nn.utils.parameters_to_vector(p)
        torch.nn.utils.vector_to_parameters(0.9 * v, p)

    return [in_place, data_mul, data_reassign, vector_to_parameters]


def test_centred_product_and_mean_follow_parameter_updates():
    # The mean μ is cached after the first product; every product must use μ at the parameters the
    # model has *now* (a mean cached once, or keyed on version counters, is stale after .data writes).
    problem = CASES["mlp_ce"].build("mean")
    A = problem.build(GradientCovariance, center=True, batch_size=5)
    V = contract.probes(A.shape[0], 3)
    C, mu, _ = _centred_dense(problem)
    contract.assert_matches(A @ V, C @ V, what="before any change")
    for change in _parameter_changes(problem.model):
        before = A @ V
        change()
        C, mu, _ = _centred_dense(problem)
        assert not torch.allclose(C @ V, before), change.__name__  # the change matters
        contract.assert_matches(A @ V, C @ V, what=f"A @ V after {change.__name__}")
        contract.assert_matches(A.mean_gradient(), mu, what=f"mean_gradient() after {change.__name__}")


def test_factor_follows_parameter_updates():
    # The factor F (FᵀF = C) of a centred covariance caches μ as well.
    problem = CASES["mlp_ce"].build("mean")
    F = problem.build(GradientCovariance, center=True, batch_size=5).factor()
    V = contract.probes(F.shape[1], 3)
    _, mu, G = _centred_dense(problem)
    contract.assert_matches(F @ V, (G - mu) @ V / problem.N ** 0.5, what="F @ V before any change")
    for change in _parameter_changes(problem.model):
        change()
        _, mu, G = _centred_dense(problem)
        contract.assert_matches(F @ V, (G - mu) @ V / problem.N ** 0.5, what=f"F @ V after {change.__name__}")
        W = contract.probes(F.shape[0], 2, seed=1)
        contract.assert_matches(F.T @ W, (G - mu).T @ W / problem.N ** 0.5, what=f"F.T @ W after {change.__name__}")
