"""Stochastic Lanczos quadrature: spectral density and log-determinant.

Exact cases (n steps on a diagonal operator reproduce its spectrum and weights 1/n; Gauss
quadrature moments), a seeded accuracy target against the true broadened density of a designed
spectrum, a seeded statistical target for the log-determinant, the PSD refusal and bad input.
"""

from __future__ import annotations

import pytest
import torch

import curvops
from curvops.linalg.density import DensityResult, LogdetResult, gaussian_density, logdet, spectral_density
from curvops.linalg.lanczos import random_block
from curvops.testing.spectra import gen, with_spectrum as rotated

DT = torch.float64


def hessian_like(n: int = 400) -> torch.Tensor:
    """Two outliers, a positive bulk, a small negative bulk and half exact zeros."""
    g = gen(7)
    return torch.cat([torch.tensor([8.0, 5.0], dtype=DT), 2 * torch.rand(150, generator=g, dtype=DT) ** 2,
                      -0.3 * torch.rand(50, generator=g, dtype=DT), torch.zeros(n - 202, dtype=DT)])


# ---- spectral density ------------------------------------------------------------------------
def test_full_steps_on_a_diagonal_operator_are_exact():
    # With m = n steps each probe's quadrature is the exact spectral measure seen from it; for a
    # diagonal operator and a Rademacher probe that is weight v_i²/n = 1/n on each eigenvalue.
    d = torch.linspace(-1, 3, 40, dtype=DT) ** 3
    res = spectral_density(curvops.Diagonal(d), num_probes=3, num_steps=40, sigma=0.05, generator=gen(0))
    assert isinstance(res, DensityResult) and res.nodes.shape == (3, 40) and res.num_matvecs == 120
    for nodes, weights in zip(res.nodes, res.weights):
        torch.testing.assert_close(nodes, torch.sort(d).values, atol=1e-12, rtol=0)
        torch.testing.assert_close(weights, torch.full((40,), 1 / 40, dtype=DT), atol=1e-12, rtol=0)
    exact = gaussian_density(res.grid, d, torch.full_like(d, 1 / 40), 0.05)
    torch.testing.assert_close(res.density, exact, atol=1e-10, rtol=0)


def test_quadrature_reproduces_the_low_moments_of_each_probe():
    # m-node Gauss quadrature is exact for polynomials of degree ≤ 2m − 1:
    # Σ_j τ_j θ_j^p = vᵀ A^p v / ‖v‖² for p = 0..2m−1.
    n, m, K = 60, 5, 4
    A = rotated(torch.linspace(-2, 3, n, dtype=DT))
    res = spectral_density(A, num_probes=K, num_steps=m, generator=gen(3))
    V = random_block(n, K, DT, torch.device("cpu"), gen(3), "rademacher")  # the same probes
    for p in range(2 * m):
        quad = (res.weights * res.nodes ** p).sum(dim=1)
        Ap = torch.linalg.matrix_power(A, p)
        exact = ((V * (Ap @ V)).sum(dim=0) / (V * V).sum(dim=0))
        torch.testing.assert_close(quad, exact, rtol=1e-9, atol=1e-9)


def test_density_integrates_to_one_and_weights_sum_to_one():
    A = curvops.Dense(rotated(hessian_like()))
    res = spectral_density(A, num_probes=6, num_steps=30, generator=gen(1))
    torch.testing.assert_close(res.weights.sum(dim=1), torch.ones(6, dtype=DT), atol=1e-12, rtol=0)
    assert abs(float(torch.trapezoid(res.density, res.grid)) - 1) < 1e-6
    assert float(res.density.min()) >= 0
    assert res.grid.numel() == 1000 and res.sigma > 0


@pytest.mark.parametrize("seed", range(4))
def test_density_matches_the_true_broadened_density(seed):
    # Target: L1 distance ∫ |φ̂_σ − φ_σ| dt ≤ 0.1 (φ_σ: the exact eigenvalue density convolved
    # with the same Gaussian, σ ≈ 1.2 % of the spread), with 20 probes × 60 steps on a 400 × 400
    # Hessian-like spectrum.  Observed over seeds: 0.02–0.05.
    d = hessian_like()
    A = curvops.Dense(rotated(d))
    res = spectral_density(A, num_probes=20, num_steps=60, sigma=0.1, generator=gen(seed))
    exact = gaussian_density(res.grid, d, torch.full_like(d, 1 / d.numel()), 0.1)
    l1 = float(torch.trapezoid((res.density - exact).abs(), res.grid))
    assert l1 <= 0.1
    # and it sees the outliers: the mass near 8 and near 5 is 1/400 each in expectation; each
    # probe sees (uᵀv)²/n with (uᵀv)² ≈ χ²₁, so the mean of 20 has a spread of about ±32 %
    for top in (8.0, 5.0):
        near = (res.grid > top - 0.5) & (res.grid < top + 0.5)
        mass = float(torch.trapezoid(res.density[near], res.grid[near]))
        assert 0.2 / 400 <= mass <= 2.0 / 400


def test_density_on_a_given_grid_is_reproducible_and_runs_probes_together():
    A = curvops.Dense(rotated(hessian_like(250)))
    widths = []
    counted = curvops.func_operator((250, 250), lambda V: (widths.append(V.shape[1]), A @ V)[1], dtype=DT)
    grid = torch.linspace(-1, 9, 50, dtype=DT)
    r1 = spectral_density(counted, num_probes=5, num_steps=12, grid=grid, sigma=0.2, generator=gen(4))
    assert widths == [5] * 12  # one product (data pass) per step for all probes
    r2 = spectral_density(A, num_probes=5, num_steps=12, grid=grid, sigma=0.2, generator=gen(4))
    assert torch.equal(r1.density, r2.density) and torch.equal(r1.grid, grid)
    r3 = spectral_density(A, num_probes=5, num_steps=12, grid=grid, sigma=0.2, generator=gen(5))
    assert not torch.equal(r1.density, r3.density)
    r4 = spectral_density(A, num_probes=5, num_steps=12, grid=grid, sigma=0.2, generator=gen(4), probe_batch_size=2)
    torch.testing.assert_close(r4.density, r1.density)


def test_spectral_density_rejects_bad_input():
    A = rotated(torch.linspace(-1, 2, 30, dtype=DT))
    with pytest.raises(ValueError, match=r"spectral_density: expected a square operator, got shape \(3, 4\)"):
        spectral_density(torch.ones(3, 4, dtype=DT))
    with pytest.raises(ValueError, match=r"spectral_density: expected num_probes ≥ 1, got 0"):
        spectral_density(A, num_probes=0)
    with pytest.raises(ValueError, match=r"spectral_density: expected sigma > 0, got -1"):
        spectral_density(A, sigma=-1.0)
    with pytest.raises(ValueError, match=r"spectral_density: expected distribution"):
        spectral_density(A, distribution="uniform")
    nan_op = curvops.func_operator((30, 30), lambda V: V * float("nan"), dtype=DT, tags=("symmetric",))
    with pytest.raises(ValueError, match=r"the product A @ V at iteration 1 returned NaN"):
        spectral_density(nan_op, num_probes=2, num_steps=3)


# ---- log-determinant -------------------------------------------------------------------------
def test_logdet_is_exact_with_full_steps_on_a_diagonal_operator():
    d = torch.linspace(0.5, 4, 25, dtype=DT)
    res = logdet(curvops.Diagonal(d), damping=0.1, num_probes=3, num_steps=25, generator=gen(0))
    assert isinstance(res, LogdetResult) and res.num_matvecs == 75
    assert res.value == pytest.approx(float(torch.log(d + 0.1).sum()), rel=1e-12)
    assert res.stderr < 1e-10  # every Rademacher probe gives the exact value here


@pytest.mark.parametrize("seed", range(8))
def test_logdet_is_within_its_error_estimate(seed):
    # Target: |estimate − exact| ≤ 4 stderr and stderr ≤ 1.5 % of |exact| (30 probes × 30 steps,
    # 300 × 300 PSD, κ ≈ 3·10³).  Observed z-scores over these seeds: within ±2.4.
    d = torch.linspace(0.05, 10, 300, dtype=DT) ** 1.5
    A = curvops.Dense(rotated(d), tags=("psd",))
    exact = float(torch.log(d).sum())
    res = logdet(A, num_probes=30, num_steps=30, generator=gen(seed))
    assert abs(res.value - exact) <= 4 * res.stderr
    assert res.stderr <= 0.015 * abs(exact)


def test_logdet_refuses_operators_not_tagged_psd():
    d = torch.linspace(0.5, 2, 20, dtype=DT)
    A = torch.diag(d)  # diagonal: every Rademacher probe with n steps gives the exact value
    with pytest.raises(ValueError, match=r"logdet: expected an operator tagged 'psd', got tags none"):
        logdet(A)
    with pytest.raises(ValueError, match=r"got tags \['symmetric'\]"):
        logdet(curvops.Dense(A, tags=("symmetric",)))
    res = logdet(A, assume_psd=True, num_probes=4, num_steps=20, generator=gen(0))
    assert res.value == pytest.approx(float(torch.log(d).sum()), rel=1e-10)


def test_logdet_of_a_singular_operator_needs_damping():
    d = torch.cat([torch.linspace(1, 2, 10, dtype=DT), torch.zeros(10, dtype=DT)])
    A = curvops.Dense(torch.diag(d), tags=("psd",))
    with pytest.raises(ValueError, match=r"logdet: A \+ 0·I has a Ritz value .* numerically singular"):
        logdet(A, num_probes=3, num_steps=20, generator=gen(0))
    res = logdet(A, damping=0.5, num_probes=3, num_steps=20, generator=gen(0))
    assert res.value == pytest.approx(float(torch.log(d + 0.5).sum()), rel=1e-10)
    with pytest.raises(ValueError, match=r"logdet: expected damping ≥ 0, got -1"):
        logdet(A, damping=-1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_slq_runs_on_the_operator_device():
    d = torch.linspace(0.5, 4, 25, dtype=DT)
    A = curvops.Dense(torch.diag(d).cuda(), tags=("psd",))
    g = torch.Generator(device="cuda").manual_seed(0)
    res = spectral_density(A, num_probes=3, num_steps=25, sigma=0.05, generator=g)
    assert res.density.device.type == "cuda" and res.nodes.device.type == "cuda"
    torch.testing.assert_close(res.nodes[0].cpu(), d, atol=1e-12, rtol=0)
    assert logdet(A, num_probes=3, num_steps=25, generator=g).value == pytest.approx(float(torch.log(d).sum()))
