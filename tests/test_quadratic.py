"""The quadratic toy model (seeds/001): f(w) = ½ wᵀAw + bᵀw + c with designed spectra.

A = Q diag(d) Qᵀ for a fixed random rotation Q and b = Q b̃ with b̃ chosen per axis, so every
singular case (a_j = 0 with b̃_j ≠ 0 / = 0) is exact by construction.
"""

from __future__ import annotations

import pytest
import torch

import curvops
from curvops.analysis import classify_stationary_point
from curvops.analysis.quadratic import QuadraticModel, QuadraticStability, QuadraticStationaryPoints
from curvops.testing.spectra import gen

DT = torch.float64
N = 8


def rotation(n: int = N, seed: int = 0) -> torch.Tensor:
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen(seed), dtype=DT))
    return Q


def designed(d, bt, c=0.0, seed=0) -> tuple[QuadraticModel, torch.Tensor]:
    """Model with eigenvalues d and rotated linear term b̃ (both in the basis Q); returns (model, Q)."""
    d, bt = torch.as_tensor(d, dtype=DT), torch.as_tensor(bt, dtype=DT)
    Q = rotation(d.numel(), seed)
    A = (Q * d) @ Q.T
    A = 0.5 * (A + A.T)
    return QuadraticModel(A, Q @ bt, c), Q


ONES = [1.0, -0.5, 2.0, 0.3, -1.2, 0.7, 1.1, -0.9]
CASES = {  # name: (eigenvalues, b̃, lr, expected kind, stationary point exists)
    "positive_definite": ([0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0], ONES, 0.3, "minimum", True),
    "negative_definite": ([-4.0, -3.0, -2.0, -1.5, -1.0, -0.8, -0.5, -0.2], ONES, 0.05, "maximum", True),
    "indefinite": ([-1.0, -0.5, 0.2, 0.5, 1.0, 2.0, 3.0, 4.0], ONES, 0.2, "saddle", True),
    "singular_drift": ([0.0, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0], [1.0, 0.0] + ONES[2:], 0.3, "none", False),
    "singular_frozen": ([0.0, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0], [0.0, 0.0] + ONES[2:], 0.3, "degenerate", True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_closed_form_equals_simulation(name):
    d, bt, lr, _, _ = CASES[name]
    model, _ = designed(d, bt)
    w0 = torch.randn(N, generator=gen(3), dtype=DT)
    closed = model.gd_closed_form(w0, lr, 50)
    sim = model.gd_simulate(w0, lr, 50)
    assert closed.shape == sim.shape == (51, N) and closed.dtype == DT
    torch.testing.assert_close(closed, sim, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(closed[0], w0, rtol=0, atol=1e-14)


def test_zero_eigenvalue_axes_drift_or_freeze():
    """a_j = 0: u_j(t) = u_j(0) − t α b̃_j — linear drift when b̃_j ≠ 0, frozen when b̃_j = 0."""
    d, bt, lr, _, _ = CASES["singular_drift"]
    model, Q = designed(d, bt)
    w0 = torch.randn(N, generator=gen(4), dtype=DT)
    U = model.gd_simulate(w0, lr, 50) @ Q  # rows: u(t) in the designed basis
    t = torch.arange(51, dtype=DT)
    u0 = Q.T @ w0
    torch.testing.assert_close(U[:, 0], u0[0] - t * lr * bt[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(U[:, 1], u0[1].expand(51), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", list(CASES))
def test_stationary_points(name):
    d, bt, _, kind, exists = CASES[name]
    model, Q = designed(d, bt)
    sp = model.stationary_points()
    assert isinstance(sp, QuadraticStationaryPoints)
    assert sp.kind == kind and sp.exists is exists
    a = torch.as_tensor(d, dtype=DT)
    torch.testing.assert_close(sp.eigenvalues, a.sort().values, rtol=0, atol=1e-12)
    # w* = −A⁺b: in the designed basis −b̃_j/a_j on curved axes, 0 on flat ones.
    bt_t = torch.as_tensor(bt, dtype=DT)
    u_star = torch.where(a == 0, torch.zeros_like(a), -bt_t / torch.where(a == 0, torch.ones_like(a), a))
    torch.testing.assert_close(sp.w_star, Q @ u_star, rtol=1e-10, atol=1e-10)
    grad = model.gradient(sp.w_star)
    if exists:
        assert float(grad.norm()) <= 1e-12
    else:  # the residual gradient is exactly the drift component b̃_0 q_0
        torch.testing.assert_close(grad, bt_t[0] * Q[:, 0], rtol=1e-10, atol=1e-12)
    flat = int((a == 0).sum())
    n_free = flat if exists else flat - 1
    assert sp.null_space.shape == (N, n_free) and sp.drift_directions.shape == (N, flat - n_free)
    if n_free:  # the free directions: A v = 0 and bᵀv = 0, so w* + v is as stationary as w*
        torch.testing.assert_close(model.A @ sp.null_space, torch.zeros(N, n_free, dtype=DT), rtol=0, atol=1e-12)
        assert float((model.b @ sp.null_space).abs().max()) <= 1e-12
        moved = sp.w_star + sp.null_space @ torch.ones(n_free, dtype=DT)
        torch.testing.assert_close(model.gradient(moved), grad, rtol=0, atol=1e-12)
        if name == "singular_drift":  # the one free direction is the designed axis 1
            assert float(abs(sp.null_space[:, 0] @ Q[:, 1])) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("name", ["positive_definite", "negative_definite", "indefinite"])
def test_agrees_with_classify_stationary_point(name):
    d, bt, _, kind, _ = CASES[name]
    model, _ = designed(d, bt)
    sp = model.stationary_points()
    res = classify_stationary_point(model.hessian(), model.gradient(sp.w_star), generator=gen(0))
    assert res.kind == sp.kind == kind, res.explanation


def test_hessian_is_A_with_tags():
    for name, psd in [("positive_definite", True), ("singular_frozen", True), ("indefinite", False)]:
        d, bt, _, _, _ = CASES[name]
        model, _ = designed(d, bt)
        H = model.hessian()
        assert isinstance(H, curvops.Dense) and H.shape == (N, N)
        assert H.is_symmetric and H.is_psd is psd
        V = torch.randn(N, 3, generator=gen(5), dtype=DT)
        torch.testing.assert_close(H.matmat_torch(V), model.A @ V, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(H.to_dense(), model.A, rtol=0, atol=0)


def test_value_and_gradient_match_autograd():
    d, bt, _, _, _ = CASES["indefinite"]
    model, _ = designed(d, bt, c=1.5)
    w = torch.randn(N, generator=gen(6), dtype=DT)
    f = lambda u: 0.5 * u @ model.A @ u + model.b @ u + 1.5  # noqa: E731
    assert float(model.value(w)) == pytest.approx(float(f(w)), rel=1e-14)
    torch.testing.assert_close(model.gradient(w), torch.func.grad(f)(w), rtol=1e-13, atol=1e-13)
    W = torch.randn(4, N, generator=gen(7), dtype=DT)  # batched
    torch.testing.assert_close(model.value(W), torch.stack([f(x) for x in W]), rtol=1e-13, atol=1e-13)
    a, Q = model.eig()
    assert model.eig()[0] is a  # cached
    torch.testing.assert_close(Q @ torch.diag(a) @ Q.T, model.A, rtol=0, atol=1e-12)


def test_stability_thresholds():
    """α a_j = −0.5, 0, 0, 0.5, 1, 2, 2.5 (α = 0.5): diverges, drifts, frozen, converges ×2, oscillates, diverges."""
    d = [-1.0, 0.0, 0.0, 1.0, 2.0, 4.0, 5.0]
    bt = [0.3, 1.0, 0.0, 0.2, -0.4, 0.5, 0.1]
    model, Q = designed(d, bt)
    st = model.stability(0.5)
    assert isinstance(st, QuadraticStability)
    assert st.labels == ("diverges", "drifts", "frozen", "converges", "converges", "oscillates", "diverges")
    assert st.converges.tolist() == [False, False, False, True, True, False, False]
    assert not st.stable
    torch.testing.assert_close(st.lr_times_eigenvalue, 0.5 * torch.tensor(d, dtype=DT), rtol=0, atol=1e-12)
    # The labels are what GD does: distance to u*_j after 30 steps, per designed axis (30, not more:
    # rounding leaks the diverging axes, growing as 1.5^t, into the others).
    w0 = torch.randn(7, generator=gen(8), dtype=DT)
    U = model.gd_simulate(w0, 0.5, 30) @ Q
    a, b = torch.tensor(d, dtype=DT), torch.tensor(bt, dtype=DT)
    u_star = torch.where(a == 0, torch.zeros_like(a), -b / torch.where(a == 0, torch.ones_like(a), a))
    dist0, dist = (U[0] - u_star).abs(), (U[-1] - u_star).abs()
    assert dist[0] > 1e4 * dist0[0] and dist[6] > 1e4 * dist0[6]  # diverge: |1 − α a| = 1.5
    assert float(U[-1, 1]) == pytest.approx(float(U[0, 1]) - 30 * 0.5 * 1.0, abs=1e-9)  # drift: −t α b̃
    assert float(U[-1, 2]) == pytest.approx(float(U[0, 2]), abs=1e-9)  # frozen
    assert dist[3] < 1e-9 and dist[4] < 1e-9  # converge (α a = 1: in one step)
    assert float(dist[5]) == pytest.approx(float(dist0[5]), rel=1e-9)  # oscillates with constant amplitude
    # Below 2 / a_max everything curved converges; a positive-definite model is then stable.
    pd, _ = designed(*CASES["positive_definite"][:2])
    assert pd.stability(0.49).stable and all(lab == "converges" for lab in pd.stability(0.49).labels)
    assert pd.stability(0.5).labels[-1] == "oscillates" and not pd.stability(0.5).stable
    assert pd.stability(0.51).labels[-1] == "diverges"


def test_bad_input():
    A = torch.eye(3, dtype=DT)
    b = torch.zeros(3, dtype=DT)
    with pytest.raises(ValueError, match=r"QuadraticModel: expected a square.*got shape \(2, 3\)"):
        QuadraticModel(torch.zeros(2, 3), torch.zeros(2))
    with pytest.raises(ValueError, match=r"QuadraticModel: expected a square.*got shape \(3,\)"):
        QuadraticModel(torch.zeros(3), b)
    with pytest.raises(ValueError, match="QuadraticModel: expected a symmetric A"):
        QuadraticModel(torch.tensor([[1.0, 2.0], [0.0, 1.0]]), torch.zeros(2))
    with pytest.raises(ValueError, match="QuadraticModel: expected a finite A"):
        QuadraticModel(torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]), torch.zeros(2))
    with pytest.raises(ValueError, match=r"QuadraticModel: expected b of shape \(3,\), got shape \(2,\)"):
        QuadraticModel(A, torch.zeros(2))
    with pytest.raises(ValueError, match="QuadraticModel: expected a finite b"):
        QuadraticModel(A, torch.tensor([0.0, float("inf"), 0.0]))
    with pytest.raises(ValueError, match="QuadraticModel: expected a finite c"):
        QuadraticModel(A, b, c=float("nan"))
    with pytest.raises(ValueError, match="QuadraticModel: expected 0 < tol < 1"):
        QuadraticModel(A, b, tol=0.0)
    m = QuadraticModel(A, b)
    with pytest.raises(ValueError, match=r"QuadraticModel.gradient: expected w of shape \(3,\)"):
        m.gradient(torch.zeros(4))
    with pytest.raises(ValueError, match=r"QuadraticModel.gd_simulate: expected a finite step size lr > 0, got -0.1"):
        m.gd_simulate(torch.zeros(3), -0.1, 5)
    with pytest.raises(ValueError, match=r"QuadraticModel.gd_closed_form: expected an integer steps ≥ 0, got 2.5"):
        m.gd_closed_form(torch.zeros(3), 0.1, 2.5)
    with pytest.raises(ValueError, match="QuadraticModel.stability: expected a finite step size lr > 0"):
        m.stability(float("inf"))
