"""Real architectures (issue 11, item 5): every operator on every model of the real zoo, exact.

GPT-2, BERT (masked LM with padding, sequence classification), a Llama-style causal LM and T5 built
from tiny transformers configs with their default attention implementation; nn.TransformerEncoder
on its fused fast path; ResNet-style nets with BatchNorm (eval) and GroupNorm; LSTM and GRU
classifiers; tied weights; a legacy autograd.Function.  Each operator's 2-column product is checked
to 1e-10 (relative to the largest entry) against a dense float64 oracle built by plain reverse-mode
autograd on the concatenated data (curvops.testing.autograd_oracles: row by row, reverse over
reverse; no torch.func.hessian), with the loss the model's user means written out by hand
(curvops.testing.real_zoo).  Every product leaves the model exactly as found and torch's global
attention / fast-path / autograd settings as they were.
"""

from __future__ import annotations

import copy
from functools import lru_cache

import pytest

pytest.importorskip("transformers")

import numpy as np  # noqa: E402
import scipy.linalg  # noqa: E402
import torch  # noqa: E402
from torch.func import functional_call  # noqa: E402

import curvops  # noqa: E402
from curvops import (GGN, NTK, ActivationHessian, EmpiricalFisher, Fisher, GradientCovariance, Hessian,  # noqa: E402
                     Jacobian, Objective)
from curvops.testing import autograd_oracles as ao  # noqa: E402
from curvops.testing.contract import assert_unchanged, snapshot  # noqa: E402
from curvops.testing.real_zoo import CASES, call, concat, inputs_of, predict  # noqa: E402

D = torch.float64
NAMES = list(CASES)
RTOL = 1e-10


# ---- the model and its dense oracles (cached per model) --------------------------------------
@lru_cache(maxsize=None)
def pristine(name):
    return CASES[name].build()


def fresh(name):
    """A copy of the model for one test (tied parameters stay tied: deepcopy keeps sharing)."""
    return copy.deepcopy(pristine(name))


class Fn:
    """f(θ_flat, inputs) of the model by functional_call; θ = named_parameters() (tied ones once)."""

    def __init__(self, model):
        named = dict(model.named_parameters())
        self.model, self.names = model, list(named)
        self.shapes = [named[n].shape for n in self.names]
        self.sizes = [named[n].numel() for n in self.names]
        self.theta = torch.cat([named[n].detach().reshape(-1) for n in self.names]).clone()

    def __call__(self, theta, inputs):
        params = {n: t.reshape(s) for n, t, s in zip(self.names, torch.split(theta, self.sizes), self.shapes)}
        if isinstance(inputs, dict):
            return predict(functional_call(self.model, params, (), dict(inputs)))
        return predict(functional_call(self.model, params, (inputs,)))


def take(inputs, idx):
    if isinstance(inputs, dict):
        return {k: v[idx] for k, v in inputs.items()}
    return inputs[idx]


@lru_cache(maxsize=None)
def setup(name):
    case = CASES[name]
    model = pristine(name)
    X, Y = inputs_of(concat(case.batches()))
    return case, model, Fn(model), X, Y


def whole_loss(name):
    case, _, f, X, Y = setup(name)

    def L(theta):
        s, d = case.terms(f(theta, X), Y)
        return s / d
    return L


@lru_cache(maxsize=None)
def dense_hessian(name):
    _, _, f, _, _ = setup(name)
    return ao.hessian(whole_loss(name), f.theta)


@lru_cache(maxsize=None)
def dense_jacobian(name):
    """∂ vec f(X) / ∂θ of the raw prediction (HF logits [N, T, V]), sample-major rows."""
    _, _, f, X, _ = setup(name)
    return ao.jacobian(lambda th: f(th, X), f.theta)


@lru_cache(maxsize=None)
def outputs(name):
    _, _, f, X, _ = setup(name)
    with torch.no_grad():
        return f(f.theta, X)


@lru_cache(maxsize=None)
def dense_ggn(name):
    """Jᵀ H_f J with H_f the Hessian of the loss in output space (reverse over reverse)."""
    case, _, _, _, Y = setup(name)
    out = outputs(name)

    def Lf(o):
        s, d = case.terms(o.reshape(out.shape), Y)
        return s / d
    J = dense_jacobian(name)
    return J.T @ ao.hessian(Lf, out.reshape(-1)) @ J


@lru_cache(maxsize=None)
def dense_fisher(name):
    """The exact Fisher from its closed form per likelihood (not from the loss Hessian):
    softmax: Σ_counted J_tᵀ (diag p − p pᵀ) J_t / D; Gaussian (MSE): 2 JᵀJ / numel;
    Bernoulli: Jᵀ diag(s(1−s)) J / numel."""
    case, _, _, _, Y = setup(name)
    out, J = outputs(name), dense_jacobian(name)
    P = J.shape[1]
    if case.loss == "mse":
        return 2 * J.T @ J / out.numel()
    if case.loss == "bce_with_logits":
        s = torch.sigmoid(out).reshape(-1)
        return (J.T * (s * (1 - s))) @ J / out.numel()
    if case.loss == "cross_entropy":
        Jr, logits, w = J.reshape(*out.shape, P), out, torch.ones(out.shape[0], dtype=D)
        Jr, logits, w = Jr[:, None], logits[:, None], w[:, None]  # one "position" per sample
    else:
        Jr, logits, labels = J.reshape(*out.shape, P), out, Y
        if case.loss == "causal_lm":
            Jr, logits, labels = Jr[:, :-1], logits[:, :-1], labels[:, 1:]
        w = (labels != -100).to(D)
    p = torch.softmax(logits, dim=-1)  # [N, T, V]
    u = torch.einsum("ntvp,ntv->ntp", Jr, p)
    F = torch.einsum("ntvp,ntv,ntvq->pq", Jr, p * w[..., None], Jr) - torch.einsum("ntp,nt,ntq->pq", u, w, u)
    return F / w.sum()


@lru_cache(maxsize=None)
def sample_gradients(name):
    """Rows ∇ℓ_i: the loss of sample i run alone through the model (samples with no counted target left out)."""
    case, _, f, X, Y = setup(name)
    rows = []
    for i in range(Y.shape[0]):
        xi, yi = take(X, slice(i, i + 1)), Y[i:i + 1]
        if float(case.terms(outputs(name)[i:i + 1], yi)[1]) == 0:
            continue

        def li(th, xi=xi, yi=yi):
            s, d = case.terms(f(th, xi), yi)
            return (s / d).reshape(1)
        rows.append(ao.jacobian(li, f.theta)[0])
    return torch.stack(rows)


def live(theta):
    """θ recording gradients, as in training: the model runs its differentiable path (PyTorch's
    TransformerEncoder takes its fused fast path, nested tensors included, only when nothing
    needs a gradient)."""
    return theta.detach().clone().requires_grad_()


@lru_cache(maxsize=None)
def activation_shape(name):
    case, model, f, X, _ = setup(name)
    module = dict(model.named_modules())[case.layer]
    seen = []
    h = module.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    try:
        with ao.derivative_mode():
            f(live(f.theta), X)
    finally:
        h.remove()
    return seen[0]


def with_perturbation(name, layer, fn):
    """fn(δ_flat) evaluated with δ added to ``layer``'s output (a forward hook of our own)."""
    _, model, _, _, _ = setup(name)
    module = dict(model.named_modules())[layer]
    shape = activation_shape(name) if layer == CASES[name].layer else None

    def run(delta):
        h = module.register_forward_hook(lambda m, i, o: o + delta.reshape(shape or o.shape))
        try:
            return fn()
        finally:
            h.remove()
    return run


@lru_cache(maxsize=None)
def dense_activation_hessian(name):
    case, _, f, X, Y = setup(name)
    shape = activation_shape(name)

    def L():
        s, d = case.terms(f(live(f.theta), X), Y)
        return s / d
    run = with_perturbation(name, case.layer, L)
    return ao.hessian(run, torch.zeros(shape.numel(), dtype=D))


@lru_cache(maxsize=None)
def dense_layer_jacobian(name):
    case, _, f, X, _ = setup(name)
    run = with_perturbation(name, case.layer, lambda: f(live(f.theta), X))
    return ao.jacobian(run, torch.zeros(activation_shape(name).numel(), dtype=D))


# ---- what every product must leave alone --------------------------------------------------------
def global_state():
    """torch's process-wide settings a product might switch: SDPA backends and their priority, the
    fused transformer fast path, grad / inference mode, autocast."""
    return (
        torch._C._get_flash_sdp_enabled(), torch._C._get_mem_efficient_sdp_enabled(),
        torch._C._get_math_sdp_enabled(), torch._C._get_cudnn_sdp_enabled(),
        torch._C._get_overrideable_sdp_enabled(), tuple(torch._C._get_sdp_priority_order()),
        torch.backends.mha.get_fastpath_enabled(), torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
        torch.is_autocast_enabled("cpu"),
    )


def product(A, V, model, adjoint=False):
    before, settings = snapshot(model), global_state()
    out = (A.T if adjoint else A) @ V
    assert global_state() == settings, f"global settings changed: {settings} -> {global_state()}"
    assert_unchanged(before, snapshot(model))
    assert not model.training, "the model left eval mode"
    return out


def close(actual, expected, what, rtol=RTOL):
    """max |actual − expected| ≤ rtol · max |expected| (relative to the largest entry)."""
    assert isinstance(actual, torch.Tensor) and actual.shape == expected.shape, (what, getattr(actual, "shape", None))
    scale = float(expected.abs().max())
    err = float((actual - expected).abs().max())
    assert scale > 0, f"{what}: the oracle is zero (a test that cannot fail)"
    assert err <= rtol * scale, f"{what}: max error {err:.3g} > {rtol:g} × max entry {scale:.3g}"


def probes(n, k=2, seed=0):
    return torch.randn(n, k, dtype=D, generator=torch.Generator().manual_seed(seed))


def input_batches(name):
    return [inputs_of(b)[0] for b in CASES[name].batches()]


# ---- the cells --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_hessian(name):
    case, model = CASES[name], fresh(name)
    H = Hessian(model, case.loss, case.batches())
    V = probes(H.shape[1])
    close(product(H, V, model), dense_hessian(name) @ V, f"{name} Hessian")


@pytest.mark.parametrize("name", NAMES)
def test_ggn(name):
    case, model = CASES[name], fresh(name)
    G = GGN(model, case.loss, case.batches())
    V = probes(G.shape[1], seed=1)
    close(product(G, V, model), dense_ggn(name) @ V, f"{name} GGN")


@pytest.mark.parametrize("name", NAMES)
def test_fisher(name):
    case, model = CASES[name], fresh(name)
    F = Fisher(model, case.loss, case.batches())
    V = probes(F.shape[1], seed=2)
    close(product(F, V, model), dense_fisher(name) @ V, f"{name} Fisher")


@pytest.mark.parametrize("name", NAMES)
def test_empirical_fisher(name):
    case, model = CASES[name], fresh(name)
    E = EmpiricalFisher(model, case.loss, case.batches())
    G = sample_gradients(name)
    V = probes(E.shape[1], seed=3)
    close(product(E, V, model), G.T @ (G @ V) / G.shape[0], f"{name} EmpiricalFisher")


@pytest.mark.parametrize("name", NAMES)
def test_gradient_covariance(name):
    case, model = CASES[name], fresh(name)
    C = GradientCovariance(model, case.loss, case.batches(), center=True)
    G = sample_gradients(name)
    Gc = G - G.mean(0, keepdim=True)
    V = probes(C.shape[1], seed=4)
    close(product(C, V, model), Gc.T @ (Gc @ V) / G.shape[0], f"{name} GradientCovariance(center=True)")


@pytest.mark.parametrize("name", NAMES)
def test_jacobian(name):
    model = fresh(name)
    J = Jacobian(model, input_batches(name))
    Jd = dense_jacobian(name)
    V, W = probes(J.shape[1], seed=5), probes(J.shape[0], seed=6)
    close(product(J, V, model), Jd @ V, f"{name} Jacobian @ V")
    close(product(J, W, model, adjoint=True), Jd.T @ W, f"{name} Jacobian.T @ W")


@pytest.mark.parametrize("name", ["resnet_bn", "transformer_encoder"])
def test_jacobian_wrt_a_layer(name):
    model = fresh(name)
    J = Jacobian(model, input_batches(name), wrt=CASES[name].layer)
    Jd = dense_layer_jacobian(name)
    V, W = probes(J.shape[1], seed=7), probes(J.shape[0], seed=8)
    close(product(J, V, model), Jd @ V, f"{name} Jacobian wrt {CASES[name].layer} @ V")
    close(product(J, W, model, adjoint=True), Jd.T @ W, f"{name} Jacobian wrt layer .T @ W")


@pytest.mark.parametrize("name", NAMES)
def test_ntk(name):
    model = fresh(name)
    K = NTK(model, input_batches(name))
    Jd = dense_jacobian(name)
    W = probes(K.shape[1], seed=9)
    close(product(K, W, model), Jd @ (Jd.T @ W), f"{name} NTK")


@pytest.mark.parametrize("name", NAMES)
def test_activation_hessian(name):
    case, model = CASES[name], fresh(name)
    A = ActivationHessian(model, case.loss, case.batches(), layer=case.layer)
    V = probes(A.shape[1], seed=10)
    close(product(A, V, model), dense_activation_hessian(name) @ V, f"{name} ActivationHessian({case.layer})")


# ---- the loss is the user's; the oracle is the model's own gradient ---------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_loss_and_gradient_are_the_models_own(name):
    """The hand-written whole-data loss equals curvops' loss value, and for HuggingFace models the
    model's own loss on the concatenated data (HF upcasts logits to float32 in its causal-LM loss);
    its gradient equals the model's own backward (tied weights: both uses summed into one parameter)."""
    case, model = CASES[name], fresh(name)
    _, _, f, X, Y = setup(name)
    L = whole_loss(name)
    value = float(L(f.theta))
    assert abs(Objective(model, case.loss, case.batches()).loss_value() - value) <= 1e-12 * max(1.0, value)
    if case.huggingface:
        with torch.no_grad():
            hf = float(model(**concat(case.batches())).loss)
        assert abs(hf - value) <= 1e-6 * value, (hf, value)
        for b in case.batches():  # and batch by batch (different numbers of counted tokens)
            with torch.no_grad():
                hf = float(model(**b).loss)
            mine = Objective(model, case.loss, [b]).loss_value()
            assert abs(hf - mine) <= 1e-6 * mine, (hf, mine)
    m = fresh(name)
    s, d = case.terms(predict(call(m, X)), Y)
    (s / d).backward()
    own = torch.cat([p.grad.reshape(-1) for p in m.parameters()])
    th = f.theta.clone().requires_grad_()
    (g,) = torch.autograd.grad(L(th), th)
    close(g, own, f"{name} oracle gradient vs model backward", rtol=1e-12)
    close(Objective(model, case.loss, case.batches()).gradient(), own, f"{name} Objective.gradient", rtol=1e-12)


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert_mlm", "t5"])
def test_token_losses_do_not_depend_on_the_batch_split(name):
    """Batches with different numbers of counted tokens (and a sequence with none): the same matrix."""
    case, model = CASES[name], fresh(name)
    data = concat(case.batches())
    for bounds in ((0, 1, 5, 6), (0, 6), (0, 3, 4, 6)):
        batches = [{k: v[a:b] for k, v in data.items()} for a, b in zip(bounds[:-1], bounds[1:])]
        H = Hessian(model, case.loss, batches)
        V = probes(H.shape[1], seed=11)
        close(product(H, V, model), dense_hessian(name) @ V, f"{name} Hessian, batches {bounds}")


@pytest.mark.parametrize("name", ["gpt2", "bert_mlm"])
def test_eigsh_matches_scipy_on_the_dense_hessian(name):
    case, model = CASES[name], fresh(name)
    H = Hessian(model, case.loss, case.batches())
    settings, before = global_state(), snapshot(model)
    res = curvops.eigsh(H, k=3, which="LA", tol=1e-10, generator=0)
    assert global_state() == settings
    assert_unchanged(before, snapshot(model))
    want = scipy.linalg.eigh(dense_hessian(name).numpy(), eigvals_only=True)[-3:]
    np.testing.assert_allclose(res.eigenvalues.numpy(), want, rtol=1e-8, atol=1e-10 * abs(want).max())
    assert res.converged


def test_the_zoo_has_what_makes_these_models_hard():
    """Guards on the zoo itself: default (sdpa) attention, tied heads, the fused encoder fast path,
    a legacy Function that torch.func refuses, BatchNorm in eval mode."""
    for name in ("gpt2", "bert_mlm", "bert_cls", "llama", "t5"):
        assert pristine(name).config._attn_implementation == "sdpa", name
    gpt2 = pristine("gpt2")
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    assert "lm_head.weight" not in dict(gpt2.named_parameters())
    assert pristine("tied").mid2.weight is pristine("tied").mid.weight
    enc = pristine("transformer_encoder")
    nested = []
    h = enc.encoder.layers[0].register_forward_hook(lambda m, i, o: nested.append(o.is_nested))
    try:
        with torch.no_grad():
            call(enc, input_batches("transformer_encoder")[0])
    finally:
        h.remove()
    assert nested == [True], "the encoder no longer takes the fused fast path"
    legacy, x = pristine("legacy_function"), input_batches("legacy_function")[0]
    params = {k: v.detach() for k, v in legacy.named_parameters()}
    with pytest.raises(RuntimeError, match="setup_context"):
        torch.func.jvp(lambda p: functional_call(legacy, p, (x,)), (params,), (params,))
    bn = [m for m in pristine("resnet_bn").modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn and not any(m.training for m in bn) and all(float(m.running_var.min()) > 0.5 for m in bn)


def test_t5_batches_are_what_the_model_makes_from_labels():
    """T5's dict batch carries decoder_input_ids (labels shifted right behind the start token, as
    the model derives them when given labels alone): the model's own loss from labels alone is the
    same, so "token_cross_entropy" on the decoder logits is the user's loss."""
    model, batch = pristine("t5"), concat(CASES["t5"].batches())
    torch.testing.assert_close(model._shift_right(batch["labels"]), batch["decoder_input_ids"], rtol=0, atol=0)
    with torch.no_grad():
        own = float(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          labels=batch["labels"]).loss)
    assert abs(own - float(whole_loss("t5")(setup("t5")[2].theta))) <= 1e-12 * own


def test_stock_llama_with_float32_rms_norm():
    """transformers' own LlamaRMSNorm upcasts to float32 even in a float64 model, so the model's
    function carries float32 rounding: the Hessian (curvops' and the oracle's alike) is exact only to
    float32 level there; the zoo's Llama computes RMSNorm in float64 and is checked to 1e-10 above."""
    from curvops.testing.real_zoo import llama_stock

    case, model = CASES["llama"], llama_stock()
    f = Fn(model)
    X, Y = inputs_of(concat(case.batches()))

    def L(theta):
        s, d = case.terms(f(theta, X), Y)
        return s / d
    H_dense = ao.hessian(L, f.theta)
    H = Hessian(model, case.loss, case.batches())
    V = probes(H.shape[1], seed=12)
    close(product(H, V, model), H_dense @ V, "stock llama Hessian", rtol=1e-5)
