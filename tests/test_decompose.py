"""PCA and NMF of stacks against numpy's SVD and exactly low-rank non-negative matrices."""

import numpy as np
import pytest
import torch

from curvops.analysis.decompose import nmf, pca

D = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---- PCA ------------------------------------------------------------------------------------------
def test_pca_matches_numpy_svd_up_to_sign():
    X = torch.randn(12, 7, generator=gen(), dtype=D) * torch.linspace(0.2, 3.0, 7, dtype=D)
    res = pca(X)
    Xc = X.numpy() - X.numpy().mean(0)
    U, S, Vt = np.linalg.svd(Xc, full_matrices=False)
    np.testing.assert_allclose(res.singular_values.numpy(), S, rtol=1e-12)
    np.testing.assert_allclose(res.mean.numpy(), X.numpy().mean(0), rtol=1e-12)
    signs = np.sign((res.components.numpy() * Vt).sum(1))  # ±1 per component
    np.testing.assert_allclose(res.components.numpy(), signs[:, None] * Vt, atol=1e-12)
    np.testing.assert_allclose(res.scores.numpy(), signs[None] * U * S, atol=1e-12)
    np.testing.assert_allclose(res.explained_variance.numpy(), S**2 / 11, rtol=1e-12)
    np.testing.assert_allclose(res.explained_variance.numpy(), np.sort(np.linalg.eigvalsh(np.cov(Xc.T)))[::-1], rtol=1e-10)
    assert float(res.explained_variance_ratio.sum()) == pytest.approx(1.0, abs=1e-14)
    # sign convention: the largest-magnitude entry of every component is positive
    C = res.components
    assert bool((C[torch.arange(7), C.abs().argmax(1)] > 0).all())
    torch.testing.assert_close(res.reconstruct(), X)  # full k rebuilds the stack
    torch.testing.assert_close(res.transform(X), res.scores)


def test_pca_truncation_is_the_eckart_young_optimum():
    X = torch.randn(15, 9, generator=gen(1), dtype=D)
    full, two = pca(X), pca(X, k=2)
    torch.testing.assert_close(two.components, full.components[:2])
    torch.testing.assert_close(two.explained_variance_ratio, full.explained_variance_ratio[:2])
    err = float(torch.linalg.matrix_norm(two.reconstruct() - X))
    assert err == pytest.approx(float(full.singular_values[2:].square().sum().sqrt()), rel=1e-12)
    assert float(two.explained_variance_ratio.sum()) < 1


def test_pca_uncentred_and_list_of_matrices():
    mats = [torch.randn(3, 3, generator=gen(i), dtype=D) for i in range(5)]
    res = pca(mats, center=False)
    flat = torch.stack([m.reshape(-1) for m in mats])
    U, S, Vh = torch.linalg.svd(flat, full_matrices=False)
    torch.testing.assert_close(res.singular_values, S)
    torch.testing.assert_close(res.mean, torch.zeros(9, dtype=D))
    torch.testing.assert_close(res.explained_variance, S**2 / 5)
    torch.testing.assert_close((res.components @ Vh.T).abs(), torch.eye(5, dtype=D), atol=1e-12, rtol=0)
    assert res.shape == (3, 3) and res.unflatten(res.components).shape == (5, 3, 3)
    torch.testing.assert_close(res.reconstruct(), torch.stack(mats))
    stacked = pca(torch.stack(mats), center=False)  # [R, 3, 3] tensor: the same
    torch.testing.assert_close(stacked.components, res.components)


def test_pca_errors():
    X = torch.randn(4, 6, dtype=D)
    with pytest.raises(ValueError, match=r"expected 1 <= k <= 4"):
        pca(X, k=5)
    with pytest.raises(ValueError, match=r"expected 1 <= k <= 4"):
        pca(X, k=0)
    with pytest.raises(TypeError, match="integer k"):
        pca(X, k=2.0)
    with pytest.raises(ValueError, match=r"expected a stack \[R, D\]"):
        pca(torch.randn(5, dtype=D))
    with pytest.raises(ValueError, match="items of one shape"):
        pca([torch.zeros(3), torch.zeros(4)])
    with pytest.raises(ValueError, match="NaN or Inf"):
        pca(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="at least 2 items"):
        pca(torch.ones(1, 3, dtype=D))
    with pytest.raises(TypeError, match="list of tensors"):
        pca("stack")


# ---- NMF ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("init", ["nndsvd", "random"])
def test_nmf_recovers_an_exactly_rank_k_nonnegative_matrix(init):
    g = gen(4)
    W0 = torch.rand(30, 3, generator=g, dtype=D)
    H0 = torch.rand(3, 12, generator=g, dtype=D)
    X = W0 @ H0
    res = nmf(X, 3, tol=1e-9, max_iters=6000, init=init, generator=gen(3))
    assert res.converged and res.relative_error <= 1e-9  # converged here means the error reached tol
    assert bool((res.W >= 0).all()) and bool((res.H >= 0).all())
    torch.testing.assert_close(res.W @ res.H, X, rtol=0, atol=1e-5)
    assert res.reconstruction_error == pytest.approx(float(torch.linalg.matrix_norm(X - res.W @ res.H)), rel=1e-9)
    # monotone: each HALS sweep solves its blocks exactly, so the error never increases
    h = res.history
    assert len(h) == res.iterations and bool((h[1:] <= h[:-1] * (1 + 1e-12) + 1e-15).all())
    # normalized rows of H, components ordered by contribution
    torch.testing.assert_close(res.H.norm(dim=1), torch.ones(3, dtype=D))
    contrib = res.W.norm(dim=0) * res.H.norm(dim=1)
    assert bool((contrib[:-1] >= contrib[1:]).all())


def test_nmf_error_decreases_with_iterations_and_is_bounded_by_svd():
    X = torch.rand(20, 10, generator=gen(4), dtype=D)  # full rank: no exact rank-3 factorization
    errors = [nmf(X, 3, max_iters=it, tol=0.0).relative_error for it in (1, 3, 10, 30, 100)]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(errors, errors[1:]))
    assert errors[-1] < errors[0]
    long = nmf(X, 3, max_iters=100, tol=0.0)
    np.testing.assert_allclose(long.history[[0, 2, 9, 29, 99]].numpy(), errors, rtol=1e-10)
    S = torch.linalg.svdvals(X)
    svd_err = float(S[3:].square().sum().sqrt() / S.square().sum().sqrt())
    assert long.relative_error >= svd_err - 1e-12  # the unconstrained rank-3 optimum is a lower bound
    assert long.relative_error < 1.5 * svd_err  # and NMF gets close to it on positive data


def test_nmf_list_input_seeded_random_init_and_shape():
    mats = [torch.rand(2, 5, generator=gen(i), dtype=D) for i in range(6)]
    a = nmf(mats, 2, init="random", generator=gen(7), max_iters=50)
    b = nmf(mats, 2, init="random", generator=gen(7), max_iters=50)
    torch.testing.assert_close(a.W, b.W, rtol=0, atol=0)
    assert a.shape == (2, 5) and a.unflatten(a.H).shape == (2, 2, 5) and a.W.shape == (6, 2)
    c = nmf(mats, 2, init="random", generator=gen(8), max_iters=50)
    assert not torch.equal(a.W, c.W)


def test_nmf_errors():
    X = torch.rand(5, 4, dtype=D)
    neg = X.clone()
    neg[2, 1] = -0.25
    with pytest.raises(ValueError, match=r"non-negative stack, got a minimum entry of -0.25 \(item 2, entry 1\)"):
        nmf(neg, 2)
    with pytest.raises(ValueError, match=r"expected 1 <= k <= 4"):
        nmf(X, 5)
    with pytest.raises(ValueError, match=r"expected 1 <= k <= 4"):
        nmf(X, 0)
    with pytest.raises(ValueError, match="init 'nndsvd' or 'random'"):
        nmf(X, 2, init="svd")
    with pytest.raises(ValueError, match="positive integer max_iters"):
        nmf(X, 2, max_iters=0)
    with pytest.raises(ValueError, match="finite tol"):
        nmf(X, 2, tol=-1.0)
    with pytest.raises(ValueError, match="all zeros"):
        nmf(torch.zeros(3, 3, dtype=D), 1)
