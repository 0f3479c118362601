"""Exactly the user's loss (contract rule 11): ignore_index (incl. -100), class weights, label
smoothing and sequence outputs, over batches that ignore different numbers of targets.

Oracles: torch's loss on the concatenated data, differentiated twice by reverse-over-reverse
autograd row by row (no torch.func.hessian), and per-sample gradients one sample at a time.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvops
from curvops import GGN, EmpiricalFisher, Fisher, Hessian
from curvops.testing.contract import assert_matches, snapshot, assert_unchanged

D = torch.float64
N, T, C, DIN = 9, 3, 4, 3


class SeqModel(nn.Module):
    """[n, T, DIN] → logits [n, C, T] (classes in dimension 1, as torch's cross_entropy wants)."""

    def __init__(self):
        super().__init__()
        self.lin1 = nn.Linear(DIN, 5)
        self.lin2 = nn.Linear(5, C)

    def forward(self, x):
        return self.lin2(torch.tanh(self.lin1(x))).transpose(1, 2)


def problem(ignore: int = -100, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = SeqModel().to(D)
    X = torch.randn(N, T, DIN, generator=g, dtype=D)
    y = torch.randint(0, C, (N, T), generator=g)
    y[0, 1] = ignore
    y[2] = ignore            # sample 2: every target ignored
    y[4, :2] = ignore
    y[6:9] = ignore          # the last batch of 3 (batch_size=3): every target ignored
    return model, X, y


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def functional_loss(model, loss_fn, X, y):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]

    def L(theta):
        parts = dict(zip(names, [t.reshape(s) for t, s in zip(torch.split(theta, sizes), shapes)]))
        return loss_fn(torch.func.functional_call(model, parts, (X,)), y)

    return L


def dense_hessian(L, theta):
    """Row by row, reverse over reverse."""
    theta = theta.clone().requires_grad_()
    (g,) = torch.autograd.grad(L(theta), theta, create_graph=True)
    rows = [torch.autograd.grad(g[i], theta, retain_graph=True)[0] for i in range(theta.numel())]
    return torch.stack(rows)


def dense_ggn(model, loss_fn, X, y):
    """Jᵀ H_f J on the concatenated data: J by reverse mode row by row, H_f of the torch loss in f."""
    theta = flat(model).requires_grad_()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    parts = dict(zip(names, [t.reshape(s) for t, s in zip(torch.split(theta, sizes), shapes)]))
    out = torch.func.functional_call(model, parts, (X,)).reshape(-1)
    J = torch.stack([torch.autograd.grad(out[i], theta, retain_graph=True)[0] for i in range(out.numel())])
    f = out.detach().clone().requires_grad_()
    Hf = dense_hessian(lambda o: loss_fn(o.reshape(N, C, T), y), f.detach())
    return J.T @ Hf @ J


CASES = {
    "ignore=-100": dict(),
    "ignore_index=0": dict(ignore_index=0),
    "weight": dict(weight=torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=D)),
    "label_smoothing": dict(label_smoothing=0.2),
    "weight+smoothing+ignore=1": dict(weight=torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=D), label_smoothing=0.1,
                                      ignore_index=1),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_hessian_and_ggn_equal_the_torch_loss_on_all_data(case, reduction):
    kw = CASES[case]
    loss = nn.CrossEntropyLoss(reduction=reduction, **kw)
    model, X, y = problem(ignore=kw.get("ignore_index", -100))
    L = functional_loss(model, loss, X, y)
    H_dense = dense_hessian(L, flat(model))
    G_dense = dense_ggn(model, loss, X, y)
    snap = snapshot(model)
    V = torch.randn(H_dense.shape[0], 3, dtype=D, generator=torch.Generator().manual_seed(1))
    for bs in (3, 4, None):
        H = Hessian(model, loss, (X, y), batch_size=bs)
        G = GGN(model, loss, (X, y), batch_size=bs)
        assert_matches(H @ V, H_dense @ V, rtol=1e-10, what=f"Hessian, batch_size={bs}")
        assert_matches(G @ V, G_dense @ V, rtol=1e-10, what=f"GGN, batch_size={bs}")
        assert abs(H.objective.loss_value() - float(L(flat(model)))) <= 1e-12 * (1 + abs(float(L(flat(model)))))
    assert_unchanged(snap, snapshot(model))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("ignore", [-100, 0])
def test_fisher_with_ignored_targets_is_the_ggn_of_the_counted_ones(reduction, ignore):
    loss = nn.CrossEntropyLoss(reduction=reduction, ignore_index=ignore)
    model, X, y = problem(ignore=ignore)
    G_dense = dense_ggn(model, loss, X, y)  # = the type-2 Fisher for cross-entropy
    V = torch.randn(G_dense.shape[0], 2, dtype=D, generator=torch.Generator().manual_seed(2))
    for bs in (3, 4):
        F = Fisher(model, loss, (X, y), batch_size=bs)
        assert_matches(F @ V, G_dense @ V, rtol=1e-10, what=f"Fisher, batch_size={bs}")


def test_monte_carlo_fisher_ignores_ignored_targets():
    """An ignored target adds nothing, whatever labels were drawn for it: the MC Fisher on data
    with ignored positions equals its value with those positions' inputs changed."""
    loss = nn.CrossEntropyLoss()
    model, X, y = problem()
    X2 = X.clone()
    X2[2] += 5.0  # sample 2 is wholly ignored
    V = torch.randn(flat(model).numel(), 2, dtype=D, generator=torch.Generator().manual_seed(3))
    a = Fisher(model, loss, (X, y), batch_size=3, mc_samples=4) @ V
    b = Fisher(model, loss, (X2, y), batch_size=3, mc_samples=4) @ V
    assert_matches(a, b, rtol=1e-12, what="MC Fisher")
    # and it is not zero: the counted targets contribute
    assert float(a.norm()) > 1e-3 * float(V.norm())


def per_sample_ef(model, loss_fn, X, y, reduction):
    """(1/N') Σ_i ∇ℓ_i ∇ℓ_iᵀ with ℓ_i torch's loss on sample i alone (N' samples with a counted target)."""
    theta = flat(model)
    rows = []
    for i in range(N):
        if reduction == "mean" and bool((y[i] == loss_fn.ignore_index).all()):
            continue  # torch's mean over no target is 0/0: the sample does not count
        Li = functional_loss(model, loss_fn, X[i:i + 1], y[i:i + 1])
        th = theta.clone().requires_grad_()
        (g,) = torch.autograd.grad(Li(th), th)
        rows.append(g)
    G = torch.stack(rows)
    return G.T @ G / (len(rows) if reduction == "mean" else 1)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_empirical_fisher_with_ignored_targets(reduction):
    loss = nn.CrossEntropyLoss(reduction=reduction)
    model, X, y = problem()
    E_dense = per_sample_ef(model, loss, X, y, reduction)
    V = torch.randn(E_dense.shape[0], 2, dtype=D, generator=torch.Generator().manual_seed(4))
    for bs in (3, 4, None):
        E = EmpiricalFisher(model, loss, (X, y), batch_size=bs)
        assert_matches(E @ V, E_dense @ V, rtol=1e-10, what=f"EmpiricalFisher, batch_size={bs}")


def test_every_target_ignored_is_a_clear_error():
    model, X, y = problem()
    y[:] = -100
    H = Hessian(model, "cross_entropy", (X, y), batch_size=4)
    with pytest.raises(ValueError, match="every target of the data is ignored"):
        H @ torch.zeros(H.shape[0], dtype=D)


def test_fisher_refuses_weights_and_smoothing_by_name():
    model, X, y = problem()
    for kw, name in [(dict(weight=torch.ones(C, dtype=D)), "class weights"), (dict(label_smoothing=0.1), "label smoothing")]:
        with pytest.raises(ValueError, match=name):
            Fisher(model, nn.CrossEntropyLoss(**kw), (X, y))


def test_targets_out_of_range_name_ignore_index():
    model, X, y = problem()
    y[1, 0] = 7
    H = Hessian(model, "cross_entropy", (X, y))
    with pytest.raises(ValueError, match=r"must lie in \[0, 4\) or equal ignore_index=-100"):
        H @ torch.zeros(H.shape[0], dtype=D)


def test_sequence_layout_error_says_how_to_fix():
    model = nn.Linear(DIN, C).to(D)  # [n, T, C] outputs: classes last
    X = torch.randn(N, T, DIN, dtype=D)
    y = torch.randint(0, C, (N, T))
    H = Hessian(model, "cross_entropy", (X, y))
    with pytest.raises(ValueError, match=r"output=lambda o: o.transpose\(1, 2\)"):
        H @ torch.zeros(H.shape[0], dtype=D)
    # the fix works and is exact
    H = Hessian(model, "cross_entropy", (X, y), output=lambda o: o.transpose(1, 2))
    L = functional_loss(model, lambda o, t: nn.functional.cross_entropy(o.transpose(1, 2), t), X, y)
    v = torch.randn(H.shape[0], dtype=D)
    assert_matches(H @ v, dense_hessian(L, flat(model)) @ v, rtol=1e-10)


# ---- dict batches --------------------------------------------------------------------------
class KwargsModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(DIN, C)

    def forward(self, x, scale=None):
        out = self.lin(x)
        return out if scale is None else out * scale


class DictModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(DIN, C)

    def forward(self, batch):
        return self.lin(batch["x"]) * batch["scale"]


@pytest.mark.parametrize("Model, call", [(KwargsModel, "auto"), (KwargsModel, "kwargs"),
                                         (DictModel, "auto"), (DictModel, "positional")])
def test_dict_batches_with_labels_inside(Model, call):
    torch.manual_seed(0)
    model = Model().to(D)
    X = torch.randn(N, DIN, dtype=D)
    scale = torch.rand(N, 1, dtype=D) + 0.5
    y = torch.randint(0, C, (N,))
    y[3] = -100
    batches = [{"x": X[s], "scale": scale[s], "labels": y[s]} for s in (slice(0, 4), slice(4, N))]
    H = Hessian(model, "cross_entropy", batches, call=call)
    L = functional_loss(model, lambda o, t: nn.functional.cross_entropy(o, t), X, y)
    if Model is KwargsModel:
        L = _with_scale(model, X, scale, y)
    else:
        L = _with_scale_dict(model, X, scale, y)
    v = torch.randn(H.shape[0], dtype=D, generator=torch.Generator().manual_seed(5))
    assert_matches(H @ v, dense_hessian(L, flat(model)) @ v, rtol=1e-10)
    # a dict of tensors as the whole data set, split by batch_size
    H2 = Hessian(model, "cross_entropy", {"x": X, "scale": scale, "labels": y}, batch_size=4, call=call)
    assert_matches(H2 @ v, H @ v, rtol=1e-10)


def _with_scale(model, X, scale, y):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]

    def L(theta):
        parts = dict(zip(names, [t.reshape(s) for t, s in zip(torch.split(theta, sizes), shapes)]))
        out = torch.func.functional_call(model, parts, (X,), {"scale": scale})
        return nn.functional.cross_entropy(out, y)

    return L


def _with_scale_dict(model, X, scale, y):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]

    def L(theta):
        parts = dict(zip(names, [t.reshape(s) for t, s in zip(torch.split(theta, sizes), shapes)]))
        out = torch.func.functional_call(model, parts, ({"x": X, "scale": scale},))
        return nn.functional.cross_entropy(out, y)

    return L


def test_dict_batch_errors_name_the_fix():
    model = KwargsModel().to(D)
    X = torch.randn(N, DIN, dtype=D)
    y = torch.randint(0, C, (N,))
    with pytest.raises(ValueError, match="without targets.*target_key="):
        Hessian(model, "cross_entropy", [{"x": X, "target": y}]) @ torch.zeros(16, dtype=D)
    H = Hessian(model, "cross_entropy", [{"x": X, "target": y}], target_key="target")
    H @ torch.zeros(H.shape[0], dtype=D)
    with pytest.raises(ValueError, match="dict of inputs without targets"):
        Hessian(model, "cross_entropy", {"x": X})
    with pytest.raises(ValueError, match="call must be"):
        Hessian(model, "cross_entropy", (X, y), call="star")
    # inputs-only dicts are fine for loss-free quantities
    J = curvops.Jacobian(model, {"x": X})
    assert J.shape == (N * C, H.shape[0])


# ---- mistakes users make ----------------------------------------------------------------------
def test_common_mistakes_get_errors_that_name_the_fix():
    model = KwargsModel().to(D)
    X = torch.randn(N, DIN, dtype=D)
    y = torch.randint(0, C, (N,))
    with pytest.raises(ValueError, match=r"single tensor \(inputs only\).*data=\(X, y\)"):
        Hessian(model, "cross_entropy", X)
    with pytest.raises(TypeError, match=r"loss instance, got the class CrossEntropyLoss.*CrossEntropyLoss\(\)"):
        Hessian(model, nn.CrossEntropyLoss, (X, y))
    H = Hessian(model, "cross_entropy", (X, y))
    with pytest.raises(ValueError, match=r"Hessian.matvec: expected a vector of length 16"):
        H.matvec(torch.zeros(15, dtype=D).numpy())
    with pytest.raises(ValueError, match=r"Hessian.matmat: expected a block \[16, K\]"):
        H.matmat(torch.zeros(16, dtype=D).numpy())
    # the curvlinops idiom: params=model.parameters() (and lists of parameters)
    H1 = Hessian(model, "cross_entropy", (X, y), params=model.parameters())
    H2 = Hessian(model, "cross_entropy", (X, y), params=[model.lin.weight])
    assert H1.shape == H.shape and H2.shape == (12, 12)
    with pytest.raises(ValueError, match="not a parameter of the model"):
        Hessian(model, "cross_entropy", (X, y), params=[torch.zeros(3)])


def test_float64_data_for_a_float32_model_is_rounded_like_the_model_would():
    torch.manual_seed(0)
    model = KwargsModel()  # float32
    X = torch.randn(N, DIN, dtype=D)
    y = torch.randint(0, C, (N,))
    v = torch.randn(16)
    a = Hessian(model, "cross_entropy", (X, y)) @ v
    b = Hessian(model, "cross_entropy", (X.float(), y)) @ v
    assert torch.equal(a, b)


def test_gradient_covariance_of_the_loss_with_ignored_targets_is_the_empirical_fisher():
    loss = nn.CrossEntropyLoss()
    model, X, y = problem()
    E_dense = per_sample_ef(model, loss, X, y, "mean")
    V = torch.randn(E_dense.shape[0], 2, dtype=D, generator=torch.Generator().manual_seed(6))
    for bs in (3, 4):
        Cov = curvops.GradientCovariance(model, loss, (X, y), batch_size=bs)
        assert_matches(Cov @ V, E_dense @ V, rtol=1e-10, what=f"GradientCovariance, batch_size={bs}")
