"""Stationary-point classification (seeds/001): quadratics with designed Hessians, and networks.

f(w) = ½ wᵀAw + bᵀw has gradient Aw + b and Hessian A; at w* = −A⁺b it is stationary (b in the
range of A), and its kind is decided by the signs of A's extremal eigenvalues.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvops
from curvops.analysis import StationaryPointResult, classify_stationary_point
from curvops.testing.zoo import CASES
from curvops.testing.spectra import gen, with_spectrum as rotated

DT = torch.float64
N = 60


SPECTRA = {  # name: (eigenvalues, expected kind)
    "positive_definite": (torch.linspace(0.1, 4, N, dtype=DT), "minimum"),
    "negative_definite": (-torch.linspace(0.1, 4, N, dtype=DT), "maximum"),
    "indefinite": (torch.linspace(-1, 4, N, dtype=DT), "saddle"),
    "indefinite_with_zeros": (torch.cat([torch.linspace(-1, -0.5, 5, dtype=DT), torch.zeros(45, dtype=DT),
                                         torch.linspace(1, 3, 10, dtype=DT)]), "saddle"),
    "psd_singular": (torch.cat([torch.zeros(40, dtype=DT), torch.linspace(0.5, 3, 20, dtype=DT)]), "degenerate"),
    "nsd_singular": (torch.cat([torch.zeros(40, dtype=DT), -torch.linspace(0.5, 3, 20, dtype=DT)]), "degenerate"),
    "zero": (torch.zeros(N, dtype=DT), "degenerate"),
}


def quadratic(d: torch.Tensor):
    """Hessian operator A (tagged symmetric), a b in A's range, and the stationary point w* = −A⁺b."""
    A = rotated(d)
    b = A @ torch.randn(N, generator=gen(1), dtype=DT)  # in the range of A: a stationary point exists
    w_star = -torch.linalg.pinv(A, hermitian=True) @ b
    return A, b, w_star


def gradient(A: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """∇f by autograd on f(w) = ½ wᵀAw + bᵀw (not by the closed form)."""
    return torch.func.grad(lambda u: 0.5 * u @ A @ u + b @ u)(w)


@pytest.mark.parametrize("name", list(SPECTRA))
def test_quadratics_with_designed_hessians(name):
    d, kind = SPECTRA[name]
    A, b, w_star = quadratic(d)
    H = curvops.Dense(A, tags=("symmetric",))
    res = classify_stationary_point(H, gradient(A, b, w_star), generator=gen(0))
    assert isinstance(res, StationaryPointResult)
    assert res.kind == kind == res.curvature, res.explanation
    assert res.converged and res.grad_norm <= 1e-10
    if name != "zero":  # the evidence: the extremal eigenvalues
        assert res.lambda_min == pytest.approx(float(d.min()), abs=1e-8)
        assert res.lambda_max == pytest.approx(float(d.max()), abs=1e-8)
    assert res.zero_threshold == pytest.approx(res.tol * max(abs(res.lambda_min), abs(res.lambda_max)))


def test_a_point_with_a_gradient_is_not_stationary():
    d, _ = SPECTRA["positive_definite"]
    A, b, w_star = quadratic(d)
    w = w_star + 0.1 * torch.randn(N, generator=gen(2), dtype=DT)
    res = classify_stationary_point(A, gradient(A, b, w), generator=gen(0))
    assert res.kind == "not_stationary" and res.curvature == "minimum"
    assert "grad_tol" in res.explanation and res.grad_norm > 1e-3


def test_tolerances_decide_what_counts_as_zero():
    # Smallest eigenvalue 1e-9 relative to the largest: positive definite at tol=1e-12,
    # degenerate (numerically singular) at the default tol=1e-6.
    d = torch.cat([torch.tensor([1e-9], dtype=DT), torch.linspace(0.5, 1, N - 1, dtype=DT)])
    A, b, w_star = quadratic(d)
    g = gradient(A, b, w_star)
    assert classify_stationary_point(A, g, generator=gen(0)).kind == "degenerate"
    strict = classify_stationary_point(A, torch.zeros(N, dtype=DT), tol=1e-12, generator=gen(0))
    assert strict.kind == "minimum" and strict.lambda_min == pytest.approx(1e-9, rel=1e-3)
    loose = classify_stationary_point(A, 1e-3 * torch.ones(N, dtype=DT), grad_tol=1e-1, generator=gen(0))
    assert loose.kind == "degenerate" and loose.grad_tol == 1e-1


def test_gradient_as_parameter_dict_and_list():
    d, _ = SPECTRA["indefinite"]
    A, b, w_star = quadratic(d)
    g = gradient(A, b, w_star)
    as_dict = {"w1": g[:20].reshape(4, 5), "w2": g[20:]}
    assert classify_stationary_point(A, as_dict, generator=gen(0)).kind == "saddle"
    assert classify_stationary_point(A, [g[:20], g[20:]], generator=gen(0)).kind == "saddle"


def test_linear_regression_at_its_least_squares_solution_is_a_minimum():
    p = CASES["linear_mse"].build("mean")
    X1 = torch.cat([p.X, torch.ones(p.N, 1, dtype=DT)], dim=1)
    sol = torch.linalg.lstsq(X1, p.y).solution  # [D+1, C]
    with torch.no_grad():
        p.model.weight.copy_(sol[:-1].T)
        p.model.bias.copy_(sol[-1])
    H = p.build(curvops.Hessian)
    g = curvops.Objective(p.model, p.loss_arg(), p.data, **p.kwargs()).gradient()
    res = classify_stationary_point(H, g, grad_tol=1e-10, generator=gen(0))
    assert res.kind == "minimum", res.explanation
    lam = torch.linalg.eigvalsh(H.to_dense())
    assert res.lambda_min == pytest.approx(float(lam[0]), rel=1e-6)


def test_a_network_with_all_weights_zero_is_a_saddle():
    # f(x) = W2 tanh(W1 x + b1) + b2 with W1, b1, W2 = 0 and b2 = mean(y): the gradient vanishes
    # (tanh(0) = 0 and W2 = 0 block every path), but the W1–W2 cross block of the Hessian is
    # nonzero while the W1 and W2 diagonal blocks vanish: eigenvalues of both signs.
    g = gen(3)
    X, y = torch.randn(32, 3, generator=g, dtype=DT), torch.randn(32, 2, generator=g, dtype=DT)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    with torch.no_grad():
        for prm in model.parameters():
            prm.zero_()
        model[2].bias.copy_(y.mean(dim=0))
    H = curvops.Hessian(model, "mse", (X, y))
    grad = curvops.Objective(model, "mse", (X, y)).gradient()
    res = classify_stationary_point(H, grad, generator=gen(0))
    lam = torch.linalg.eigvalsh(H.to_dense())
    assert res.kind == "saddle", res.explanation
    assert lam[0] < 0 < lam[-1]
    assert res.lambda_min == pytest.approx(float(lam[0]), rel=1e-6)
    assert res.lambda_max == pytest.approx(float(lam[-1]), rel=1e-6)


def test_classification_is_reproducible_and_rejects_bad_input():
    d, _ = SPECTRA["indefinite"]
    A, b, w_star = quadratic(d)
    g = gradient(A, b, w_star)
    r1 = classify_stationary_point(A, g, generator=gen(5))
    r2 = classify_stationary_point(A, g, generator=gen(5))
    assert (r1.lambda_min, r1.lambda_max, r1.num_matvecs) == (r2.lambda_min, r2.lambda_max, r2.num_matvecs)
    api = "classify_stationary_point"
    with pytest.raises(ValueError, match=rf"{api}: expected a gradient with 60 entries .*got 59"):
        classify_stationary_point(A, g[:59])
    with pytest.raises(ValueError, match=rf"{api}: expected a square operator, got shape \(60, 59\)"):
        classify_stationary_point(A[:, :59], g)
    with pytest.raises(ValueError, match=rf"{api}: expected 0 < tol < 1, got 0"):
        classify_stationary_point(A, g, tol=0.0)
    with pytest.raises(ValueError, match=rf"{api}: the gradient is not finite"):
        classify_stationary_point(A, g * float("nan"))
    nan_H = curvops.func_operator((60, 60), lambda V: V * float("nan"), dtype=DT, tags=("symmetric",))
    with pytest.raises(ValueError, match=r"eigsh: the product A @ V at iteration 1 returned NaN"):
        classify_stationary_point(nan_H, g)
