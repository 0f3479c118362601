"""The objective adapter: inputs it accepts, errors it raises, and the model left as found."""

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import curvops
from curvops import EmpiricalFisher, Fisher, GGN, Hessian, Objective

D = torch.float64


def mlp(dropout=False, batchnorm=False):
    torch.manual_seed(0)
    layers = [nn.Linear(3, 5)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(5))
    layers += [nn.Tanh()] + ([nn.Dropout(0.5)] if dropout else []) + [nn.Linear(5, 2)]
    return nn.Sequential(*layers).to(D)


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, generator=g, dtype=D), torch.randint(0, 2, (8,), generator=g)


def snapshot(model):
    return {
        "state": copy.deepcopy(model.state_dict()),
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grad": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "modes": [m.training for m in model.modules()],
        "rng": torch.get_rng_state().clone(),
    }


def assert_same(model, snap):
    now = snapshot(model)
    for k, v in snap["state"].items():
        assert torch.equal(v, now["state"][k]), k
    assert snap["requires_grad"] == now["requires_grad"]
    assert len(snap["grad"]) == len(now["grad"])
    for a, b in zip(snap["grad"], now["grad"]):
        assert (a is None and b is None) or torch.equal(a, b)
    assert snap["modes"] == now["modes"]
    assert torch.equal(snap["rng"], now["rng"])


# ---- bad vectors -----------------------------------------------------------------------
def test_wrong_length_dtype_device(data):
    H = Hessian(mlp(), "cross_entropy", data)
    P = H.shape[0]
    with pytest.raises(ValueError, match=rf"expected a vector of length {P} \(parameters\), got shape \({P - 1},\)"):
        H @ torch.zeros(P - 1, dtype=D)
    with pytest.raises(TypeError, match="expected dtype torch.float64, got torch.float32"):
        H @ torch.zeros(P, dtype=torch.float32)
    with pytest.raises(ValueError, match="expected a tensor on cpu, got one on meta"):
        H @ torch.zeros(P, dtype=D, device="meta")
    with pytest.raises(ValueError, match="expected a vector"):
        H @ torch.zeros(P, 1, 1, dtype=D)


def test_bad_parameter_dicts(data):
    model = mlp()
    H = Hessian(model, "cross_entropy", data)
    v = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    missing = dict(v)
    missing.pop("0.bias")
    with pytest.raises(ValueError, match=r"missing \['0.bias'\]"):
        H @ missing
    bad = dict(v)
    bad["0.bias"] = torch.zeros(4, dtype=D)
    with pytest.raises(ValueError, match=r"entry '0.bias' has shape \(4,\), expected \(5,\)"):
        H @ bad
    out = H @ v
    assert set(out) == set(v) and all(out[n].shape == v[n].shape for n in v)


# ---- bad data and losses -----------------------------------------------------------
def test_empty_data(data):
    X, y = data
    with pytest.raises(ValueError, match="empty"):
        Hessian(mlp(), "cross_entropy", (X[:0], y[:0]))
    with pytest.raises(ValueError, match="empty"):
        Hessian(mlp(), "cross_entropy", [])


def test_one_shot_iterator_refused(data):
    with pytest.raises(TypeError, match="one-shot iterator"):
        Hessian(mlp(), "cross_entropy", (b for b in [data]))


def test_targets_must_match_outputs(data):
    X, y = data
    H = Hessian(mlp(), "mse", (X, torch.zeros(8, 3, dtype=D)))
    with pytest.raises(ValueError, match=r"targets do not match outputs on batch 0: output shape \(8, 2\)"):
        H @ torch.zeros(H.shape[0], dtype=D)
    H = Hessian(mlp(), "cross_entropy", (X, y + 5))
    with pytest.raises(ValueError, match=r"class targets on batch 0 must lie in \[0, 2\)"):
        H @ torch.zeros(H.shape[0], dtype=D)
    H = Hessian(mlp(), "cross_entropy", (X, y[:, None].expand(8, 2)))
    with pytest.raises(ValueError, match="expected class indices of shape"):
        H @ torch.zeros(H.shape[0], dtype=D)


def test_nan_in_parameters_and_batches(data):
    X, y = data
    model = mlp()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="parameter '0.weight' contains NaN or Inf"):
        Hessian(model, "cross_entropy", data)
    Xbad = X.clone()
    Xbad[5, 1] = float("inf")
    H = GGN(mlp(), "cross_entropy", (Xbad, y), batch_size=3)
    with pytest.raises(ValueError, match="batch 1 contains NaN or Inf"):
        H @ torch.zeros(H.shape[0], dtype=D)


def test_reduction_must_be_known(data):
    with pytest.raises(ValueError, match="reduction of this loss can't be known"):
        Hessian(mlp(), lambda out, y: ((out - y) ** 2).mean(), data)
    with pytest.raises(ValueError, match="expected a loss with reduction 'mean' or 'sum', got reduction='none'"):
        Hessian(mlp(), nn.CrossEntropyLoss(reduction="none"), data)
    with pytest.raises(ValueError, match="contradicts"):
        Hessian(mlp(), nn.CrossEntropyLoss(reduction="sum"), data, reduction="mean")
    with pytest.raises(ValueError, match="unknown loss name"):
        Hessian(mlp(), "hinge", data)


def test_callable_loss_with_declared_reduction_matches_module(data):
    X, y = data
    Y = torch.randn(8, 2, dtype=D)
    a = Hessian(mlp(), lambda o, t: ((o - t) ** 2).sum(), (X, Y), reduction="sum").to_dense()
    b = Hessian(mlp(), nn.MSELoss(reduction="sum"), (X, Y)).to_dense()
    torch.testing.assert_close(a, b)


def test_fisher_needs_a_known_likelihood(data):
    with pytest.raises(ValueError, match="Fisher: expected one of the losses"):
        Fisher(mlp(), lambda o, t: o.sum(), data, reduction="sum")
    with pytest.raises(ValueError, match="label smoothing"):
        Fisher(mlp(), nn.CrossEntropyLoss(label_smoothing=0.1), data)
    with pytest.raises(ValueError, match="mc_samples must be"):
        Fisher(mlp(), "cross_entropy", data, mc_samples=0)


def test_loss_must_return_a_scalar(data):
    H = Hessian(mlp(), lambda o, t: o, data, reduction="mean")
    with pytest.raises(ValueError, match=r"the loss must return a scalar tensor, got \(8, 2\) on batch 0"):
        H @ torch.zeros(H.shape[0], dtype=D)


# ---- parameter selection -------------------------------------------------------------
def test_parameter_selection_errors(data):
    model = mlp()
    with pytest.raises(ValueError, match="unknown parameter name 'nope'"):
        Hessian(model, "cross_entropy", data, params=["nope"])
    with pytest.raises(ValueError, match="not a submodule"):
        Hessian(model, "cross_entropy", data, params=nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no parameters selected"):
        Hessian(model, "cross_entropy", data, params=lambda n, p: False)
    with pytest.raises(TypeError, match="plain function model needs params="):
        Hessian(lambda p, x: x, "mse", data)


def test_frozen_parameters_are_constants(data):
    model = mlp()
    model[0].weight.requires_grad_(False)
    H = Hessian(model, "cross_entropy", data)
    assert H.domain.names == ("0.bias", "2.weight", "2.bias")
    full = Hessian(mlp(), "cross_entropy", data).to_dense()
    torch.testing.assert_close(H.to_dense(), full[15:, 15:])
    assert model[0].weight.requires_grad is False


# ---- stochastic models -----------------------------------------------------------------
def test_dropout_in_train_mode_is_refused_unless_allowed(data):
    model = mlp(dropout=True)
    with pytest.raises(ValueError, match=r"'1' \(Dropout\)|2 \(Dropout\)"):
        Hessian(model, "cross_entropy", data)
    H = Hessian(model, "cross_entropy", data, allow_stochastic=True)
    snap = snapshot(model)
    report = curvops.check_deterministic(H)
    assert not report.deterministic
    assert any("Dropout" in s for s in report.issues)
    # The masks come from the global RNG, which every product restores afterwards: consecutive
    # products agree, and the structural check is what flags the model.
    assert report.max_relative_difference == 0.0
    assert_same(model, snap)  # global RNG restored although dropout drew from it
    with pytest.raises(ValueError, match="not a fixed matrix"):
        curvops.check_deterministic(H, strict=True)
    model.eval()
    assert curvops.check_deterministic(Hessian(model, "cross_entropy", data)).deterministic


def test_train_mode_batchnorm_refused_and_buffers_untouched(data):
    model = mlp(batchnorm=True)
    with pytest.raises(ValueError, match="BatchNorm1d in train mode"):
        GGN(model, "cross_entropy", data)
    snap = snapshot(model)
    H = Hessian(model, "cross_entropy", data, allow_stochastic=True)
    H @ torch.ones(H.shape[0], dtype=D)
    assert_same(model, snap)  # running stats were not updated


@pytest.mark.parametrize("Op", [Hessian, GGN, Fisher, EmpiricalFisher])
def test_shuffling_loader_is_refused_at_construction(data, Op):
    loader = DataLoader(TensorDataset(*data), batch_size=3, shuffle=True)
    with pytest.raises(ValueError, match=r"DataLoader shuffles \(RandomSampler\).*shuffle=False"):
        Op(mlp(), "cross_entropy", loader)


def test_shuffling_loader_accepted_only_when_asked_and_then_flagged(data):
    loader = DataLoader(TensorDataset(*data), batch_size=3, shuffle=True)
    H = Hessian(mlp(), "cross_entropy", loader, allow_stochastic=True)
    report = curvops.check_deterministic(H)
    assert any("shuffles" in s for s in report.issues)
    with pytest.raises(ValueError, match="keep_graphs=True.*shuffles"):
        Hessian(mlp(), "cross_entropy", loader, keep_graphs=True, allow_stochastic=True)


# ---- model left as found, also on errors --------------------------------------------------
@pytest.mark.parametrize("Op", [Hessian, GGN, Fisher, EmpiricalFisher])
def test_model_untouched_when_a_product_fails_midway(data, Op):
    X, y = data
    model = mlp()
    model(X).sum().backward()  # leave some .grad around
    model[0].bias.requires_grad_(False)
    snap = snapshot(model)
    batches = [(X[:4], y[:4]), (X[4:], y[4:] + 7)]  # batch 1 has bad targets
    A = Op(model, "cross_entropy", batches)
    v = torch.randn(A.shape[0], dtype=D, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="batch 1"):
        A @ v
    assert_same(model, snap)
    A2 = Op(model, "cross_entropy", batches[:1])
    A2 @ v
    assert_same(model, snap)


# ---- accepted inputs ---------------------------------------------------------------------
def test_inputs_dtype_follow_parameters(data):
    X, y = data
    a = Hessian(mlp(), "cross_entropy", (X.float(), y)).to_dense()
    b = Hessian(mlp(), "cross_entropy", (X, y)).to_dense()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_tuple_inputs_and_output_picker(data):
    X, y = data

    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def forward(self, a, b):
            return {"logits": self.net(a + b)}

    model = TwoInputs()
    A = Hessian(model, "cross_entropy", ((X, 0.5 * X), y), output=lambda o: o["logits"]).to_dense()
    B = Hessian(mlp(), "cross_entropy", (1.5 * X, y)).to_dense()
    torch.testing.assert_close(A, B)
    # an output with logits (a dict here, a HuggingFace ModelOutput usually) is reduced to them
    C = Hessian(model, "cross_entropy", ((X, 0.5 * X), y)).to_dense()
    torch.testing.assert_close(C, B)

    class NoLogits(TwoInputs):
        def forward(self, a, b):
            return {"scores": self.net(a + b)}

    with pytest.raises(TypeError, match="pass output= to pick"):
        Hessian(NoLogits(), "cross_entropy", ((X, X), y)) @ torch.zeros(B.shape[0], dtype=D)


def test_objective_gradient_and_loss_match_autograd(data):
    X, y = data
    model = mlp()
    obj = Objective(model, "cross_entropy", (X, y), batch_size=3)
    loss = nn.functional.cross_entropy(model(X), y)
    g = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(obj.gradient(), torch.cat([t.reshape(-1) for t in g]))
    assert abs(obj.loss_value() - loss.item()) < 1e-12
