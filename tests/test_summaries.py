"""Spectral summaries: numerical rank, condition number, spectral and nuclear norm.

Designed spectra with known answers (repeated eigenvalues, exact zeros, indefinite, rectangular
low rank), a curvops GGN against its dense rank, and the documented errors.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse.linalg as spla
import torch

import curvops
from curvops.linalg.summaries import CondResult, NormEstimate, RankResult, cond, nuclear_norm, rank, spectral_norm
from curvops.testing.zoo import CASES
from curvops.testing.spectra import gen, with_spectrum as rotated

DT = torch.float64


def hessian_like(n: int = 300) -> torch.Tensor:
    """Rank 32: distinct positive values, a 5-fold eigenvalue 2, negative ones, and exact zeros."""
    return torch.cat([torch.linspace(1, 3, 20, dtype=DT), torch.full((5,), 2.0, dtype=DT),
                      -torch.linspace(0.5, 1, 7, dtype=DT), torch.zeros(n - 32, dtype=DT)])


def low_rank(M: int, N: int, r: int, seed: int = 0) -> torch.Tensor:
    g = gen(seed)
    return torch.randn(M, r, generator=g, dtype=DT) @ torch.randn(r, N, generator=g, dtype=DT)


# ---- rank ------------------------------------------------------------------------------------
def test_rank_of_a_symmetric_operator_with_repeated_and_zero_eigenvalues():
    A = curvops.Dense(rotated(hessian_like()), tags=("symmetric",))
    res = rank(A, generator=gen(0))
    assert isinstance(res, RankResult)
    assert res.value == 32 and not res.lower_bound and res.converged
    assert "Lanczos" in res.method and res.num_matvecs < 300  # cheaper than densifying


def test_rank_of_an_untagged_operator_goes_through_singular_values():
    res = rank(rotated(hessian_like()), generator=gen(0))  # a plain tensor: no symmetry promised
    assert res.value == 32 and "Gram" in res.method


def test_rank_of_a_projector_counts_every_copy():
    Q, _ = torch.linalg.qr(torch.randn(300, 7, generator=gen(1), dtype=DT))
    P = curvops.Dense(Q @ Q.T, tags=("psd",))  # eigenvalue 1 seven times, 0 otherwise
    assert rank(P, k_max=20, generator=gen(0)).value == 7
    capped = rank(P, k_max=5, generator=gen(0))
    assert capped.value == 5 and capped.lower_bound  # rank ≥ 5 is all that 5 eigenvalues can say


@pytest.mark.parametrize("shape, r", [((200, 80), 50), ((400, 300), 20), ((150, 400), 25), ((60, 200), 30)])
def test_rank_of_rectangular_operators_matches_numpy(shape, r):
    J = low_rank(*shape, r)
    res = rank(J, k_max=60, generator=gen(0))
    assert res.value == np.linalg.matrix_rank(J.numpy()) == r and not res.lower_bound
    assert ("dense" in res.method) == (min(shape) <= 60 + 2 * 4)


def test_rank_with_an_explicit_tolerance_and_float32():
    d = torch.logspace(0, -8, 200, dtype=DT)  # 1 … 1e-8
    A = curvops.Diagonal(d)
    res = rank(A, tol=1e-4, k_max=150, generator=gen(0))
    assert res.value == int((d > 1e-4).sum())
    res32 = rank(curvops.Diagonal(d.float()), k_max=150, generator=gen(0))  # default τ = 200 · ε₃₂
    assert res32.value == int((d > 200 * torch.finfo(torch.float32).eps).sum())


def test_rank_of_a_curvops_ggn_matches_the_dense_rank():
    p = CASES["mlp_ce"].build("mean")
    G = p.build(curvops.GGN)
    dense = G.to_dense()
    expected = int(np.linalg.matrix_rank(dense.numpy(), hermitian=True))
    res = rank(G, k_max=40, generator=gen(0))  # 51 parameters > 40 + 8: the Lanczos path
    assert "Lanczos" in res.method
    assert res.value == expected < G.shape[0]


def test_rank_states_its_cutoff_and_the_gap_around_it():
    d = torch.cat([torch.linspace(1, 2, 12, dtype=DT), torch.full((3,), 1e-9, dtype=DT), torch.zeros(45, dtype=DT)])
    res = rank(curvops.Dense(rotated(d), tags=("psd",)), generator=gen(0))  # 60 ≤ k_max + 8: dense, exact
    eps = torch.finfo(DT).eps
    assert res.value == 15 and res.complete and res.status == "well defined" and res.well_defined
    assert res.tol == pytest.approx(2.0 * 60 * eps, rel=1e-10)
    assert res.above == pytest.approx(1e-9, rel=1e-5) and abs(res.below) < 1e-14  # λ15 and λ16 (a rounding zero)
    assert res.symbol == "λ" and "λ₁·n·ε = 2 · 60 · 2.22e-16" in res.tol_rule
    assert "rank 15 of 60" in res.explain() and "clear gap" in res.explain()
    full = rank(curvops.Dense(rotated(torch.linspace(1, 2, 30, dtype=DT)), tags=("symmetric",)))
    assert full.value == 30 and full.well_defined and math.isnan(full.below) and full.above == pytest.approx(1.0)
    assert full.symbol == "|λ|" and full.tol_rule == f"max|λ|·n·ε = 2 · 30 · {torch.finfo(DT).eps:.3g}"
    rect = rank(low_rank(40, 30, 5), k_max=40)  # untagged: singular values, dense
    assert rect.symbol == "σ" and rect.tol_rule.startswith("σ₁·max(M, N)·ε = ") and rect.value == 5
    assert rect.well_defined and rect.below < 1e-9 * rect.above


def test_rank_inside_a_smooth_run_is_not_well_defined_float32():
    """Issue 10: the float32 cutoff λ₁·n·ε fell inside λ16 = 0.0323, λ17 = 0.0301, λ18 = 0.0300."""
    n = 300
    run = torch.logspace(1, -3, n - 1, dtype=torch.float32)  # a smooth decay, ratio ≈ 1.03 per step
    d = torch.cat([torch.tensor([0.031 / (n * torch.finfo(torch.float32).eps)]), run])  # λ₁·n·ε₃₂ = 0.031
    res = rank(curvops.Dense(rotated(d.double()).float(), tags=("symmetric",)), k_max=n, generator=gen(0))
    assert res.tol == pytest.approx(0.031, rel=1e-4)
    expected = int((d > res.tol).sum())
    assert abs(res.value - expected) <= 1  # float32 rounding of the rotated matrix, right at the cutoff
    assert not res.well_defined and res.status == "not well defined"
    assert res.below <= res.tol < res.above and res.above / res.below < 1.1
    assert "rank not well defined at this precision" in res.explain()
    # the same spectrum with a cutoff placed in a real gap is well defined
    gap = torch.cat([torch.ones(5), torch.full((10,), 1e-6)]).double()
    assert rank(curvops.Diagonal(gap), tol=1e-3).well_defined
    assert not rank(curvops.Diagonal(gap), tol=1e-3, gap_factor=2000).well_defined


def test_rank_lower_bound_is_not_well_defined():
    Q, _ = torch.linalg.qr(torch.randn(300, 7, generator=gen(1), dtype=DT))
    capped = rank(curvops.Dense(Q @ Q.T, tags=("psd",)), k_max=5, generator=gen(0))
    assert capped.lower_bound and capped.status == "lower bound" and not capped.well_defined
    assert math.isnan(capped.below) and "raise k_max" in capped.explain()


def test_rank_rejects_bad_input():
    with pytest.raises(ValueError, match=r"rank: expected k_max ≥ 1, got 0"):
        rank(torch.eye(5, dtype=DT), k_max=0)
    with pytest.raises(ValueError, match=r"rank: expected tol ≥ 0, got -1"):
        rank(torch.eye(5, dtype=DT), tol=-1.0)
    with pytest.raises(ValueError, match=r"rank: expected a finite gap_factor > 1 \(e.g. 10\), got 1"):
        rank(torch.eye(5, dtype=DT), gap_factor=1)


# ---- condition number ------------------------------------------------------------------------
def test_cond_of_a_psd_operator_with_damping():
    d = torch.linspace(0.01, 5, 300, dtype=DT)
    A = curvops.Dense(rotated(d), tags=("psd",))
    res = cond(A, generator=gen(0))
    assert isinstance(res, CondResult) and res.kind == "psd" and res.converged
    assert res.value == pytest.approx(500.0, rel=1e-6)
    damped = cond(A, damping=1.0, generator=gen(0))
    assert damped.value == pytest.approx(6.0 / 1.01, rel=1e-8) and damped.damping == 1.0


def test_cond_of_a_singular_psd_operator_is_infinite():
    A = curvops.Dense(rotated(torch.cat([torch.linspace(1, 2, 10, dtype=DT), torch.zeros(50, dtype=DT)])),
                      tags=("psd",))
    assert cond(A, generator=gen(0)).value == math.inf
    assert cond(A, damping=0.5, generator=gen(0)).value == pytest.approx(2.5 / 0.5, rel=1e-8)


def test_cond_of_a_symmetric_indefinite_operator_uses_magnitudes():
    d = torch.cat([torch.linspace(0.2, 3, 60, dtype=DT), -torch.linspace(0.1, 2, 60, dtype=DT)])
    A = curvops.Dense(rotated(d), tags=("symmetric",))
    res = cond(A, generator=gen(0))
    assert res.kind == "symmetric" and "(A+δI)²" in res.method and res.converged
    assert res.value == pytest.approx(3.0 / 0.1, rel=1e-6)
    assert res.largest == pytest.approx(3.0, rel=1e-8) and res.smallest == pytest.approx(0.1, rel=1e-6)
    # negative definite: both extremes have one sign, no squared operator needed
    neg = cond(curvops.Dense(rotated(-torch.linspace(0.5, 4, 80, dtype=DT)), tags=("symmetric",)), generator=gen(0))
    assert neg.kind == "symmetric" and neg.value == pytest.approx(8.0, rel=1e-8) and "definite" in neg.method


def test_cond_of_a_general_operator_uses_singular_values():
    J = torch.randn(120, 40, generator=gen(3), dtype=DT)
    res = cond(J, generator=gen(0))
    assert res.kind == "general"
    assert res.value == pytest.approx(float(torch.linalg.cond(J)), rel=1e-6)


def test_unconverged_cond_is_a_lower_bound():
    d = torch.cat([torch.logspace(-6, -4, 150, dtype=DT), torch.linspace(1, 5, 150, dtype=DT)])
    A = curvops.Dense(rotated(d), tags=("psd",))
    exact = 5.0 / 1e-6
    for max_iters in (8, None):  # the clustered small end is not reached in 8 steps, nor by default
        res = cond(A, max_iters=max_iters, generator=gen(0))
        assert not res.converged and res.lower_bound and res.status == "lower bound"
        assert res.value < exact and res.smallest > 1e-6 and res.largest <= 5.0 * (1 + 1e-12)
    done = cond(curvops.Dense(rotated(torch.linspace(0.01, 5, 300, dtype=DT)), tags=("psd",)), generator=gen(0))
    assert done.converged and not done.lower_bound and done.status == "converged"
    assert done.value == pytest.approx(500.0, rel=1e-6)
    # a symmetric operator whose unconverged Ritz values look definite: an estimate, no bound
    sym = cond(curvops.Dense(rotated(d), tags=("symmetric",)), max_iters=8, generator=gen(0))
    assert not sym.converged and not sym.lower_bound and sym.status == "not converged"


def test_infinite_cond_states_its_zero_threshold():
    A = curvops.Dense(rotated(torch.cat([torch.linspace(1, 2, 10, dtype=DT), torch.zeros(50, dtype=DT)])),
                      tags=("psd",))
    res = cond(A, generator=gen(0))
    assert res.status == "infinite" and not res.lower_bound
    assert res.zero_threshold == pytest.approx(torch.finfo(DT).eps ** (2 / 3) * 2.0, rel=1e-6)
    assert res.smallest <= res.zero_threshold


def test_cond_rejects_bad_input():
    J = torch.randn(20, 10, generator=gen(3), dtype=DT)
    with pytest.raises(ValueError, match=r"cond: damping applies to symmetric operators"):
        cond(J, damping=1.0)
    with pytest.raises(ValueError, match=r"cond: expected damping ≥ 0, got -1"):
        cond(curvops.Identity(5), damping=-1.0)
    with pytest.raises(ValueError, match=r"cond: expected an operator of size ≥ 3"):
        cond(curvops.Identity(2))


# ---- norms -----------------------------------------------------------------------------------
def test_spectral_norm_of_symmetric_and_rectangular_operators():
    d = torch.cat([torch.tensor([-7.0], dtype=DT), torch.linspace(-1, 5, 99, dtype=DT)])
    res = spectral_norm(curvops.Dense(rotated(d), tags=("symmetric",)), generator=gen(0))
    assert isinstance(res, NormEstimate) and res.converged and "|λ|" in res.method
    assert res.value == pytest.approx(7.0, rel=1e-8)
    J = torch.randn(90, 60, generator=gen(4), dtype=DT)
    for given in (J, spla.aslinearoperator(J.numpy()), J.T):
        out = spectral_norm(given, generator=gen(0))
        assert out.value == pytest.approx(float(torch.linalg.matrix_norm(J, ord=2)), rel=1e-8)
        assert "Gram" in out.method


def test_norm_and_cond_of_a_curvops_hessian_match_dense():
    p = CASES["mlp_ce"].build("mean")
    H = p.build(curvops.Hessian)  # tagged symmetric, indefinite
    lam = torch.linalg.eigvalsh(H.to_dense())
    assert spectral_norm(H, generator=gen(0)).value == pytest.approx(float(lam.abs().max()), rel=1e-8)
    res = cond(H, damping=0.0, generator=gen(0))
    assert res.kind == "symmetric" and res.converged
    assert res.largest == pytest.approx(float(lam.abs().max()), rel=1e-8)
    # The smallest |λ| is an exact zero here (softmax shift invariance). Through H² it is resolved
    # only to ε^(1/3)·max|λ| ≈ 6e-6·max|λ| (how close to 0 depends on the BLAS's rounding), and
    # anything below that counts as zero: the condition number is infinite.
    assert float(lam.abs().min()) < 1e-12 * float(lam.abs().max())
    assert res.value == math.inf and res.smallest <= 6.1e-6 * res.largest


def test_nuclear_norm_of_a_psd_operator_is_its_trace():
    d = torch.linspace(0.01, 5, 300, dtype=DT)
    A = curvops.Dense(rotated(d), tags=("psd",))
    res = nuclear_norm(A, num_matvecs=60, generator=gen(0))
    assert res.num_matvecs <= 60 and "trace" in res.method
    assert abs(res.value - float(d.sum())) <= 4 * res.stderr + 1e-9 * float(d.sum())
    assert res.stderr <= 0.02 * float(d.sum())


@pytest.mark.parametrize("seed", range(3))
def test_nuclear_norm_of_indefinite_and_rectangular_operators(seed):
    # Target: within 4 standard errors and 4 % (30 probes × 40 steps of SLQ on the Gram operator).
    d = torch.cat([torch.linspace(0.2, 3, 100, dtype=DT), -torch.linspace(0.1, 2, 100, dtype=DT)])
    A = curvops.Dense(rotated(d), tags=("symmetric",))
    J = torch.randn(150, 100, generator=gen(5), dtype=DT)
    for op, exact in ((A, float(d.abs().sum())), (J, float(torch.linalg.svdvals(J).sum()))):
        res = nuclear_norm(op, num_probes=30, num_steps=40, generator=gen(seed))
        assert "SLQ" in res.method and res.num_matvecs == 2 * 30 * 40
        assert abs(res.value - exact) <= 4 * res.stderr
        assert abs(res.value - exact) <= 0.04 * exact


def test_summaries_are_reproducible_with_a_generator():
    A = curvops.Dense(rotated(torch.linspace(-1, 4, 120, dtype=DT)), tags=("symmetric",))
    assert spectral_norm(A, tol=1e-3, generator=gen(9)) == spectral_norm(A, tol=1e-3, generator=gen(9))
    r1 = nuclear_norm(A, num_probes=5, num_steps=10, generator=gen(9))
    r2 = nuclear_norm(A, num_probes=5, num_steps=10, generator=gen(9))
    assert r1.value == r2.value
    assert nuclear_norm(A, num_probes=5, num_steps=10, generator=gen(10)).value != r1.value
