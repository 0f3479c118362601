"""Lanczos tridiagonalization and the thick-restart (block) eigensolver ``eigsh``.

Exact cases (n steps rebuild A), agreement with ``numpy.linalg.eigvalsh`` on designed spectra
(clustered, indefinite, many zeros like a real Hessian), agreement with scipy's ARPACK on a
curvops Hessian, the block variant on a multiple eigenvalue, no ghosts, and bad input.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse.linalg as spla
import torch

import curvops
from curvops.linalg.lanczos import EighResult, eigsh, lanczos, tridiagonal
from curvops.testing.zoo import CASES
from curvops.testing.spectra import gen, with_spectrum as rotated

DT = torch.float64


def spectrum(name: str, n: int = 120) -> torch.Tensor:
    g = gen(7)

    def rand(m: int) -> torch.Tensor:
        return torch.rand(m, generator=g, dtype=DT)

    if name == "clustered":  # ten eigenvalues within 1e-3 of each other above a bulk
        return torch.cat([1 + 1e-3 * rand(10), 0.5 * rand(n - 10)])
    if name == "indefinite":  # outliers at both ends of a bulk that straddles zero
        return torch.cat([torch.tensor([5.0, -4.0, 3.5, -3.0], dtype=DT), 3 * rand(n - 4) - 1])
    if name == "hessian_like":  # a few outliers, small eigenvalues of both signs, and mostly exact zeros
        return torch.cat([torch.tensor([10.0, 7.0, 5.0, 3.0, 2.0], dtype=DT),
                          0.1 * torch.randn(25, generator=g, dtype=DT), torch.zeros(n - 30, dtype=DT)])
    raise KeyError(name)


def expected(lam: torch.Tensor, k: int, which: str) -> torch.Tensor:
    lam = torch.sort(lam).values
    if which == "LA":
        return lam[-k:]
    if which == "SA":
        return lam[:k]
    if which == "LM":
        return torch.sort(lam[lam.abs().argsort()[-k:]]).values
    return torch.cat([lam[: k // 2], lam[len(lam) - (k - k // 2):]])  # "BE": the extra one from the top


# ---- the primitive ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["indefinite", "hessian_like"])
def test_lanczos_with_n_steps_rebuilds_the_matrix(name):
    # "hessian_like" has a 90-fold zero eigenvalue: the Krylov space becomes invariant early and
    # the recurrence continues with fresh random vectors (β = 0), so Q T Qᵀ = A still holds.
    d = spectrum(name, 60)
    A = rotated(d)
    n = A.shape[0]
    alphas, betas, Q = lanczos(A, torch.randn(n, generator=gen(1), dtype=DT), n, generator=gen(2))
    assert alphas.shape == (n,) and betas.shape == (n - 1,) and Q.shape == (n, n)
    torch.testing.assert_close(Q.T @ Q, torch.eye(n, dtype=DT), atol=1e-12, rtol=0)
    torch.testing.assert_close(Q @ tridiagonal(alphas, betas) @ Q.T, A, atol=1e-12, rtol=0)
    if name == "hessian_like":
        assert int((betas == 0).sum()) >= 1  # the breakdowns happened and were handled


def test_lanczos_relation_and_start_vector():
    A = rotated(spectrum("indefinite", 50))
    v0 = torch.randn(50, generator=gen(3), dtype=DT)
    alphas, betas, Q = lanczos(curvops.Dense(A), v0, 12)
    T = tridiagonal(alphas, betas)
    torch.testing.assert_close(Q[:, 0], v0 / v0.norm())
    torch.testing.assert_close(Q.T @ A @ Q, T, atol=1e-12, rtol=0)


def test_lanczos_block_of_start_vectors_runs_independent_recurrences():
    A = curvops.Dense(rotated(spectrum("clustered", 40)))
    V0 = torch.randn(40, 3, generator=gen(4), dtype=DT)
    calls = []
    counted = curvops.func_operator((40, 40), lambda V: (calls.append(V.shape[1]), A @ V)[1], dtype=DT)
    alphas, betas, Q = lanczos(counted, V0, 10)
    assert alphas.shape == (3, 10) and betas.shape == (3, 9) and Q.shape == (3, 40, 10)
    assert calls == [3] * 10  # one block product per step for all three runs
    for j in range(3):
        a, b, q = lanczos(A, V0[:, j], 10)
        torch.testing.assert_close(alphas[j], a, atol=1e-12, rtol=0)
        torch.testing.assert_close(betas[j], b, atol=1e-12, rtol=0)
        torch.testing.assert_close(Q[j].abs(), q.abs(), atol=1e-10, rtol=0)


def test_reorthogonalization_prevents_ghost_eigenvalues():
    # One outlier far above a bulk: it converges in a few steps, after which the plain
    # three-term recurrence loses orthogonality and returns copies of it (the failure seen in
    # hessian-eigenthings); full reorthogonalization returns it once.
    d = torch.cat([torch.tensor([100.0], dtype=DT), torch.linspace(0, 1, 199, dtype=DT)])
    A = torch.diag(d)
    v0 = torch.randn(200, generator=gen(5), dtype=DT)
    copies = {}
    for reorth in (False, True):
        alphas, betas, _ = lanczos(A, v0, 120, reorthogonalize=reorth)
        theta = torch.linalg.eigvalsh(tridiagonal(alphas, betas))
        copies[reorth] = int(((theta - 100).abs() < 1e-6).sum())
    assert copies[False] >= 2
    assert copies[True] == 1


# ---- eigsh against dense eigenvalues ---------------------------------------------------------------
@pytest.mark.parametrize("block_size", [1, 3])
@pytest.mark.parametrize("which", ["LA", "SA", "LM", "BE"])
@pytest.mark.parametrize("name", ["clustered", "indefinite", "hessian_like"])
def test_eigsh_matches_eigvalsh_on_designed_spectra(name, which, block_size):
    d = spectrum(name)
    A = curvops.Dense(rotated(d))
    k = 6
    res = eigsh(A, k=k, which=which, tol=1e-10, block_size=block_size, ncv=40, generator=gen(1))
    assert isinstance(res, EighResult) and res.converged
    want = expected(d, k, which)
    torch.testing.assert_close(res.eigenvalues, want, atol=1e-9 * float(d.abs().max()), rtol=0)
    X = res.eigenvectors
    torch.testing.assert_close(X.T @ X, torch.eye(k, dtype=DT), atol=1e-8, rtol=0)
    true_res = (A.A @ X - X * res.eigenvalues).norm(dim=0)
    assert float(true_res.max()) <= 1e-9 * float(d.abs().max())
    torch.testing.assert_close(res.residuals, true_res, atol=1e-11, rtol=0)  # the cheap estimate is honest
    assert res.num_matvecs == res.iterations * block_size


def test_eigsh_k_close_to_n_is_exact():
    d = spectrum("indefinite", 30)
    res = eigsh(rotated(d), k=29, which="LA", ncv=30, tol=1e-12, generator=gen(0))
    assert res.converged and res.num_matvecs == 30
    torch.testing.assert_close(res.eigenvalues, torch.sort(d).values[1:], atol=1e-12, rtol=0)


def test_eigsh_returns_no_duplicates_through_many_restarts():
    # A dominant outlier and a small basis (many thick restarts): the outlier must appear once.
    d = torch.cat([torch.tensor([100.0], dtype=DT), torch.linspace(0, 1, 199, dtype=DT)])
    res = eigsh(torch.diag(d), k=5, which="LA", ncv=12, tol=1e-10, generator=gen(3))
    assert res.converged and res.iterations > 12  # restarted
    torch.testing.assert_close(res.eigenvalues, torch.sort(d).values[-5:], atol=1e-9, rtol=0)


def test_block_eigsh_finds_a_multiple_eigenvalue():
    # The top eigenvalue has multiplicity 3: the Krylov space of one start vector holds one copy
    # (single-vector Lanczos finds copies only through rounding or breakdowns); a block of 3 finds all.
    d = torch.cat([torch.full((3,), 2.0, dtype=DT), torch.linspace(-1, 1, 97, dtype=DT)])
    A = curvops.Dense(rotated(d, seed=2))
    res = eigsh(A, k=4, which="LA", block_size=3, tol=1e-10, generator=gen(0))
    assert res.converged
    torch.testing.assert_close(res.eigenvalues, torch.tensor([1.0, 2.0, 2.0, 2.0], dtype=DT), atol=1e-9, rtol=0)


def test_block_eigsh_uses_one_product_per_block():
    A = curvops.Dense(rotated(spectrum("indefinite", 80)))
    widths = []
    counted = curvops.func_operator((80, 80), lambda V: (widths.append(V.shape[1]), A @ V)[1], dtype=DT)
    res = eigsh(counted, k=4, which="LA", block_size=4, generator=gen(0))
    assert res.converged and set(widths) == {4} and len(widths) == res.iterations


def test_eigsh_relative_to_norm_converges_on_zero_eigenvalues():
    # Wanted eigenvalues that are exactly zero (a 60-fold one, found by a block of 3): the
    # residual is measured against ‖A‖, since relative to |λ| = 0 it could never converge.
    d = torch.cat([torch.linspace(1, 2, 20, dtype=DT), torch.zeros(60, dtype=DT)])
    res = eigsh(rotated(d), k=3, which="SA", relative_to="norm", tol=1e-8, block_size=3, generator=gen(0))
    assert res.converged
    assert float(res.eigenvalues.abs().max()) < 1e-8


# ---- agreement with scipy's ARPACK on a curvature operator ------------------------------------------
@pytest.mark.parametrize("block_size", [1, 3])
@pytest.mark.parametrize("which", ["LA", "SA", "LM", "BE"])
def test_eigsh_agrees_with_scipy_on_a_curvops_hessian(which, block_size):
    p = CASES["mlp_ce"].build("mean")
    H = p.build(curvops.Hessian)  # 51 parameters, float64, indefinite
    k = 4
    v0 = torch.randn(H.shape[0], generator=gen(0), dtype=DT)
    ref = np.sort(spla.eigsh(H, k=k, which=which, v0=v0.numpy(), tol=1e-12, return_eigenvectors=False))
    res = eigsh(H, k=k, which=which, tol=1e-10, relative_to="norm", block_size=block_size, generator=gen(1))
    assert res.converged
    scale = float(np.abs(ref).max())
    np.testing.assert_allclose(res.eigenvalues.numpy(), ref, rtol=0, atol=1e-8 * scale)


def test_eigsh_accepts_tensors_arrays_and_scipy_operators():
    A = rotated(spectrum("indefinite", 50))
    want = torch.sort(torch.linalg.eigvalsh(A)).values[-3:]
    for given in (A, A.numpy(), spla.aslinearoperator(A.numpy())):
        res = eigsh(given, k=3, tol=1e-10, generator=gen(0))
        assert isinstance(res.eigenvalues, torch.Tensor)
        torch.testing.assert_close(res.eigenvalues, want, atol=1e-9, rtol=0)


def test_eigsh_is_reproducible_with_a_generator():
    A = rotated(spectrum("clustered"))
    r1 = eigsh(A, k=5, tol=1e-6, generator=gen(11))
    r2 = eigsh(A, k=5, tol=1e-6, generator=gen(11))
    r3 = eigsh(A, k=5, tol=1e-6, generator=gen(12))
    assert torch.equal(r1.eigenvalues, r2.eigenvalues) and r1.num_matvecs == r2.num_matvecs
    assert torch.equal(r1.eigenvectors, r2.eigenvectors)
    assert not torch.equal(r1.eigenvectors, r3.eigenvectors)


def test_eigsh_reports_non_convergence():
    res = eigsh(rotated(spectrum("clustered")), k=6, tol=1e-12, ncv=10, max_iters=15, generator=gen(0))
    assert not res.converged and res.iterations == 15 and res.eigenvalues.shape == (6,)


def test_eigsh_resolves_small_eigenvalues_of_a_float32_operator():
    # A spectrum over four decades, like the seed-002 Hessian (78 … 0.0106 above a bulk up to
    # 0.0102): the tolerance is relative to each eigenvalue, so the small ones come out right too
    # (a residual floor of ε^(2/3)·‖A‖ ≈ 2e-3 would accept them 10–25 % off).
    top = torch.tensor([78.0, 46.5, 6.1, 2.47, 0.347, 0.102, 0.0226, 0.0119, 0.0108, 0.0106], dtype=DT)
    d = torch.cat([top, 0.0102 * torch.rand(2000, generator=gen(0), dtype=DT)]).float()
    res = eigsh(curvops.Diagonal(d), k=10, tol=1e-4, generator=gen(0))
    assert res.converged
    rel = ((res.eigenvalues.flip(0).double() - top) / top).abs()
    assert float(rel.max()) <= 1e-4


def test_eigsh_without_eigenvectors_and_float32():
    d = spectrum("indefinite", 80)
    A = rotated(d).float()
    res = eigsh(A, k=3, which="LM", return_eigenvectors=False, tol=1e-5, generator=gen(0))
    assert res.eigenvectors is None and res.eigenvalues.dtype == torch.float32
    torch.testing.assert_close(res.eigenvalues.double(), expected(d, 3, "LM"), atol=1e-4, rtol=0)


# ---- bad input -------------------------------------------------------------------------------
def test_eigsh_rejects_bad_input():
    A = rotated(spectrum("indefinite", 20))
    with pytest.raises(ValueError, match=r"eigsh: expected a square operator, got shape \(5, 4\)"):
        eigsh(curvops.func_operator((5, 4), lambda V: V[:5], dtype=DT), k=1)
    with pytest.raises(ValueError, match=r"eigsh: expected 1 ≤ k < n = 20, got k=20"):
        eigsh(A, k=20)
    with pytest.raises(ValueError, match=r"eigsh: expected 1 ≤ k < n = 20, got k=0"):
        eigsh(A, k=0)
    with pytest.raises(ValueError, match=r"eigsh: expected which in .*got 'XX'"):
        eigsh(A, k=2, which="XX")
    with pytest.raises(ValueError, match=r"eigsh: expected k \+ block_size = 4 ≤ ncv ≤ 20, got ncv=3"):
        eigsh(A, k=3, ncv=3)
    with pytest.raises(ValueError, match=r"eigsh: expected 1 ≤ block_size"):
        eigsh(A, k=3, block_size=10)
    with pytest.raises(ValueError, match=r"eigsh: expected v0 of shape \[20\]"):
        eigsh(A, k=2, v0=torch.ones(19, dtype=DT))
    with pytest.raises(ValueError, match=r"eigsh: expected a finite, nonzero v0"):
        eigsh(A, k=2, v0=torch.zeros(20, dtype=DT))
    with pytest.raises(ValueError, match=r"eigsh: expected relative_to"):
        eigsh(A, k=2, relative_to="other")


def test_eigsh_names_the_iteration_where_a_product_turned_nan():
    A = torch.as_tensor(rotated(spectrum("indefinite", 30)))
    calls = [0]

    def matmat(V):
        calls[0] += 1
        out = A @ V
        return out * float("nan") if calls[0] == 3 else out

    op = curvops.func_operator((30, 30), matmat, dtype=DT, tags=("symmetric",))
    with pytest.raises(ValueError, match=r"eigsh: the product A @ V at iteration 3 returned NaN or Inf"):
        eigsh(op, k=2)
    calls[0] = 0
    with pytest.raises(ValueError, match=r"lanczos: the product A @ V at iteration 3 returned NaN"):
        lanczos(op, torch.ones(30, dtype=DT), 5)


def test_lanczos_rejects_bad_input():
    A = rotated(spectrum("indefinite", 10))
    with pytest.raises(ValueError, match=r"lanczos: expected 1 ≤ num_steps ≤ n = 10, got 11"):
        lanczos(A, torch.ones(10, dtype=DT), 11)
    with pytest.raises(ValueError, match=r"lanczos: expected finite, nonzero start vectors"):
        lanczos(A, torch.zeros(10, dtype=DT), 3)
    with pytest.raises(ValueError, match=r"lanczos: expected v0 of shape \[10\] or \[10, K\]"):
        lanczos(A, torch.ones(9, dtype=DT), 3)
    with pytest.raises(ValueError, match=r"lanczos: expected a square operator"):
        lanczos(torch.ones(3, 4, dtype=DT), torch.ones(4, dtype=DT), 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_eigsh_runs_on_the_operator_device():
    d = spectrum("indefinite", 100)
    A = curvops.Dense(rotated(d).cuda())
    res = eigsh(A, k=4, which="BE", tol=1e-10, generator=torch.Generator(device="cuda").manual_seed(0))
    assert res.eigenvalues.device.type == "cuda" and res.eigenvectors.device.type == "cuda"
    torch.testing.assert_close(res.eigenvalues.cpu(), expected(d, 4, "BE"), atol=1e-9, rtol=0)
