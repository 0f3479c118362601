"""Kept per-batch graphs (issue 15): the automatic default, kept-graph GGN / Fisher / empirical
Fisher, the batched block path, the memory accounting and the budget.

Every product is checked against dense float64 oracles built here by plain reverse-over-reverse
autograd on the whole data at once (no curvops code), and against the recompute path
(``keep_graphs=False``).  Tolerance: both sides are sums of a few hundred float64 products of
O(1) terms, so they agree to ~1e-15 relative; 1e-11 leaves room for reordering.
"""

from __future__ import annotations

import ctypes
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import curvops

D = torch.float64
RTOL = 1e-11
OPS = {"Hessian": curvops.Hessian, "GGN": curvops.GGN, "Fisher": curvops.Fisher,
       "EmpiricalFisher": curvops.EmpiricalFisher}


def _model(seed=0, dtype=D, widths=(3, 6, 5, 3)):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers += [nn.Linear(a, b), nn.Tanh()] if i < len(widths) - 2 else [nn.Linear(a, b)]
    return nn.Sequential(*layers).to(dtype)


def _data(n=24, ignore=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, dtype=D, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    if ignore:
        y[::3] = -100
        y[4:8] = -100  # batch 1 (of 4) is entirely ignored
    return X, y


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _f(model, theta, X):
    shapes = [(n, p.shape, p.numel()) for n, p in model.named_parameters()]
    parts, i = {}, 0
    for n, s, k in shapes:
        parts[n] = theta[i:i + k].reshape(s)
        i += k
    return torch.func.functional_call(model, parts, (X,))


def dense(kind: str, model, X, y) -> torch.Tensor:
    """Whole-data oracles: H and GGN (= exact Fisher for cross-entropy) by double backward of the
    mean cross-entropy over all samples at once; EF from per-sample gradients of the counted samples."""
    theta = _flat(model).requires_grad_()
    P = theta.numel()
    if kind == "Hessian":
        (g,) = torch.autograd.grad(F.cross_entropy(_f(model, theta, X), y), theta, create_graph=True)
        return torch.stack([torch.autograd.grad(g[i], theta, retain_graph=True)[0] for i in range(P)])
    if kind in ("GGN", "Fisher"):
        out = _f(model, theta, X)
        flat = out.reshape(-1)
        J = torch.stack([torch.autograd.grad(flat[i], theta, retain_graph=True)[0] for i in range(flat.numel())])
        o = out.detach().reshape(-1).requires_grad_()
        (go,) = torch.autograd.grad(F.cross_entropy(o.reshape(out.shape), y), o, create_graph=True)
        Hout = torch.stack([torch.autograd.grad(go[i], o, retain_graph=True)[0] for i in range(o.numel())])
        return J.T @ Hout @ J
    keep = [i for i in range(X.shape[0]) if y[i] != -100]
    G = torch.stack([torch.autograd.grad(F.cross_entropy(_f(model, theta, X[i:i + 1]), y[i:i + 1]), theta)[0]
                     for i in keep])
    return G.T @ G / len(keep)


def probes(P, K, seed=2):
    return torch.randn(P, K, dtype=D, generator=torch.Generator().manual_seed(seed))


def close(a, b, what=""):
    err = float((a - b).norm() / b.norm())
    assert err < RTOL, f"{what}: relative error {err:.2e}"


def views(X, y, bs=4):
    return list(zip(X.split(bs), y.split(bs)))


# ---- the automatic default keeps the graphs, exactly ------------------------------------------
@pytest.mark.parametrize("K", [1, 4])
@pytest.mark.parametrize("name", list(OPS))
def test_default_keeps_graphs_and_matches_the_oracle(name, K):
    model, (X, y) = _model(), _data()
    A = OPS[name](model, "cross_entropy", views(X, y))
    B = OPS[name](model, "cross_entropy", views(X, y), keep_graphs=False)
    V = probes(A.shape[1], K)
    M = dense(name, model, X, y)
    for i in range(2):  # first product builds the graphs, the second runs on them only
        close(A @ V, M @ V, f"{name} product {i}")
    assert A.kept_batches == 6 and A.cache_bytes > 0 and "kept" in A.last_path, A.last_path
    close(A @ V, B @ V, f"{name} kept vs recomputed")
    assert B.kept_batches == 0 and B.cache_bytes == 0 and "kept" not in B.last_path


def test_block_path_loop_fallback_and_mc_fisher():
    model, (X, y) = _model(), _data()
    V = probes(sum(p.numel() for p in model.parameters()), 5)
    G = curvops.GGN(model, "cross_entropy", views(X, y))
    G @ V
    G._batched = False  # as after an operation without a batching rule: the column loop
    close(G @ V, dense("GGN", model, X, y) @ V, "GGN column loop on kept graphs")
    A = curvops.Fisher(model, "cross_entropy", views(X, y), mc_samples=3, seed=4)
    B = curvops.Fisher(model, "cross_entropy", views(X, y), mc_samples=3, seed=4, keep_graphs=False)
    A @ V
    assert A.kept_batches == 6
    close(A @ V, B @ V, "MC Fisher kept vs recomputed")


# ---- caches follow the model ------------------------------------------------------------------
def _mul(model):
    model[0].weight.data.mul_(1.3)  # no version bump: only the value check can see it


def _load(model):
    state = {k: v + 0.1 * torch.randn_like(v) for k, v in model.state_dict().items()}
    model.load_state_dict(state)


def _reassign(model):
    model[2].bias.data = model[2].bias.data + 0.5


@pytest.mark.parametrize("change", [_mul, _load, _reassign], ids=["data.mul_", "load_state_dict", "data="])
@pytest.mark.parametrize("name", list(OPS))
def test_kept_graphs_follow_parameter_changes(name, change):
    model, (X, y) = _model(), _data()
    A = OPS[name](model, "cross_entropy", views(X, y))
    V = probes(A.shape[1], 2)
    A @ V
    assert A.kept_batches == 6
    change(model)
    close(A @ V, dense(name, model, X, y) @ V, f"{name} after {change.__name__}")
    close(A @ V, dense(name, model, X, y) @ V, f"{name} after {change.__name__}, rebuilt graphs")


@pytest.mark.parametrize("name", ["Hessian", "GGN", "EmpiricalFisher"])
def test_kept_graphs_follow_the_data(name):
    # A fixed list of batches can still change: a batch replaced, one appended, a tensor written in place.
    model, (X, y) = _model(), _data(28)
    data = views(X[:24], y[:24])
    A = OPS[name](model, "cross_entropy", data)
    V = probes(A.shape[1], 2)
    A @ V
    data[2] = (data[2][0] + 1.0, data[2][1])
    Xs, ys = torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])
    close(A @ V, dense(name, model, Xs, ys) @ V, f"{name} after a batch was replaced")
    data.append((X[24:], y[24:]))
    close(A @ V, dense(name, model, torch.cat([Xs, X[24:]]), y) @ V, f"{name} after a batch was appended")
    with torch.no_grad():
        X.mul_(0.5)  # batch 0 is a view of X
    Xs = torch.cat([b[0] for b in data])
    close(A @ V, dense(name, model, Xs, y) @ V, f"{name} after the inputs were scaled in place")


# ---- targets, budgets, warnings ---------------------------------------------------------------
@pytest.mark.parametrize("name", list(OPS))
def test_ignore_index_targets(name):
    model, (X, y) = _model(), _data(ignore=True)
    A = OPS[name](model, nn.CrossEntropyLoss(ignore_index=-100), views(X, y))
    V = probes(A.shape[1], 3)
    M = dense(name, model, X, y)
    for _ in range(2):
        close(A @ V, M @ V, f"{name} with ignored targets")
    assert A.kept_batches == 5  # the entirely ignored batch has weight 0 and is skipped


@pytest.mark.parametrize("name", ["Hessian", "GGN"])
def test_budget_keeps_some_batches_and_warns_once(name):
    model, (X, y) = _model(), _data()
    full = OPS[name](model, "cross_entropy", views(X, y))
    V = probes(full.shape[1], 2)
    full @ V
    per_batch = full.cache_bytes / 6
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        A = OPS[name](model, "cross_entropy", views(X, y), max_graph_bytes=int(2.5 * per_batch))
        for _ in range(3):
            close(A @ V, dense(name, model, X, y) @ V, f"{name} with a partial budget")
    ours = [w for w in caught if "kept graphs" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert "max_graph_bytes" in str(ours[0].message) and ours[0].filename == __file__
    assert 0 < A.kept_batches < 6 and A.cache_bytes <= int(2.5 * per_batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # everything fits: no warning
        OPS[name](model, "cross_entropy", views(X, y)) @ V


def test_a_budget_too_small_for_one_batch_keeps_nothing():
    model, (X, y) = _model(), _data()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        A = curvops.GGN(model, "cross_entropy", views(X, y), max_graph_bytes=1)
        V = probes(A.shape[1], 2)
        for _ in range(3):
            close(A @ V, dense("GGN", model, X, y) @ V, "GGN with a budget of 1 byte")
    assert len([w for w in caught if "kept graphs" in str(w.message)]) == 1
    assert A.kept_batches == 0 and A.cache_bytes == 0 and A._cache.stamp is None  # no copy of the state held


def test_accounting_charges_views_their_slice():
    # Batches sliced from one input tensor: each batch's graph costs the same whatever N is (the
    # old count charged each batch the whole storage, N² in total); clones of the same batches
    # (separate storages) are charged the same.
    model = _model()
    per_batch = []
    for n in (24, 96):
        X, y = _data(n)
        A = curvops.Hessian(model, "cross_entropy", views(X, y))
        A @ probes(A.shape[1], 1)
        per_batch.append(A.cache_bytes / A.kept_batches)
        B = curvops.Hessian(model, "cross_entropy", [(a.clone(), b.clone()) for a, b in views(X, y)])
        B @ probes(A.shape[1], 1)
        assert B.cache_bytes == A.cache_bytes
    # the copy of the model's state (charged once) makes the small data set's mean a bit larger
    assert per_batch[1] <= per_batch[0] < 1.2 * per_batch[1], per_batch


def _in_use() -> int:
    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Info
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


@pytest.mark.parametrize("name", ["Hessian", "GGN"])
def test_counted_bytes_are_the_bytes_really_held(name):
    try:
        _in_use()
    except (OSError, AttributeError):
        pytest.skip("needs glibc's mallinfo2 to read the bytes in use")
    model = _model(widths=(64, 256, 256, 10), dtype=torch.float32)
    X, y = torch.randn(2048, 64), torch.randint(0, 10, (2048,))
    A = OPS[name](model, "cross_entropy", (X, y), batch_size=256)
    v = torch.randn(A.shape[1])
    OPS[name](model, "cross_entropy", (X, y), batch_size=256, keep_graphs=False) @ v  # warm up
    before = _in_use()
    A @ v
    held = _in_use() - before
    assert A.kept_batches == 8
    assert 0.85 * held < A.cache_bytes < 1.15 * held, (A.cache_bytes, held)


# ---- when graphs are not kept -----------------------------------------------------------------
class _OnceDifferentiableTanh(torch.autograd.Function):
    """tanh whose backward is not recorded (once_differentiable), with a forward-mode formula."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (t,) = ctx.saved_tensors
        return g * (1 - t * t)

    @staticmethod
    def jvp(ctx, dx):
        (t,) = ctx.saved_tensors
        return dx * (1 - t * t)


class _NoJvpTanh(_OnceDifferentiableTanh):
    jvp = torch.autograd.Function.jvp  # the base class's: raises (no forward mode)


class _Act(nn.Module):
    def __init__(self, fn=_OnceDifferentiableTanh):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn.apply(x)


@pytest.mark.parametrize("name", ["GGN", "EmpiricalFisher"])
def test_model_without_double_backward_falls_back_exactly(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), _Act(), nn.Linear(6, 3)).to(D)
    X, y = _data()
    A = OPS[name](model, "cross_entropy", views(X, y))
    ref = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3)).to(D)
    ref.load_state_dict(model.state_dict())
    V = probes(A.shape[1], 3)
    for _ in range(2):
        close(A @ V, dense(name, ref, X, y) @ V, f"{name} without a double backward")
    assert A.kept_batches == 0 and "kept" not in A.last_path and "forward-mode" in A.last_path
    # without a forward-mode formula either, J v can't be computed exactly: a clear error, not zeros
    model[1].fn = _NoJvpTanh
    with pytest.raises(RuntimeError, match="once_differentiable"):
        OPS[name](model, "cross_entropy", views(X, y)) @ V


def test_data_loaders_and_stochastic_models_are_not_kept_automatically():
    model, (X, y) = _model(), _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=4)
    V = probes(sum(p.numel() for p in model.parameters()), 1)
    auto, kept = curvops.GGN(model, "cross_entropy", loader), curvops.GGN(model, "cross_entropy", loader,
                                                                           keep_graphs=True)
    close(auto @ V, kept @ V, "DataLoader")
    assert auto.kept_batches == 0 and kept.kept_batches == 6
    drop = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5)).to(D).train()
    H = curvops.Hessian(drop, "cross_entropy", views(X, y), allow_stochastic=True)
    H @ probes(H.shape[1], 1)
    assert H.kept_batches == 0


@pytest.mark.parametrize("kw, match", [({"keep_graphs": "yes"}, "keep_graphs must be"),
                                       ({"max_graph_bytes": -1}, "max_graph_bytes must be"),
                                       ({"max_graph_bytes": 1.5}, "max_graph_bytes must be")])
def test_bad_arguments(kw, match):
    model, (X, y) = _model(), _data()
    for cls in OPS.values():
        with pytest.raises(ValueError, match=match):
            cls(model, "cross_entropy", views(X, y), **kw)
