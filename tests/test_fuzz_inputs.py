"""A fuzzed catalogue of bad (and oddly shaped but valid) inputs for the curvature operators (issue 10).

For every generated case the operator either

* gives the **exact** answer — compared with a dense float64 oracle built here, independently of
  the package, by reverse-over-reverse autograd on the concatenated data (rows of the Hessian by
  ``torch.autograd.grad(create_graph=True)`` twice; ``torch.func.hessian`` is not used: it is
  wrong through LayerNorm in torch 2.13), or
* raises a **clear error**: a ``ValueError``/``TypeError`` whose message names what is wrong,
  raised before heavy work (at most the one forward that found the problem),

and afterwards the model is bit-for-bit as found: parameter and buffer values (compared as
bits, so NaN parameters compare too), version counters, identities, ``.grad``,
``requires_grad``, train/eval flags and the global RNG state.

The budget is small in CI (15 derandomized examples per test, 4 per kind where a test is
parametrized over every kind of bad input); set ``CURVOPS_FUZZ_EXAMPLES=500`` for a longer,
randomized run (500 per test, 50 per kind).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

import curvops
from curvops import EmpiricalFisher, Fisher, GGN, GradientCovariance, Hessian, Jacobian, NTK
from curvops.testing.contract import assert_matches, single_thread, snapshot

DT = torch.float64
RTOL = 1e-10
_EXAMPLES = int(os.environ.get("CURVOPS_FUZZ_EXAMPLES", "0") or 0)
FUZZ = settings(
    max_examples=_EXAMPLES or 15,
    deadline=None,
    derandomize=not _EXAMPLES,
    database=None,
    # no shrinking in CI: a failing case is already small (and derandomized, so reproducible)
    phases=tuple(Phase) if _EXAMPLES else (Phase.explicit, Phase.reuse, Phase.generate),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
#: for tests parametrized over every kind of bad input: a few examples per kind
FUZZ_EACH = settings(FUZZ, max_examples=max(_EXAMPLES // 10, 4) if _EXAMPLES else 4)

D_IN, HIDDEN = 3, 4
PARAM_OPS = ("Hessian", "GGN", "Fisher", "EmpiricalFisher", "GradientCovariance")
ALL_OPS = PARAM_OPS + ("Jacobian", "NTK")


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


# ---- tiny models (a few dozen parameters) -----------------------------------------------------
def make_model(kind: str, C: int, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, C))
    elif kind == "layernorm":
        model = nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.LayerNorm(HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, C))
    elif kind == "batchnorm-eval":
        model = nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, C))
    else:
        raise AssertionError(kind)
    model = model.to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT) * 0.7)
        for name, b in model.named_buffers():
            if b.is_floating_point():
                b.copy_(torch.rand(b.shape, generator=g, dtype=DT) + (0.5 if "var" in name else -0.5))
    if kind == "batchnorm-eval":
        model.eval()
    return model


def data_for(loss_kind: str, N: int, C: int, seed: int):
    g = torch.Generator().manual_seed(1000 + seed)
    X = torch.randn(N, D_IN, generator=g, dtype=DT)
    if loss_kind == "mse":
        y = torch.randn(N, C, generator=g, dtype=DT)
    else:
        y = torch.randint(0, C, (N,), generator=g)
    return X, y


# ---- the model left exactly as found --------------------------------------------------------
def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t.reshape(-1).contiguous().view(torch.uint8).clone() if t.dtype != torch.bool else t.clone()


@dataclass
class State:
    snap: object
    bits: dict
    grad_bits: dict


def take_state(model: nn.Module) -> State:
    snap = snapshot(model)
    tensors = dict(model.named_parameters())
    tensors.update({f"buffer:{n}": b for n, b in model.named_buffers()})
    return State(snap, {n: _bits(t) for n, t in tensors.items()},
                 {n: (None if t.grad is None else _bits(t.grad)) for n, t in tensors.items()})


def assert_untouched(model: nn.Module, before: State) -> None:
    after = take_state(model)
    b, a = before.snap, after.snap
    assert a.ids == b.ids, "parameters or buffers were replaced"
    assert after.bits.keys() == before.bits.keys(), "parameters or buffers were added or removed"
    for n, bits in before.bits.items():
        assert torch.equal(after.bits[n], bits), f"{n} changed value (bitwise)"
    assert a.versions == b.versions, f"a parameter or buffer was written in place: {b.versions} -> {a.versions}"
    assert a.requires_grad == b.requires_grad, "requires_grad flags changed"
    for n, g in before.grad_bits.items():
        g2 = after.grad_bits[n]
        assert (g is None) == (g2 is None) and (g is None or torch.equal(g, g2)), f"{n}.grad changed"
    assert a.training == b.training, "train/eval modes changed"
    assert torch.equal(a.rng, b.rng), "the global RNG state changed"


def dress(model: nn.Module, draw_grads: bool, freeze: bool) -> list[str]:
    """Give some parameters a .grad and freeze one (its flag must survive too); → the trainable names."""
    names = [n for n, _ in model.named_parameters()]
    if freeze:
        dict(model.named_parameters())[names[1]].requires_grad_(False)  # first layer's bias
    if draw_grads:
        for i, p in enumerate(model.parameters()):
            if i % 2 == 0:
                p.grad = torch.full_like(p, 0.125 * (i + 1))
    return [n for n, p in model.named_parameters() if p.requires_grad]


class ForwardCounter:
    """Counts calls of the model's forward (a pre-hook; removed on exit, so the model is left as found)."""

    def __init__(self, model: nn.Module):
        self.model, self.calls = model, 0

    def __enter__(self):
        def hook(module, args, kwargs=None):
            self.calls += 1

        self.handle = self.model.register_forward_pre_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# ---- the dense oracle (independent of the package) --------------------------------------------
def _unflatten(model, names, theta):
    shapes = [dict(model.named_parameters())[n].shape for n in names]
    out, start = {}, 0
    for n, s in zip(names, shapes):
        k = int(np.prod(s)) if len(s) else 1
        out[n] = theta[start:start + k].reshape(s)
        start += k
    return out


def _theta(model, names):
    params = dict(model.named_parameters())
    return torch.cat([params[n].detach().reshape(-1) for n in names]).clone()


def _forward(model, names, theta, X):
    return functional_call(model, _unflatten(model, names, theta), (X,))


def _rows(vec: torch.Tensor, wrt: torch.Tensor) -> torch.Tensor:
    rows = []
    for i in range(vec.numel()):
        (r,) = torch.autograd.grad(vec[i], wrt, retain_graph=True, allow_unused=True)
        rows.append((torch.zeros_like(wrt) if r is None else r).reshape(-1))
    return torch.stack(rows) if rows else wrt.new_zeros(0, wrt.numel())


def oracle(op: str, model, names, loss_fn, X, y, subset=None) -> torch.Tensor:
    """The dense float64 matrix of ``op`` on the whole (concatenated) data."""
    X = X.detach().clone().to(DT).contiguous()
    y = y.detach().clone().contiguous()
    theta = _theta(model, names).requires_grad_()
    with torch.enable_grad():
        out = _forward(model, names, theta, X)
        if op == "Hessian":
            (g,) = torch.autograd.grad(loss_fn(out, y), theta, create_graph=True)
            return _rows(g, theta)
        J = _rows(out.reshape(-1), theta)  # [N·C, P], sample-major
        if op == "Jacobian":
            return J
        if op == "NTK":
            return J @ J.T
        if op in ("GGN", "Fisher"):
            o = out.detach().requires_grad_()
            (go,) = torch.autograd.grad(loss_fn(o, y), o, create_graph=True)
            Ho = _rows(go.reshape(-1), o)
            return J.T @ Ho @ J
        # per-sample gradients of the sample's own loss
        N = X.shape[0]
        ignore = getattr(loss_fn, "ignore_index", None) if isinstance(loss_fn, nn.CrossEntropyLoss) else None
        grads, keep = [], []
        for i in range(N):
            if ignore is not None and int(y[i]) == ignore:
                continue
            if subset is not None and not bool(subset[i]):
                continue
            li = loss_fn(out[i:i + 1], y[i:i + 1])
            (gi,) = torch.autograd.grad(li, theta, retain_graph=True)
            grads.append(gi)
            keep.append(i)
        G = torch.stack(grads)
        if op == "EmpiricalFisher":
            scale = 1.0 / len(keep) if loss_fn.reduction == "mean" else 1.0
            return scale * G.T @ G
        if op == "GradientCovariance":
            return G.T @ G / len(keep)
    raise AssertionError(op)


def build(op: str, model, loss_fn, data, **kw):
    if op == "Jacobian":
        return Jacobian(model, data[0] if isinstance(data, tuple) else [b[0] for b in data], **kw)
    if op == "NTK":
        return NTK(model, data[0] if isinstance(data, tuple) else [b[0] for b in data], **kw)
    cls = {"Hessian": Hessian, "GGN": GGN, "Fisher": Fisher, "EmpiricalFisher": EmpiricalFisher,
           "GradientCovariance": GradientCovariance}[op]
    return cls(model, loss_fn, data, **kw)


def check_products(A, dense: torch.Tensor, form: str, seed: int) -> None:
    """A @ v in the drawn form against ``dense @ v``."""
    g = torch.Generator().manual_seed(seed)
    n = dense.shape[1]
    V = torch.randn(n, 3, generator=g, dtype=DT)
    if form == "torch-vector":
        assert_matches(A @ V[:, 0], dense @ V[:, 0], RTOL, "A @ v")
    elif form == "torch-block":
        assert_matches(A @ V, dense @ V, RTOL, "A @ V")
    elif form == "non-contiguous-column":
        W = torch.randn(3, n, generator=g, dtype=DT).T  # [n, 3], a transposed (non-contiguous) view
        assert not W.is_contiguous()
        assert_matches(A @ W[:, 1], dense @ W[:, 1], RTOL, "A @ W[:, 1]")
        assert_matches(A @ W, dense @ W, RTOL, "A @ W (non-contiguous block)")
    elif form == "strided":
        W = torch.randn(2 * n, generator=g, dtype=DT)[::2]
        assert_matches(A @ W, dense @ W, RTOL, "A @ x[::2]")
    elif form == "expanded":
        w = torch.tensor([0.75], dtype=DT).expand(n)
        assert_matches(A @ w, dense @ w.contiguous(), RTOL, "A @ c.expand(n)")
    elif form == "numpy-matvec":
        x = V[:, 0].numpy()
        res = A.matvec(x)
        assert isinstance(res, np.ndarray)
        assert_matches(torch.from_numpy(np.asarray(res).reshape(-1)), dense @ V[:, 0], RTOL, "A.matvec(ndarray)")
    elif form == "numpy-matmul":
        res = A @ V.numpy()
        assert isinstance(res, np.ndarray)
        assert_matches(torch.from_numpy(res), dense @ V, RTOL, "A @ ndarray")
    elif form == "adjoint":
        W = torch.randn(dense.shape[0], 2, generator=g, dtype=DT)
        assert_matches(A.T @ W, dense.T @ W, RTOL, "A.T @ W")
    else:
        raise AssertionError(form)


FORMS = ("torch-vector", "torch-block", "non-contiguous-column", "strided", "expanded", "numpy-matvec",
         "numpy-matmul", "adjoint")


def layout_X(X: torch.Tensor, how: str) -> torch.Tensor:
    """The same values as ``X`` in another memory layout."""
    if how == "contiguous":
        return X
    if how == "T.T":
        return X.T.contiguous().T  # a transposed view of a transposed copy: non-contiguous
    if how == "strided":
        wide = torch.zeros(X.shape[0], 2 * X.shape[1], dtype=X.dtype)
        wide[:, ::2] = X
        return wide[:, ::2]
    if how == "expand":
        return X[:1].expand(X.shape[0], X.shape[1])  # every sample the same row, stride 0
    raise AssertionError(how)


def expect_clear_error(err: BaseException, words: tuple[str, ...], case: str, model_error: bool = False) -> None:
    """A ValueError/TypeError naming the problem; with ``model_error`` the model's own error is fine too
    (inputs the model itself rejects, e.g. integer inputs to a Linear layer: integer inputs are legitimate
    for other models, so the library must not refuse them)."""
    kinds = (ValueError, TypeError, RuntimeError) if model_error else (ValueError, TypeError)
    assert isinstance(err, kinds), f"{case}: expected a ValueError/TypeError, got {type(err).__name__}: {err}"
    msg = str(err)
    assert any(re.search(w, msg, re.IGNORECASE) for w in words), f"{case}: the message does not name {words}: {msg!r}"


def run_case(model, before: State, make, words: tuple[str, ...], case: str, max_forwards: int = 1,
             model_error: bool = False):
    """Run ``make()``; if it raises, the error must be clear and come before heavy work."""
    with ForwardCounter(model) as fc:
        try:
            result = make()
        except Exception as err:  # noqa: BLE001 - classified below
            assert_untouched(model, before)
            expect_clear_error(err, words, case, model_error)
            assert fc.calls <= max_forwards, f"{case}: {fc.calls} forward passes ran before the error"
            return None
    assert_untouched(model, before)
    return result


# ---- 1. valid inputs in every layout: exact ---------------------------------------------------
@FUZZ
@given(st.data())
def test_valid_inputs_in_any_layout_are_exact(data):
    kind = data.draw(st.sampled_from(["mlp", "layernorm", "batchnorm-eval"]), label="model")
    loss_kind = data.draw(st.sampled_from(["mse", "cross_entropy"]), label="loss")
    reduction = data.draw(st.sampled_from(["mean", "sum"]), label="reduction")
    op = data.draw(st.sampled_from(ALL_OPS), label="operator")
    N = data.draw(st.integers(1, 6), label="N")
    C = 2 if loss_kind == "mse" else 3
    seed = data.draw(st.integers(0, 2**16), label="seed")
    how = data.draw(st.sampled_from(["contiguous", "T.T", "strided", "expand"]), label="X layout")
    split = data.draw(st.sampled_from(["pair", "batch_size", "list"]), label="data as")
    form = data.draw(st.sampled_from(FORMS), label="product")
    params_as = data.draw(st.sampled_from(["default", "names", "parameters()"]), label="params")
    freeze = data.draw(st.booleans(), label="freeze a bias")
    grads = data.draw(st.booleans(), label="stale .grad")

    model = make_model(kind, C, seed)
    names = dress(model, grads, freeze)
    X, y = data_for(loss_kind, N, C, seed)
    X = layout_X(X, how)
    if data.draw(st.booleans(), label="non-contiguous targets"):
        y = torch.stack([y, y], -1)[..., 0]  # stride 2: a view into a wider tensor
        assert not y.is_contiguous() or y.numel() <= 1
    loss_fn = nn.MSELoss(reduction=reduction) if loss_kind == "mse" else nn.CrossEntropyLoss(reduction=reduction)
    dense = oracle(op, model, names, loss_fn, X, y)
    if split == "pair":
        dataset, kw = (X, y), {}
    elif split == "batch_size":
        dataset, kw = (X, y), dict(batch_size=data.draw(st.integers(1, N), label="batch_size"))
    else:
        cuts = sorted(set(data.draw(st.lists(st.integers(1, max(N - 1, 1)), max_size=3), label="cuts")) - {N})
        bounds = [0, *cuts, N]
        dataset, kw = [(X[a:b], y[a:b]) for a, b in zip(bounds, bounds[1:]) if b > a], {}
    if params_as == "names":
        kw["params"] = list(names)
    elif params_as == "parameters()":
        kw["params"] = (p for p in model.parameters() if p.requires_grad)  # the curvlinops idiom
    before = take_state(model)
    A = build(op, model, loss_fn, dataset, **kw)
    assert_untouched(model, before)
    assert tuple(A.shape) == tuple(dense.shape), f"{op}: shape {A.shape} != oracle {tuple(dense.shape)}"
    check_products(A, dense, form, seed)
    assert_untouched(model, before)


# ---- 2. ignored targets (-100 and ignore_index=k): exact over the non-ignored targets -----------
@FUZZ
@given(st.data())
def test_ignored_targets_are_exact_or_refused_clearly(data):
    op = data.draw(st.sampled_from(("Hessian", "GGN", "Fisher", "EmpiricalFisher")), label="operator")
    kind = data.draw(st.sampled_from(["mlp", "layernorm"]), label="model")
    N = data.draw(st.integers(2, 7), label="N")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    ignore_index = data.draw(st.sampled_from([None, -100, 0, 2]), label="ignore_index")
    pattern = data.draw(st.lists(st.booleans(), min_size=N, max_size=N), label="ignored samples")
    batch_size = data.draw(st.sampled_from([None, 1, 2, 3]), label="batch_size")
    C = 3
    model = make_model(kind, C, seed)
    names = dress(model, False, False)
    X, y = data_for("cross_entropy", N, C, seed)
    ign = -100 if ignore_index is None else ignore_index
    if ign >= 0:  # a class that is ignored: those targets are the ignored ones; others avoid it
        y = torch.where(y == ign, (y + 1) % C, y)
    y = torch.where(torch.tensor(pattern), torch.full_like(y, ign), y)
    loss_fn = nn.CrossEntropyLoss() if ignore_index is None else nn.CrossEntropyLoss(ignore_index=ignore_index)
    before = take_state(model)
    case = f"{op}, targets {y.tolist()}, ignore_index={ign}"
    if all(pattern):  # the loss itself is NaN (mean over no target): must be refused clearly
        def make():
            A = build(op, model, loss_fn, (X, y), batch_size=batch_size)
            return A @ torch.ones(A.shape[1], dtype=DT)

        out = run_case(model, before, make, ("ignore", "no target", "all .*targets", "empty", "0 targets"), case,
                       max_forwards=10**6)
        assert out is None, f"{case}: every target ignored, expected a clear error, got a product {out}"
        return
    dense = oracle(op, model, names, loss_fn, X, y)
    A = build(op, model, loss_fn, (X, y), batch_size=batch_size)
    check_products(A, dense, data.draw(st.sampled_from(FORMS[:3]), label="product"), seed)
    assert_untouched(model, before)


# ---- 3. masks (GradientCovariance subset=): exact over the kept samples, or a clear error ------
@FUZZ
@given(st.data())
def test_subset_masks_are_exact_or_refused_clearly(data):
    N = data.draw(st.integers(1, 6), label="N")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    shape = data.draw(st.sampled_from(["right", "short", "long", "2-D"]), label="mask length")
    dtype = data.draw(st.sampled_from(["bool", "float", "index"]), label="mask kind")
    model = make_model("mlp", 3, seed)
    names = dress(model, True, False)
    X, y = data_for("cross_entropy", N, 3, seed)
    loss_fn = nn.CrossEntropyLoss()
    length = {"right": N, "short": N - 1, "long": N + 1, "2-D": N}[shape]
    keep = torch.tensor(data.draw(st.lists(st.booleans(), min_size=length, max_size=length), label="mask"),
                        dtype=torch.bool)
    if dtype == "bool":
        subset = keep
    elif dtype == "float":
        subset = keep.to(DT)
    else:
        subset = keep.nonzero().flatten()
    if shape == "2-D":
        subset = subset[:, None]
    before = take_state(model)
    case = f"subset={subset.tolist()} for N={N}"
    bad = (dtype == "float" or shape == "2-D" or (dtype == "bool" and shape != "right")
           or not bool(keep.any()) or (dtype == "index" and shape == "long" and bool(keep[-1])))
    make = lambda: build("GradientCovariance", model, loss_fn, (X, y), subset=subset)  # noqa: E731
    if bad:
        A = run_case(model, before, lambda: make() @ torch.ones(_theta(model, names).numel(), dtype=DT),
                     ("subset", "mask", "sample"), case, max_forwards=1)
        assert A is None, f"{case}: expected a clear error, got a product"
        return
    A = make()
    mask = torch.zeros(N, dtype=torch.bool)
    mask[subset.long() if dtype == "index" else torch.nonzero(keep).flatten()] = True
    dense = oracle("GradientCovariance", model, names, loss_fn, X, y, subset=mask)
    check_products(A, dense, "torch-block", seed)
    assert_untouched(model, before)


# ---- 4. bad data: a clear error before heavy work, the model untouched --------------------------
BAD_DATA = ("samples-mismatch", "mse-target-shape", "ce-target-range", "ce-float-target-shape", "nan-X", "inf-X",
            "nan-y", "empty", "empty-batch-in-list", "X-float32", "X-float16", "X-bfloat16", "X-int", "X-meta", "y-meta", "X-only",
            "loss-class", "X-wrong-width", "one-shot-iterator")
TARGET_CASES = {"samples-mismatch", "mse-target-shape", "ce-target-range", "ce-float-target-shape", "nan-y", "y-meta",
                "X-only", "loss-class"}  # about targets or the loss: operators without a loss don't see them


@pytest.mark.parametrize("what", BAD_DATA)
@FUZZ_EACH
@given(data=st.data())
def test_bad_data_raises_a_clear_error(what, data):
    N = data.draw(st.integers(2, 5), label="N")
    bad_data_case(
        what=what,
        op=data.draw(st.sampled_from(PARAM_OPS if what in TARGET_CASES else ALL_OPS), label="operator"),
        loss_kind=data.draw(st.sampled_from(["mse", "cross_entropy"]), label="loss"),
        N=N,
        seed=data.draw(st.integers(0, 2**16), label="seed"),
        model_kind=data.draw(st.sampled_from(["mlp", "batchnorm-eval"]), label="model"),
        freeze=data.draw(st.booleans(), label="freeze"),
        at=data.draw(st.integers(0, N - 1), label="at"),
        label=data.draw(st.sampled_from([0, 4, -1, -7]), label="bad label offset"),
    )


def bad_data_case(what, op, loss_kind, N, seed, model_kind, freeze, at, label):
    """One bad-data case (also called directly by a sweep over every kind × operator)."""
    C = 2 if loss_kind == "mse" else 3
    model = make_model(model_kind, C, seed)
    names = dress(model, True, freeze)
    X, y = data_for(loss_kind, N, C, seed)
    loss_fn = nn.MSELoss() if loss_kind == "mse" else nn.CrossEntropyLoss()
    words: tuple[str, ...]
    exact_ok = False  # may the case instead give the exact answer (a documented conversion)?
    model_error = False  # may the error be the model's own (an input the model itself rejects)?
    if what == "samples-mismatch":
        y, words = y[:-1], ("samples", "size", "batch")
    elif what == "mse-target-shape":
        if loss_kind != "mse":
            return
        y, words = torch.randn(N, C + 1, dtype=DT), ("target",)
    elif what == "ce-target-range":
        if loss_kind != "cross_entropy":
            return
        y = y.clone()
        y[at] = C + label if label >= 0 else label
        words = ("target", "class")
    elif what == "ce-float-target-shape":
        if loss_kind != "cross_entropy":
            return
        y, words = torch.rand(N, C + 1, dtype=DT), ("target",)
    elif what in ("nan-X", "inf-X"):
        X = X.clone()
        X[at, 0] = float("nan") if what == "nan-X" else float("-inf")
        words = ("nan", "inf", "finite")
    elif what == "nan-y":
        if loss_kind != "mse":
            return
        y = y.clone()
        y[0, 0] = float("nan")
        words = ("nan", "inf", "finite")
    elif what == "empty":
        X, y, words = X[:0], y[:0], ("empty", "0 samples", "no sample")
    elif what == "empty-batch-in-list":
        dataset_list = [(X, y), (X[:0], y[:0])]
        words, exact_ok = ("empty", "0 samples", "no sample"), True
    elif what in ("X-float32", "X-float16", "X-bfloat16"):
        low = {"X-float32": torch.float32, "X-float16": torch.float16, "X-bfloat16": torch.bfloat16}[what]
        X, words, exact_ok = X.to(low), ("dtype", "float"), True  # cast (documented) or refused
    elif what == "X-int":
        X, words, model_error = (X * 10).long(), ("dtype", "int64", "long", "floating"), True
    elif what == "X-meta":
        X, words = X.to("meta"), ("device", "meta")
    elif what == "y-meta":
        y, words = y.to("meta"), ("device", "meta")
    elif what == "X-only":
        words = ("target", "data", "(X, y)", "pair")
    elif what == "loss-class":
        loss_fn, words = type(loss_fn), ("loss", "instance", "class")
    elif what == "X-wrong-width":
        X, words, model_error = torch.randn(N, D_IN + 1, dtype=DT), ("shape", "size", "input"), True
    elif what == "one-shot-iterator":
        words = ("iterator", "one-shot", "generator")
    else:
        raise AssertionError(what)

    if what == "empty-batch-in-list":
        dataset = dataset_list
    elif what == "X-only":
        dataset = X
    elif what == "one-shot-iterator":
        dataset = iter([(X, y)])
    else:
        dataset = (X, y)
    before = take_state(model)
    case = f"{op} with {what} ({loss_kind})"

    def make():
        if op in ("Jacobian", "NTK"):
            src = X if what != "one-shot-iterator" else iter([X])
            src = [X, X[:0]] if what == "empty-batch-in-list" else src
            A = (Jacobian if op == "Jacobian" else NTK)(model, src)
        else:
            A = build(op, model, loss_fn, dataset)
        return A, A @ torch.ones(A.shape[1], dtype=DT)

    res = run_case(model, before, make, words, case, max_forwards=2, model_error=model_error)
    if res is None:
        return
    assert exact_ok, f"{case}: expected a clear error, got a result"
    A, out = res
    Xc = X.to(DT) if what.startswith("X-") and what.endswith(("32", "16")) else X
    dense = oracle(op, model, names, loss_fn if not isinstance(loss_fn, type) else loss_fn(), Xc, y)
    assert_matches(out, dense @ torch.ones(dense.shape[1], dtype=DT), RTOL, case)


# ---- 5. bad parameters: NaN/Inf, meta, mixed dtypes -------------------------------------------
@pytest.mark.parametrize("op", ALL_OPS)
@FUZZ_EACH
@given(data=st.data())
def test_bad_parameters_raise_a_clear_error(op, data):
    bad_parameter_case(
        op=op,
        what=data.draw(st.sampled_from(["nan", "inf", "-inf"]), label="bad value"),
        where=data.draw(st.sampled_from(["frozen-unselected", "selected"]), label="in"),
        seed=data.draw(st.integers(0, 2**16), label="seed"),
        col=data.draw(st.integers(0, HIDDEN - 1), label="col"),
    )


def bad_parameter_case(op, what, where, seed, col):
    model = make_model("mlp", 2, seed)
    X, y = data_for("mse", 4, 2, seed)
    params = dict(model.named_parameters())
    target = params["2.weight"]
    with torch.no_grad():
        target[0, col] = float(what)
    kw = {}
    if where == "frozen-unselected":  # not differentiated, but still used by the forward
        kw["params"] = ["0.weight", "0.bias"]
    before = take_state(model)
    case = f"{op} with {what} in 2.weight ({where})"

    def make():
        A = build(op, model, nn.MSELoss(), (X, y), **kw)
        return A @ torch.ones(A.shape[1], dtype=DT)

    out = run_case(model, before, make, ("nan", "inf", "finite"), case, max_forwards=1)
    assert out is None, f"{case}: expected a clear error, got {out}"


# ---- 6. vectors of the wrong length, dtype, device or shape ------------------------------------
BAD_VECTORS = ("torch-short", "torch-long", "numpy-matvec-short", "numpy-matvec-long", "numpy-matmul-short",
               "numpy-rmatvec-short", "torch-float32", "torch-int", "torch-meta", "torch-3d", "dict-missing-key",
               "list-too-few", "torch-scalar")


@pytest.mark.parametrize("what", BAD_VECTORS)
@FUZZ_EACH
@given(data=st.data())
def test_bad_vectors_raise_a_clear_error(what, data):
    bad_vector_case(
        op=data.draw(st.sampled_from(ALL_OPS), label="operator"),
        what=what,
        seed=data.draw(st.integers(0, 2**16), label="seed"),
        delta=data.draw(st.integers(1, 3), label="off by"),
    )


def bad_vector_case(op, what, seed, delta):
    model = make_model("mlp", 2, seed)
    dress(model, True, False)
    X, y = data_for("mse", 3, 2, seed)
    A = build(op, model, nn.MSELoss(), (X, y))
    n = A.shape[1]
    words: tuple[str, ...] = (rf"\b{n}\b", "length", "shape")
    if what == "torch-short":
        call = lambda: A @ torch.ones(n - delta, dtype=DT)  # noqa: E731
    elif what == "torch-long":
        call = lambda: A @ torch.ones(n + delta, dtype=DT)  # noqa: E731
    elif what == "numpy-matvec-short":
        call = lambda: A.matvec(np.ones(n - delta))  # noqa: E731
    elif what == "numpy-matvec-long":
        call = lambda: A.matvec(np.ones(n + delta))  # noqa: E731
    elif what == "numpy-matmul-short":
        call = lambda: A @ np.ones(n - delta)  # noqa: E731
    elif what == "numpy-rmatvec-short":
        call = lambda: A.rmatvec(np.ones(A.shape[0] - delta))  # noqa: E731
        words = (rf"\b{A.shape[0]}\b", "length", "shape")
    elif what == "torch-float32":
        call, words = (lambda: A @ torch.ones(n, dtype=torch.float32)), ("dtype", "float32")
    elif what == "torch-int":
        call, words = (lambda: A @ torch.ones(n, dtype=torch.long)), ("dtype", "int64")
    elif what == "torch-meta":
        call, words = (lambda: A @ torch.ones(n, dtype=DT, device="meta")), ("device", "meta")
    elif what == "torch-3d":
        call, words = (lambda: A @ torch.ones(n, 2, 2, dtype=DT)), ("shape", "vector", "block")
    elif what == "dict-missing-key":
        if A.domain is None:
            return
        full = {k: torch.ones(s, dtype=DT) for k, s in zip(A.domain.names, A.domain.shapes)}
        full.pop(next(iter(full)))
        call, words = (lambda: A @ full), ("key", "missing", "param", "expected")
    elif what == "list-too-few":
        if A.domain is None:
            return
        call, words = (lambda: A @ [torch.ones(s, dtype=DT) for s in A.domain.shapes[:-1]]), \
            ("length", "expected", "param", "tensors")
    elif what == "torch-scalar":
        call, words = (lambda: A @ torch.tensor(1.0, dtype=DT)), ("shape", "vector", "scalar")
    else:
        raise AssertionError(what)
    before = take_state(model)
    out = run_case(model, before, call, words, f"{op} @ {what}", max_forwards=0)
    if what == "torch-scalar" and out is not None:  # A @ scalar may be defined as scaling, never a silent product
        assert isinstance(out, curvops.Operator), f"{op} @ 0-d tensor returned {type(out).__name__}"
        return
    assert out is None, f"{op} @ {what}: expected a clear error, got {type(out).__name__}"


# ---- 7. the model itself on a wrong device / a loss that cannot be used ------------------------
@pytest.mark.parametrize("op", ALL_OPS)
def test_model_on_meta_is_refused_at_construction(op):
    model = make_model("mlp", 2, 0).to("meta")
    X, y = data_for("mse", 3, 2, 0)
    with pytest.raises((ValueError, TypeError), match=r"(?i)meta|device"):
        A = build(op, model, nn.MSELoss(), (X, y))
        A @ torch.ones(A.shape[1], dtype=DT, device="meta")
