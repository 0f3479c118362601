"""Loss landscapes at finite steps (curvops.analysis.landscape) against closed forms and hand loops.

Truths: the quadratic toy model (ℓ(t) = f* + ½ a_j t² along an eigenvector from the minimum),
linear regression with MSE (ℓ(t) = L + t gᵀd + ½ t² dᵀHd exactly, H and g by torch.func on the
concatenated data), and plain loops of functional calls / hand-hooked forwards on the whole data.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import curvops
from curvops.analysis.landscape import (LandscapeResult, activation_along, filter_normalize, loss_along, loss_plane,
                                        random_direction)
from curvops.analysis.quadratic import QuadraticModel
from curvops.linalg.lanczos import EighResult
from curvops.testing.contract import assert_unchanged, snapshot
from curvops.testing.spectra import gen

DT = torch.float64
TOL = dict(rtol=1e-12, atol=1e-12)


# ---- problems ------------------------------------------------------------------------------
def quadratic(d, seed=0):
    """f(w) = ½ wᵀAw + bᵀw + c with A = Q diag(d) Qᵀ; returns (model, Q, w*, f*)."""
    d = torch.as_tensor(d, dtype=DT)
    Q, _ = torch.linalg.qr(torch.randn(d.numel(), d.numel(), generator=gen(seed), dtype=DT))
    A = (Q * d) @ Q.T
    b = torch.randn(d.numel(), generator=gen(seed + 1), dtype=DT)
    m = QuadraticModel(0.5 * (A + A.T), b, c=0.7)
    w_star = m.stationary_points().w_star
    return m, Q, w_star, float(m.value(w_star))


def linreg(seed=0):
    g = gen(seed)
    model = nn.Linear(4, 2).to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
    X = torch.randn(30, 4, generator=g, dtype=DT)
    y = torch.randn(30, 2, generator=g, dtype=DT)
    return model, X, y


def mlp(seed=0, n=40):
    g = gen(seed)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
    X = torch.randn(n, 3, generator=g, dtype=DT)
    y = torch.randint(0, 4, (n,), generator=g)
    return model, X, y


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def unflat(model, v):
    out, s = {}, 0
    for n, p in model.named_parameters():
        out[n] = v[s:s + p.numel()].reshape(p.shape)
        s += p.numel()
    return out


def accuracy(out, y):
    return (out.argmax(1) == y).to(DT).mean()


def hand_loop(model, X, y, points):
    """[(loss, accuracy)] at θ + v for every flat offset v in points: one functional call on all data."""
    theta = flat(model)
    rows = []
    for v in points:
        out = functional_call(model, unflat(model, theta + v), (X,))
        rows.append((float(F.cross_entropy(out, y)), float(accuracy(out, y))))
    return torch.tensor(rows, dtype=DT)


# ---- quadratic toy model: exact parabolas ----------------------------------------------------
@pytest.mark.parametrize("d", [[0.5, 1.0, 2.0, 3.5, 5.0], [-1.0, -0.3, 0.4, 2.0, 3.0]], ids=["minimum", "saddle"])
def test_quadratic_line_along_eigenvectors_is_half_a_t_squared(d):
    m, Q, w_star, f_star = quadratic(d)
    t = torch.linspace(-2, 3, 10, dtype=DT)  # 0 is not among these steps
    for j in range(len(d)):
        res = loss_along(m.value, w0=w_star, direction=Q[:, j], steps=t)
        torch.testing.assert_close(res.values["loss"], f_star + 0.5 * d[j] * t ** 2, **TOL)
        assert res.base["loss"] == pytest.approx(f_star, rel=1e-14)
        assert res.kind == "function" and res.num_evaluations == t.numel() + 1  # 0 not among the steps
    res = loss_along(m.value, w0=w_star, direction=Q, index=2, steps=t)  # a column of a matrix
    torch.testing.assert_close(res.values["loss"], f_star + 0.5 * d[2] * t ** 2, **TOL)
    assert res.labels == ("column 2",)


def test_quadratic_line_along_eigsh_result():
    d = [0.5, 1.0, 2.0, 3.5, 5.0, 7.0]
    m, _, w_star, f_star = quadratic(d)
    eig = curvops.eigsh(m.hessian(), 2, which="LA", tol=1e-12)
    t = torch.arange(-5, 6, dtype=DT) / 5
    top = loss_along(m.value, w0=w_star, direction=eig)  # default: the largest eigenvalue
    torch.testing.assert_close(top.values["loss"], f_star + 3.5 * (torch.arange(-10, 11, dtype=DT) / 10) ** 2,
                               rtol=1e-9, atol=1e-9)
    assert top.labels == ("eigenvector 1 (λ=7)",)
    second = loss_along(m.value, w0=w_star, direction=eig, index=0, steps=t)
    torch.testing.assert_close(second.values["loss"], f_star + 2.5 * t ** 2, rtol=1e-9, atol=1e-9)
    assert second.labels == ("eigenvector 2 (λ=5)",)


def test_quadratic_plane_is_sum_of_two_parabolas():
    d = [-1.0, 0.4, 2.0, 3.0]
    m, Q, w_star, f_star = quadratic(d)
    a = torch.linspace(-1, 2, 7, dtype=DT)
    b = torch.tensor([-0.5, 0.0, 0.25, 1.5], dtype=DT)
    res = loss_plane(m.value, w0=w_star, directions=(Q[:, 0], Q[:, 3]), steps=(a, b), labels=("v0", "v3"))
    Al, Be = res.mesh()
    torch.testing.assert_close(res.values["loss"], f_star + 0.5 * (d[0] * Al ** 2 + d[3] * Be ** 2), **TOL)
    assert res.values["loss"].shape == (7, 4) and res.ndim == 2 and res.labels == ("v0", "v3")
    assert res.num_evaluations == 7 * 4 and res.base["loss"] == pytest.approx(f_star, rel=1e-14)
    # one [P, k] matrix with index pairs gives the same plane
    res2 = loss_plane(m.value, w0=w_star, directions=Q, index=(0, 3), steps=(a, b[b != 0]))
    torch.testing.assert_close(res2.values["loss"], res.values["loss"][:, b != 0], **TOL)
    assert res2.num_evaluations == 7 * 3 + 1 and res2.base["loss"] == pytest.approx(f_star, rel=1e-14)


# ---- linear regression: the exact parabola dᵀHd, slope ⟨∇L, d⟩ ------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_regression_line_is_exact_parabola(reduction):
    model, X, y = linreg()
    theta = flat(model)

    def L(v):
        out = functional_call(model, unflat(model, v), (X,))
        return F.mse_loss(out, y, reduction=reduction)

    H = torch.func.hessian(L)(theta)
    g = torch.func.grad(L)(theta)
    L0 = float(L(theta))
    t = torch.tensor([-2.0, -0.5, -0.25, 0.0, 0.25, 1.0, 3.0], dtype=DT)
    loss = nn.MSELoss(reduction=reduction)
    before = snapshot(model)
    for seed in range(3):
        d = torch.randn(theta.numel(), generator=gen(10 + seed), dtype=DT)
        res = loss_along(model, loss, (X, y), d, steps=t, batch_size=7)
        expected = L0 + t * (g @ d) + 0.5 * t ** 2 * (d @ H @ d)
        torch.testing.assert_close(res.values["loss"], expected, rtol=1e-12, atol=1e-12 * (1 + expected.abs().max()))
        assert res.base["loss"] == pytest.approx(L0, rel=1e-13)
        assert res.num_evaluations == t.numel() and res.num_passes == 1  # 0 is a step: no extra point
        # slope and curvature at t = 0 from the landscape alone (exact for a parabola)
        ell = res.values["loss"]
        h = 0.25
        assert float((ell[4] - ell[2]) / (2 * h)) == pytest.approx(float(g @ d), rel=1e-10, abs=1e-12)
        assert float((ell[4] - 2 * ell[3] + ell[2]) / h ** 2) == pytest.approx(float(d @ H @ d), rel=1e-10)
    assert_unchanged(before, snapshot(model))


def test_dict_direction_missing_names_are_zero():
    model, X, y = linreg()
    dw = torch.randn(2, 4, generator=gen(3), dtype=DT)
    res = loss_along(model, "mse", (X, y), {"weight": dw}, steps=torch.tensor([-1.0, 0.5, 2.0], dtype=DT))
    ref = loss_along(model, "mse", (X, y), torch.cat([dw.reshape(-1), torch.zeros(2, dtype=DT)]),
                     steps=torch.tensor([-1.0, 0.5, 2.0], dtype=DT), batch="loop")
    torch.testing.assert_close(res.values["loss"], ref.values["loss"], **TOL)
    torch.testing.assert_close(res.directions[0], ref.directions[0], rtol=0, atol=0)


# ---- batched evaluation = a plain loop of functional calls ---------------------------------------
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_batched_line_equals_hand_loop_with_metric(chunk_size):
    model, X, y = mlp()
    d = torch.randn(flat(model).numel(), generator=gen(5), dtype=DT)
    t = torch.linspace(-3, 3, 9, dtype=DT)
    res = loss_along(model, "cross_entropy", (X, y), d, steps=t, metrics={"accuracy": accuracy},
                     batch_size=13, chunk_size=chunk_size)
    truth = hand_loop(model, X, y, [ti * d for ti in t])
    assert res.path == "vmap" and res.kind == "parameters"
    torch.testing.assert_close(res.values["loss"], truth[:, 0], **TOL)
    torch.testing.assert_close(res.values["accuracy"], truth[:, 1], **TOL)
    assert list(res.values) == ["loss", "accuracy"] and res.values["loss"].shape == (9,)
    loop = loss_along(model, "cross_entropy", (X, y), d, steps=t, metrics={"accuracy": accuracy},
                      batch_size=13, batch="loop")
    assert loop.path == "loop"
    torch.testing.assert_close(loop.values["loss"], truth[:, 0], **TOL)
    base = hand_loop(model, X, y, [torch.zeros_like(d)])[0]
    assert res.base["loss"] == pytest.approx(float(base[0]), rel=1e-13)
    assert res.base["accuracy"] == pytest.approx(float(base[1]), rel=1e-13)


@pytest.mark.parametrize("batch", ["vmap", "loop"])
def test_line_with_ignored_targets_and_class_weights_is_torchs_whole_data_loss(batch):
    """The loss column follows torch's loss over the concatenated data (ignore_index, class weights):
    batches are weighted by their own denominators, a batch whose targets are all ignored counts 0;
    the metric column stays a sample mean.  Oracle: torch's loss at θ + t·d on a perturbed copy."""
    model, X, y = mlp()
    y = y.clone()
    y[:13] = -100  # the whole first batch is ignored
    y[20::3] = -100
    weight = torch.linspace(0.5, 2.0, int(y.max()) + 1, dtype=DT)
    loss = nn.CrossEntropyLoss(weight=weight)
    d = torch.randn(flat(model).numel(), generator=gen(7), dtype=DT)
    t = torch.linspace(-1, 1, 5, dtype=DT)
    res = loss_along(model, loss, (X, y), d, steps=t, metrics={"accuracy": accuracy}, batch_size=13, batch=batch)
    theta = flat(model)
    for k, tk in enumerate(t):
        with torch.no_grad():
            out = functional_call(model, unflat(model, theta + tk * d), (X,))
        assert float(res.values["loss"][k]) == pytest.approx(float(loss(out, y)), rel=1e-12)
        assert float(res.values["accuracy"][k]) == pytest.approx(float(accuracy(out, y)), rel=1e-12)


def test_batched_plane_equals_hand_loop_ij_order():
    model, X, y = mlp(seed=1)
    g = torch.Generator().manual_seed(0)
    d1, d2 = random_direction(model, generator=g), random_direction(model, generator=g)
    f1 = torch.cat([v.reshape(-1) for v in d1.values()])
    f2 = torch.cat([v.reshape(-1) for v in d2.values()])
    a = torch.tensor([-1.0, 0.0, 0.5], dtype=DT)
    b = torch.tensor([-0.5, 0.0, 1.0, 2.0], dtype=DT)
    res = loss_plane(model, "cross_entropy", [(X[:17], y[:17]), (X[17:], y[17:])], directions=(d1, d2),
                     steps=(a, b), metrics={"accuracy": accuracy}, chunk_size=5)
    truth = hand_loop(model, X, y, [ai * f1 + bj * f2 for ai in a for bj in b]).reshape(3, 4, 2)
    torch.testing.assert_close(res.values["loss"], truth[..., 0], **TOL)
    torch.testing.assert_close(res.values["accuracy"], truth[..., 1], **TOL)
    assert res.num_evaluations == 12 and res.labels == ("direction 1", "direction 2")
    assert res.base["loss"] == pytest.approx(float(truth[1, 1, 0]), rel=1e-14)


def test_vmap_fallback_to_loop_for_unbatchable_metric():
    model, X, y = mlp()
    d = torch.randn(flat(model).numel(), generator=gen(6), dtype=DT)
    item_metric = {"accuracy": lambda out, t: (out.argmax(1) == t).double().mean().item()}  # .item(): no vmap
    res = loss_along(model, "cross_entropy", (X, y), d, metrics=item_metric, batch_size=16)
    assert res.path.startswith("loop (vmap failed")
    truth = hand_loop(model, X, y, [ti * d for ti in res.steps])
    torch.testing.assert_close(res.values["loss"], truth[:, 0], **TOL)
    torch.testing.assert_close(res.values["accuracy"], truth[:, 1], **TOL)
    with pytest.raises(RuntimeError, match="loss_along: vmap could not batch"):
        loss_along(model, "cross_entropy", (X, y), d, metrics=item_metric, batch="vmap")


def test_operator_input_and_eigenvector_curvature():
    """loss_along(H, direction=eigsh(H)): second difference at 0 ≈ λ, base = the Objective's loss."""
    model, X, y = mlp(n=24)
    H = curvops.Hessian(model, "cross_entropy", (X, y))
    eig = curvops.eigsh(H, 2, which="LA", tol=1e-10)
    h = 1e-3
    res = loss_along(H, direction=eig, index=-1, steps=torch.tensor([-h, 0.0, h], dtype=DT))
    ell = res.values["loss"]
    lam = float(eig.eigenvalues[-1])
    assert float((ell[2] - 2 * ell[1] + ell[0]) / h ** 2) == pytest.approx(lam, rel=1e-4)
    assert res.labels == (f"eigenvector 1 (λ={lam:.4g})",)
    assert res.base["loss"] == pytest.approx(H.objective.loss_value(), rel=1e-14)


# ---- filter normalization --------------------------------------------------------------------
def convnet():
    g = gen(2)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 2)).to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
        model[0].weight[1].zero_()  # a dead filter: its direction filter must be zero too
    return model.eval()


def test_filter_normalized_direction_matches_weight_filters():
    model = convnet()
    before = snapshot(model)
    d = random_direction(model, generator=torch.Generator().manual_seed(7))
    raw = torch.randn(sum(p.numel() for p in model.parameters()), generator=torch.Generator().manual_seed(7),
                      dtype=DT)
    raw = unflat(model, raw)
    assert list(d) == [n for n, _ in model.named_parameters()]
    for name, w in model.named_parameters():
        if w.dim() <= 1:
            assert torch.equal(d[name], torch.zeros_like(w)), name  # biases and BN parameters zeroed
            continue
        for i in range(w.shape[0]):  # every filter: the weight filter's norm, the Gaussian's direction
            wn, gn = w[i].detach().norm(), raw[name][i].norm()
            torch.testing.assert_close(d[name][i].norm(), wn, rtol=1e-13, atol=0)
            torch.testing.assert_close(d[name][i], raw[name][i] * (wn / gn), rtol=1e-13, atol=0)
    assert torch.equal(d["0.weight"][1], torch.zeros_like(d["0.weight"][1]))
    kept = random_direction(model, generator=torch.Generator().manual_seed(7), ignore_bias_bn=False)
    for name, w in model.named_parameters():
        if w.dim() == 1:
            torch.testing.assert_close(kept[name].abs(), w.detach().abs(), rtol=0, atol=0)
            assert torch.equal(torch.sign(kept[name]), torch.sign(raw[name]) * (w != 0))
    gauss = random_direction(model, kind="gaussian", generator=torch.Generator().manual_seed(7))
    for name in raw:
        assert torch.equal(gauss[name], raw[name]), name  # plain N(0, I), biases kept
    assert_unchanged(before, snapshot(model))


def test_normalize_filter_in_loss_along_equals_prenormalized():
    model, X, y = mlp()
    d = torch.randn(flat(model).numel(), generator=gen(8), dtype=DT)
    normed = filter_normalize(model, d)
    res = loss_along(model, "cross_entropy", (X, y), d, normalize="filter")
    ref = loss_along(model, "cross_entropy", (X, y), normed)
    torch.testing.assert_close(res.values["loss"], ref.values["loss"], rtol=0, atol=0)
    assert res.labels == ("direction (filter-normalized)",)
    for name, w in model.named_parameters():
        if w.dim() == 2:
            torch.testing.assert_close(normed[name].norm(dim=1), w.detach().norm(dim=1), rtol=1e-13, atol=0)
        else:
            assert not normed[name].any()


# ---- activations ----------------------------------------------------------------------------
@pytest.mark.parametrize("whole_data", [False, True])
def test_activation_along_matches_hand_hooked_forward(whole_data):
    model, X, y = mlp()
    shape = (X.shape[0], 5) if whole_data else (5,)
    d = torch.randn(shape, generator=gen(9), dtype=DT)
    t = torch.linspace(-2, 2, 7, dtype=DT)
    before = snapshot(model)
    res = activation_along(model, "cross_entropy", (X, y), layer="1", direction=d, steps=t,
                           metrics={"accuracy": accuracy}, batch_size=13, chunk_size=3)
    assert_unchanged(before, snapshot(model))
    assert not model[1]._forward_hooks
    truth = []
    for ti in t:
        h = model[1].register_forward_hook(lambda mod, inp, out, ti=ti: out + ti * d)
        try:
            with torch.no_grad():
                out = model(X)
        finally:
            h.remove()
        truth.append((float(F.cross_entropy(out, y)), float(accuracy(out, y))))
    truth = torch.tensor(truth, dtype=DT)
    torch.testing.assert_close(res.values["loss"], truth[:, 0], **TOL)
    torch.testing.assert_close(res.values["accuracy"], truth[:, 1], **TOL)
    assert res.kind == "activations" and res.layer == "1" and res.path == "vmap"
    with torch.no_grad():
        assert res.base["loss"] == pytest.approx(float(F.cross_entropy(model(X), y)), rel=1e-13)


# ---- the model is left untouched, also on failure -----------------------------------------------
class FailOnSecondBatch:
    def __init__(self, exc):
        self.exc, self.seen = exc, set()

    def __call__(self, out, y):
        self.seen.add(out.shape[0])
        if len(self.seen) > 1:
            raise self.exc("metric failed on the second batch")
        return accuracy(out, y)


@pytest.mark.parametrize("exc", [ValueError, RuntimeError])
def test_model_untouched_when_metric_raises_midway(exc):
    model, X, y = mlp()
    model.train()
    model[2].weight.grad = torch.ones_like(model[2].weight)
    before = snapshot(model)
    d = torch.randn(flat(model).numel(), generator=gen(4), dtype=DT)
    data = [(X[:15], y[:15]), (X[15:], y[15:])]
    with pytest.raises(exc, match="metric failed"):
        loss_along(model, "cross_entropy", data, d, metrics={"acc": FailOnSecondBatch(exc)})
    assert_unchanged(before, snapshot(model))
    with pytest.raises(exc, match="metric failed"):
        activation_along(model, "cross_entropy", data, layer="1", direction=torch.ones(5, dtype=DT),
                         metrics={"acc": FailOnSecondBatch(exc)})
    assert_unchanged(before, snapshot(model))
    assert all(not m._forward_hooks for m in model.modules())
    loss_along(model, "cross_entropy", data, d, metrics={"acc": accuracy})
    assert_unchanged(before, snapshot(model))


# ---- errors ---------------------------------------------------------------------------------
def test_errors():
    model, X, y = mlp()
    P = flat(model).numel()
    d = torch.randn(P, dtype=DT)
    args = (model, "cross_entropy", (X, y))
    with pytest.raises(ValueError, match=f"loss_along: expected a direction of length {P}"):
        loss_along(*args, torch.randn(P - 1, dtype=DT))
    with pytest.raises(ValueError, match=r"unknown parameter names \['9.weight'\]"):
        loss_along(*args, {"9.weight": torch.ones(2, dtype=DT)})
    with pytest.raises(ValueError, match="direction entry '0.weight' has shape"):
        loss_along(*args, {"0.weight": torch.ones(3, 5, dtype=DT)})
    with pytest.raises(ValueError, match="finite direction"):
        loss_along(*args, torch.full((P,), float("nan"), dtype=DT))
    with pytest.raises(ValueError, match="the direction is zero"):
        loss_along(*args, torch.zeros(P, dtype=DT))
    with pytest.raises(ValueError, match="non-empty 1-D"):
        loss_along(*args, d, steps=torch.zeros(3, 2, dtype=DT))
    with pytest.raises(ValueError, match="finite steps"):
        loss_along(*args, d, steps=torch.tensor([0.0, float("inf")], dtype=DT))
    with pytest.raises(ValueError, match="pass index="):
        loss_along(*args, torch.randn(P, 3, dtype=DT))
    eig = EighResult(torch.tensor([1.0, 2.0], dtype=DT), torch.randn(P, 2, dtype=DT),
                             torch.zeros(2, dtype=DT), 0, True, 0)
    with pytest.raises(ValueError, match=r"index in \[-2, 2\)"):
        loss_along(*args, eig, index=2)
    with pytest.raises(ValueError, match="normalize=None or 'filter'"):
        loss_along(*args, d, normalize="unit")
    with pytest.raises(ValueError, match="batch in"):
        loss_along(*args, d, batch="fast")
    with pytest.raises(ValueError, match="other than 'loss'"):
        loss_along(*args, d, metrics={"loss": accuracy})
    with pytest.raises(TypeError, match="metric 'acc' must be callable"):
        loss_along(*args, d, metrics={"acc": 3})
    with pytest.raises(ValueError, match="metric 'out' must be a scalar"):
        loss_along(*args, d, metrics={"out": lambda out, t: out[:, 0]})
    with pytest.raises(TypeError, match=r"loss_along: expected \(model, loss, data\)"):
        loss_along(model, direction=d)
    with pytest.raises(TypeError, match="w0= goes with a plain function"):
        loss_along(model, direction=d, w0=d)
    with pytest.raises(TypeError, match="expected a direction as a tensor"):
        loss_along(*args, "top")
    with pytest.raises(ValueError, match="normalize='filter' needs a model"):
        loss_along(lambda w: (w ** 2).sum(), w0=d, direction=d, normalize="filter")
    with pytest.raises(TypeError, match="loss_plane: expected directions as a pair"):
        loss_plane(*args, d)
    with pytest.raises(ValueError, match="loss_plane: expected steps as a pair"):
        loss_plane(*args, (d, d), steps=torch.zeros(3, dtype=DT))
    with pytest.raises(ValueError, match="activation_along: unknown module name 'body'"):
        activation_along(*args, layer="body", direction=torch.ones(5, dtype=DT))
    with pytest.raises(ValueError, match=r"expected a direction of shape \(5,\) .* or \(40, 5\)"):
        activation_along(*args, layer="1", direction=torch.ones(4, dtype=DT))
    with pytest.raises(ValueError, match="random_direction: expected kind"):
        random_direction(model, kind="uniform")
    with pytest.raises(ValueError, match="random_direction: the direction came out zero"):
        random_direction(nn.BatchNorm1d(3).to(DT).eval())


def test_random_direction_takes_an_int_seed_like_linalg():
    model, _, _ = mlp()
    a = random_direction(model, generator=3)
    b = random_direction(model, generator=torch.Generator().manual_seed(3))
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=0)
    with pytest.raises(TypeError, match="expected a torch.Generator or an int seed, got str"):
        random_direction(model, generator="3")


def test_result_is_a_dataclass_with_cpu_values():
    res = loss_along(lambda w: (w ** 2).sum(), w0=torch.ones(3, dtype=DT), direction=torch.ones(3, dtype=DT),
                     metrics={"norm": lambda w: w.norm()})
    assert isinstance(res, LandscapeResult)
    t = res.steps
    torch.testing.assert_close(res.loss, 3 * (1 + t) ** 2, **TOL)
    torch.testing.assert_close(res.values["norm"], 3 ** 0.5 * (1 + t).abs(), **TOL)
    assert res.base == pytest.approx({"loss": 3.0, "norm": 3 ** 0.5})
    assert res.loss.device.type == "cpu" and t.numel() == 21 and float(t[10]) == 0.0
    with pytest.raises(ValueError, match="expected a plane"):
        res.mesh()
