"""Randomized SVD, Nyström and svds: exact cases, accuracy against dense factorizations and scipy, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse.linalg as spla
import torch

import curvops
from curvops.linalg import svds
from curvops.linalg.svd import nystrom, randomized_svd
from curvops.testing.spectra import gen

DT = torch.float64


def with_singular_values(M: int, N: int, s: torch.Tensor, seed: int = 0) -> torch.Tensor:
    U, _ = torch.linalg.qr(torch.randn(M, s.numel(), generator=gen(seed), dtype=DT))
    V, _ = torch.linalg.qr(torch.randn(N, s.numel(), generator=gen(seed + 1), dtype=DT))
    return (U * s) @ V.T


def counting(A: torch.Tensor, tags=()):
    calls = []

    def mm(V, M=A, side="A"):
        calls.append((side, V.shape[1]))
        return M @ V

    op = curvops.func_operator(tuple(A.shape), mm, lambda W: mm(W, A.T, "A.T"), dtype=A.dtype, tags=tags)
    return op, calls


# ---- randomized SVD ---------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(90, 40), (40, 90)])
def test_randomized_svd_exact_on_low_rank(shape):
    J = with_singular_values(*shape, torch.tensor([5.0, 2.0, 1.0, 0.5], dtype=DT))
    res = randomized_svd(curvops.Dense(J), 4, oversample=2, power_iters=0, generator=gen())
    torch.testing.assert_close(res.operator.to_dense(), J, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(res.S, torch.tensor([5.0, 2.0, 1.0, 0.5], dtype=DT), rtol=1e-12, atol=1e-12)
    assert res.U.shape == (shape[0], 4) and res.V.shape == (shape[1], 4)
    torch.testing.assert_close(res.U.T @ res.U, torch.eye(4, dtype=DT), rtol=0, atol=1e-12)
    assert isinstance(res.operator, curvops.LowRank) and res.operator.shape == shape


def test_randomized_svd_accuracy_and_cost():
    s = 0.7 ** torch.arange(60, dtype=DT)
    J = with_singular_values(200, 60, s, seed=3)
    op, calls = counting(J)
    res = randomized_svd(op, 6, oversample=8, power_iters=2, generator=gen(1))
    # Target: top-6 singular values to 1e-8, spectral error within 1 % of the optimum σ₇.
    torch.testing.assert_close(res.S, s[:6], rtol=1e-8, atol=0)
    assert float(torch.linalg.matrix_norm(J - res.operator.to_dense(), 2)) <= 1.01 * float(s[6])
    assert res.num_matvecs == 14 * 6 and sum(k for _, k in calls) == 84
    assert [side for side, _ in calls] == ["A", "A.T", "A", "A.T", "A", "A.T"]


def test_randomized_svd_of_a_jacobian():
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).to(DT)
    X = torch.randn(20, 3, generator=gen(4), dtype=DT)
    J = curvops.Jacobian(model, X)
    dense = J.to_dense()
    res = randomized_svd(J, 5, power_iters=3, generator=gen())
    torch.testing.assert_close(res.S, torch.linalg.svdvals(dense)[:5], rtol=1e-9, atol=1e-12)


def test_randomized_svd_reproducible():
    J = torch.randn(50, 30, generator=gen(), dtype=DT)
    a = randomized_svd(J, 3, generator=gen(9))
    b = randomized_svd(J, 3, generator=gen(9))
    assert torch.equal(a.U, b.U) and torch.equal(a.S, b.S)


# ---- Nyström ------------------------------------------------------------------------------
def psd(lam: torch.Tensor, seed: int = 0) -> torch.Tensor:
    Q, _ = torch.linalg.qr(torch.randn(lam.numel(), lam.numel(), generator=gen(seed), dtype=DT))
    A = (Q * lam) @ Q.T
    return (A + A.T) / 2


def test_nystrom_exact_on_low_rank_psd():
    lam = torch.cat([torch.tensor([4.0, 2.0, 1.0, 0.25], dtype=DT), torch.zeros(56, dtype=DT)])
    A = psd(lam)
    res = nystrom(curvops.Dense(A, tags=("psd",)), 4, oversample=3, generator=gen())
    torch.testing.assert_close(res.operator.to_dense(), A, rtol=1e-10, atol=1e-12)
    assert res.operator.is_psd and res.V is None and res.num_matvecs == 7


def test_nystrom_accuracy_single_pass():
    lam = 0.6 ** torch.arange(100, dtype=DT)
    A = psd(lam, seed=2)
    op, calls = counting(A, tags=("psd",))
    res = nystrom(op, 10, oversample=10, generator=gen())
    assert calls == [("A", 20)]
    torch.testing.assert_close(res.S[:5], lam[:5], rtol=1e-2, atol=0)  # single pass: errors ~ λ_ℓ/2 ... λ_k
    assert float(torch.linalg.matrix_norm(A - res.operator.to_dense(), 2)) <= 1.05 * float(lam[10])
    assert bool((res.S >= 0).all()) and res.shift > 0


def test_nystrom_power_iterations_help_slow_decay():
    lam = 1.0 / (1.0 + torch.arange(120, dtype=DT))
    A = psd(lam, seed=4)
    err = [float(torch.linalg.matrix_norm(A - nystrom(curvops.Dense(A, tags=("psd",)), 8, power_iters=q,
                                                      generator=gen()).operator.to_dense(), 2)) for q in (0, 2)]
    assert err[1] < 0.7 * err[0]


def test_nystrom_float32_operator():
    lam = 0.5 ** torch.arange(50, dtype=DT)
    A = psd(lam).float()
    res = nystrom(curvops.Dense(A, tags=("psd",)), 5, generator=gen())
    ref = nystrom(curvops.Dense(A.double(), tags=("psd",)), 5, generator=gen())  # same sketch, float64 products
    assert res.S.dtype == torch.float32 and res.shift > 10 * ref.shift  # ε of the operator's dtype
    torch.testing.assert_close(res.S, ref.S.float(), rtol=2e-3, atol=1e-6)


def test_bad_input():
    with pytest.raises(ValueError, match=r"randomized_svd: expected 1 <= rank <= 3 \(the smaller dimension\), got 4"):
        randomized_svd(torch.ones(5, 3, dtype=DT), 4)
    with pytest.raises(TypeError, match="expected an integer rank"):
        randomized_svd(torch.ones(5, 3, dtype=DT), 2.0)
    with pytest.raises(ValueError, match="non-negative integer power_iters"):
        randomized_svd(torch.ones(5, 3, dtype=DT), 2, power_iters=-1)
    with pytest.raises(ValueError, match=r"nystrom: expected a PSD operator \(tag 'psd'\)"):
        nystrom(curvops.Dense(torch.eye(4, dtype=DT), tags=("symmetric",)), 2)
    with pytest.raises(ValueError, match="nystrom: expected a square operator"):
        nystrom(curvops.Dense(torch.ones(4, 3, dtype=DT)), 2, assume_psd=True)
    no_adjoint = curvops.func_operator((6, 4), lambda V: torch.ones(6, V.shape[1], dtype=DT), dtype=DT)
    with pytest.raises(NotImplementedError, match="adjoint"):
        randomized_svd(no_adjoint, 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_gpu():
    J = with_singular_values(80, 30, torch.tensor([3.0, 2.0, 1.0], dtype=DT)).cuda()
    res = randomized_svd(curvops.Dense(J), 3, generator=gen())
    assert res.U.device.type == "cuda" and res.operator.device.type == "cuda"
    torch.testing.assert_close(res.operator.to_dense(), J, rtol=1e-10, atol=1e-12)
    A = J.T @ J
    ny = nystrom(curvops.Dense(A, tags=("psd",)), 3, generator=torch.Generator(device="cuda").manual_seed(0))
    torch.testing.assert_close(ny.operator.to_dense(), A, rtol=1e-9, atol=1e-10)


# ---- svds: the k largest singular triplets, against scipy.sparse.linalg.svds on the dense matrix -----
def scipy_svds(dense: torch.Tensor, k: int):
    """scipy's reference (ARPACK to machine precision), ascending like ours."""
    u, s, vt = spla.svds(dense.numpy(), k=k, tol=0, random_state=np.random.default_rng(0))
    order = np.argsort(s)
    return (torch.from_numpy(u[:, order].copy()), torch.from_numpy(s[order].copy()),
            torch.from_numpy(vt[order].T.copy()))


def assert_matches_scipy(res, dense: torch.Tensor, k: int, rtol: float, align: float):
    U_ref, S_ref, V_ref = scipy_svds(dense, k)
    torch.testing.assert_close(S_ref, torch.linalg.svdvals(dense)[:k].flip(0), rtol=1e-12, atol=0)  # the oracle
    torch.testing.assert_close(res.S, S_ref, rtol=rtol, atol=0)
    for X, X_ref in ((res.U, U_ref), (res.V, V_ref)):  # vectors up to sign
        cos = (X * X_ref).sum(0).abs()
        assert float((1 - cos).abs().max()) <= align, cos
    torch.testing.assert_close(res.U.T @ res.U, torch.eye(k, dtype=DT), rtol=0, atol=1e-12)
    torch.testing.assert_close(res.V.T @ res.V, torch.eye(k, dtype=DT), rtol=0, atol=1e-12)
    torch.testing.assert_close(dense @ res.V, res.U * res.S, rtol=0, atol=10 * float(res.residuals.max()) + 1e-12)


@pytest.mark.parametrize("shape", [(120, 50), (50, 120)])
def test_svds_lanczos_matches_scipy_on_a_random_matrix(shape):
    dense = torch.randn(*shape, generator=gen(11), dtype=DT)
    op, calls = counting(dense)
    res = svds(op, k=5, tol=1e-10, generator=gen(2))
    # Target: top-5 σ of a flat (Gaussian) spectrum to 1e-10 relative, vectors to 1e-10 in cos.
    assert res.converged and res.method == "lanczos"
    assert_matches_scipy(res, dense, 5, rtol=1e-10, align=1e-10)
    assert bool((res.residuals <= 1e-10 * res.S).all())
    assert res.num_matvecs == 2 * res.iterations == sum(k for _, k in calls)
    assert [side for side, _ in calls[:4]] == ["A", "A.T", "A", "A.T"]


def test_svds_lanczos_restarts_and_reproducible():
    dense = torch.randn(200, 150, generator=gen(12), dtype=DT)
    a = svds(dense, k=4, ncv=10, tol=1e-9, generator=gen(3))  # basis of 10: many thick restarts
    b = svds(dense, k=4, ncv=10, tol=1e-9, generator=gen(3))
    assert a.converged and a.iterations > 10
    assert_matches_scipy(a, dense, 4, rtol=1e-9, align=1e-8)
    assert torch.equal(a.S, b.S) and torch.equal(a.U, b.U)


def test_svds_lanczos_exact_low_rank():
    J = with_singular_values(80, 60, torch.tensor([5.0, 2.0, 1.0], dtype=DT), seed=5)
    res = svds(J, k=3, generator=gen(4))
    assert res.converged
    torch.testing.assert_close(res.S, torch.tensor([1.0, 2.0, 5.0], dtype=DT), rtol=1e-12, atol=0)
    torch.testing.assert_close(res.operator.to_dense(), J, rtol=0, atol=1e-12)


def test_svds_randomized_matches_scipy():
    s = 0.5 ** torch.arange(40, dtype=DT)
    dense = with_singular_values(150, 40, s, seed=6)
    op, calls = counting(dense)
    res = svds(op, k=5, method="randomized", oversample=8, power_iters=2, generator=gen(5))
    # Fast decay: σ₁₄/σ₅ = 2⁻⁹, so two power iterations give the top 5 to ~1e-13.
    assert res.converged and res.method == "randomized"
    assert_matches_scipy(res, dense, 5, rtol=1e-10, align=1e-10)
    assert res.num_matvecs == 13 * 6 + 2 * 5 == sum(k for _, k in calls)


def test_svds_randomized_reports_unconverged_on_a_flat_spectrum():
    dense = torch.randn(120, 50, generator=gen(13), dtype=DT)
    res = svds(dense, k=5, method="randomized", oversample=2, power_iters=0, tol=1e-8, generator=gen(1))
    assert not res.converged and bool((res.residuals > 1e-8 * res.S).any())


@pytest.mark.parametrize("method", ["lanczos", "randomized"])
def test_svds_of_a_jacobian(method):
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).to(DT)
    X = torch.randn(20, 3, generator=gen(4), dtype=DT)
    J = curvops.Jacobian(model, X)  # 40 × 50
    dense = J.to_dense()
    res = svds(J, k=4, method=method, tol=1e-10, power_iters=6, generator=gen(7))
    assert res.converged
    assert_matches_scipy(res, dense, 4, rtol=1e-10, align=1e-9)


def test_svds_public_and_without_vectors():
    assert curvops.svds is svds and curvops.linalg.svds is svds
    dense = torch.randn(60, 30, generator=gen(14), dtype=DT)
    res = svds(dense, k=3, return_singular_vectors=False, generator=gen())
    assert res.U is None and res.V is None
    torch.testing.assert_close(res.S, torch.linalg.svdvals(dense)[:3].flip(0), rtol=1e-8, atol=0)
    with pytest.raises(ValueError, match="expected singular vectors"):
        res.operator


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(k=0), ValueError, r"svds\(lanczos\): expected 1 ≤ k < min\(M, N\) = 8, got k=0"),
    (dict(k=8), ValueError, r"expected 1 ≤ k < min\(M, N\) = 8, got k=8"),
    (dict(k=9, method="randomized"), ValueError, r"svds\(randomized\): expected 1 ≤ k ≤ min\(M, N\) = 8"),
    (dict(k=2.0), TypeError, r"expected an integer k, got float 2.0. Pass k=2"),
    (dict(method="arpack"), ValueError, r"svds: expected method in \('lanczos', 'randomized'\)"),
    (dict(tol=-1.0), ValueError, r"expected a finite tol ≥ 0"),
    (dict(tol="small"), TypeError, r"expected a real number for tol"),
    (dict(k=3, ncv=3), ValueError, r"expected k \+ 1 = 4 ≤ ncv ≤ min\(M, N\) = 8, got ncv=3"),
    (dict(max_iters=0), ValueError, r"max_iters ≥ 1"),
    (dict(generator="seed"), TypeError, r"expected a torch.Generator, an int seed or None"),
    (dict(return_singular_vectors=1), TypeError, r"expected True or False for return_singular_vectors"),
    (dict(v0=torch.ones(7, dtype=DT)), ValueError, r"expected v0 of shape \[8\]"),
    (dict(v0=torch.zeros(8, dtype=DT)), ValueError, r"expected a finite, nonzero v0"),
    (dict(v0=torch.ones(8, dtype=DT), method="randomized"), ValueError, r"expected v0=None"),
    (dict(oversample=-1, method="randomized"), ValueError, r"oversample ≥ 0"),
])
def test_svds_argument_errors_before_any_product(kwargs, error, match):
    op, calls = counting(torch.randn(12, 8, generator=gen(), dtype=DT))
    kwargs = {"k": 2, **kwargs}
    with pytest.raises(error, match=match):
        svds(op, **kwargs)
    assert calls == []


def test_svds_non_finite_product_names_the_step():
    def mm(V):
        out = torch.ones(10, V.shape[1], dtype=DT)
        out[0] = float("nan")
        return out

    op = curvops.func_operator((10, 6), mm, lambda W: torch.ones(6, W.shape[1], dtype=DT), dtype=DT)
    with pytest.raises(ValueError, match=r"svds\(lanczos\): the product A @ V \(A @ v at step 1\) returned non-finite"):
        svds(op, k=2)
