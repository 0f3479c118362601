r"""Influence functions (curvops.analysis.influence) against dense oracles and closed forms.

Oracles share no code with curvops: per-sample gradients by one autograd call per sample, the
Hessian row by row (reverse over reverse), the GGN as Jᵀ H_f J from an explicit output Jacobian and
the loss's Hessian in output space, the empirical Fisher from the per-sample gradients, and
``torch.linalg.solve`` for (C + δI)⁻¹.  Tolerances: the iterative solves run to rtol = 1e-13 on
systems with condition number below ~1e3, so the scores carry a relative error ≲ κ · rtol ≈ 1e-10.
"""

from __future__ import annotations

import pathlib
import runpy

import pytest
import torch
from torch import nn

import curvops
from curvops.analysis import InfluenceResult, influence, self_influence
from curvops.linalg import ConvergenceError

DT = torch.float64
ROOT = pathlib.Path(__file__).resolve().parents[1]
N, M, D, H, C = 13, 4, 3, 5, 3  # P = 3·5 + 5 + 5·3 + 3 = 38
RTOL = 1e-10


def _mlp(out: int = C) -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, out)).to(DT)


def _data(kind: str, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, D, generator=g, dtype=DT)
    y = torch.randint(0, C, (n,), generator=g) if kind == "cross_entropy" else torch.randn(n, C, generator=g, dtype=DT)
    return X, y


def _flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def _per_sample_grads(model, loss_fn, X, y) -> torch.Tensor:
    params = list(model.parameters())
    return torch.stack([_flat(torch.autograd.grad(loss_fn(model(X[i:i + 1]), y[i:i + 1]), params))
                        for i in range(X.shape[0])])


def _dense_hessian(model, loss_fn, X, y) -> torch.Tensor:
    params = list(model.parameters())
    g = _flat(torch.autograd.grad(loss_fn(model(X), y), params, create_graph=True))
    return torch.stack([_flat(torch.autograd.grad(g[k], params, retain_graph=True)) for k in range(g.numel())])


def _dense_ggn(model, loss_fn, X, y) -> torch.Tensor:
    params = list(model.parameters())
    out = model(X)
    J = torch.stack([_flat(torch.autograd.grad(out.reshape(-1)[r], params, retain_graph=True))
                     for r in range(out.numel())])  # [N·C, P]
    f = out.detach().requires_grad_()
    gf = torch.autograd.grad(loss_fn(f, y), f, create_graph=True)[0].reshape(-1)
    Hf = torch.stack([torch.autograd.grad(gf[r], f, retain_graph=True)[0].reshape(-1) for r in range(gf.numel())])
    return J.T @ Hf @ J


def _oracle(curv: str, model, loss_fn, X, y, Xq, yq, damping):
    G = _per_sample_grads(model, loss_fn, X, y)
    Q = _per_sample_grads(model, loss_fn, Xq, yq)
    if curv == "hessian":
        Cm = _dense_hessian(model, loss_fn, X, y)
    elif curv == "ggn":
        Cm = _dense_ggn(model, loss_fn, X, y)
    else:  # the empirical Fisher of the per-sample losses ℓ_i: (1/N) Σ g gᵀ (mean), Σ g gᵀ (sum)
        Cm = G.T @ G / (X.shape[0] if loss_fn.reduction == "mean" else 1.0)
    A = Cm + damping * torch.eye(Cm.shape[0], dtype=DT)
    return -G @ torch.linalg.solve(A, Q.T), G, Q, A


def _close(a, b, rtol=RTOL):
    err = float((a - b).norm() / b.norm())
    assert err <= rtol, f"relative error {err:.2e} > {rtol:.0e}"


CURVATURES = {"ggn": curvops.GGN, "hessian": curvops.Hessian, "ef": curvops.EmpiricalFisher}
LOSSES = {"cross_entropy-mean": nn.CrossEntropyLoss(), "mse-sum": nn.MSELoss(reduction="sum"),
          "mse-mean": nn.MSELoss()}


@pytest.mark.parametrize("loss_name", sorted(LOSSES))
@pytest.mark.parametrize("curv", sorted(CURVATURES))
def test_scores_match_the_dense_oracle(curv, loss_name):
    loss_fn = LOSSES[loss_name]
    kind = loss_name.split("-")[0]
    model = _mlp()
    X, y = _data(kind, N, 1)
    Xq, yq = _data(kind, M, 2)
    Cop = CURVATURES[curv](model, loss_fn, (X, y), batch_size=5)
    # δ relative to the curvature's scale (mean losses are 1/N smaller), keeping κ(C + δI) ≲ 1e3
    scale = float(torch.linalg.matrix_norm(Cop.to_dense(), 2))
    damping = 1e-2 * scale
    expected, G, _, A = _oracle(curv, model, loss_fn, X, y, Xq, yq, damping)
    assert float(torch.linalg.cond(A)) < 2e3
    res = influence(model, loss_fn, (X, y), (Xq, yq), curvature=Cop, damping=damping, rtol=1e-13,
                    batch_size=5, chunk_size=4)
    assert isinstance(res, InfluenceResult) and res.scores.shape == (N, M) and res.converged
    assert res.solver == ("minres" if curv == "hessian" else "cg")
    _close(res.scores, expected)
    w = torch.full((N,), 1.0 / N if loss_fn.reduction == "mean" else 1.0, dtype=DT)
    torch.testing.assert_close(res.loss_weights, w, rtol=0, atol=1e-15)
    # Σ_i w_i ∇ℓ_i is the gradient of the whole-data loss (the weights are L's)
    torch.testing.assert_close(w @ G, curvops.Objective(model, loss_fn, (X, y)).gradient(), rtol=1e-12, atol=1e-14)


def test_query_chunks_give_the_same_scores():
    model = _mlp()
    X, y = _data("cross_entropy", N, 1)
    Xq, yq = _data("cross_entropy", 7, 2)
    kw = dict(damping=0.05, rtol=1e-13, batch_size=4)
    whole = influence(model, "cross_entropy", (X, y), (Xq, yq), **kw)
    parts = influence(model, "cross_entropy", (X, y), (Xq, yq), query_chunk_size=3, chunk_size=5, **kw)
    assert len(whole.solves) == 1 and whole.solve is whole.solves[0]
    assert len(parts.solves) == 3 and parts.solve is None and parts.converged  # queries 3 + 3 + 1
    _close(parts.scores, whole.scores, 1e-11)
    with pytest.raises(ValueError, match="query_chunk_size >= 1"):
        influence(model, "cross_entropy", (X, y), (Xq, yq), query_chunk_size=0)


def test_default_curvature_is_the_ggn_and_self_influence_is_the_diagonal():
    loss_fn = nn.CrossEntropyLoss()
    model = _mlp()
    X, y = _data("cross_entropy", N, 1)
    damping = 1e-2
    expected, G, _, A = _oracle("ggn", model, loss_fn, X, y, X, y, damping)
    res = influence(model, "cross_entropy", (X, y), (X, y), damping=damping, rtol=1e-13)
    assert res.curvature == "GGN 38×38"
    _close(res.scores, expected)
    s = self_influence(model, "cross_entropy", (X, y), damping=damping, rtol=1e-13, chunk_size=5)
    _close(s.scores, -torch.diagonal(expected))
    assert bool((s.scores > 0).all()) and s.converged and len(s.solves) == 3  # chunks of 5, 5, 3
    vals, idx = s.top_k(3)
    assert torch.equal(idx, torch.topk(-torch.diagonal(expected), 3).indices)


class _WithInverse(curvops.Dense):
    """A dense PSD matrix that brings its own damped inverse (as KFAC does); counts the calls."""

    calls = 0

    def inverse(self, *, damping):
        type(self).calls += 1
        return curvops.Dense(torch.linalg.inv(self.A + damping * torch.eye(self.shape[0], dtype=self.A.dtype)),
                             tags=("psd",))


def test_an_operator_with_its_own_inverse_is_used_directly():
    loss_fn = nn.CrossEntropyLoss()
    model = _mlp()
    X, y = _data("cross_entropy", N, 1)
    Xq, yq = _data("cross_entropy", M, 2)
    expected, G, Q, A = _oracle("ef", model, loss_fn, X, y, Xq, yq, 0.05)
    op = _WithInverse(A - 0.05 * torch.eye(A.shape[0], dtype=DT), tags=("psd",))
    res = influence(model, loss_fn, (X, y), (Xq, yq), curvature=op, damping=0.05)
    assert res.solver == "inverse" and res.solve is None and _WithInverse.calls == 1
    _close(res.scores, expected, 1e-12)
    cg = influence(model, loss_fn, (X, y), (Xq, yq), curvature=op, damping=0.05, solver="cg", rtol=1e-13)
    assert cg.solver == "cg" and cg.solve.converged
    _close(cg.scores, expected)


@pytest.mark.parametrize("kron", ["KFAC", "EKFAC"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_kfac_influence_on_one_linear_layer_is_the_ggn_influence(kron, reduction):
    """One linear layer with MSE: KFAC (and EKFAC) equal the GGN, so the influence through their own exact
    damped inverse equals the dense GGN oracle."""
    torch.manual_seed(4)
    model = nn.Linear(D, C).to(DT)
    loss_fn = nn.MSELoss(reduction=reduction)
    X, y = _data("mse", N, 1)
    Xq, yq = _data("mse", M, 2)
    damping = 1e-2 if reduction == "mean" else 1.0
    expected, *_ = _oracle("ggn", model, loss_fn, X, y, Xq, yq, damping)
    K = getattr(curvops, kron)(model, loss_fn, (X, y), batch_size=5)
    res = influence(model, loss_fn, (X, y), (Xq, yq), curvature=K, damping=damping, batch_size=5)
    assert res.solver == "inverse" and res.solve is None and res.curvature == f"{kron} 12×12"
    _close(res.scores, expected)
    s = self_influence(model, loss_fn, (X, y), curvature=K, damping=damping)
    own, *_ = _oracle("ggn", model, loss_fn, X, y, X, y, damping)
    _close(s.scores, -torch.diagonal(own))
    with pytest.raises(ValueError, match=f"influence: {kron}.inverse\\(damping=0\\) refused"):
        influence(model, loss_fn, (X, y), (Xq, yq), curvature=K)


def test_ridge_regression_leave_one_out_identity():
    r"""Linear least squares with ridge δ/2‖θ‖²: the exact leave-one-out change of θ is
    H⁻¹∇ℓ_i / (1 − h_i) (Sherman–Morrison; h_i = 2φ_iᵀH⁻¹φ_i the leverage), so the first-order
    removal effect divided by (1 − h_i) equals ∇ℓ_qᵀ(θ₋ᵢ − θ̂) from refitting without sample i,
    and the self-influence is 2 r_i² h_i."""
    g = torch.Generator().manual_seed(5)
    n, d, delta = 15, 3, 0.3
    X = torch.randn(n, d, generator=g, dtype=DT)
    y = X @ torch.randn(d, 1, generator=g, dtype=DT) + 0.5 * torch.randn(n, 1, generator=g, dtype=DT)
    Xq, yq = torch.randn(4, d, generator=g, dtype=DT), torch.randn(4, 1, generator=g, dtype=DT)
    phi = torch.cat([X, torch.ones(n, 1, dtype=DT)], 1)  # features of (weight, bias)
    phiq = torch.cat([Xq, torch.ones(4, 1, dtype=DT)], 1)
    I = torch.eye(d + 1, dtype=DT)

    def fit(P, t):
        return torch.linalg.solve(2 * P.T @ P + delta * I, 2 * P.T @ t)

    theta = fit(phi, y)
    model = nn.Linear(d, 1).to(DT)
    with torch.no_grad():
        model.weight.copy_(theta[:d].T)
        model.bias.copy_(theta[d])
    loss = nn.MSELoss(reduction="sum")
    res = influence(model, loss, (X, y), (Xq, yq), damping=delta, rtol=1e-14)
    Hinv = torch.linalg.inv(2 * phi.T @ phi + delta * I)
    h = 2 * torch.einsum("ip,pq,iq->i", phi, Hinv, phi)
    grad_q = 2 * (phiq @ theta - yq) * phiq  # [4, d+1]
    exact = torch.stack([grad_q @ (fit(torch.cat([phi[:i], phi[i + 1:]]), torch.cat([y[:i], y[i + 1:]])) - theta)[:, 0]
                         for i in range(n)])  # [n, 4]: ∇ℓ_qᵀ(θ₋ᵢ − θ̂)
    _close(res.removal_effect() / (1 - h)[:, None], exact)
    r = (phi @ theta - y)[:, 0]
    s = self_influence(model, loss, (X, y), damping=delta, rtol=1e-14)
    _close(s.scores, 2 * r ** 2 * h)


def test_ignored_targets_get_zero_rows_and_weights():
    model = _mlp()
    X, y = _data("cross_entropy", N, 1)
    y[[2, 7]] = -100
    keep = y != -100
    loss_fn = nn.CrossEntropyLoss()
    expected, *_ = _oracle("ef", model, loss_fn, X[keep], y[keep], X[:3][keep[:3]], y[:3][keep[:3]], 0.1)
    op = curvops.EmpiricalFisher(model, loss_fn, (X, y), batch_size=4)
    res = influence(model, loss_fn, (X, y), (X[:3], y[:3]), curvature=op, damping=0.1, rtol=1e-13, batch_size=4)
    assert torch.equal(res.scores[[2, 7]], torch.zeros(2, 3, dtype=DT))
    assert torch.equal(res.scores[:, 2], torch.zeros(N, dtype=DT))  # query 2 is ignored too
    _close(res.scores[keep][:, [0, 1]], expected)
    torch.testing.assert_close(res.loss_weights, torch.where(keep, 1.0, 0.0).to(DT) / 11, rtol=1e-15, atol=0)


def test_result_helpers():
    scores = torch.tensor([[1.0, -2.0], [3.0, 0.5], [-4.0, 1.0]], dtype=DT)
    res = InfluenceResult(scores=scores, loss_weights=torch.full((3,), 0.5, dtype=DT), solver="cg", damping=0.1)
    assert res.harmful(1).tolist() == [1] and res.helpful(1).tolist() == [2]  # row sums −1, 3.5, −3
    assert res.harmful(2, query=0).tolist() == [1, 0] and res.helpful(1, query=1).tolist() == [0]
    torch.testing.assert_close(res.removal_effect(), -0.5 * scores)
    assert res.top_k(10)[1].numel() == 3
    with pytest.raises(ValueError, match="expected query=None .* or an index in \\[0, 2\\)"):
        res.top_k(1, query=2)
    with pytest.raises(ValueError, match="expected a positive integer k"):
        res.harmful(0)


def test_bad_input_raises_before_any_pass():
    model = _mlp()
    X, y = _data("cross_entropy", N, 1)
    data, q = (X, y), (X[:2], y[:2])
    with pytest.raises(TypeError, match="influence: expected a loss"):
        influence(model, None, data, q)
    with pytest.raises(TypeError, match="influence: expected query_data"):
        influence(model, "cross_entropy", data, None)
    with pytest.raises(TypeError, match="expected curvature= as a curvops operator"):
        influence(model, "cross_entropy", data, q, curvature=torch.eye(38, dtype=DT))
    with pytest.raises(ValueError, match="expected a 38×38 curvature"):
        influence(model, "cross_entropy", data, q, curvature=curvops.Dense(torch.eye(5, dtype=DT)))
    other = curvops.GGN(model, "cross_entropy", data, params=["2.weight", "2.bias"])
    with pytest.raises(ValueError, match="expected a 38×38 curvature"):
        influence(model, "cross_entropy", data, q, curvature=other)
    with pytest.raises(ValueError, match="the curvature's parameters .* are not the influence's"):
        influence(model, "cross_entropy", data, q, params=["0.weight", "0.bias"],  # 20 parameters each
                  curvature=curvops.GGN(model, "cross_entropy", data, params=["0.bias", "2.weight"]))
    with pytest.raises(ValueError, match="expected a curvature in torch.float64"):
        influence(model, "cross_entropy", data, q, curvature=curvops.Dense(torch.eye(38)))
    with pytest.raises(ValueError, match="solver='cg' needs a PSD curvature"):
        influence(model, "cross_entropy", data, q, curvature=curvops.Hessian(model, "cross_entropy", data), solver="cg")
    with pytest.raises(ValueError, match="solver='inverse' needs an operator with an inverse"):
        influence(model, "cross_entropy", data, q, solver="inverse")
    with pytest.raises(ValueError, match="expected solver in"):
        influence(model, "cross_entropy", data, q, solver="lu")
    with pytest.raises(ValueError, match="expected damping >= 0"):
        influence(model, "cross_entropy", data, q, damping=-1.0)
    with pytest.raises(ValueError, match="chunk_size >= 1"):
        self_influence(model, "cross_entropy", data, chunk_size=0)
    with pytest.raises(TypeError, match="expected the model .* got an Objective"):
        influence(curvops.Objective(model, "cross_entropy", data), "cross_entropy", data, q)


def _state(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [p.requires_grad for p in model.parameters()],
            [None if p.grad is None else p.grad.clone() for p in model.parameters()], model.training,
            torch.get_rng_state())


def _same(a, b):
    assert a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    assert a[1] == b[1] and a[3] == b[3] and torch.equal(a[4], b[4])
    assert all((x is None and y is None) or torch.equal(x, y) for x, y in zip(a[2], b[2]))


def test_model_left_as_found_also_after_a_failure():
    model = _mlp()
    X, y = _data("cross_entropy", N, 1)
    model[0].weight.grad = torch.ones_like(model[0].weight)
    model[2].bias.requires_grad_(False)
    before = _state(model)
    influence(model, "cross_entropy", (X, y), (X[:2], y[:2]), damping=0.1)
    influence(model, "cross_entropy", (X, y), (X[:2], y[:2]), damping=0.1, query_chunk_size=1)
    self_influence(model, "cross_entropy", (X, y), damping=0.1)
    _same(before, _state(model))
    with pytest.raises(ConvergenceError, match="influence: the cg solve did not converge"):
        influence(model, "cross_entropy", (X, y), (X[:2], y[:2]), max_iters=1, strict=True)
    _same(before, _state(model))
    with pytest.warns(curvops.linalg.ConvergenceWarning, match="did not converge"):
        res = influence(model, "cross_entropy", (X, y), (X[:2], y[:2]), max_iters=1)
    assert not res.converged and res.solve.iterations == 1
    _same(before, _state(model))


def test_mislabelled_example_finds_the_planted_points(tmp_path, capsys):
    mod = runpy.run_path(str(ROOT / "examples" / "influence_mislabelled.py"), run_name="example")
    res = mod["cli"](["--quick", "--out", str(tmp_path / "fig.png")])
    out = capsys.readouterr().out
    assert (tmp_path / "fig.png").stat().st_size > 10_000
    assert res["found_self"] >= res["required"] and res["found_test"] >= res["required"]
    assert f"{res['found_self']} of the {res['planted']} planted" in out
