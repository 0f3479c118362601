"""Response Jacobians of an optimum (implicit function theorem) against dense and closed-form truths."""

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from curvops.analysis.quadratic import QuadraticModel
from curvops.linalg.solve import ConvergenceError, ConvergenceWarning
from curvops.analysis.response import ResponseJacobian, StationarityWarning, hypergradient
from curvops.operators import _bilevel as response_mod  # where the columns are vmapped
from curvops.operators.mixed import MixedDerivative, ParameterHessian
from curvops.testing import contract

D = torch.float64


# ---- a tiny tanh MLP with weight decay and per-sample weights ---------------------------------
def _mlp_problem(seed=0, n=12):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 2, generator=g, dtype=D)
    y = torch.sin(X[:, 0]) + 0.5 * X[:, 1] + 0.1 * torch.randn(n, generator=g, dtype=D)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).to(D)

    def L(p, lam, s):
        out = functional_call(model, p, (X,)).squeeze(-1)
        return 0.5 * (s * (out - y) ** 2).sum() / n + 0.5 * lam * sum((t ** 2).sum() for t in p.values())

    hyper = {"lam": torch.tensor(0.05, dtype=D), "s": 0.5 + torch.rand(n, generator=g, dtype=D)}
    return model, L, hyper, X, y


def _flat_oracle(model, L):
    """F(θ_flat, λ_flat) with λ = (lam, s) concatenated: the dense oracle's view (no operator code)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]

    def unflat(theta):
        return {n: t.reshape(s) for n, t, s in zip(names, torch.split(theta, sizes), shapes)}

    def F(theta, h):
        return L(unflat(theta), h[0], h[1:])

    return F, unflat


def _dense_hessian(F, theta, h):
    """∇²_θ F by reverse-over-reverse autograd (torch.func.hessian is forward-over-reverse)."""
    return jacrev(jacrev(F, argnums=0), argnums=0)(theta, h)


def _newton(F, theta, h, iters=100):
    r"""Damped Newton (dense, Levenberg-Marquardt safeguard) on θ ↦ F(θ, h) to the rounding floor of ∇F.

    Error analysis of the stopping rule. θ is stored to a relative error u (unit roundoff), so even
    the exact optimum rounded to float64 has ‖∇F‖ ≈ ‖H‖₂ · u · ‖θ‖, and evaluating ∇F (a sum over a
    dozen samples through a two-layer net) adds rounding of the same order: that is the floor no
    iteration can go below (measured here: 2e-17 … 4e-16 against u‖H‖₂‖θ‖ ≈ 7e-16). A fixed
    absolute target near it (the old 1e-13) passes or fails with the CPU's summation order. So:

    - the target is ``tol = 100 · u · ‖H‖₂ · ‖θ‖`` (scaled by the problem, far above the floor,
      far below what the finite differences below need);
    - a step is accepted if it lowers F, or — once F is flat to rounding (within 4u|F|, where the
      loss can no longer rank steps: a step from ‖∇F‖ = 4e-11 changes F by ≈ ‖∇F‖²/λ_min ≈ 1e-18,
      below u|F| ≈ 1e-17) — if it lowers ‖∇F‖ (the old rule stalled there);
    - once ‖∇F‖ ≤ tol, full Newton steps polish while they at least halve ‖∇F‖, so the result sits
      at the floor whatever the CPU, and both finite-difference solves end equally converged.
    """
    u = torch.finfo(theta.dtype).eps
    eye = torch.eye(len(theta), dtype=theta.dtype)
    grad = jacrev(F, argnums=0)
    mu, f, g = 1e-3, F(theta, h), grad(theta, h)
    for _ in range(iters):
        H = _dense_hessian(F, theta, h)
        tol = 100 * u * float(torch.linalg.matrix_norm(H, 2)) * float(theta.norm())
        if float(g.norm()) <= tol:
            for _ in range(5):  # quadratic convergence: one or two steps reach the floor
                new = theta - torch.linalg.solve(_dense_hessian(F, theta, h), g)
                g_new = grad(new, h)
                if not float(g_new.norm()) < float(g.norm()) / 2:
                    break
                theta, g = new, g_new
            return theta
        while mu < 1e20:
            new = theta - torch.linalg.solve(H + mu * eye, g)
            f_new, g_new = F(new, h), grad(new, h)
            if f_new < f or (f_new <= f + 4 * u * abs(f) and float(g_new.norm()) < float(g.norm())):
                theta, f, g, mu = new, f_new, g_new, max(mu / 10, 1e-14)
                break
            mu *= 10
        else:
            break
    raise AssertionError(f"Newton did not reach ‖∇F‖ ≤ {tol:.1e}: stopped at {float(g.norm()):.1e}")


@pytest.fixture(scope="module")
def mlp():
    """The MLP at an optimum of L for its hyper: (model, L, hyper, params dict, F, unflat, θ*, λ_flat)."""
    model, L, hyper, X, y = _mlp_problem()
    F, unflat = _flat_oracle(model, L)
    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    h = torch.cat([hyper["lam"].reshape(1), hyper["s"]])
    theta = _newton(F, theta0, h)
    with torch.no_grad():  # move the module to the optimum (a test fixture: the module is ours)
        for p, v in zip(model.parameters(), unflat(theta).values()):
            p.copy_(v)
    return dict(model=model, L=L, hyper=hyper, params=unflat(theta), F=F, unflat=unflat, theta=theta, h=h)


# ---- dense oracles --------------------------------------------------------------------------
def test_parameter_hessian_and_mixed_derivative_match_dense(mlp):
    F, theta, h = mlp["F"], mlp["theta"], mlp["h"]
    H_true = _dense_hessian(F, theta, h)
    M_true = jacrev(jacrev(F, argnums=0), argnums=1)(theta, h)  # [P, Q]
    P, Q = M_true.shape
    for strategy in ("auto", "loop"):
        H = ParameterHessian(mlp["L"], mlp["model"], mlp["hyper"], column_strategy=strategy)
        M = MixedDerivative(mlp["L"], mlp["model"], mlp["hyper"], column_strategy=strategy)
        assert H.shape == (P, P) and M.shape == (P, Q) and H.tags == {"symmetric"}
        contract.check_products(H, H_true)
        contract.check_products(M, M_true)
        contract.check_adjoint(M)
        contract.assert_matches(M.T @ contract.probes(P, 3), M_true.T @ contract.probes(P, 3), what="M.T @ U")
        assert M.last_path == ("vmap" if strategy == "auto" else "loop")
    # parameter dicts on the w side, hyper dicts on the λ side
    names = list(mlp["params"])
    sizes = [mlp["params"][n].numel() for n in names]
    slices, start = {}, 0
    for n, k in zip(names, sizes):
        slices[n], start = slice(start, start + k), start + k
    contract.check_dict_products(H, H_true, slices, {n: t.shape for n, t in mlp["params"].items()})
    v = contract.probes(Q, 1)[:, 0]
    out = M @ {"lam": v[0], "s": v[1:]}
    assert isinstance(out, dict) and list(out) == names
    contract.assert_matches(torch.cat([out[n].reshape(-1) for n in names]), M_true @ v, what="M @ hyper dict")
    back = M.T @ out
    assert set(back) == {"lam", "s"} and back["lam"].shape == () and back["s"].shape == (Q - 1,)
    contract.assert_matches(torch.cat([back["lam"].reshape(1), back["s"]]), M_true.T @ (M_true @ v),
                            what="M.T @ params dict")


def test_wrt_selects_hyper_columns(mlp):
    F, theta, h = mlp["F"], mlp["theta"], mlp["h"]
    M_true = jacrev(jacrev(F, argnums=0), argnums=1)(theta, h)
    M = MixedDerivative(mlp["L"], mlp["params"], mlp["hyper"], wrt="s")
    assert M.shape == (M_true.shape[0], M_true.shape[1] - 1)
    contract.check_products(M, M_true[:, 1:])
    J = ResponseJacobian(mlp["L"], mlp["params"], mlp["hyper"], wrt=["lam"], assume_psd=True)
    H_true = _dense_hessian(F, theta, h)
    contract.assert_matches(J.to_dense(), -torch.linalg.solve(H_true, M_true[:, :1]), rtol=1e-7, what="J (lam)")


def test_response_jacobian_matches_dense_ift_and_adjoint(mlp):
    F, theta, h = mlp["F"], mlp["theta"], mlp["h"]
    H_true = _dense_hessian(F, theta, h)
    M_true = jacrev(jacrev(F, argnums=0), argnums=1)(theta, h)
    J_true = -torch.linalg.solve(H_true, M_true)
    for method, psd in (("auto", False), ("auto", True), ("minres", False)):
        J = ResponseJacobian(mlp["L"], mlp["model"], mlp["hyper"], method=method, assume_psd=psd, rtol=1e-11)
        assert J.method == ("cg" if psd else "minres") and J.is_stationary
        contract.assert_matches(J.to_dense(), J_true, rtol=1e-7, what=f"J dense ({J.method})")
        contract.check_adjoint(J)
        assert J.last_solve.converged and J.num_matvecs > 0 and J.num_solves >= 3
    # damping: −(H + δI)⁻¹ M
    Jd = ResponseJacobian(mlp["L"], mlp["model"], mlp["hyper"], damping=0.3, rtol=1e-11)
    eye = torch.eye(H_true.shape[0], dtype=D)
    contract.assert_matches(Jd.to_dense(), -torch.linalg.solve(H_true + 0.3 * eye, M_true), rtol=1e-7,
                            what="damped J")


def test_vmap_failure_falls_back_to_a_column_loop(mlp, monkeypatch):
    F, theta, h = mlp["F"], mlp["theta"], mlp["h"]
    M_true = jacrev(jacrev(F, argnums=0), argnums=1)(theta, h)

    def no_vmap(fn, *a, **k):
        def raiser(*args, **kwargs):
            raise RuntimeError("no batching rule (simulated)")
        return raiser

    monkeypatch.setattr(response_mod, "vmap", no_vmap)
    M = MixedDerivative(mlp["L"], mlp["params"], mlp["hyper"])
    contract.check_products(M, M_true)
    assert M.last_path == "loop"
    strict = MixedDerivative(mlp["L"], mlp["params"], mlp["hyper"], column_strategy="vmap")
    with pytest.raises(RuntimeError, match="simulated"):
        strict @ contract.probes(M.shape[1], 2)


# ---- closed forms ----------------------------------------------------------------------------
def _ridge(n=15, d=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=D)
    y = torch.randn(n, generator=g, dtype=D)
    return X, y


def test_ridge_closed_form_weight_decay():
    X, y = _ridge()
    lam = torch.tensor(0.7, dtype=D)
    A = X.T @ X + lam * torch.eye(X.shape[1], dtype=D)
    w_star = torch.linalg.solve(A, X.T @ y)
    dw_true = -torch.linalg.solve(A, w_star)

    def L(w, lam):
        return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * lam * (w ** 2).sum()

    for psd in (False, True):
        J = ResponseJacobian(L, w_star, {"lam": lam}, assume_psd=psd)
        torch.testing.assert_close(J @ torch.ones(1, dtype=D), dw_true, rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(J @ {"lam": torch.tensor(1.0, dtype=D)}, dw_true, rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(J.to_dense(), dw_true[:, None], rtol=1e-8, atol=1e-12)
    # dict parameters: dicts in, dicts out; a Python number as hyper
    Jd = ResponseJacobian(lambda p, lam: L(p["w"], lam), {"w": w_star}, {"lam": 0.7})
    out = Jd @ {"lam": torch.tensor(2.0, dtype=D)}
    assert list(out) == ["w"]
    torch.testing.assert_close(out["w"], 2 * dw_true, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(Jd.T @ {"w": w_star}, {"lam": w_star @ dw_true}, rtol=1e-8, atol=1e-12)


def test_weighted_least_squares_closed_form_with_a_tensor_hyper():
    X, y = _ridge(n=12, d=4, seed=2)
    s = 0.5 + torch.rand(12, generator=torch.Generator().manual_seed(3), dtype=D)
    A = X.T @ (s[:, None] * X)
    w_star = torch.linalg.solve(A, X.T @ (s * y))
    r = X @ w_star - y
    J_true = -torch.linalg.solve(A, X.T * r)  # dw*/ds_i = −A⁻¹ x_i r_i

    def L(w, s):  # the tensor hyper arrives as the second positional argument
        return 0.5 * (s * (X @ w - y) ** 2).sum()

    J = ResponseJacobian(L, w_star, s, assume_psd=True)
    assert J.shape == (4, 12)
    torch.testing.assert_close(J.to_dense(), J_true, rtol=1e-8, atol=1e-12)
    u = torch.randn(4, dtype=D)
    torch.testing.assert_close(J.T @ u, J_true.T @ u, rtol=1e-8, atol=1e-12)
    # hypergradient of a validation loss on the same data, closed form, returned as a tensor like s
    Xv, yv = _ridge(n=7, d=4, seed=4)
    V = lambda w: 0.5 * ((Xv @ w - yv) ** 2).sum()  # noqa: E731
    res = hypergradient(V, L, w_star, s, assume_psd=True)
    want = J_true.T @ (Xv.T @ (Xv @ w_star - yv))
    assert isinstance(res.gradient, torch.Tensor) and res.gradient.shape == (12,)
    torch.testing.assert_close(res.gradient, want, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(res.direct, torch.zeros(12, dtype=D))
    assert res.converged and res.num_matvecs > 0 and res.grad_norm < 1e-10


@pytest.mark.parametrize("eigs", [[0.5, 1.0, 2.0, 4.0, 8.0], [-3.0, -0.5, 1.0, 2.0, 6.0]], ids=["min", "saddle"])
def test_quadratic_model_response_to_b_is_minus_A_inverse(eigs):
    Qm = torch.linalg.qr(torch.randn(5, 5, generator=torch.Generator().manual_seed(5), dtype=D))[0]
    A = Qm @ torch.diag(torch.tensor(eigs, dtype=D)) @ Qm.T
    b = torch.randn(5, generator=torch.Generator().manual_seed(6), dtype=D)
    model = QuadraticModel(A, b)
    w_star = model.stationary_points().w_star

    def L(w, b):  # ½wᵀAw + bᵀw with the model's A and λ = b
        return model.value(w) - model.b @ w + b @ w

    J = ResponseJacobian(L, w_star, {"b": b}, rtol=1e-12)  # MINRES: fine at a saddle too
    torch.testing.assert_close(J.to_dense(), -torch.linalg.inv(model.A), rtol=1e-9, atol=1e-12)
    M = MixedDerivative(L, w_star, {"b": b})
    torch.testing.assert_close(M.to_dense(), torch.eye(5, dtype=D))
    torch.testing.assert_close(ParameterHessian(L, w_star, {"b": b}).to_dense(), model.A)
    if min(eigs) > 0:
        Jc = ResponseJacobian(L, w_star, {"b": b}, assume_psd=True, rtol=1e-12)
        torch.testing.assert_close(Jc.to_dense(), -torch.linalg.inv(model.A), rtol=1e-9, atol=1e-12)


# ---- finite differences of re-optimised optima ------------------------------------------------
def test_finite_differences_of_reoptimised_mlp(mlp):
    F, theta, h = mlp["F"], mlp["theta"], mlp["h"]
    J = ResponseJacobian(mlp["L"], mlp["params"], mlp["hyper"], rtol=1e-12)
    eps = 1e-5  # the response is strongly curved here (λ_min(H) ≈ 2e-3): FD error ≈ 900 ε²
    # direction: weight decay and a random change of the per-sample weights together
    v = torch.cat([torch.ones(1, dtype=D), 0.5 * contract.probes(len(h) - 1, 1, seed=7)[:, 0]])
    plus = _newton(F, theta, h + eps * v)
    minus = _newton(F, theta, h - eps * v)
    fd = (plus - minus) / (2 * eps)
    out = J @ {"lam": v[0], "s": v[1:]}
    jv = torch.cat([out[n].reshape(-1) for n in mlp["params"]])
    torch.testing.assert_close(jv, fd, rtol=1e-6, atol=1e-8)
    assert float(fd.norm()) > 1e-2  # a real response, not a trivially zero one


def test_hypergradient_matches_finite_differences_of_validation_loss(mlp):
    F, theta, h, unflat, model = mlp["F"], mlp["theta"], mlp["h"], mlp["unflat"], mlp["model"]
    g = torch.Generator().manual_seed(11)
    Xv = torch.randn(9, 2, generator=g, dtype=D)
    yv = torch.sin(Xv[:, 0]) + 0.5 * Xv[:, 1]

    def V(p, lam, s):  # takes the hyperparameters: a direct term in lam
        out = functional_call(model, p, (Xv,)).squeeze(-1)
        return 0.5 * ((out - yv) ** 2).mean() + lam ** 2

    res = hypergradient(V, mlp["L"], model, mlp["hyper"], assume_psd=True, rtol=1e-12)
    eps = 1e-5  # the response is strongly curved here (λ_min(H) ≈ 2e-3): FD error ≈ 900 ε²
    fd = []
    for j in (0, 1, 5):
        e = torch.zeros_like(h)
        e[j] = eps
        vp = V(unflat(_newton(F, theta, h + e)), h[0] + e[0], None)
        vm = V(unflat(_newton(F, theta, h - e)), h[0] - e[0], None)
        fd.append((vp - vm) / (2 * eps))
    got = torch.stack([res.gradient["lam"], res.gradient["s"][0], res.gradient["s"][4]])
    torch.testing.assert_close(got, torch.stack(fd), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(res.direct["lam"], 2 * h[0])
    torch.testing.assert_close(res.direct["s"], torch.zeros_like(h[1:]))
    torch.testing.assert_close(res.gradient["lam"], res.direct["lam"] + res.indirect["lam"])
    assert res.converged and res.value == pytest.approx(float(V(unflat(theta), h[0], None)))


# ---- bad input and the model left as found ---------------------------------------------------
def test_hyper_name_not_in_signature_raises_before_any_work():
    calls = []

    def L(w, lam):
        calls.append(1)
        return (w ** 2).sum() * lam

    w = torch.zeros(3, dtype=D)
    for cls in (ResponseJacobian, MixedDerivative):
        with pytest.raises(ValueError, match=r"\['mu'\] not in the objective's signature"):
            cls(L, w, {"mu": torch.tensor(1.0, dtype=D)})
    with pytest.raises(ValueError, match="takes one positional argument"):
        ResponseJacobian(lambda w: (w ** 2).sum(), w, torch.ones(2, dtype=D))
    with pytest.raises(ValueError, match=r"requires argument\(s\) \['lam'\]"):
        ResponseJacobian(lambda w, lam, mu: (w ** 2).sum(), w, {"mu": 1.0})
    assert calls == []
    # **kwargs accepts any name
    J = ResponseJacobian(lambda w, **kw: 0.5 * (w ** 2).sum() * kw["mu"] + w.sum() * kw["mu"], -torch.ones(3, dtype=D),
                         {"mu": torch.tensor(2.0, dtype=D)})
    torch.testing.assert_close(J @ torch.ones(1, dtype=D), torch.zeros(3, dtype=D), atol=1e-12, rtol=0)


def test_non_stationary_point_warns_or_raises():
    X, y = _ridge()
    L = lambda w, lam: 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * lam * (w ** 2).sum()  # noqa: E731
    w = torch.ones(X.shape[1], dtype=D)
    lam = {"lam": torch.tensor(0.7, dtype=D)}
    with pytest.raises(ValueError, match="not stationary"):
        ResponseJacobian(L, w, lam, strict=True)
    with pytest.warns(StationarityWarning, match=r"‖∇_w L‖ / max\(1, \|L\|\)"):
        J = ResponseJacobian(L, w, lam)
    assert not J.is_stationary
    A = X.T @ X + 0.7 * torch.eye(X.shape[1], dtype=D)
    torch.testing.assert_close(J.grad_norm, float((A @ w - X.T @ y).norm()))
    # a loose enough grad_tol accepts the point; the operator is still −H⁻¹M at it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        J = ResponseJacobian(L, w, lam, grad_tol=1e3)
    torch.testing.assert_close(J @ torch.ones(1, dtype=D), -torch.linalg.solve(A, w), rtol=1e-8, atol=1e-12)


def test_bad_vectors_options_and_objectives():
    X, y = _ridge()
    lam = torch.tensor(0.7, dtype=D)
    A = X.T @ X + lam * torch.eye(X.shape[1], dtype=D)
    w_star = torch.linalg.solve(A, X.T @ y)
    L = lambda w, lam: 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * lam * (w ** 2).sum()  # noqa: E731
    J = ResponseJacobian(L, w_star, {"lam": lam})
    with pytest.raises(ValueError, match=r"expected a vector of length 1 \(hyperparameters λ\), got shape \(2,\)"):
        J @ torch.ones(2, dtype=D)
    with pytest.raises(ValueError, match=r"expected a vector of length 5, got shape \(4,\)"):
        J.T @ torch.ones(4, dtype=D)
    with pytest.raises(ValueError, match=r"expected a vector of length 5 \(parameters w\), got shape \(4,\)"):
        J.rmatmat_torch(torch.ones(4, dtype=D))
    with pytest.raises(ValueError, match="parameter dict does not match"):
        J @ {"mu": torch.tensor(1.0, dtype=D)}
    with pytest.raises(ValueError, match="return a scalar tensor, got shape"):
        ResponseJacobian(lambda w, lam: X @ w * lam, w_star, {"lam": lam})
    with pytest.raises(ValueError, match="return a scalar tensor, got shape"):
        MixedDerivative(lambda w, lam: X @ w * lam, w_star, {"lam": lam}) @ torch.ones(1, dtype=D)
    with pytest.raises(ValueError, match="method='cg' needs a positive definite"):
        ResponseJacobian(L, w_star, {"lam": lam}, method="cg")
    with pytest.raises(ValueError, match="expected method in"):
        ResponseJacobian(L, w_star, {"lam": lam}, method="lsmr")
    with pytest.raises(ValueError, match="expected wrt to name some of the hyper keys"):
        ResponseJacobian(L, w_star, {"lam": lam}, wrt=["mu"])
    with pytest.raises(TypeError, match=r"expected hyper\['lam'\] of dtype torch.float64"):
        ResponseJacobian(L, w_star, {"lam": lam.float()})
    with pytest.raises(TypeError, match="expected params as a dict"):
        ResponseJacobian(L, [w_star], {"lam": lam})
    with pytest.raises(ValueError, match="takes some hyper names but not"):
        hypergradient(lambda w, lam: lam, lambda w, lam, mu: L(w, lam) + 0 * mu, w_star,
                      {"lam": lam, "mu": lam})
    # an inner solve that cannot converge: warn, or raise with strict
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        ResponseJacobian(L, w_star, {"lam": lam}, max_iters=1) @ torch.ones(1, dtype=D)
    Js = ResponseJacobian(L, w_star, {"lam": lam}, max_iters=1, strict=True)
    with pytest.raises(ConvergenceError, match="did not converge"):
        Js @ torch.ones(1, dtype=D)
    assert Js.last_solve is not None and not Js.last_solve.converged


def test_model_left_untouched():
    model, L, hyper, X, y = _mlp_problem(seed=3)
    model.train()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    before = contract.snapshot(model)
    with pytest.warns(StationarityWarning):  # the freshly initialised model is not an optimum
        J = ResponseJacobian(L, model, hyper, max_iters=200)
    contract.exercise(J)
    contract.exercise(MixedDerivative(L, model, hyper))
    with pytest.warns(StationarityWarning):
        hypergradient(lambda p: L(p, hyper["lam"], hyper["s"]), L, model, hyper)
    with pytest.raises(ValueError, match="not stationary"):
        ResponseJacobian(L, model, hyper, strict=True)
    contract.assert_unchanged(before, contract.snapshot(model))
    # the operator follows the model (contract rule 9): after a change, a product equals a fresh
    # operator's at the new point, and the stationarity check runs again there
    V = contract.probes(J.shape[1], 1)
    first = J @ V
    with torch.no_grad():
        model[0].weight.mul_(1.5)
    with pytest.warns(StationarityWarning):
        moved = J @ V
    with pytest.warns(StationarityWarning):
        fresh = ResponseJacobian(L, model, hyper, max_iters=200)
    torch.testing.assert_close(moved, fresh @ V, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(moved, first)
    assert J.grad_norm == fresh.grad_norm
