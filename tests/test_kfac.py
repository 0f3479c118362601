"""KFAC and EKFAC: exactness against dense oracles, curvlinops, identities, inverses, errors.

The oracles here are naive dense computations on the concatenated data (a full Jacobian and the
loss Hessian in output space by torch.autograd.functional; per-sample gradients by a loop), sharing
no code with the operators.  Tolerances: every exact identity holds to rounding of float64 products
of a few hundred terms (1e-10 relative leaves ~10⁵ ulps of room); the MC test's tolerance comes from
the variance measured across independent seeds.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch
from torch import nn
from torch.func import functional_call

import curvops
from curvops.testing import contract

DT = torch.float64
LOSSES = {"mse": nn.MSELoss, "cross_entropy": nn.CrossEntropyLoss, "bce_with_logits": nn.BCEWithLogitsLoss}


def _needs_curvlinops():
    """curvlinops, or a skip — an error in CI, where it is installed (CURVOPS_REQUIRE_CURVLINOPS=1)."""
    if os.environ.get("CURVOPS_REQUIRE_CURVLINOPS") == "1":
        import curvlinops  # noqa: F401 - CI installed it: a failed import is a failure, not a skip
        return curvlinops
    return pytest.importorskip("curvlinops", reason="curvlinops-for-pytorch==3.0.1 not installed; pip install "
                               "--no-deps curvlinops-for-pytorch==3.0.1 einops einconv opt-einsum")


# ---- models and data -------------------------------------------------------------------------
def mlp(seed=1, d_in=5, hidden=4, C=3, act=nn.Tanh):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), act(), nn.Linear(hidden, C)).to(DT)


def convnet(seed=1):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 2, stride=2), nn.Flatten(),
                         nn.Linear(18, 3)).to(DT)


def data(arch, kind, n=10, C=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 5, generator=g, dtype=DT) if arch == "mlp" else torch.randn(n, 2, 6, 6, generator=g, dtype=DT)
    if kind == "cross_entropy":
        y = torch.randint(0, C, (n,), generator=g)
    elif kind == "mse":
        y = torch.randn(n, C, generator=g, dtype=DT)
    else:  # binary labels (curvlinops' type-2 BCE needs them)
        y = torch.randint(0, 2, (n, C), generator=g).to(DT)
    return X, y


def rel(A, B):
    return float(torch.linalg.matrix_norm(A - B) / torch.linalg.matrix_norm(B))


# ---- dense oracles -----------------------------------------------------------------------------
def _flat_fn(model):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(flat, x):
        parts, s = {}, 0
        for n, sh in zip(names, shapes):
            k = sh.numel()
            parts[n] = flat[s:s + k].reshape(sh)
            s += k
        return functional_call(model, parts, (x,))
    return theta, f


def ggn_oracle(model, loss, X, y):
    """Jᵀ (∇²_f loss) J on all the data at once (torch's own normalization)."""
    theta, f = _flat_fn(model)
    out = f(theta, X)
    J = torch.autograd.functional.jacobian(lambda t: f(t, X).reshape(-1), theta)
    H = torch.autograd.functional.hessian(lambda o: loss(o.reshape(out.shape), y), out.detach().reshape(-1))
    return J.T @ H @ J


def ef_oracle(model, loss, X, y):
    """(1/N) Σ ∇ℓ_i ∇ℓ_iᵀ ('mean'), Σ ∇ℓ_i ∇ℓ_iᵀ ('sum'), ℓ_i the loss of sample i alone."""
    rows = []
    for i in range(X.shape[0]):
        g = torch.autograd.grad(loss(model(X[i:i + 1]), y[i:i + 1]), list(model.parameters()))
        rows.append(torch.cat([t.reshape(-1) for t in g]))
    G = torch.stack(rows)
    return G.T @ G / (X.shape[0] if loss.reduction == "mean" else 1)


def theta_index(model, rec):
    """Flat-parameter indices of a layer's Θ = [W | b] in row-major order (independent of curvops)."""
    offsets, s = {}, 0
    for n, p in model.named_parameters():
        offsets[n] = s
        s += p.numel()
    d_out = rec.B.shape[0]
    idx = torch.empty(d_out, rec.A.shape[0], dtype=torch.long)
    if rec.weight is not None:
        W = dict(model.named_parameters())[rec.weight]
        d_in = W[0].numel()
        idx[:, :d_in] = offsets[rec.weight] + torch.arange(d_out * d_in).reshape(d_out, d_in)
    if rec.bias is not None:
        idx[:, -1] = offsets[rec.bias] + torch.arange(d_out)
    return idx.reshape(-1)


# ---- exactness -----------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bias", [True, False])
def test_single_linear_layer_mse_is_the_exact_ggn(reduction, bias):
    torch.manual_seed(0)
    model = nn.Linear(4, 3, bias=bias).to(DT)
    X, Y = torch.randn(11, 4, dtype=DT), torch.randn(11, 3, dtype=DT)
    loss = nn.MSELoss(reduction=reduction)
    G = ggn_oracle(model, loss, X, Y)
    for approx in ("expand", "reduce"):
        K = curvops.KFAC(model, loss, (X, Y), batch_size=4, kfac_approx=approx)
        assert rel(K.to_dense(), G) < 1e-10


def test_one_data_point_blocks_are_exact_and_cross_blocks_zero():
    """N = 1: every layer's GGN block is (āāᵀ) ⊗ Σ_c g_c g_cᵀ exactly, for any network and loss."""
    model = mlp()
    X, y = data("mlp", "cross_entropy", n=1)
    loss = nn.CrossEntropyLoss()
    K = curvops.KFAC(model, loss, (X, y))
    G, Kd = ggn_oracle(model, loss, X, y), K.to_dense()
    sizes = [p.numel() for p in model.parameters()]
    bounds = [0, sizes[0] + sizes[1], sum(sizes)]  # layer 0: weight+bias, layer 2: weight+bias
    for a, b in zip(bounds[:-1], bounds[1:]):
        assert rel(Kd[a:b, a:b], G[a:b, a:b]) < 1e-10
    assert float(Kd[:bounds[1], bounds[1]:].abs().max()) == 0.0
    assert float(G[:bounds[1], bounds[1]:].abs().max()) > 1e-3  # the GGN itself has cross blocks
    EF = curvops.KFAC(model, loss, (X, y), fisher_type="empirical").to_dense()
    EFd = ef_oracle(model, loss, X, y)
    for a, b in zip(bounds[:-1], bounds[1:]):
        assert rel(EF[a:b, a:b], EFd[a:b, a:b]) < 1e-10


def test_deep_linear_network_mse_blocks_are_exact():
    """A deep linear network with MSE has a Jacobian w.r.t. each layer's output that is the same for every
    sample, so B is sample-independent and KFAC's diagonal blocks equal the GGN's for any N."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3), nn.Linear(3, 2)).to(DT)
    X, Y = torch.randn(9, 4, dtype=DT), torch.randn(9, 2, dtype=DT)
    loss = nn.MSELoss()
    Kd = curvops.KFAC(model, loss, (X, Y), batch_size=4).to_dense()
    G = ggn_oracle(model, loss, X, Y)
    s = 0
    for layer in model:
        n = sum(p.numel() for p in layer.parameters())
        assert rel(Kd[s:s + n, s:s + n], G[s:s + n, s:s + n]) < 1e-10
        s += n
    assert rel(Kd, G) > 0.1  # but not the cross-layer blocks


def test_doubling_the_data_leaves_kfac_unchanged_and_batch_split_invariant():
    model = mlp()
    X, y = data("mlp", "cross_entropy", n=8)
    K1 = curvops.KFAC(model, "cross_entropy", (X, y), batch_size=3).to_dense()
    K2 = curvops.KFAC(model, "cross_entropy", (torch.cat([X, X]), torch.cat([y, y])), batch_size=5).to_dense()
    assert rel(K2, K1) < 1e-12


def test_ignore_index_factors_follow_the_whole_data_normalization():
    """Cross-entropy with -100 targets: B = Σ_{kept} (diag p − ppᵀ) / D (D = kept targets of all the data),
    A = mean of āāᵀ over the rows of the batches; checked explicitly on a single linear layer."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3).to(DT)
    X = torch.randn(10, 4, dtype=DT)
    y = torch.tensor([0, 2, -100, 1, -100, 0, 1, 2, -100, 1])
    K = curvops.KFAC(model, "cross_entropy", (X, y), batch_size=4)
    (rec,) = K.kron_factors()
    keep = y != -100
    p = torch.softmax(model(X), 1).detach()
    B = sum(torch.diag(p[i]) - torch.outer(p[i], p[i]) for i in range(10) if keep[i]) / keep.sum()
    Xa = torch.cat([X, torch.ones(10, 1, dtype=DT)], 1)
    torch.testing.assert_close(rec.B, B, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(rec.A, Xa.T @ Xa / 10, rtol=1e-12, atol=1e-14)
    K5 = curvops.KFAC(model, "cross_entropy", (X, y), batch_size=5).to_dense()
    assert rel(K5, K.to_dense()) < 1e-12


CL_CASES = list(itertools.product(["mlp", "conv"], ["mse", "cross_entropy", "bce_with_logits"],
                                  ["type-2", "empirical"], ["expand", "reduce"]))


@pytest.mark.parametrize("arch,kind,fisher_type,approx", CL_CASES, ids=["-".join(c) for c in CL_CASES])
def test_matches_curvlinops_kfac(arch, kind, fisher_type, approx):
    """curvlinops' KFACLinearOperator with weight and bias in one block: the same matrix, times κ = C for
    the empirical Fisher of a 'mean' MSE/BCE (docs/conventions.md), on different batch splits."""
    cl = _needs_curvlinops()
    model = mlp() if arch == "mlp" else convnet()
    X, y = data(arch, kind)
    loss = LOSSES[kind]()
    P = sum(p.numel() for p in model.parameters())
    A = cl.KFACLinearOperator(model, loss, list(model.parameters()), [(X[:4], y[:4]), (X[4:], y[4:])],
                              fisher_type=fisher_type, kfac_approx=approx, separate_weight_and_bias=False,
                              check_deterministic=False) @ torch.eye(P, dtype=DT)
    B = curvops.KFAC(model, loss, (X, y), batch_size=3, fisher_type=fisher_type, kfac_approx=approx).to_dense()
    kappa = 3.0 if (fisher_type == "empirical" and kind != "cross_entropy") else 1.0
    assert rel(kappa * B, A) < 1e-10


class TinyAttention(nn.Module):
    """Linear q, k, v, o on [n, T, d]: weight sharing over positions and mixing between them."""

    def __init__(self, d=4, C=3, classes_first=False):
        super().__init__()
        self.q, self.k, self.v, self.o = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, C)
        self.classes_first = classes_first

    def forward(self, x):
        att = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2) / 2, dim=-1)
        out = self.o(torch.tanh(att @ self.v(x)))
        return out.movedim(-1, 1) if self.classes_first else out


@pytest.mark.parametrize("kind", ["mse", "cross_entropy"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_sequence_attention_matches_curvlinops(kind, approx):
    """Sequence outputs: the same convention as curvlinops for type-2 (factor 1); the empirical KFAC
    differs by T·C (MSE) or T (cross-entropy): curvops' per-sample ℓ_i averages over the positions."""
    cl = _needs_curvlinops()
    torch.manual_seed(0)
    model = TinyAttention(classes_first=kind == "cross_entropy").to(DT)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(6, 5, 4, generator=g, dtype=DT)
    y = torch.randint(0, 3, (6, 5), generator=g) if kind == "cross_entropy" else torch.randn(6, 5, 3, generator=g,
                                                                                               dtype=DT)
    loss = LOSSES[kind]()
    P = sum(p.numel() for p in model.parameters())
    for fisher_type, factor in (("type-2", 1.0), ("empirical", 15.0 if kind == "mse" else 5.0)):
        A = cl.KFACLinearOperator(model, loss, list(model.parameters()), [(X[:4], y[:4]), (X[4:], y[4:])],
                                  fisher_type=fisher_type, kfac_approx=approx, separate_weight_and_bias=False,
                                  check_deterministic=False) @ torch.eye(P, dtype=DT)
        B = curvops.KFAC(model, loss, (X, y), batch_size=3, fisher_type=fisher_type, kfac_approx=approx).to_dense()
        assert rel(factor * B, A) < 1e-10


@pytest.mark.parametrize("arch,fisher_type", [("mlp", "type-2"), ("mlp", "empirical"), ("conv", "type-2"),
                                              ("conv", "empirical")])
def test_ekfac_eigenvalues_are_the_best_diagonal_in_the_kfac_eigenbasis(arch, fisher_type):
    """λ = diag(Qᵀ G_l Q) with Q = Q_B ⊗ Q_A (row-major Θ) and G_l the exact block (GGN or EF): the
    diagonal that minimizes ‖Q diag(λ) Qᵀ − G_l‖_F; and EKFAC's dense block is Q diag(λ) Qᵀ."""
    model = mlp() if arch == "mlp" else convnet()
    X, y = data(arch, "cross_entropy")
    loss = nn.CrossEntropyLoss()
    exact = (ggn_oracle if fisher_type == "type-2" else ef_oracle)(model, loss, X, y)
    E = curvops.EKFAC(model, loss, (X, y), batch_size=4, fisher_type=fisher_type)
    K = curvops.KFAC(model, loss, (X, y), batch_size=4, fisher_type=fisher_type)
    Ed = E.to_dense()
    for rec, lam in zip(K.kron_factors(), E.eigenvalues()):
        idx = theta_index(model, rec)
        G = exact[idx][:, idx]
        Q = torch.kron(torch.linalg.eigh(rec.B)[1], torch.linalg.eigh(rec.A)[1])
        best = torch.diagonal(Q.T @ G @ Q)
        torch.testing.assert_close(lam.reshape(-1), best, rtol=1e-10, atol=1e-12 * float(best.abs().max()))
        torch.testing.assert_close(Ed[idx][:, idx], Q @ torch.diag(best) @ Q.T, rtol=1e-10, atol=1e-13)
        dist = torch.linalg.matrix_norm(Q @ torch.diag(best) @ Q.T - G)
        for _ in range(3):  # any other diagonal is farther away
            other = best + 1e-3 * float(best.abs().max()) * torch.randn_like(best)
            assert torch.linalg.matrix_norm(Q @ torch.diag(other) @ Q.T - G) > dist
    torch.testing.assert_close(E.trace(), torch.trace(exact), rtol=1e-10, atol=0)


# ---- inverse, logdet, trace, det -----------------------------------------------------------------
@pytest.mark.parametrize("cls", [curvops.KFAC, curvops.EKFAC])
def test_inverse_logdet_trace_det_match_dense(cls):
    model = convnet()
    X, y = data("conv", "cross_entropy")
    K = cls(model, "cross_entropy", (X, y), batch_size=4)
    Kd = K.to_dense()
    P, d = Kd.shape[0], 1e-2
    I = torch.eye(P, dtype=DT)
    Kinv = K.inverse(damping=d)
    assert Kinv.is_psd and K.is_psd and K.is_symmetric
    torch.testing.assert_close(Kinv @ (Kd + d * I), I, rtol=0, atol=1e-10)
    torch.testing.assert_close(Kd, Kd.T, rtol=0, atol=1e-14)
    torch.testing.assert_close(K.logdet(d), torch.logdet(Kd + d * I), rtol=1e-10, atol=0)
    torch.testing.assert_close(K.trace(), torch.trace(Kd), rtol=1e-12, atol=0)
    small = torch.linalg.eigvalsh(Kd)
    torch.testing.assert_close(K.det(1.0), torch.prod(small + 1.0), rtol=1e-10, atol=0)
    # undamped, on a model whose factors are full rank (MSE: B has no null space, unlike cross-entropy's)
    model = mlp()
    X, y = data("mlp", "mse", n=30)
    K = cls(model, "mse", (X, y))
    Kd = K.to_dense()
    assert float(torch.linalg.eigvalsh(Kd).min()) > 1e-8
    torch.testing.assert_close(K.logdet(), torch.logdet(Kd), rtol=1e-10, atol=0)


def test_pi_damping_inverts_the_damped_factors():
    model = mlp()
    X, y = data("mlp", "cross_entropy")
    K = curvops.KFAC(model, "cross_entropy", (X, y))
    d = 1e-2
    Kinv = K.inverse(d, pi_damping=True).to_dense()
    for rec in K.kron_factors():
        idx = theta_index(model, rec)
        pi = ((torch.trace(rec.A) / rec.A.shape[0]) / (torch.trace(rec.B) / rec.B.shape[0])).sqrt()
        Ad = rec.A + pi * d**0.5 * torch.eye(rec.A.shape[0], dtype=DT)
        Bd = rec.B + d**0.5 / pi * torch.eye(rec.B.shape[0], dtype=DT)
        torch.testing.assert_close(Kinv[idx][:, idx], torch.kron(torch.linalg.inv(Bd), torch.linalg.inv(Ad)),
                                   rtol=1e-10, atol=1e-10)
    exact = K.inverse(d).to_dense()
    assert rel(Kinv, exact) > 1e-3  # a different matrix, as documented


def test_skip_unsupported_gives_zero_blocks_and_damping_only_inverse():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    X, y = torch.randn(8, 3, dtype=DT), torch.randint(0, 2, (8,))
    with pytest.raises(ValueError, match=r"1\.weight \(in 1: LayerNorm\).*skip_unsupported=True"):
        curvops.KFAC(model, "cross_entropy", (X, y))
    K = curvops.KFAC(model, "cross_entropy", (X, y), skip_unsupported=True)
    assert K.skipped == ["1.weight (in 1: LayerNorm)", "1.bias (in 1: LayerNorm)"]
    Kd = K.to_dense()
    ln = slice(16, 24)
    assert float(Kd[ln].abs().max()) == 0.0 and float(Kd[:, ln].abs().max()) == 0.0
    d = 0.1
    I = torch.eye(Kd.shape[0], dtype=DT)
    torch.testing.assert_close(K.inverse(d) @ (Kd + d * I), I, rtol=0, atol=1e-10)
    torch.testing.assert_close(K.logdet(d), torch.logdet(Kd + d * I), rtol=1e-10, atol=0)
    # layers= selects those layers' parameters
    K3 = curvops.KFAC(model, "cross_entropy", (X, y), layers=["3"])
    assert K3.shape == (10, 10)
    torch.testing.assert_close(K3.to_dense(), Kd[24:, 24:], rtol=1e-12, atol=1e-15)


def test_weight_only_and_bias_only_selections_are_sub_blocks():
    model = mlp()
    X, y = data("mlp", "cross_entropy")
    full = curvops.KFAC(model, "cross_entropy", (X, y)).to_dense()
    for names, idx in ((["0.weight"], slice(0, 20)), (["2.bias"], slice(36, 39)),
                       (["0.weight", "2.bias"], [*range(20), *range(36, 39)])):
        sub = curvops.KFAC(model, "cross_entropy", (X, y), params=names).to_dense()
        ref = full[idx][:, idx] if isinstance(idx, slice) else full[idx][:, idx]
        torch.testing.assert_close(sub, ref, rtol=1e-12, atol=1e-15)


def test_hf_conv1d_equals_the_transposed_linear():
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(3, 4).to(DT)  # nf=3 outputs, nx=4 inputs, weight [4, 3]
    lin = nn.Linear(4, 3).to(DT)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.T)
        lin.bias.copy_(conv.bias)
    X, Y = torch.randn(7, 2, 4, dtype=DT), torch.randn(7, 2, 3, dtype=DT)
    Kc = curvops.KFAC(conv, "mse", (X, Y)).to_dense()
    Kl = curvops.KFAC(lin, "mse", (X, Y)).to_dense()
    perm = torch.arange(12).reshape(3, 4).T.reshape(-1)  # Conv1D's flat index i·3 + o ↔ Linear's o·4 + i
    perm = torch.cat([perm, torch.arange(12, 15)])
    torch.testing.assert_close(Kc, Kl[perm][:, perm], rtol=1e-12, atol=1e-15)
    assert transformers is not None


# ---- Monte Carlo ------------------------------------------------------------------------------------
def test_mc_is_unbiased_for_type2_within_its_measured_variance():
    model = mlp()
    X, y = data("mlp", "cross_entropy", n=12)
    exact = curvops.KFAC(model, "cross_entropy", (X, y)).to_dense()
    draws = torch.stack([curvops.KFAC(model, "cross_entropy", (X, y), fisher_type="mc", mc_samples=16,
                                      generator=torch.Generator().manual_seed(s)).to_dense() for s in range(8)])
    mean = draws.mean(0)
    expected_sq = float(draws.var(0, unbiased=True).sum() / draws.shape[0])  # E‖mean − exact‖²_F
    err_sq = float(((mean - exact) ** 2).sum())
    assert err_sq < 9 * expected_sq  # 3 standard errors in norm
    assert float(((mean - 1.2 * exact) ** 2).sum()) > 9 * expected_sq  # a 20% bias would be caught
    # one fixed matrix per generator seed
    gen = torch.Generator().manual_seed(3)
    K = curvops.KFAC(model, "cross_entropy", (X, y), fisher_type="mc", generator=gen)
    v = torch.randn(K.shape[0], dtype=DT)
    first = K @ v
    K.refresh()
    torch.testing.assert_close(K @ v, first, rtol=0, atol=0)


# ---- behaviour -----------------------------------------------------------------------------------
def test_model_untouched_hooks_removed_and_factors_follow_the_model():
    model = convnet()
    X, y = data("conv", "cross_entropy")
    model[0].weight.grad = torch.ones_like(model[0].weight)
    v = torch.randn(140, dtype=DT)
    before = contract.snapshot(model)
    K = curvops.EKFAC(model, "cross_entropy", (X, y), batch_size=4)
    contract.exercise(K)
    K.inverse(0.1) @ v
    contract.assert_unchanged(before, contract.snapshot(model))
    assert all(not m._forward_hooks for m in model.modules())
    old = K @ v
    with torch.no_grad():
        model[0].weight.mul_(1.5)
    new = K @ v
    assert rel(new[:, None], old[:, None]) > 1e-3
    fresh = curvops.EKFAC(model, "cross_entropy", (X, y), batch_size=4) @ v
    torch.testing.assert_close(new, fresh, rtol=1e-12, atol=1e-14)
    # an error mid-pass (bad targets in the second batch) leaves no hooks behind
    bad = [(X[:4], y[:4]), (X[4:], torch.full((6,), 7))]
    with pytest.raises(ValueError, match="class targets on batch 1"):
        curvops.KFAC(model, "cross_entropy", bad) @ v
    assert all(not m._forward_hooks for m in model.modules())


def test_in_place_activation_after_the_layer():
    model = mlp(act=lambda: nn.ReLU(inplace=True))
    ref = mlp(act=nn.ReLU)
    X, y = data("mlp", "cross_entropy")
    torch.testing.assert_close(curvops.KFAC(model, "cross_entropy", (X, y)).to_dense(),
                               curvops.KFAC(ref, "cross_entropy", (X, y)).to_dense(), rtol=0, atol=0)


def test_bad_inputs():
    model = mlp()
    X, y = data("mlp", "cross_entropy")
    with pytest.raises(ValueError, match="fisher_type must be one of"):
        curvops.KFAC(model, "cross_entropy", (X, y), fisher_type="exact")
    with pytest.raises(ValueError, match="kfac_approx must be one of"):
        curvops.KFAC(model, "cross_entropy", (X, y), kfac_approx="mean")
    with pytest.raises(ValueError, match="mc_samples=4 needs fisher_type='mc'"):
        curvops.KFAC(model, "cross_entropy", (X, y), mc_samples=4)
    with pytest.raises(ValueError, match="mc_samples must be a positive integer"):
        curvops.KFAC(model, "cross_entropy", (X, y), fisher_type="mc", mc_samples=0)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        curvops.KFAC(model, "cross_entropy", (X, y), fisher_type="mc", generator=3)
    with pytest.raises(ValueError, match="label smoothing.*fisher_type='empirical'"):
        curvops.KFAC(model, nn.CrossEntropyLoss(label_smoothing=0.1), (X, y))
    with pytest.raises(ValueError, match=r"layers= names \['nope'\] are not modules"):
        curvops.KFAC(model, "cross_entropy", (X, y), layers=["nope"])
    with pytest.raises(ValueError, match=r"layers= names unsupported modules \['1 \(Tanh\)'\]"):
        curvops.KFAC(model, "cross_entropy", (X, y), layers=["1"])
    with pytest.raises(TypeError, match="plain function"):
        curvops.KFAC(lambda p, x: x @ p["w"], "mse", (X, torch.randn(10, 1, dtype=DT)),
                     params={"w": torch.randn(5, 1, dtype=DT)})
    K = curvops.KFAC(model, "cross_entropy", (X, y))
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="damping must be finite and > 0"):
            K.inverse(bad)
    with pytest.raises(TypeError, match="damping must be a number"):
        K.logdet("a")
    with pytest.raises(ValueError, match="pi_damping is defined for KFAC"):
        curvops.EKFAC(model, "cross_entropy", (X, y)).inverse(0.1, pi_damping=True)
    torch.manual_seed(0)
    grouped = nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Flatten()).to(DT)
    with pytest.raises(ValueError, match=r"0\.weight \(in 0: Conv2d with groups=2"):
        curvops.KFAC(grouped, "mse", (torch.randn(3, 2, 4, 4, dtype=DT), torch.randn(3, 8, dtype=DT)))


def test_layer_called_twice_is_refused():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return self.lin(torch.tanh(self.lin(x)))

    model = Twice().to(DT)
    X, Y = torch.randn(4, 3, dtype=DT), torch.randn(4, 3, dtype=DT)
    with pytest.raises(ValueError, match="'lin' ran more than once"):
        curvops.KFAC(model, "mse", (X, Y)).to_dense()
    assert not model.lin._forward_hooks


def test_kron_factors_records_rebuild_the_operator():
    """The documented layout: block = kron(B, A) on the row-major Θ = [W | b] (Conv2d kernel flattened)."""
    model = convnet()
    X, y = data("conv", "mse")
    K = curvops.KFAC(model, "mse", (X, y), kfac_approx="reduce")
    Kd = K.to_dense()
    recs = K.kron_factors()
    assert [r.module for r in recs] == ["0", "2", "4"]
    assert [r.params for r in recs][0] == ("0.weight", "0.bias") and recs[0].kind == "conv2d"
    assert recs[0].A.shape == (2 * 9 + 1, 2 * 9 + 1) and recs[0].B.shape == (3, 3)
    rebuilt = torch.zeros_like(Kd)
    for r in recs:
        idx = theta_index(model, r)
        rebuilt[idx[:, None], idx[None, :]] = torch.kron(r.B, r.A)
    torch.testing.assert_close(Kd, rebuilt, rtol=1e-12, atol=1e-15)


# ---- torch.distributed: 2 processes on gloo -----------------------------------------------------
def _dist_worker(rank: int, port: int, outdir: str) -> None:
    import torch.distributed as dist

    from test_distributed import join_group

    join_group(rank, port, world=2)
    result: dict = {}
    try:
        X, y = _dist_data()
        shard = slice(0, 9) if rank == 0 else slice(9, 17)  # uneven shards, ignored targets mostly on rank 0
        for name, cls, ft in _DIST_CASES:
            obj = curvops.Objective(convnet(), "cross_entropy", (X[shard], y[shard]), batch_size=4, distributed=True)
            result[name] = cls(obj, fisher_type=ft).to_dense()
    except Exception:  # noqa: BLE001 - reported through the file
        import traceback

        result["crash"] = traceback.format_exc()
    finally:
        torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def _dist_data():
    X, y = data("conv", "cross_entropy", n=17)
    y[[0, 3, 4, 12]] = -100
    return X, y


_DIST_CASES = [("kfac", curvops.KFAC, "type-2"), ("ekfac_ef", curvops.EKFAC, "empirical")]


@pytest.mark.slow  # two spawned processes: ~10 s of CPU, mostly imports
def test_distributed_factors_equal_one_process_on_every_rank(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.spawn(_dist_worker, args=(port, str(tmp_path)), nprocs=2, join=False)
    for p in ctx.processes:
        p.join(120)
    alive = [p for p in ctx.processes if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "distributed workers hung"
    out = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for r, res in enumerate(out):
        assert "crash" not in res, f"rank {r} crashed:\n{res['crash']}"
    X, y = _dist_data()
    for name, cls, ft in _DIST_CASES:
        ref = cls(convnet(), "cross_entropy", (X, y), batch_size=5, fisher_type=ft).to_dense()
        for res in out:
            assert rel(res[name], ref) < 1e-12, name


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("kw", [dict(kernel_size=3, padding=1), dict(kernel_size=(2, 3), stride=(2, 1), padding=(1, 0)),
                                dict(kernel_size=3, dilation=2, padding="same"), dict(kernel_size=(3, 2), padding="same"),
                                dict(kernel_size=2, padding="valid", stride=2)])
def test_conv_patches_match_the_convolution(kw):
    """Σ_patch W·patch + b reproduces the conv output, for strides, dilations and 'same'/'valid' padding."""
    from curvops.operators._kfac_layers import LayerBlock, input_rows

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, **kw).to(DT)
    x = torch.randn(2, 3, 7, 8, dtype=DT)
    blk = LayerBlock("c", "conv2d", "weight", "bias", 4, conv.weight[0].numel())
    rows = input_rows(blk, conv, x)  # [n, L, c·kh·kw]
    out = conv(x)
    z = rows @ conv.weight.reshape(4, -1).T + conv.bias
    torch.testing.assert_close(z.transpose(1, 2).reshape(out.shape), out, rtol=1e-12, atol=1e-12)


def test_inverses_match_curvlinops_exact_and_heuristic_damping():
    cl = _needs_curvlinops()
    model = convnet()
    X, y = data("conv", "cross_entropy")
    loss = nn.CrossEntropyLoss()
    theirs = cl.KFACLinearOperator(model, loss, list(model.parameters()), [(X, y)], fisher_type="type-2",
                                   separate_weight_and_bias=False, check_deterministic=False)
    ours = curvops.KFAC(model, loss, (X, y))
    V = torch.randn(ours.shape[0], 3, dtype=DT)
    for kwargs, pi in ((dict(use_exact_damping=True), False), (dict(use_heuristic_damping=True), True)):
        ref = cl.KFACInverseLinearOperator(theirs, damping=1e-2, **kwargs) @ V
        assert rel(ours.inverse(1e-2, pi_damping=pi) @ V, ref) < 1e-10


def test_gpt2_attention_and_mlp_projections():
    """transformers' GPT-2: its Conv1D projections get blocks; embeddings and LayerNorms are refused by name
    or skipped; the factors of the tied lm_head (shared with the token embedding) are refused."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2,
                                  attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).to(DT).eval()
    ids = torch.randint(0, 11, (3, 6))
    batch = {"input_ids": ids, "labels": ids}
    with pytest.raises(ValueError, match=r"transformer\.wte\.weight \(shared by modules \['lm_head', 'transformer\.wte'\]\)"):
        curvops.KFAC(model, "causal_lm", batch)
    layers = ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc",
              "transformer.h.0.mlp.c_proj"]
    K = curvops.KFAC(model, "causal_lm", batch, layers=layers)
    assert [r.kind for r in K.kron_factors()] == ["conv1d_hf"] * 4
    assert K.shape[0] == sum(p.numel() for n, p in model.named_parameters() if n.rsplit(".", 1)[0] in layers)
    G = curvops.GGN(model, "causal_lm", batch, params=list(K.objective.names)).to_dense()
    Kd = K.to_dense()
    for rec in K.kron_factors():  # every block has the GGN block's trace order of magnitude, and EKFAC its trace
        o = K.objective.layout.offsets()
        idx = torch.cat([torch.arange(*o[n]) for n in rec.params])
        ratio = float(torch.trace(Kd[idx][:, idx]) / torch.trace(G[idx][:, idx]))
        assert 0.1 < ratio < 10
    # the empirical variant uses each sequence's own gradient, so EKFAC keeps the exact trace of the EF
    E = curvops.EKFAC(model, "causal_lm", batch, layers=layers, fisher_type="empirical")
    EF = curvops.EmpiricalFisher(model, "causal_lm", batch, params=list(K.objective.names)).to_dense()
    torch.testing.assert_close(E.trace(), torch.trace(EF), rtol=1e-10, atol=0)
    Ks = curvops.KFAC(model, "causal_lm", batch, skip_unsupported=True)
    assert "transformer.wte.weight" in Ks.skipped[0] and len(Ks.blocks) == 4


@pytest.mark.parametrize("arch,approx", [("mlp", "expand"), ("mlp", "reduce"), ("conv", "expand")])
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
def test_ekfac_matches_curvlinops(arch, approx, fisher_type):
    """curvlinops' EKFACLinearOperator: the same matrix.  (Conv layers with "reduce" differ: curvlinops
    corrects with the reduced gradients ĝ âᵀ, curvops with the exact per-sample Σ_t g_t ā_tᵀ, which is
    what makes the eigenvalues the best diagonal for the exact block.)"""
    cl = _needs_curvlinops()
    model = mlp() if arch == "mlp" else convnet()
    X, y = data(arch, "cross_entropy")
    loss = nn.CrossEntropyLoss()
    P = sum(p.numel() for p in model.parameters())
    A = cl.EKFACLinearOperator(model, loss, list(model.parameters()), [(X[:4], y[:4]), (X[4:], y[4:])],
                               fisher_type=fisher_type, kfac_approx=approx, separate_weight_and_bias=False,
                               check_deterministic=False) @ torch.eye(P, dtype=DT)
    B = curvops.EKFAC(model, loss, (X, y), batch_size=3, fisher_type=fisher_type, kfac_approx=approx).to_dense()
    assert rel(B, A) < 1e-10


@pytest.mark.parametrize("which", ["kfac", "ekfac", "kfac_inverse", "ekfac_inverse", "pi_inverse"])
def test_operator_contract(which):
    """Products (torch, numpy, dicts, lists), adjoint, tags, scipy eigsh and the context matrix, against a
    dense reference built from the factors (torch.kron) or by inverting it."""
    model = convnet()
    X, y = data("conv", "cross_entropy")
    cls = curvops.EKFAC if which.startswith("ekfac") else curvops.KFAC
    K = cls(model, "cross_entropy", (X, y), batch_size=4)
    P = K.shape[0]
    dense = torch.zeros(P, P, dtype=DT)
    if cls is curvops.KFAC:
        for r in K.kron_factors():
            idx = theta_index(model, r)
            dense[idx[:, None], idx[None, :]] = torch.kron(r.B, r.A)
    else:
        for r, lam in zip(K.kron_factors(), K.eigenvalues()):
            idx = theta_index(model, r)
            Q = torch.kron(torch.linalg.eigh(r.B)[1], torch.linalg.eigh(r.A)[1])
            dense[idx[:, None], idx[None, :]] = Q @ torch.diag(lam.reshape(-1)) @ Q.T
    A = K
    if which.endswith("inverse"):
        A = K.inverse(0.05, pi_damping=which == "pi_inverse")
        if which == "pi_inverse":  # the π-damped inverse from the factors, block by block
            dense = torch.zeros(P, P, dtype=DT)
            for r in K.kron_factors():
                idx = theta_index(model, r)
                pi = ((torch.trace(r.A) / r.A.shape[0]) / (torch.trace(r.B) / r.B.shape[0])).sqrt()
                Ad = torch.linalg.inv(r.A + pi * 0.05**0.5 * torch.eye(r.A.shape[0], dtype=DT))
                Bd = torch.linalg.inv(r.B + 0.05**0.5 / pi * torch.eye(r.B.shape[0], dtype=DT))
                dense[idx[:, None], idx[None, :]] = torch.kron(Bd, Ad)
        else:
            dense = torch.linalg.inv(dense + 0.05 * torch.eye(P, dtype=DT))
    contract.check_products(A, dense)
    named = dict(model.named_parameters())
    slices, s = {}, 0
    for n, p in named.items():
        slices[n] = slice(s, s + p.numel())
        s += p.numel()
    contract.check_dict_products(A, dense, slices, {n: p.shape for n, p in named.items()})
    contract.check_adjoint(A)
    contract.check_tags(A)
    contract.check_dense_tags(A, dense)
    contract.check_eigsh(A, dense)
    v = contract.probes(P, 1)[:, 0]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        contract.assert_matches(A @ v, dense @ v, what="under no_grad + autocast")
    with torch.inference_mode():
        contract.assert_matches(A @ v, dense @ v, what="under inference_mode")
    if which == "ekfac":  # the factor passes themselves under the caller's contexts
        for ctx in (torch.inference_mode, lambda: torch.autocast("cpu", dtype=torch.bfloat16)):
            with ctx():
                fresh = cls(model, "cross_entropy", (X, y), batch_size=4) @ v
            contract.assert_matches(fresh, dense @ v, what="factors computed under a context")


@pytest.mark.parametrize("kind", ["mse", "cross_entropy", "bce_with_logits"])
def test_column_chunks_do_not_change_the_matrix(kind):
    model = mlp()
    X, y = data("mlp", kind)
    full = curvops.EKFAC(model, kind, (X, y)).to_dense()
    for k in (1, 2):
        torch.testing.assert_close(curvops.EKFAC(model, kind, (X, y), max_columns=k).to_dense(), full,
                                   rtol=1e-12, atol=1e-15)


def test_bf16_model_factors_in_float32():
    """A bf16 model: factors accumulated and decomposed in float32, products returned in bf16, within a few
    bf16 unit roundoffs (2⁻⁸) of the float64 operator."""
    model = mlp()
    X, y = data("mlp", "cross_entropy", n=32)
    half = mlp().to(torch.bfloat16)
    v = torch.randn(39, dtype=DT)
    for cls in (curvops.KFAC, curvops.EKFAC):
        ref, K = cls(model, "cross_entropy", (X, y), batch_size=8), cls(half, "cross_entropy", (X, y), batch_size=8)
        out = K @ v.to(torch.bfloat16)
        assert out.dtype == torch.bfloat16 and K.kron_factors()[0].A.dtype == torch.float32
        assert rel((out.double())[:, None], (ref @ v)[:, None]) < 4 * 2**-8
        assert abs(float(K.logdet(0.1)) - float(ref.logdet(0.1))) < 4 * 2**-8 * abs(float(ref.logdet(0.1)))


def test_separate_weight_and_bias_blocks_from_the_records():
    """The documented split (laplace-torch's Kron): kron(B, A[:-1, :-1]) for the weight, A[-1, -1]·B for the
    bias equals curvlinops' separate_weight_and_bias=True operator."""
    cl = _needs_curvlinops()
    model = convnet()
    X, y = data("conv", "cross_entropy")
    loss = nn.CrossEntropyLoss()
    P = sum(p.numel() for p in model.parameters())
    ref = cl.KFACLinearOperator(model, loss, list(model.parameters()), [(X, y)], fisher_type="type-2",
                                check_deterministic=False) @ torch.eye(P, dtype=DT)
    dense = torch.zeros(P, P, dtype=DT)
    for r in curvops.KFAC(model, loss, (X, y)).kron_factors():
        idx = theta_index(model, r).reshape(r.B.shape[0], -1)
        w, b = idx[:, :-1].reshape(-1), idx[:, -1]
        dense[w[:, None], w[None, :]] = torch.kron(r.B, r.A[:-1, :-1])
        dense[b[:, None], b[None, :]] = r.A[-1, -1] * r.B
        assert float(r.A[-1, -1]) == pytest.approx(1.0, abs=1e-14)
    assert rel(dense, ref) < 1e-10
