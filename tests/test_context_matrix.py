r"""The context matrix (contract rules 8 and 9): every operator × every caller context.

Each cell builds an operator on a model of the zoo below, multiplies a block of two seeded
columns in one context and compares with a dense float64 oracle built by reverse-over-reverse
autograd on the concatenated data (:mod:`curvops.testing.autograd_oracles`, which shares no
code with the operators), to 1e-10 relative to the largest entry of the expected product.

Contexts
    * ``plain``; ``no_grad``; ``inference_mode`` (the vector is created inside it too);
      ``function_forward`` (``A @ v`` inside a custom ``autograd.Function.forward``, where grad
      mode is off — how GPyTorch multiplies); ``autocast_bf16`` (an ambient
      ``torch.autocast("cpu", dtype=torch.bfloat16)``); ``plain_float32`` (see below).  In these the operator's *first*
      product happens inside the context, so caches (kept graphs, NTK features, the centred
      covariance's mean) are built there.
    * model changes made *after* the operator was built and after one (checked) product, so
      caches exist: ``inplace_add`` (``with torch.no_grad(): p.add_(…)``), ``data_mul``
      (``p.data.mul_(…)``, no version bump), ``data_assign`` (``p.data = …``),
      ``vector_to_parameters`` and ``load_state_dict`` (parameters and buffers of another
      model).  The oracle is built at the new parameters and buffers.

Autocast never touches float64 tensors (they are not autocast-eligible), so the autocast
column runs a float32 copy of the model: its product must equal the float32 product of the
same operator built and multiplied outside autocast (bf16 would be ~1e-2 off) and the float64
oracle at the float32 model's values to float32 accuracy (1e-4 of the largest entry).  The
``plain_float32`` column is that float32 model without autocast, against the same oracle, so
a float32 defect is told apart from an autocast one.  The Monte-Carlo Fisher is random
(but seeded): it is compared with the same operator's product in the plain context (after a
model change: a fresh operator at the new state), to 1e-13.

In every cell the model is left exactly as found by the product
(:func:`curvops.testing.contract.snapshot`) and the caller's modes (grad, inference mode,
autocast and its dtype) are the same after the product as before it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

import curvops
from curvops.testing import autograd_oracles as ao
from curvops.testing.contract import assert_unchanged, probes, snapshot

N, BATCH, K = 10, 4, 2
TOL64, TOL32_ORACLE, TOL32_SAME, TOL_MC = 1e-10, 1e-4, 1e-6, 1e-13


# ---- the zoo ------------------------------------------------------------------------------------
class Attention(nn.Module):
    """LayerNorm → multi-head self-attention (train mode, dropout 0) with a residual → mean over
    the sequence → linear head."""

    def __init__(self, need_weights: bool = True):
        super().__init__()
        self.ln = nn.LayerNorm(4)
        self.attn = nn.MultiheadAttention(4, num_heads=2, dropout=0.0, batch_first=True)
        self.head = nn.Linear(4, 2)
        self.need_weights = need_weights

    def forward(self, x):
        h = self.ln(x)
        a, _ = self.attn(h, h, h, need_weights=self.need_weights)
        return self.head((h + a).mean(1))


def _seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build().double()
        for m in model.modules():  # non-trivial buffers: eval-mode BatchNorm uses them
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.copy_(0.5 * torch.randn(m.num_features, dtype=torch.float64))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, dtype=torch.float64))
                m.eval()
    return model


@dataclass(frozen=True)
class Spec:
    name: str
    loss: str  # "cross_entropy" | "mse"
    build: Callable[[], nn.Module] = field(repr=False)
    x_shape: tuple
    out_dim: int
    cross: tuple  # (rows, cols) parameter names for CrossHessian
    restrict: tuple  # parameter names for restrict(H, ...)
    layers: tuple | None = None  # (a, b): indices of nn.Sequential layers, a < b, for layer-wise ops

    def model(self, seed: int = 0) -> nn.Module:
        return _seeded(seed, self.build)

    def data(self) -> tuple[Tensor, Tensor]:
        gen = torch.Generator().manual_seed(11)
        X = torch.randn(N, *self.x_shape, generator=gen, dtype=torch.float64)
        if self.loss == "cross_entropy":
            y = torch.randint(0, self.out_dim, (N,), generator=gen)
        else:
            y = torch.randn(N, self.out_dim, generator=gen, dtype=torch.float64)
        return X, y

    def total_loss(self, out: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(out, y) if self.loss == "cross_entropy" else F.mse_loss(out, y)

    def sample_losses(self, out: Tensor, y: Tensor) -> Tensor:
        if self.loss == "cross_entropy":
            return F.cross_entropy(out, y, reduction="none")
        return F.mse_loss(out, y, reduction="none").mean(1)


SPECS = {s.name: s for s in [
    Spec("mlp", "cross_entropy",
         lambda: nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)),
         (4,), 3, ("0.weight", ("4.weight", "4.bias")), ("2.weight", "2.bias"), layers=(1, 3)),
    Spec("linear", "mse", lambda: nn.Sequential(nn.Linear(5, 2)), (5,), 2,
         ("0.weight", "0.bias"), ("0.bias",)),
    Spec("attn", "mse", Attention, (3, 4), 2,
         (("ln.weight", "ln.bias"), ("head.weight", "head.bias")), ("attn.out_proj.weight", "ln.bias")),
    Spec("bn", "cross_entropy",
         lambda: nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)),
         (4,), 3, (("1.weight", "1.bias"), "3.weight"), ("1.weight", "1.bias"), layers=(1, 2)),
]}

# ---- model changes (deterministic, so the oracle of each new state is built once) ----------------
def _deltas(model: nn.Module) -> list[Tensor]:
    gen = torch.Generator().manual_seed(123)
    return [0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in model.parameters()]


def _inplace_add(model, spec):
    with torch.no_grad():
        for p, d in zip(model.parameters(), _deltas(model)):
            p.add_(d)


def _data_mul(model, spec):
    for p, d in zip(model.parameters(), _deltas(model)):
        p.data.mul_(1 + d)


def _data_assign(model, spec):
    for p, d in zip(model.parameters(), _deltas(model)):
        p.data = (p.detach() + d).clone()


def _vector_to_parameters(model, spec):
    other = spec.model(seed=1).to(next(model.parameters()).dtype)
    vec = nn.utils.parameters_to_vector(other.parameters()).detach()
    nn.utils.vector_to_parameters(vec, model.parameters())


def _load_state_dict(model, spec):
    other = spec.model(seed=1).to(next(model.parameters()).dtype)
    model.load_state_dict(other.state_dict())


def _buffers_inplace(model, spec):
    with torch.no_grad():
        for b in model.buffers():
            if b.is_floating_point():
                b.mul_(1.5).add_(0.2)


def _buffers_assign(model, spec):
    for mod in model.modules():
        for name, b in list(mod.named_buffers(recurse=False)):
            if b.is_floating_point():
                setattr(mod, name, b * 1.5 + 0.2)


CHANGES = {"inplace_add": _inplace_add, "data_mul": _data_mul, "data_assign": _data_assign,
           "vector_to_parameters": _vector_to_parameters, "load_state_dict": _load_state_dict,
           "buffers_inplace": _buffers_inplace, "buffers_assign": _buffers_assign}
BUFFER_CHANGES = ("buffers_inplace", "buffers_assign")  # only on models with floating buffers (bn)
CALLER_CONTEXTS = ["plain", "no_grad", "inference_mode", "function_forward", "plain_float32", "autocast_bf16"]
FLOAT32_CONTEXTS = ("plain_float32", "autocast_bf16")
CONTEXTS = CALLER_CONTEXTS + list(CHANGES)


# ---- dense oracles per (model, state), built once ------------------------------------------------
class Oracle:
    """Dense float64 matrices of one model in one state, each built on first use."""

    def __init__(self, spec: Spec, model: nn.Module, X: Tensor, y: Tensor):
        self.spec, self.model, self.X, self.y = spec, model, X, y
        self.f = ao.ModuleFunction(model)
        self.theta = self.f.theta

    def loss(self, out: Tensor) -> Tensor:
        return self.spec.total_loss(out, self.y)

    def out(self, theta: Tensor) -> Tensor:
        return self.f(theta, self.X)

    def index(self, names) -> Tensor:
        names = [names] if isinstance(names, str) else list(names)
        off = self.f.offsets()
        return torch.cat([torch.arange(off[n].start, off[n].stop) for n in self.f.names if n in names])

    @cached_property
    def H(self):
        return ao.hessian(lambda th: self.loss(self.out(th)), self.theta)

    @cached_property
    def _ggn(self):
        return ao.ggn(self.out, self.loss, self.theta)

    @property
    def G(self):
        return self._ggn[0]

    @property
    def J(self):
        return self._ggn[1]

    @cached_property
    def sample_grads(self):
        X, y, spec = self.X, self.y, self.spec
        return ao.per_sample_gradients(
            lambda th, i: spec.sample_losses(self.f(th, X[i:i + 1]), y[i:i + 1]).sum(), self.theta, N)

    @cached_property
    def EF(self):
        return ao.second_moment(self.sample_grads)

    @cached_property
    def C_centered(self):
        return ao.second_moment(self.sample_grads, center=True)

    @cached_property
    def J_inputs(self):
        return ao.jacobian(lambda x: self.out_at(x.reshape(self.X.shape)), self.X.reshape(-1))

    def out_at(self, X):
        return self.f(self.theta, X)

    @cached_property
    def NTK(self):
        return self.J @ self.J.T

    @cached_property
    def weights_u(self):  # fixed output weights for OutputHessian
        return probes(N * self.spec.out_dim, 1, seed=5)[:, 0].reshape(N, self.spec.out_dim)

    @cached_property
    def output_hessian(self):
        return ao.hessian(lambda th: (self.weights_u * self.out(th)).sum(), self.theta)

    @cached_property
    def residual(self):
        out = self.out(self.theta).detach()
        r = ao.jacobian(lambda o: self.loss(o.reshape(out.shape)), out.reshape(-1)).reshape(out.shape)
        return ao.hessian(lambda th: (r * self.out(th)).sum(), self.theta)

    # layer-wise quantities of an nn.Sequential: F_a = model[:a+1](X), F_b = model[a+1:b+1](F_a)
    @cached_property
    def F_a(self):
        a = self.spec.layers[0]
        with torch.no_grad():
            return self.model[:a + 1](self.X)

    @cached_property
    def J_layer(self):  # ∂ vec f / ∂ vec F_a
        a, Fa = self.spec.layers[0], self.F_a
        return ao.jacobian(lambda z: self.model[a + 1:](z.reshape(Fa.shape)), Fa.reshape(-1))

    @cached_property
    def J_of(self):  # ∂ vec F_b / ∂θ
        b = self.spec.layers[1]
        return ao.jacobian(lambda th: self.f(th, self.X, module=self.model[:b + 1]), self.theta)

    @cached_property
    def J_layer_of(self):  # ∂ vec F_b / ∂ vec F_a
        (a, b), Fa = self.spec.layers, self.F_a
        return ao.jacobian(lambda z: self.model[a + 1:b + 1](z.reshape(Fa.shape)), Fa.reshape(-1))

    @cached_property
    def H_act(self):  # ∇²_{F_a} L
        a, Fa = self.spec.layers[0], self.F_a
        return ao.hessian(lambda z: self.loss(self.model[a + 1:](z.reshape(Fa.shape))), Fa.reshape(-1))

    @cached_property
    def H_act_cross(self):  # ∂²L / ∂F_a ∂F_b with additive perturbations at both layers
        (a, b), Fa = self.spec.layers, self.F_a
        with torch.no_grad():
            Fb = self.model[a + 1:b + 1](Fa)

        def L(da, db):
            zb = self.model[a + 1:b + 1](Fa + da.reshape(Fa.shape)) + db.reshape(Fb.shape)
            return self.loss(self.model[b + 1:](zb))

        return ao.mixed(L, torch.zeros(Fa.numel(), dtype=Fa.dtype), torch.zeros(Fb.numel(), dtype=Fb.dtype))

    @cached_property
    def response(self):
        L = response_objective(self.spec, self.model, self.X, self.y)
        h = torch.cat([torch.ones(1, dtype=torch.float64), torch.ones(N, dtype=torch.float64)])
        return ao.response_jacobian(lambda w, hh: L(self.f.unflatten(w), hh[0], hh[1:]), self.theta, h)


def response_objective(spec: Spec, model: nn.Module, X: Tensor, y: Tensor):
    """L(w, lam, s) = mean_i s_i ℓ_i(w) + ½ lam ‖w‖² (per-sample weights s and weight decay lam)."""

    def L(params, lam, s):
        out = functional_call(model, params, (X,))
        decay = sum((p ** 2).sum() for p in params.values())
        return (s * spec.sample_losses(out, y)).mean() + 0.5 * lam * decay

    return L


_ORACLES: dict[tuple[str, str], Oracle] = {}


def oracle(spec: Spec, state: str) -> Oracle:
    """The oracle of ``spec`` at ``state``: "base", "f32" (the float32 model's values) or a change."""
    key = (spec.name, state)
    if key not in _ORACLES:
        model = spec.model()
        X, y = spec.data()
        if state == "f32":
            model = model.float().double()
            X = X.float().double()
            y = y if spec.loss == "cross_entropy" else y.float().double()
        elif state != "base":
            CHANGES[state](model, spec)
        _ORACLES[key] = Oracle(spec, model, X, y)
    return _ORACLES[key]


# ---- operators -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setup:
    spec: Spec
    model: nn.Module
    X: Tensor
    y: Tensor

    @property
    def data(self):
        return (self.X, self.y)


def _layer(s: Setup, i: int) -> str:
    return str(s.spec.layers[i])


def _response(s: Setup):
    f64 = s.X.dtype == torch.float64
    hyper = {"lam": torch.tensor(1.0, dtype=s.X.dtype), "s": torch.ones(N, dtype=s.X.dtype)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", curvops.StationarityWarning)  # not at an optimum: J is still defined
        return curvops.ResponseJacobian(response_objective(s.spec, s.model, s.X, s.y), s.model, hyper,
                                        method="cg", assume_psd=True, rtol=1e-13 if f64 else 1e-6)


def _names(group) -> list[str]:
    return [group] if isinstance(group, str) else list(group)


@dataclass(frozen=True)
class OpCase:
    name: str
    build: Callable[[Setup], object]
    dense: Callable[[Oracle], Tensor] | None  # None: compare with the same operator in the plain context
    models: tuple = ("mlp", "linear", "attn", "bn")


def _fit(s: Setup, cls, **kw):
    return cls(s.model, s.spec.loss, s.data, batch_size=BATCH, **kw)


OPS = [
    OpCase("hessian", lambda s: _fit(s, curvops.Hessian), lambda o: o.H),
    OpCase("hessian_keep_graphs", lambda s: _fit(s, curvops.Hessian, keep_graphs=True), lambda o: o.H),
    OpCase("ggn", lambda s: _fit(s, curvops.GGN), lambda o: o.G),
    OpCase("fisher_exact", lambda s: _fit(s, curvops.Fisher), lambda o: o.G),
    OpCase("fisher_mc", lambda s: _fit(s, curvops.Fisher, mc_samples=3, seed=7), None),
    OpCase("empirical_fisher", lambda s: _fit(s, curvops.EmpiricalFisher), lambda o: o.EF),
    OpCase("jacobian_params", lambda s: curvops.Jacobian(s.model, s.X, batch_size=BATCH), lambda o: o.J),
    OpCase("jacobian_params.T", lambda s: curvops.Jacobian(s.model, s.X, batch_size=BATCH).T, lambda o: o.J.T),
    OpCase("jacobian_inputs", lambda s: curvops.Jacobian(s.model, s.X, batch_size=BATCH, wrt="inputs"),
           lambda o: o.J_inputs),
    OpCase("jacobian_inputs.T", lambda s: curvops.Jacobian(s.model, s.X, batch_size=BATCH, wrt="inputs").T,
           lambda o: o.J_inputs.T),
    OpCase("jacobian_layer", lambda s: curvops.Jacobian(s.model, s.X, batch_size=BATCH, wrt=_layer(s, 0)),
           lambda o: o.J_layer, ("mlp", "bn")),
    OpCase("jacobian_layer.T", lambda s: curvops.Jacobian(s.model, s.X, batch_size=BATCH, wrt=_layer(s, 0)).T,
           lambda o: o.J_layer.T, ("mlp", "bn")),
    OpCase("jacobian_of_layer", lambda s: curvops.Jacobian(s.model, s.X, batch_size=BATCH, of=_layer(s, 1)),
           lambda o: o.J_of, ("mlp", "bn")),
    OpCase("jacobian_of_layer.T", lambda s: curvops.Jacobian(s.model, s.X, batch_size=BATCH, of=_layer(s, 1)).T,
           lambda o: o.J_of.T, ("mlp", "bn")),
    OpCase("jacobian_layer_to_layer",
           lambda s: curvops.Jacobian(s.model, s.X, batch_size=BATCH, wrt=_layer(s, 0), of=_layer(s, 1)),
           lambda o: o.J_layer_of, ("mlp", "bn")),
    OpCase("ntk_cached", lambda s: curvops.NTK(s.model, s.X, batch_size=BATCH, cache_features=True),
           lambda o: o.NTK),
    OpCase("ntk_uncached", lambda s: curvops.NTK(s.model, s.X, batch_size=BATCH, cache_features=False),
           lambda o: o.NTK),
    OpCase("gradient_covariance", lambda s: _fit(s, curvops.GradientCovariance), lambda o: o.EF),
    OpCase("gradient_covariance_centered", lambda s: _fit(s, curvops.GradientCovariance, center=True),
           lambda o: o.C_centered),
    OpCase("activation_hessian", lambda s: _fit(s, curvops.ActivationHessian, layer=_layer(s, 0)),
           lambda o: o.H_act, ("mlp", "bn")),
    OpCase("activation_hessian_cross",
           lambda s: _fit(s, curvops.ActivationHessian, layer=_layer(s, 0), layer2=_layer(s, 1)),
           lambda o: o.H_act_cross, ("mlp", "bn")),
    OpCase("activation_hessian_cross.T",
           lambda s: _fit(s, curvops.ActivationHessian, layer=_layer(s, 0), layer2=_layer(s, 1)).T,
           lambda o: o.H_act_cross.T, ("mlp", "bn")),
    # zero for a model linear in θ: only on nonlinear models (a test that cannot fail is a defect)
    OpCase("output_hessian",
           lambda s: curvops.OutputHessian(s.model, s.X, oracle(s.spec, "base").weights_u.to(s.X.dtype),
                                           batch_size=BATCH),
           lambda o: o.output_hessian, ("mlp", "attn", "bn")),
    OpCase("hessian_residual", lambda s: _fit(s, curvops.HessianResidual), lambda o: o.residual,
           ("mlp", "attn", "bn")),
    OpCase("cross_hessian",
           lambda s: _fit(s, curvops.CrossHessian, rows=_names(s.spec.cross[0]), cols=_names(s.spec.cross[1])),
           lambda o: o.H[o.index(o.spec.cross[0])][:, o.index(o.spec.cross[1])]),
    OpCase("composite_H_minus_G", lambda s: _fit(s, curvops.Hessian) - _fit(s, curvops.GGN),
           lambda o: o.H - o.G, ("mlp", "attn", "bn")),
    OpCase("composite_2F_plus_G", lambda s: 2 * _fit(s, curvops.Fisher) + _fit(s, curvops.GGN),
           lambda o: 3 * o.G),
    OpCase("composite_restrict",
           lambda s: curvops.restrict(_fit(s, curvops.Hessian, keep_graphs=True), params=list(s.spec.restrict)),
           lambda o: o.H[o.index(o.spec.restrict)][:, o.index(o.spec.restrict)]),
    OpCase("response_jacobian", _response, lambda o: o.response, ("mlp", "linear")),
]

CELLS = [pytest.param(SPECS[m], op, ctx, id=f"{m}-{op.name}-{ctx}")
         for op in OPS for m in op.models for ctx in CONTEXTS
         if ctx not in BUFFER_CHANGES or m == "bn"]


def make_setup(spec: Spec, dtype=torch.float64) -> Setup:
    model = spec.model().to(dtype)
    X, y = spec.data()
    return Setup(spec, model, X.to(dtype), y if spec.loss == "cross_entropy" else y.to(dtype))


# ---- contexts ---------------------------------------------------------------------------------
def ambient() -> tuple:
    """The caller's modes a product must leave as they were."""
    return (torch.is_grad_enabled(), torch.is_inference_mode_enabled(), torch.is_autocast_enabled("cpu"),
            torch.get_autocast_dtype("cpu"))


def _checked_product(A, V: Tensor) -> Tensor:
    before = ambient()
    out = A @ V
    after = ambient()
    assert after == before, f"the product changed the caller's modes (grad, inference, autocast, dtype): " \
                            f"{before} -> {after}"
    return out


class _ProductInForward(torch.autograd.Function):
    """``A @ V`` inside ``forward`` (grad mode off there), as GPyTorch's linear_operator does."""

    @staticmethod
    def forward(ctx, V, A):
        assert not torch.is_grad_enabled()  # the context under test
        return _checked_product(A, V)

    @staticmethod
    def backward(ctx, grad_out):  # pragma: no cover - never differentiated here
        raise NotImplementedError


def product_in(context: str, A, V: Tensor) -> Tensor:
    if context == "no_grad":
        with torch.no_grad():
            return _checked_product(A, V)
    if context == "inference_mode":
        with torch.inference_mode():
            W = V.clone()  # created inside inference mode: an inference tensor
            assert W.is_inference()
            out = _checked_product(A, W)
        return out.clone()
    if context == "function_forward":
        return _ProductInForward.apply(V.clone().requires_grad_(True), A).detach()
    if context == "autocast_bf16":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _checked_product(A, V)
    return _checked_product(A, V)


def assert_close_rel(actual: Tensor, expected: Tensor, tol: float, what: str) -> None:
    """max |actual − expected| ≤ tol · max |expected| (float64 comparison)."""
    assert isinstance(actual, Tensor), f"{what}: expected a tensor, got {type(actual).__name__}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype in (torch.float64, torch.float32), f"{what}: dtype {actual.dtype}"
    a, e = actual.detach().double(), expected.detach().double()
    scale = float(e.abs().max())
    err = float((a - e).abs().max())
    assert scale > 0, f"{what}: the expected product is zero; this cell cannot fail"
    assert err <= tol * scale, (f"{what}: max error {err:.3e} = {err / scale:.3e} × max|expected| "
                                f"({scale:.3e}) > {tol:g}")


# ---- the matrix ----------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::curvops.StationarityWarning")  # moved off the optimum: J is still defined
@pytest.mark.parametrize("spec, op, context", CELLS)
def test_context_matrix(spec: Spec, op: OpCase, context: str):
    dtype = torch.float32 if context in FLOAT32_CONTEXTS else torch.float64
    s = make_setup(spec, dtype)
    A = op.build(s)
    V = probes(A.shape[1], K, seed=1).to(dtype)
    if context in CHANGES:
        # one product first (caches exist), then the model changes under the operator
        first = product_in("plain", A, V)
        if op.dense is not None:
            assert_close_rel(first, op.dense(oracle(spec, "base")) @ V, TOL64, "product before the change")
        CHANGES[context](s.model, spec)
        state = context
    else:
        state = "f32" if dtype == torch.float32 else "base"
    # the reference for random and float32 cells: the same operator, built now, multiplied in plain mode
    reference = None
    if op.dense is None or context == "autocast_bf16":
        reference = product_in("plain", op.build(s), V)
    before = snapshot(s.model)
    out = product_in(context, A, V)
    assert_unchanged(before, snapshot(s.model))
    assert out.dtype == dtype, f"product dtype {out.dtype}, expected {dtype}"
    if op.dense is None:
        assert_close_rel(out, reference, TOL_MC, f"{context}: Monte-Carlo product vs the plain-context product")
        return
    expected = op.dense(oracle(spec, state)) @ V.double()
    if dtype == torch.float32:
        if reference is not None:
            assert_close_rel(out, reference, TOL32_SAME, f"{context}: float32 product vs the same outside autocast")
        assert_close_rel(out, expected, TOL32_ORACLE, f"{context}: float32 product vs the float64 oracle")
    else:
        assert_close_rel(out, expected, TOL64, f"{context}: product vs the dense oracle")


def test_oracles_agree_with_each_other():
    """Cross-checks of the oracles themselves: H = GGN + residual; EF = covariance + μμᵀ; the MLP
    Hessian is not the GGN (so cells comparing the two can fail)."""
    o = oracle(SPECS["mlp"], "base")
    assert_close_rel(o.G + o.residual, o.H, 1e-12, "H = G + R")
    mu = o.sample_grads.mean(0)
    assert_close_rel(o.C_centered + torch.outer(mu, mu), o.EF, 1e-12, "EF = C + μμᵀ")
    assert float((o.H - o.G).abs().max()) > 1e-3 * float(o.H.abs().max())
    # the reverse-over-reverse Hessian through LayerNorm and attention against central differences
    # of the gradient (independent of any second-order autograd formula)
    o = oracle(SPECS["attn"], "base")
    v = probes(o.theta.numel(), 1, seed=3)[:, 0]
    grad_at = lambda th: ao.jacobian(lambda t: o.loss(o.out(t)), th)[0]  # noqa: E731
    eps = 1e-5
    fd = (grad_at(o.theta + eps * v) - grad_at(o.theta - eps * v)) / (2 * eps)
    assert_close_rel(o.H @ v, fd, 1e-6, "attn: H v vs central differences of the gradient")
    for name in CHANGES:  # every change really changes the matrix
        changed = oracle(SPECS["bn"], name)
        assert float((changed.H - oracle(SPECS["bn"], "base").H).abs().max()) > 1e-3, name
        assert float((changed.H - oracle(SPECS["bn"], "f32").H).abs().max()) > 1e-3, name


# ---- rule 10 beside the matrix: attention on torch's fused SDPA kernel ----------------------------
@pytest.mark.parametrize("context", ["plain", "no_grad"])
@pytest.mark.parametrize("op", [op for op in OPS if op.name in (
    "hessian", "ggn", "empirical_fisher", "jacobian_params", "ntk_uncached", "gradient_covariance_centered")],
    ids=lambda op: op.name)
def test_attention_on_fused_sdpa_kernel(op: OpCase, context: str):
    """``need_weights=False`` sends nn.MultiheadAttention through scaled_dot_product_attention, whose
    fused CPU kernel has no double-backward or forward-mode formula; products must still be exact
    (rule 10: curvature passes run the kernels on paths with the derivatives they need)."""
    spec = SPECS["attn"]
    s = make_setup(spec)
    s.model.need_weights = False
    A = op.build(s)
    V = probes(A.shape[1], K, seed=1)
    before = snapshot(s.model)
    out = product_in(context, A, V)
    assert_unchanged(before, snapshot(s.model))
    assert_close_rel(out, op.dense(oracle(spec, "base")) @ V, TOL64, f"{context}: fused-SDPA attention")
