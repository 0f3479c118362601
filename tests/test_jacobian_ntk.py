"""Jacobians (parameters, inputs, activations, layer to layer), the NTK and activation Hessians
against dense torch.func oracles."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev

from curvops import NTK, ActivationHessian, Jacobian
from curvops.testing import contract, oracles
from curvops.testing.zoo import CASES

D = torch.float64
PARAM_CASES = ["linear_mse", "mlp_ce", "conv_ce", "dict_mse", "bn_eval_mse", "function_ce", "mlp_bce"]


def exercise(A):
    """Products of every kind on a possibly rectangular operator."""
    V, W = contract.probes(A.shape[1], 3), contract.probes(A.shape[0], 3, seed=1)
    return A @ V[:, 0], A @ V, A.matvec(V[:, 0].numpy()), A.T @ W, A.rmatvec(W[:, 0].numpy())


def dense_jacobian(problem):
    theta = oracles.flat_params(problem)
    out = oracles.forward(problem, theta, problem.X)
    return jacrev(lambda th: oracles.forward(problem, th, problem.X))(theta).reshape(out.numel(), -1)


def jac(problem, **kw):
    kw.setdefault("batch_size", 5)
    extra = {"params": problem.params} if problem.params is not None else {}
    return Jacobian(problem.model, problem.X, **extra, **kw)


# ---- Jacobian with respect to parameters -------------------------------------------------
@pytest.mark.parametrize("case", PARAM_CASES)
def test_parameter_jacobian_matches_dense(case):
    problem = CASES[case].build("mean")
    Jd = dense_jacobian(problem)
    J = jac(problem)
    assert J.shape == Jd.shape
    contract.check_products(J, Jd)
    contract.check_adjoint(J)
    torch.testing.assert_close(J.T @ torch.eye(J.shape[0], dtype=D)[:, :4], Jd.T[:, :4])
    before = contract.snapshot(problem.model if problem.params is None else None, problem.params)
    exercise(J)
    contract.assert_unchanged(before, contract.snapshot(problem.model if problem.params is None else None,
                                                        problem.params))


def test_batch_split_invariance_and_loaders():
    problem = CASES["mlp_ce"].build("mean")
    Jd = dense_jacobian(problem)
    V = contract.probes(Jd.shape[1], 2)
    for bs in (1, 4, problem.N):
        torch.testing.assert_close(jac(problem, batch_size=bs) @ V, Jd @ V)
    batches = [problem.X[s:s + 6] for s in range(0, problem.N, 6)]
    torch.testing.assert_close(Jacobian(problem.model, batches) @ V, Jd @ V)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(problem.X, problem.y), batch_size=4)
    torch.testing.assert_close(Jacobian(problem.model, loader) @ V, Jd @ V)  # targets ignored


def test_linear_model_closed_forms():
    torch.manual_seed(0)
    N, d, C = 6, 4, 3
    model = nn.Linear(d, C).to(D)
    X = torch.randn(N, d, dtype=D)
    J = Jacobian(model, X, batch_size=4).to_dense()
    # rows i·C + c; columns: W (C×d, row-major) then b (C)
    expected = torch.zeros(N * C, C * d + C, dtype=D)
    for i in range(N):
        for c in range(C):
            expected[i * C + c, c * d:(c + 1) * d] = X[i]
            expected[i * C + c, C * d + c] = 1.0
    assert torch.equal(J, expected)
    K = NTK(model, X, batch_size=4)
    closed = torch.kron(X @ X.T + torch.ones(N, N, dtype=D), torch.eye(C, dtype=D))
    torch.testing.assert_close(K.to_dense(), closed, rtol=0, atol=1e-12)
    torch.testing.assert_close(K @ torch.eye(N * C, dtype=D), closed, rtol=0, atol=1e-12)


# ---- NTK ---------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["mlp_ce", "conv_ce", "bn_eval_mse", "function_ce"])
def test_ntk_products_dense_and_tags(case):
    problem = CASES[case].build("mean")
    Jd = dense_jacobian(problem)
    extra = {"params": problem.params} if problem.params is not None else {}
    K = NTK(problem.model, problem.X, batch_size=5, **extra)
    assert K.tags == {"symmetric", "psd"}
    contract.check_products(K, Jd @ Jd.T)
    torch.testing.assert_close(K.to_dense(), Jd @ Jd.T)
    contract.check_tags(K)


def test_ntk_dense_fallback_paths_agree():
    problem = CASES["mlp_ce"].build("mean")
    Jd = dense_jacobian(problem)
    # tiny budget: no room for layer features -> products with identity blocks
    K = NTK(problem.model, problem.X, batch_size=5, memory_budget=8)
    torch.testing.assert_close(K.to_dense(), Jd @ Jd.T)
    # only the first layer selected: the rest of the kernel comes from the rest-Jacobian rows
    K1 = NTK(problem.model, problem.X, params=lambda n, p: n.startswith("0."), batch_size=5)
    cols = slice(0, sum(p.numel() for n, p in problem.model.named_parameters() if n.startswith("0.")))
    torch.testing.assert_close(K1.to_dense(), Jd[:, cols] @ Jd[:, cols].T)


def test_cross_kernel_and_output_reduction():
    problem = CASES["mlp_ce"].build("mean")
    X1, X2 = problem.X[:7], problem.X[7:]
    theta = oracles.flat_params(problem)
    J1 = jacrev(lambda th: oracles.forward(problem, th, X1))(theta).reshape(-1, theta.numel())
    J2 = jacrev(lambda th: oracles.forward(problem, th, X2))(theta).reshape(-1, theta.numel())
    K = NTK(problem.model, X1, X2, batch_size=3)
    assert K.shape == (J1.shape[0], J2.shape[0]) and not K.tags
    contract.check_products(K, J1 @ J2.T)
    contract.check_adjoint(K)
    torch.testing.assert_close(K.to_dense(), J1 @ J2.T)
    C = problem.model(X1).shape[1]
    for red, scale in (("sum", 1.0), ("mean", 1.0 / C)):
        Ks = NTK(problem.model, X1, X2, output_reduction=red, batch_size=4)
        S1 = J1.view(len(X1), C, -1).sum(1) * scale
        S2 = J2.view(len(X2), C, -1).sum(1) * scale
        torch.testing.assert_close(Ks.to_dense(), S1 @ S2.T)
        torch.testing.assert_close(Ks @ torch.eye(len(X2), dtype=D), S1 @ S2.T)


# ---- inputs, activations, layer to layer ----------------------------------------------------
def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).to(D)


def block_diag_jac(fn, inputs):
    """Per-sample Jacobians of fn (one sample in, one out) stacked block-diagonally."""
    blocks = [jacrev(lambda a: fn(a[None])[0].reshape(-1))(a).reshape(-1, a.numel()) for a in inputs]
    return torch.block_diag(*blocks).detach()


def test_input_and_activation_jacobians():
    model = mlp()
    X = torch.randn(7, 3, dtype=D, generator=torch.Generator().manual_seed(1))
    Ji = Jacobian(model, X, wrt="inputs", batch_size=3)
    ref = block_diag_jac(model, X)
    contract.check_products(Ji, ref)
    contract.check_adjoint(Ji)
    H1 = torch.tanh(model[0](X))  # output of module "1"
    Ja = Jacobian(model, X, wrt="1", batch_size=3)
    ref_a = block_diag_jac(lambda a: model[2:](a), H1)
    assert Ja.shape == (14, 35)
    contract.check_products(Ja, ref_a)
    contract.check_adjoint(Ja)
    # layer to layer: ∂f^(3)/∂F^(0)
    Z0 = model[0](X)
    Jl = Jacobian(model, X, wrt="0", of="3", batch_size=3)
    contract.check_products(Jl, block_diag_jac(lambda z: model[1:4](z), Z0))
    # with respect to a layer's activations, derivatives of a parameter-free layer's input
    before = contract.snapshot(model)
    exercise(Jl)
    contract.assert_unchanged(before, contract.snapshot(model))
    assert all(not m._forward_hooks for m in model.modules())


def test_activation_hessian_and_cross_blocks():
    model = mlp()
    g = torch.Generator().manual_seed(2)
    X, y = torch.randn(6, 3, dtype=D, generator=g), torch.randint(0, 2, (6,), generator=g)

    def loss(d0, d2, reduction):
        h = model[2](model[1](model[0](X) + d0)) + d2
        return F.cross_entropy(model[4](model[3](h)), y, reduction=reduction)

    z0, z2 = torch.zeros(6, 5, dtype=D), torch.zeros(6, 4, dtype=D)
    for reduction in ("mean", "sum"):
        H = hessian(lambda a, b: loss(a, b, reduction), argnums=(0, 1))(z0, z2)
        H = [[h.detach() for h in row] for row in H]
        A = ActivationHessian(model, nn.CrossEntropyLoss(reduction=reduction), (X, y), layer="0", batch_size=4)
        assert A.tags == {"symmetric"}
        contract.check_products(A, H[0][0].reshape(30, 30))
        B = ActivationHessian(model, nn.CrossEntropyLoss(reduction=reduction), (X, y), layer="0", layer2="2",
                              batch_size=4)
        contract.check_products(B, H[0][1].reshape(30, 24))
        contract.check_adjoint(B)
        torch.testing.assert_close(B.T @ torch.eye(30, dtype=D), H[1][0].reshape(24, 30))


# ---- bad input ------------------------------------------------------------------------------
def test_bad_modules_and_inputs():
    model = mlp()
    X = torch.randn(5, 3, dtype=D)
    with pytest.raises(ValueError, match="unknown module name 'nope'"):
        Jacobian(model, X, wrt="nope")

    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.spare = nn.Linear(3, 2).to(D), nn.Linear(3, 2).to(D)

        def forward(self, x):
            return self.used(x)

    with pytest.raises(ValueError, match=r"module\(s\) \['spare'\] never ran"):
        Jacobian(Unused(), X, wrt="spare")

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Linear(3, 3).to(D)

        def forward(self, x):
            return self.block(torch.tanh(self.block(x)))

    with pytest.raises(ValueError, match="'block' runs more than once in one forward pass"):
        Jacobian(Twice(), X, wrt="block")
    # parameters of a module used twice are fine (the Jacobian w.r.t. parameters is well defined)
    twice = Twice()
    K = NTK(twice, X, batch_size=2)
    Jd = jacrev(lambda p: functional_call(twice, p, (X,)))(dict(twice.named_parameters()))
    Jd = torch.cat([v.reshape(15, -1) for v in Jd.values()], dim=1)
    torch.testing.assert_close(K.to_dense(), Jd @ Jd.T)
    with pytest.raises(ValueError, match="wrt='inputs'.*single tensor input"):
        Jacobian(CASES["dict_mse"].build().model, CASES["dict_mse"].build().X, wrt="inputs")
    J = Jacobian(model, X)
    with pytest.raises(ValueError, match=r"Jacobian.T @ v: expected a vector of length 10, got shape \(14,\)"):
        J.T @ torch.zeros(14, dtype=D)
    with pytest.raises(ValueError, match="output_reduction must be"):
        NTK(model, X, output_reduction="max")
    with pytest.raises(TypeError, match=r"expected \(model, loss, data\)"):
        ActivationHessian(model, None, X, layer="0")


def test_ntk_feature_cache_matches_matrix_free_and_follows_parameters():
    problem = CASES["mlp_ce"].build("mean")
    X1, X2 = problem.X[:9], problem.X[9:]
    V = contract.probes(len(X2) * 3, 2)
    for x2 in (None, X2):
        cached = NTK(problem.model, X1, x2, batch_size=4)
        free = NTK(problem.model, X1, x2, batch_size=4, cache_features=False)
        W = V if x2 is not None else contract.probes(len(X1) * 3, 2)
        torch.testing.assert_close(cached @ W, free @ W)
        torch.testing.assert_close(cached.T @ contract.probes(len(X1) * 3, 2), free.T @ contract.probes(len(X1) * 3, 2))
    K = NTK(problem.model, X1, batch_size=4)
    W = contract.probes(len(X1) * 3, 1)
    before = K @ W
    with torch.no_grad():
        next(problem.model.parameters()).mul_(1.5)  # an in-place update drops the cached features
    after = K @ W
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, NTK(problem.model, X1, batch_size=4, cache_features=False) @ W)


# ---- a DataLoader that drops its last partial batch ------------------------------------------------
def test_jacobian_and_ntk_over_a_drop_last_loader_cover_exactly_the_yielded_samples():
    # 16 samples in batches of 5 with drop_last=True: the loader yields 15. A sample count taken
    # from the dataset's size (16) gives 3 extra rows (or columns) of zeros; the oracle is built on
    # exactly the samples the loader yields, so shape and values both have to be right.
    problem = CASES["mlp_ce"].build("mean")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(problem.X, problem.y), batch_size=5,
                                         drop_last=True)
    seen = torch.cat([x for x, _ in loader])
    assert seen.shape[0] == 15
    theta = oracles.flat_params(problem)
    Jd = jacrev(lambda th: oracles.forward(problem, th, seen))(theta).reshape(15 * 3, -1)
    J = Jacobian(problem.model, loader)
    assert J.shape == Jd.shape == (45, theta.numel())
    contract.check_products(J, Jd)
    contract.check_adjoint(J)
    torch.testing.assert_close(J.to_dense(), Jd)
    for cache in (True, False):
        K = NTK(problem.model, loader, cache_features=cache)
        assert K.shape == (45, 45)
        contract.check_products(K, Jd @ Jd.T)
        torch.testing.assert_close(K.to_dense(), Jd @ Jd.T)
    # cross kernel: the dropping loader on either side
    X1 = problem.X[:7]
    J1 = jacrev(lambda th: oracles.forward(problem, th, X1))(theta).reshape(21, -1)
    K12 = NTK(problem.model, X1, loader)
    assert K12.shape == (21, 45)
    contract.check_products(K12, J1 @ Jd.T)
    contract.check_adjoint(K12)
    K21 = NTK(problem.model, loader, X1)
    assert K21.shape == (45, 21)
    contract.check_products(K21, Jd @ J1.T)
