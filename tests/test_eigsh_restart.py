"""Thick-restart eigsh with a bounded basis (issue 15) against dense ``eigvalsh`` on float64 operators
with known spectra: many restarts (small ncv), clustered and repeated eigenvalues, k near n, and
``converged`` / ``residuals`` checked against residuals recomputed from the returned vectors."""

import pytest
import torch

import curvops
from curvops.linalg.eigensolver import _reorthogonalize, _rotate_rows, eigsh

D = torch.float64


def _operator(lam: torch.Tensor, seed: int = 0):
    """Q diag(λ) Qᵀ with a random orthogonal Q: the spectrum is λ exactly."""
    n = lam.numel()
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=D))
    M = (Q * lam) @ Q.T
    return curvops.Dense((M + M.T) / 2), M


def _true_residuals(M, res):
    X = res.eigenvectors
    return (M @ X - X * res.eigenvalues).norm(dim=0)


def _check(res, M, k, which, tol):
    exact = torch.linalg.eigvalsh(M)
    want = {"LA": exact[-k:], "SA": exact[:k]}[which]
    assert res.converged
    true = _true_residuals(M, res)
    scale = res.eigenvalues.abs().max()
    # honest diagnostics: the reported residuals are the true ones (to rounding) and meet the tolerance
    torch.testing.assert_close(res.residuals, true, rtol=1e-6, atol=1e-12 * float(scale))
    assert bool((true <= tol * res.eigenvalues.abs() + 1e-12 * scale).all())
    # |θ − λ| ≤ ‖r‖ (Weyl / Bauer-Fike for symmetric matrices), so the error is within the residual
    assert bool(((res.eigenvalues - want).abs() <= true + 1e-12 * scale).all())
    X = res.eigenvectors
    torch.testing.assert_close(X.T @ X, torch.eye(k, dtype=D), rtol=0, atol=1e-10)


@pytest.mark.parametrize("which", ["LA", "SA"])
def test_many_restarts_on_a_spread_spectrum(which):
    ends = 2.0 ** (-0.5 * torch.arange(10, dtype=D))  # 1, 0.71, 0.5, ...: geometric gaps at both ends
    bulk = torch.linspace(-0.02, 0.02, 180, dtype=D)
    A, M = _operator(torch.cat([ends, -3 * ends, bulk]))
    res = eigsh(A, k=6, which=which, ncv=12, tol=1e-10, generator=0, max_iters=500)
    assert res.iterations > 12  # the basis of 12 filled and was restarted several times
    _check(res, M, 6, which, 1e-10)


def test_clustered_top_eigenvalues():
    lam = torch.cat([1.0 + 1e-3 * torch.arange(8, dtype=D), 0.9 * torch.rand(292, dtype=D,
                                                                             generator=torch.Generator().manual_seed(1))])
    A, M = _operator(lam, seed=2)
    res = eigsh(A, k=6, ncv=16, tol=1e-9, generator=1)
    _check(res, M, 6, "LA", 1e-9)


def test_repeated_top_eigenvalue_with_a_block():
    lam = torch.cat([torch.full((3,), 5.0, dtype=D), torch.tensor([4.0], dtype=D),
                     torch.linspace(0.0, 3.0, 146, dtype=D)])
    A, M = _operator(lam, seed=3)
    res = eigsh(A, k=4, block_size=3, ncv=15, tol=1e-10, generator=2, max_iters=300)
    assert res.num_matvecs > 15  # the basis of 15 filled: restarted
    _check(res, M, 4, "LA", 1e-10)
    torch.testing.assert_close(res.eigenvalues[-3:], torch.full((3,), 5.0, dtype=D), rtol=1e-9, atol=0)


def test_k_near_n():
    lam = torch.linspace(1.0, 2.0, 40, dtype=D)
    A, M = _operator(lam, seed=4)
    res = eigsh(A, k=37, tol=1e-10, generator=3)
    _check(res, M, 37, "LA", 1e-10)


def test_converged_flag_is_honest_when_stopped_early():
    lam = 1.0 + 1e-4 * torch.arange(300, dtype=D)  # nearly flat: slow convergence
    A, M = _operator(lam, seed=5)
    res = eigsh(A, k=5, ncv=10, tol=1e-12, max_iters=15, generator=4)
    assert not res.converged and res.iterations == 15
    true = _true_residuals(M, res)
    torch.testing.assert_close(res.residuals, true, rtol=1e-6, atol=1e-14)
    assert bool((true > 1e-12 * res.eigenvalues.abs()).any())  # the flag matches the residuals


def test_both_ends_and_largest_magnitude_with_restarts():
    lam = torch.linspace(-5.0, 4.0, 150, dtype=D)
    A, M = _operator(lam, seed=6)
    exact = torch.linalg.eigvalsh(M)
    be = eigsh(A, k=4, which="BE", ncv=10, tol=1e-10, generator=5)
    torch.testing.assert_close(be.eigenvalues, torch.cat([exact[:2], exact[-2:]]), rtol=1e-8, atol=1e-10)
    lm = eigsh(A, k=3, which="LM", ncv=9, tol=1e-10, generator=5)
    want = exact[exact.abs().argsort(descending=True)[:3]].sort().values
    torch.testing.assert_close(lm.eigenvalues, want, rtol=1e-8, atol=1e-10)


def test_reorthogonalization_and_in_place_rotation():
    n, c = 500, 12
    Qt = torch.zeros(c + 1, n, dtype=D)
    Qt[:c] = torch.linalg.qr(torch.randn(n, c, dtype=D))[0].T
    W = torch.randn(n, 1, dtype=D) + Qt[:c].T @ torch.randn(c, 1, dtype=D) * 1e3
    W0 = W.clone()
    H = _reorthogonalize(W, Qt, c - 2, c)
    torch.testing.assert_close(H, Qt[:c] @ W0, rtol=1e-12, atol=1e-9)  # the projection's coefficients
    assert float((Qt[:c] @ W).abs().max()) <= 1e-12 * float(W.norm())  # orthogonal to the basis
    torch.testing.assert_close(W0 - Qt[:c].T @ H, W, rtol=0, atol=1e-9)
    S = torch.randn(c, 5, dtype=D)
    expected = S.T @ Qt[:c]
    _rotate_rows(Qt, c, S, chunk=37)  # several column slices
    torch.testing.assert_close(Qt[:5], expected, rtol=1e-13, atol=1e-13)
