"""Exact paths for models whose kernels lack a derivative (contract rule 10): a legacy
autograd.Function (torch.func refuses it), the fused TransformerEncoderLayer fast path, fused
scaled-dot-product attention — every operator against dense reverse-mode oracles, with the path
reported and no global setting left behind."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvops
from curvops.testing.contract import assert_matches, assert_unchanged, snapshot

D = torch.float64


class LegacySquare(torch.autograd.Function):
    """x·|x| with a hand-written backward; old style: forward(ctx, …), no setup_context, no jvp."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x.abs()

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * g * x.abs()


class LegacyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.b(LegacySquare.apply(self.a(x)))


class EncoderNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(4, 2, 6, dropout=0.0, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.enc(x).mean(1))


def problem(kind):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if kind == "legacy":
        model, X = LegacyNet().to(D), torch.randn(7, 3, generator=g, dtype=D)
    else:
        model, X = EncoderNet().to(D).eval(), torch.randn(7, 3, 4, generator=g, dtype=D)
    return model, X, torch.randint(0, 3, (7,), generator=g)


def dense_oracles(model, X, y):
    """Hessian (row by row), GGN, per-sample gradients and the Jacobian, by plain torch.autograd
    (attention on its MATH backend: the fused CPU kernel has no double backward)."""
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
        return _dense_oracles(model, X, y)


def _dense_oracles(model, X, y):
    params = [p for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in params]).requires_grad_()
    sizes = [p.numel() for p in params]

    def f(th, x):
        parts = {n: t.reshape(p.shape) for n, t, p in zip(names, torch.split(th, sizes), params)}
        return torch.func.functional_call(model, parts, (x,))

    loss = nn.functional.cross_entropy(f(theta, X), y)
    (g,) = torch.autograd.grad(loss, theta, create_graph=True)
    H = torch.stack([torch.autograd.grad(g[i], theta, retain_graph=True)[0] for i in range(theta.numel())])
    out = f(theta, X)
    flat = out.reshape(-1)
    J = torch.stack([torch.autograd.grad(flat[i], theta, retain_graph=True)[0] for i in range(flat.numel())])
    p = torch.softmax(out.detach(), dim=1)
    H_out = torch.block_diag(*[torch.diag(pi) - torch.outer(pi, pi) for pi in p]) / X.shape[0]
    G = torch.stack([torch.autograd.grad(nn.functional.cross_entropy(f(theta, X[i:i + 1]), y[i:i + 1]), theta)[0]
                     for i in range(X.shape[0])])
    return {"H": H, "GGN": J.T @ H_out @ J, "EF": G.T @ G / X.shape[0], "J": J, "G": G}


@pytest.mark.parametrize("kind", ["legacy", "encoder"])
def test_every_operator_is_exact_on_models_without_some_derivative(kind):
    model, X, y = problem(kind)
    dense = dense_oracles(model, X, y)
    snap = snapshot(model)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    data = [(X[:4], y[:4]), (X[4:], y[4:])]
    P = dense["H"].shape[0]
    V = torch.randn(P, 3, dtype=D, generator=torch.Generator().manual_seed(2))
    ops = {
        "Hessian": (curvops.Hessian(model, "cross_entropy", data), dense["H"]),
        "GGN": (curvops.GGN(model, "cross_entropy", data), dense["GGN"]),
        "Fisher": (curvops.Fisher(model, "cross_entropy", data), dense["GGN"]),
        "EmpiricalFisher": (curvops.EmpiricalFisher(model, "cross_entropy", data), dense["EF"]),
        "GradientCovariance": (curvops.GradientCovariance(model, "cross_entropy", data), dense["EF"]),
    }
    for name, (A, M) in ops.items():
        for cols in (V[:, :1], V):  # the one-column kernels and the block kernels
            assert_matches(A @ cols, M @ cols, rtol=1e-10, what=f"{kind} {name} ({cols.shape[1]} columns)")
    if kind == "legacy":  # torch.func refuses the model: plain autograd ran
        assert "torch.autograd" in ops["GGN"][0].last_path
    J = curvops.Jacobian(model, [X[:4], X[4:]])
    assert_matches(J @ V, dense["J"] @ V, rtol=1e-10, what=f"{kind} J @ V")
    if kind == "legacy":
        assert "double-VJP" in J.last_path, J.last_path
    W = torch.randn(J.shape[0], 2, dtype=D, generator=torch.Generator().manual_seed(3))
    assert_matches(J.T @ W, dense["J"].T @ W, rtol=1e-10, what=f"{kind} J.T @ W")
    for cache in (True, False):
        K = curvops.NTK(model, X, cache_features=cache)
        assert_matches(K @ W, dense["J"] @ (dense["J"].T @ W), rtol=1e-10, what=f"{kind} NTK cache={cache}")
    assert_matches(curvops.NTK(model, X).to_dense(), dense["J"] @ dense["J"].T, rtol=1e-10, what="NTK dense")
    Gs, _ = curvops.GradientCovariance(model, "cross_entropy", data).sample_gradients()
    assert_matches(Gs, dense["G"], rtol=1e-10, what=f"{kind} per-sample gradients")
    assert_unchanged(snap, snapshot(model))
    assert torch.backends.mha.get_fastpath_enabled() == fastpath


def test_fastpath_setting_restored_when_a_product_raises():
    model, X, y = problem("encoder")
    H = curvops.Hessian(model, "cross_entropy", [(X, y), (X, y + 5)])  # batch 1: bad targets
    before = torch.backends.mha.get_fastpath_enabled()
    with pytest.raises(ValueError, match="batch 1"):
        H @ torch.zeros(H.shape[0], dtype=D)
    assert torch.backends.mha.get_fastpath_enabled() == before


def test_fused_attention_runs_exactly_and_the_backend_choice_does_not_leak():
    torch.manual_seed(0)

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(4, 4) for _ in range(4))

        def forward(self, x):
            a = nn.functional.scaled_dot_product_attention(self.q(x), self.k(x), self.v(x), is_causal=True)
            return self.o(a).mean(1)

    model = Attn().to(D)
    X, y = torch.randn(5, 3, 4, dtype=D), torch.randn(5, 4, dtype=D)
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    theta = torch.cat([p.detach().reshape(-1) for p in params]).requires_grad_()
    sizes = [p.numel() for p in params]

    def L(th):
        parts = {n: t.reshape(p.shape) for n, t, p in zip(names, torch.split(th, sizes), params)}
        with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):  # the oracle's own path
            return nn.functional.mse_loss(torch.func.functional_call(model, parts, (X,)), y)

    (g,) = torch.autograd.grad(L(theta), theta, create_graph=True)
    H = torch.stack([torch.autograd.grad(g[i], theta, retain_graph=True)[0] for i in range(theta.numel())])
    v = torch.randn(theta.numel(), 2, dtype=D)
    assert_matches(curvops.Hessian(model, "mse", (X, y)) @ v, H @ v, rtol=1e-10)
    flags = _sdp_flags()
    J = curvops.Jacobian(model, X)
    assert J.shape == (20, theta.numel())
    for i in range(2):  # forward mode through attention, against reverse-mode rows
        jv = J @ v[:, i]
        assert torch.isfinite(jv).all()
    assert _sdp_flags() == flags  # the backend choice is the caller's again


def _sdp_flags():
    b = torch.backends.cuda
    return (b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.math_sdp_enabled(), b.cudnn_sdp_enabled())
