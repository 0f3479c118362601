"""CG, MINRES, LSMR, the Nyström preconditioner and the lazy inverse: residuals, exact cases, bad input."""

from __future__ import annotations

import warnings

import pytest
import torch

import curvops
from curvops.linalg.solve import (
    ConvergenceError, ConvergenceWarning, InverseOperator, inverse, nystrom_preconditioner, solve,
)
from curvops.testing import oracles
from curvops.testing.zoo import CASES
from curvops.testing.spectra import gen, with_spectrum as designed

DT = torch.float64


def rhs(n: int, k: int | None = None, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, generator=gen(seed), dtype=DT) if k is None else torch.randn(n, k, generator=gen(seed),
                                                                                       dtype=DT)


def counting(A: torch.Tensor, tags=(), nan_at: int | None = None):
    calls = []

    def mm(V, M=A):
        calls.append(V.shape[1])
        out = M @ V
        return out * float("nan") if nan_at is not None and len(calls) >= nan_at else out

    op = curvops.func_operator(tuple(A.shape), mm, lambda W: mm(W, A.T), dtype=A.dtype, tags=tags)
    return op, calls


PSD_A = designed(torch.logspace(-2, 1, 60))
INDEF_A = designed(torch.cat([torch.linspace(-2.0, -0.1, 25), torch.linspace(0.1, 3.0, 35)]), seed=2)


# ---- CG ---------------------------------------------------------------------------------------
def test_cg_residual_and_solution():
    b = rhs(60)
    res = solve(curvops.Dense(PSD_A, tags=("psd",)), b, method="cg", rtol=1e-10)
    true_res = float((PSD_A @ res.x - b).norm())
    assert res.converged and res.method == "cg" and res.message == "converged"
    assert true_res <= 2e-10 * float(b.norm()) and res.residual_norm == pytest.approx(true_res, rel=1e-2)
    torch.testing.assert_close(res.x, torch.linalg.solve(PSD_A, b), rtol=1e-8, atol=1e-10)
    assert res.num_matvecs == res.iterations and len(res.history) == res.iterations + 1


def test_cg_converges_in_as_many_steps_as_distinct_eigenvalues():
    # Krylov exactness: 4 distinct eigenvalues → the solution lies in a 4-dimensional Krylov space.
    A = designed(torch.tensor([1.0, 2.0, 5.0, 9.0]).repeat_interleave(10))
    res = solve(curvops.Dense(A, tags=("psd",)), rhs(40), method="cg", rtol=1e-10)
    assert res.converged and res.iterations == 4


def test_cg_block_damping_and_x0():
    B = rhs(60, 3)
    op, calls = counting(PSD_A, tags=("psd",))
    res = solve(op, B, method="cg", damping=0.5, rtol=1e-12)
    expected = torch.linalg.solve(PSD_A + 0.5 * torch.eye(60, dtype=DT), B)
    torch.testing.assert_close(res.x, expected, rtol=1e-9, atol=1e-11)
    assert res.residual_norm.shape == (3,) and bool((res.residual_norm <= 1e-12 * B.norm(dim=0)).all())
    assert len(calls) == res.iterations and sum(calls) == res.num_matvecs and calls[0] == 3  # one call per step
    warm = solve(op, B, method="cg", damping=0.5, rtol=1e-12, x0=expected)
    assert warm.iterations == 0 and warm.num_matvecs == 3  # only the initial residual


def test_cg_on_a_ggn_with_damping():
    problem = CASES["mlp_ce"].build("mean")
    G = problem.build(curvops.GGN)
    D = oracles.ORACLES["GGN"](problem)
    b = rhs(G.shape[0])
    res = solve(G, b, damping=1e-2, rtol=1e-10)
    assert res.method == "cg" and res.converged
    torch.testing.assert_close(res.x, torch.linalg.solve(D + 1e-2 * torch.eye(G.shape[0], dtype=DT), b),
                               rtol=1e-7, atol=1e-9)


def test_cg_detects_negative_curvature():
    res = solve(curvops.Dense(INDEF_A, tags=("symmetric",)), rhs(60), method="cg", assume_psd=True)
    assert res.negative_curvature and not res.converged
    assert "negative curvature" in res.message and "iteration" in res.message
    with pytest.raises(ConvergenceError, match="negative curvature") as info:
        solve(curvops.Dense(INDEF_A, tags=("symmetric",)), rhs(60), method="cg", assume_psd=True, strict=True)
    assert info.value.result.negative_curvature


def test_nystrom_preconditioned_cg_needs_fewer_iterations():
    lam = torch.cat([100 * 0.7 ** torch.arange(40, dtype=DT), torch.full((160,), 1e-3, dtype=DT)])
    A = curvops.Dense(designed(lam, seed=3), tags=("psd",))
    b = rhs(200)
    plain = solve(A, b, method="cg", damping=1e-3, rtol=1e-8)
    pre = solve(A, b, method="cg", damping=1e-3, rtol=1e-8, preconditioner="nystrom", preconditioner_rank=45,
                generator=gen())
    assert plain.converged and pre.converged
    assert pre.iterations <= plain.iterations / 4
    assert pre.info["preconditioner_matvecs"] == 55 and pre.num_matvecs == pre.iterations + 55
    torch.testing.assert_close(pre.x, plain.x, rtol=1e-5, atol=1e-6)


def test_nystrom_preconditioner_condition_number():
    lam = 50 * 0.8 ** torch.arange(120, dtype=DT)
    A = designed(lam)
    mu = 1e-3
    P = nystrom_preconditioner(curvops.Dense(A, tags=("psd",)), 60, mu, generator=gen())
    assert P.is_psd and P.num_matvecs == 70
    M = P.to_dense()
    L = torch.linalg.cholesky(M)
    ev = torch.linalg.eigvalsh(L.T @ (A + mu * torch.eye(120, dtype=DT)) @ L)
    before = float((lam.max() + mu) / (lam.min() + mu))
    assert float(ev.max() / ev.min()) < 10 < before


# ---- MINRES ----------------------------------------------------------------------------------
def test_minres_indefinite_residual():
    b = rhs(60)
    res = solve(curvops.Dense(INDEF_A, tags=("symmetric",)), b, rtol=1e-10)
    assert res.method == "minres" and res.converged
    assert float((INDEF_A @ res.x - b).norm()) <= 1e-8 * float(b.norm())
    torch.testing.assert_close(res.x, torch.linalg.solve(INDEF_A, b), rtol=1e-7, atol=1e-9)


def test_minres_block_and_negative_shift():
    B = rhs(60, 2)
    res = solve(curvops.Dense(PSD_A, tags=("psd",)), B, method="minres", damping=-0.3, rtol=1e-11)
    shifted = PSD_A - 0.3 * torch.eye(60, dtype=DT)
    torch.testing.assert_close(res.x, torch.linalg.solve(shifted, B), rtol=1e-7, atol=1e-9)
    assert res.converged and res.residual_norm.shape == (2,)


def test_minres_singular_consistent_system():
    A = designed(torch.cat([torch.zeros(10), torch.linspace(-1.0, 1.0, 30).clamp(min=0.2)]))
    b = A @ rhs(40)  # in the range
    res = solve(curvops.Dense(A, tags=("symmetric",)), b, rtol=1e-10)
    assert res.converged and float((A @ res.x - b).norm()) <= 1e-8 * float(b.norm())


def test_minres_with_spd_preconditioner():
    d = PSD_A.diagonal()
    res = solve(curvops.Dense(PSD_A, tags=("psd",)), rhs(60), method="minres", preconditioner=curvops.Diagonal(1 / d),
                rtol=1e-10)
    torch.testing.assert_close(res.x, torch.linalg.solve(PSD_A, rhs(60)), rtol=1e-7, atol=1e-9)


# ---- LSMR ------------------------------------------------------------------------------------
J = torch.randn(90, 30, generator=gen(7), dtype=DT)


def test_lsmr_least_squares():
    y = rhs(90)
    res = solve(curvops.Dense(J), y, rtol=1e-12)
    assert res.method == "lsmr" and res.converged
    x_ls = torch.linalg.lstsq(J, y[:, None]).solution[:, 0]
    torch.testing.assert_close(res.x, x_ls, rtol=1e-9, atol=1e-10)
    assert res.residual_norm == pytest.approx(float((J @ x_ls - y).norm()), rel=1e-8)
    assert res.num_matvecs == 2 * res.iterations + 1
    assert float(res.info["normal_residual_norm"]) <= 1e-10 * float(res.info["norm_A"]) * res.residual_norm


def test_lsmr_damped_block_and_wide():
    Y = rhs(90, 3)
    res = solve(curvops.Dense(J), Y, method="lsmr", damping=0.5, rtol=1e-12)
    ridge = torch.linalg.solve(J.T @ J + 0.5 * torch.eye(30, dtype=DT), J.T @ Y)
    torch.testing.assert_close(res.x, ridge, rtol=1e-9, atol=1e-10)
    wide = J.T  # 30 × 90, consistent, underdetermined: LSMR from 0 gives the minimum-norm solution
    y = rhs(30)
    res = solve(curvops.Dense(wide), y, method="lsmr", rtol=1e-12)
    torch.testing.assert_close(res.x, torch.linalg.pinv(wide) @ y, rtol=1e-8, atol=1e-10)


def test_lsmr_with_a_jacobian():
    model = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1)).to(DT)
    X = torch.randn(40, 3, generator=gen(8), dtype=DT)
    Jop = curvops.Jacobian(model, X)
    Jd = Jop.to_dense()
    r = rhs(40)
    res = solve(Jop, r, damping=1e-3, rtol=1e-10)
    normal = Jd.T @ (Jd @ res.x - r) + 1e-3 * res.x
    assert float(normal.norm()) <= 1e-8 * float((Jd.T @ r).norm())
    ridge = torch.linalg.solve(Jd.T @ Jd + 1e-3 * torch.eye(Jd.shape[1], dtype=DT), Jd.T @ r)
    torch.testing.assert_close(res.x, ridge, rtol=1e-4, atol=1e-8)  # κ(JᵀJ + λI) ≈ 1e5


# ---- lazy inverse -----------------------------------------------------------------------------
def test_inverse_cg_in_compositions():
    A = curvops.Dense(PSD_A, tags=("psd",))
    Ainv = inverse(A, damping=0.1, rtol=1e-12)
    assert isinstance(Ainv, InverseOperator) and Ainv.tags == {"symmetric", "psd"} and Ainv.T is Ainv
    dense_inv = torch.linalg.inv(PSD_A + 0.1 * torch.eye(60, dtype=DT))
    V = rhs(60, 4)
    torch.testing.assert_close(Ainv @ V, dense_inv @ V, rtol=1e-9, atol=1e-11)
    assert Ainv.last_result.converged and Ainv.last_result.x.shape == (60, 4)
    Jm = torch.randn(5, 60, generator=gen(2), dtype=DT)
    K = curvops.Dense(Jm) @ Ainv @ curvops.Dense(Jm.T)  # J (A + λI)⁻¹ Jᵀ
    torch.testing.assert_close(K.to_dense(), Jm @ dense_inv @ Jm.T, rtol=1e-9, atol=1e-11)
    assert Ainv.num_matvecs > 0


def test_inverse_minres_and_lsmr():
    Hinv = inverse(curvops.Dense(INDEF_A, tags=("symmetric",)), rtol=1e-12)
    assert Hinv.method == "minres" and Hinv.tags == {"symmetric"}
    torch.testing.assert_close(Hinv.to_dense(), torch.linalg.inv(INDEF_A), rtol=1e-7, atol=1e-9)
    Jp = inverse(curvops.Dense(J), damping=0.5, rtol=1e-12)
    pinv = torch.linalg.solve(J.T @ J + 0.5 * torch.eye(30, dtype=DT), J.T)
    assert Jp.shape == (30, 90) and Jp.method == "lsmr"
    torch.testing.assert_close(Jp @ rhs(90, 2), pinv @ rhs(90, 2), rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(Jp.T @ rhs(30, 2), pinv.T @ rhs(30, 2), rtol=1e-9, atol=1e-11)
    assert Jp.last_adjoint_result.converged


def test_inverse_reports_non_convergence():
    A = curvops.Dense(PSD_A, tags=("psd",))
    with pytest.warns(ConvergenceWarning, match=r"inverse\(cg\) @ V: the solve did not converge"):
        x = inverse(A, max_iters=2) @ rhs(60)
    assert x.shape == (60,)
    with pytest.raises(ConvergenceError, match="did not converge") as info:
        inverse(A, max_iters=2, strict=True) @ rhs(60)
    assert info.value.result.iterations == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Ainv = inverse(A, max_iters=2, warn=False)
        Ainv @ rhs(60)
    assert not Ainv.last_result.converged


def test_inverse_builds_nystrom_preconditioner_lazily():
    op, calls = counting(PSD_A, tags=("psd",))
    Ainv = inverse(op, damping=1e-2, preconditioner="nystrom", preconditioner_rank=20, generator=gen(), rtol=1e-10)
    assert calls == []  # nothing at construction
    Ainv @ rhs(60)
    assert calls[0] == 30 and Ainv.num_matvecs == sum(calls)
    n_before = len(calls)
    Ainv @ rhs(60)
    assert calls[n_before] == 1  # built once, reused
    torch.testing.assert_close(Ainv @ rhs(60), torch.linalg.solve(PSD_A + 1e-2 * torch.eye(60, dtype=DT), rhs(60)),
                               rtol=1e-8, atol=1e-10)


# ---- bad input ---------------------------------------------------------------------------------
def test_bad_input():
    A = curvops.Dense(PSD_A, tags=("psd",))
    with pytest.raises(ValueError,
                       match=r"solve\(cg\): expected a square operator for method='cg', got shape \(90, 30\)"):
        solve(curvops.Dense(J), rhs(90), method="cg")
    with pytest.raises(ValueError, match=r"CG needs a positive \(semi\)definite operator.*method='minres'"):
        solve(curvops.Dense(INDEF_A, tags=("symmetric",)), rhs(60), method="cg")
    with pytest.raises(ValueError, match="MINRES needs a symmetric operator"):
        solve(curvops.Dense(torch.randn(6, 6, dtype=DT)), rhs(6), method="minres")
    with pytest.raises(ValueError, match=r"expected b of shape \[60\] or \[60, K\] \(the rows of A\), got \(59,\)"):
        solve(A, rhs(59))
    with pytest.raises(TypeError, match="expected b of dtype torch.float64, got torch.float32"):
        solve(A, rhs(60).float())
    with pytest.raises(ValueError, match="expected a finite right-hand side"):
        solve(A, torch.full((60,), float("nan"), dtype=DT))
    with pytest.raises(ValueError, match=r"expected x0 of shape \[60\]"):
        solve(A, rhs(60), x0=torch.zeros(3, dtype=DT))
    with pytest.raises(ValueError, match="expected damping >= 0"):
        solve(A, rhs(60), method="cg", damping=-1.0)
    with pytest.raises(ValueError, match="expected method in"):
        solve(A, rhs(60), method="gmres")
    with pytest.raises(ValueError, match="LSMR takes no preconditioner"):
        solve(curvops.Dense(J), rhs(90), preconditioner=curvops.Identity(30))
    with pytest.raises(ValueError, match="preconditioner would be singular"):
        nystrom_preconditioner(curvops.Dense(designed(torch.cat([torch.ones(3), torch.zeros(17)])), tags=("psd",)),
                               10, 0.0)
    with pytest.raises(ValueError, match="CG needs a positive"):
        inverse(curvops.Dense(INDEF_A, tags=("symmetric",)), method="cg")


@pytest.mark.parametrize("method, tags, at", [("cg", ("psd",), 3), ("minres", ("symmetric",), 3), ("lsmr", (), 5)])
def test_nan_from_a_product_names_the_iteration(method, tags, at):
    op, _ = counting(PSD_A, tags=tags, nan_at=at)
    # CG/MINRES: call 3 is iteration 3; LSMR: call 1 is Aᵀu₀, then two calls per iteration.
    with pytest.raises(ValueError, match=rf"solve\({method}\): the product A(\.T)? @ V at iteration 2|"
                                         rf"solve\({method}\): the product A @ V at iteration 3"):
        solve(op, rhs(60), method=method, rtol=1e-14)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["cg", "minres", "lsmr"])
def test_on_gpu(method):
    A = PSD_A.cuda()
    b = rhs(60, 2).cuda()
    res = solve(curvops.Dense(A, tags=("psd",)), b, method=method, rtol=1e-11,
                preconditioner="nystrom" if method == "cg" else None, preconditioner_rank=20,
                generator=torch.Generator(device="cuda").manual_seed(0), damping=1e-2)
    assert res.converged and res.x.device.type == "cuda" and res.residual_norm.device.type == "cpu"
    expected = (torch.linalg.solve(PSD_A + 1e-2 * torch.eye(60, dtype=DT), rhs(60, 2)) if method != "lsmr" else
                torch.linalg.solve(PSD_A @ PSD_A + 1e-2 * torch.eye(60, dtype=DT), PSD_A @ rhs(60, 2)))
    tol = dict(rtol=1e-6, atol=1e-8) if method == "lsmr" else dict(rtol=1e-7, atol=1e-9)  # κ(A² + λI) ≈ 1e4
    torch.testing.assert_close(res.x.cpu(), expected, **tol)
    Ainv = inverse(curvops.Dense(A, tags=("psd",)), damping=1e-2, method=method, rtol=1e-11)
    torch.testing.assert_close((Ainv @ b).cpu(), expected, **tol)
