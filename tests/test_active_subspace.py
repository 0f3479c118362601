"""Active subspaces against closed forms (linear models) and dense torch.func oracles (small MLPs)."""

import dataclasses
import math

import pytest
import torch
from torch import nn

import importlib

AS = importlib.import_module("curvops.analysis.active_subspace")  # the module (the package exports the function of that name)
AS_PLAN = importlib.import_module("curvops.analysis.active_subspace.plan")  # where the dense-path limits are read
from curvops.analysis.active_subspace import (active_subspace, active_subspace_convergence, per_sample_gradients,
                                              subspace_distance, subspace_distances)
from curvops.testing import contract, oracles, zoo
from curvops.testing.zoo import CASES

D = torch.float64


# ---- problems and oracles -----------------------------------------------------------------------------------
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mlp_problem(N: int, loss: str = "cross_entropy", seed: int = 0) -> zoo.Problem:
    """A 3-5-2 tanh MLP (32 parameters) on N random samples."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(D)
    gen = _gen(seed + 1)
    X = torch.randn(N, 3, generator=gen, dtype=D)
    y = torch.randint(0, 2, (N,), generator=gen) if loss == "cross_entropy" else torch.randn(N, 2, generator=gen,
                                                                                             dtype=D)
    return zoo.Problem("mlp", model, X, y, loss, "mean")


def linear_problem(N: int, seed: int = 0, scales=(3.0, 1.5, 0.7, 0.2)) -> zoo.Problem:
    """nn.Linear(4, 2) on inputs with distinct variances (10 parameters), MSE targets."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Linear(4, 2).to(D)
    gen = _gen(seed + 1)
    X = torch.randn(N, 4, generator=gen, dtype=D) * torch.tensor(scales, dtype=D)
    return zoo.Problem("linear", model, X, torch.randn(N, 2, generator=gen, dtype=D), "mse", "mean")


oracle_gradients = oracles.per_sample_gradients  # G [N, P] from the dense oracle


def oracle_eig(G, w=None, center=False):
    """Descending eigenpairs of C = Σ w_i (g_i − μ)(g_i − μ)ᵀ / W."""
    w = torch.ones(G.shape[0], dtype=D) if w is None else w
    mu = (w[:, None] * G).sum(0) / w.sum()
    A = G - mu if center else G
    C = (A.T * w) @ A / w.sum()
    lam, W = torch.linalg.eigh(C)
    return lam.flip(0), W.flip(1), C


def assert_eigenpairs(res, lam, W, vec_count=3, rtol=1e-9):
    """Eigenvalues (all returned) and the leading eigenvectors up to sign."""
    k = res.eigenvalues.shape[0]
    torch.testing.assert_close(res.eigenvalues, lam[:k], rtol=rtol, atol=rtol * float(lam[0]))
    E = res.eigenvectors[:, :vec_count]
    signs = torch.sign((E * W[:, :vec_count]).sum(0))
    torch.testing.assert_close(E * signs, W[:, :vec_count], rtol=0, atol=1e-7)


# ---- closed forms -------------------------------------------------------------------------------------------
def test_linear_mse_closed_form_both_paths():
    """f = Wx + b, per-sample MSE over C = 2 outputs: ∇ℓ_i = (2/C)·[r_i ⊗ x_i, r_i] with r_i = f_i − y_i."""
    p = linear_problem(24)
    Wt, b = p.model.weight.detach(), p.model.bias.detach()
    r = p.X @ Wt.T + b - p.y
    G = torch.cat([(r[:, :, None] * p.X[:, None, :]).reshape(p.N, -1), r], dim=1) * (2 / 2)
    lam, W, _ = oracle_eig(G)
    for method in ("snapshot", "operator"):
        full = active_subspace(p.model, "mse", p.data, method=method, batch_size=5)
        assert full.k == 10 and full.method == method and full.num_samples == 24 and full.num_params == 10
        assert_eigenpairs(full, lam, W)
        top = active_subspace(p.model, "mse", p.data, k=3, method=method, tol=1e-12, batch_size=7)
        assert_eigenpairs(top, lam, W)
        assert top.converged


def test_linear_output_gives_the_input_second_moment():
    """g = f_0 = w_0ᵀx + b_0: ∇g = [x, 0, 1, 0], so C = E[x̃x̃ᵀ] (x̃ = [x; 1]) on (w_0, b_0), zero elsewhere."""
    p = linear_problem(40)
    Xt = torch.cat([p.X, torch.ones(p.N, 1, dtype=D)], dim=1)
    m = torch.linalg.eigvalsh(Xt.T @ Xt / p.N).flip(0)
    for method in ("snapshot", "operator"):
        res = active_subspace(p.model, data=p.X, g=lambda out, y: out[:, 0], method=method, batch_size=16)
        torch.testing.assert_close(res.eigenvalues[:5], m, rtol=1e-10, atol=0)
        assert float(res.eigenvalues[5:].abs().max()) < 1e-12 * float(m[0])
        outside = torch.ones(10, dtype=torch.bool)
        outside[[0, 1, 2, 3, 8]] = False
        assert float(res.eigenvectors[outside, :5].abs().max()) < 1e-10  # the active subspace is (w_0, b_0)


# ---- dense oracle on every algorithm ----------------------------------------------------------------------------
@pytest.mark.parametrize("N, k, method, force, algorithm", [
    (12, None, "snapshot", False, "thin SVD"),
    (12, None, "snapshot", True, "sample Gram"),          # N < P
    (48, None, "snapshot", True, "accumulated chunk by chunk"),  # N ≥ P
    (12, 3, "snapshot", False, "thin SVD"),
    (12, 3, "snapshot", True, "block Krylov on F (G in memory"),  # Krylov on the sample side
    (48, 4, "snapshot", True, "block Krylov on F (G in memory"),  # Krylov on the parameter side
    (12, 3, "operator", False, "matrix-free"),
    (48, 4, "operator", False, "matrix-free"),
    (48, None, "operator", False, "GradientCovariance products"),
])
def test_every_algorithm_matches_the_dense_oracle(monkeypatch, N, k, method, force, algorithm):
    if force:
        monkeypatch.setattr(AS_PLAN, "DENSE_SVD_MAX", 0)
        monkeypatch.setattr(AS_PLAN, "DENSE_TOPK_MAX", 0)
    p = mlp_problem(N)
    lam, W, _ = oracle_eig(oracle_gradients(p))
    res = active_subspace(p.model, "cross_entropy", p.data, k=k, method=method, tol=1e-12, batch_size=5,
                          chunk_size=4)
    assert algorithm in res.algorithm
    assert res.k == (min(N, 32) if k is None else k)
    assert_eigenpairs(res, lam, W)
    torch.testing.assert_close(res.eigenvectors.T @ res.eigenvectors, torch.eye(res.k, dtype=D), atol=1e-10, rtol=0)
    torch.testing.assert_close(res.gaps, res.eigenvalues[:-1] - res.eigenvalues[1:])
    lam_next = res.eigenvalues[1:]
    ratios = torch.where(lam_next > 0, res.eigenvalues[:-1] / lam_next, torch.full_like(lam_next, math.inf))
    torch.testing.assert_close(res.gap_ratios, ratios)
    assert bool((res.eigenvalues >= 0).all())
    if "Krylov" in res.algorithm:
        assert res.converged and res.num_matvecs > 0 and float(res.residuals.max()) <= 1e-12
    values_only = active_subspace(p.model, "cross_entropy", p.data, k=k, method=method, tol=1e-12,
                                  return_eigenvectors=False, batch_size=5)
    assert values_only.eigenvectors is None
    torch.testing.assert_close(values_only.eigenvalues, res.eigenvalues, rtol=1e-9, atol=1e-12 * float(lam[0]))


@pytest.mark.parametrize("center", [False, True])
def test_lanczos_on_fused_gram_products_matches_the_dense_oracle(monkeypatch, center):
    """G in memory, N ≥ P, top-k: block Lanczos on C = FᵀF whose products read G once (row chunks),
    against the dense eigendecomposition of the weighted (and centred) per-sample gradients."""
    AS_EIG = importlib.import_module("curvops.analysis.active_subspace.eigenpairs")
    monkeypatch.setattr(AS_EIG, "_GRAM_BLOCK", 4)  # P = 32 here; at the seed's size the block is 24
    monkeypatch.setattr(AS_PLAN, "DENSE_TOPK_MAX", 0)
    calls = []
    lanczos = AS_EIG._gram_lanczos
    monkeypatch.setattr(AS_EIG, "_gram_lanczos", lambda *a, **kw: calls.append(1) or lanczos(*a, **kw))
    p = mlp_problem(48)
    G = oracle_gradients(p)
    w = torch.linspace(0.5, 1.5, p.N, dtype=D)
    lam, W, _ = oracle_eig(G, w, center=center)
    res = active_subspace(p.model, "cross_entropy", p.data, k=4, weights=w, center=center, tol=1e-12, batch_size=7,
                          bootstrap=3, generator=_gen(0))
    assert "Krylov" in res.algorithm and res.converged
    assert len(calls) == 4  # the estimate and its 3 bootstrap replicates ran on the fused products
    assert_eigenpairs(res, lam, W)
    assert float(res.residuals.max()) <= 1e-12
    # the fused product itself: FᵀF X with G read in row chunks that do not divide N
    FACT = importlib.import_module("curvops.analysis.active_subspace.factors")
    f = FACT._DenseRows(G, w, center)
    X = torch.randn(G.shape[1], 3, generator=_gen(4), dtype=D)
    F = f.dense()
    torch.testing.assert_close(f.gram_matmat(X, rows=7), F.T @ (F @ X), rtol=1e-12, atol=1e-14)


def test_weights_center_subset_classes_and_dataloader_match_dense():
    p = mlp_problem(30)
    G = oracle_gradients(p)
    w = torch.linspace(0.3, 2.0, p.N, dtype=D)
    sub = torch.arange(0, p.N, 3)
    lam, W, _ = oracle_eig(G[sub], w[sub], center=True)
    for method, k in (("snapshot", None), ("snapshot", 3), ("operator", 3)):
        res = active_subspace(p.model, "cross_entropy", p.data, k=k, method=method, weights=w, center=True,
                              subset=sub, tol=1e-12, batch_size=7)
        assert res.num_samples == 10 and math.isclose(res.total_weight, float(w[sub].sum()))
        assert_eigenpairs(res, lam, W)
    keep = p.y == 1
    lam, W, _ = oracle_eig(G[keep])
    loader = zoo.as_dataloader(p, batch_size=8)
    for method in ("snapshot", "operator"):
        res = active_subspace(p.model, "cross_entropy", loader, k=3, classes=1, method=method, tol=1e-12)
        assert res.num_samples == int(keep.sum())
        assert_eigenpairs(res, lam, W)


def test_per_sample_gradients_match_torch_func_and_leave_the_model_alone():
    p = CASES["conv_ce"].build("mean")
    before = contract.snapshot(p.model)
    G = per_sample_gradients(p.model, p.loss_arg(), p.data, batch_size=5, chunk_size=2)
    contract.assert_matches(G, oracle_gradients(p))
    g = lambda out, y: out.logsumexp(1)  # noqa: E731
    contract.assert_matches(per_sample_gradients(p.model, data=p.X, g=g), oracle_gradients(p, g))
    contract.assert_unchanged(before, contract.snapshot(p.model))


def test_auto_falls_back_to_the_operator_path_under_a_small_budget():
    p = mlp_problem(16)
    snap = active_subspace(p.model, "cross_entropy", p.data, k=2, tol=1e-12)
    assert snap.method == "snapshot"
    oper_need = AS._candidates(2, 16, 32, 8, 16, 0, True)[1][0].memory
    assert oper_need < snap.memory_estimate
    res = active_subspace(p.model, "cross_entropy", p.data, k=2, tol=1e-12, memory_budget=oper_need)
    assert res.method == "operator" and res.memory_estimate <= oper_need
    torch.testing.assert_close(res.eigenvalues, snap.eigenvalues, rtol=1e-10, atol=0)
    assert subspace_distance(res.eigenvectors, snap.eigenvectors) < 1e-8


# ---- the Krylov SVD on its own ----------------------------------------------------------------------------------
def test_block_krylov_svd_resolves_tiny_singular_values():
    """Singular values spanning 10 decades: σ² (the eigenvalues of C) to high relative accuracy, which
    products with C = AᵀA (rounding ε·σ₁²) could not give."""
    gen = _gen(3)
    M, N = 300, 120
    U, _ = torch.linalg.qr(torch.randn(M, N, generator=gen, dtype=D))
    V, _ = torch.linalg.qr(torch.randn(N, N, generator=gen, dtype=D))
    s = torch.logspace(0, -10, N, dtype=D)
    A = U @ torch.diag(s) @ V.T
    out = AS._block_krylov_svd(lambda X: A @ X, lambda Y: A.T @ Y, M, N, 8, tol=1e-8, dtype=D, device="cpu",
                               generator=gen)
    assert out.converged
    torch.testing.assert_close(out.S.square(), s[:8].square(), rtol=1e-8, atol=0)
    torch.testing.assert_close((out.V * V[:, :8]).sum(0).abs(), torch.ones(8, dtype=D), rtol=0, atol=1e-8)
    # exactly low rank (an invariant subspace is reached) and a wanted count above the rank
    B = U[:, :3] @ torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=D)) @ V[:, :3].T
    out = AS._block_krylov_svd(lambda X: B @ X, lambda Y: B.T @ Y, M, N, 5, tol=1e-10, dtype=D, device="cpu",
                               generator=gen)
    torch.testing.assert_close(out.S, torch.tensor([3.0, 2.0, 1.0, 0.0, 0.0], dtype=D), rtol=0, atol=1e-12)


# ---- bootstrap ------------------------------------------------------------------------------------------------
def test_bootstrap_intervals_contain_the_estimate_and_shrink_with_more_samples():
    g = lambda out, y: out[:, 0]  # noqa: E731 - C = E[x̃x̃ᵀ], eigenvalues ≈ 9, 2.25, 1, 0.49, 0.04
    widths, dists = [], []
    for N in (40, 640):
        p = linear_problem(N)
        res = active_subspace(p.model, data=p.X, g=g, k=4, bootstrap=60, confidence=0.9, generator=_gen(5))
        assert res.bootstrap == 60 and res.bootstrap_eigenvalues.shape == (60, 4)
        assert bool((res.eigenvalue_lower <= res.eigenvalues).all() and (res.eigenvalues <= res.eigenvalue_upper).all())
        q = torch.quantile(res.bootstrap_eigenvalues, torch.tensor([0.05, 0.95], dtype=D), dim=0)
        torch.testing.assert_close(q[0], res.eigenvalue_lower)
        torch.testing.assert_close(res.subspace_distance_mean, res.bootstrap_distances.mean(0))
        assert bool((res.subspace_distance_lower <= res.subspace_distance_upper).all())
        widths.append((res.eigenvalue_upper - res.eigenvalue_lower) / res.eigenvalues)
        dists.append(res.subspace_distance_mean)
    assert bool((widths[1] < 0.5 * widths[0]).all())
    assert bool((dists[1] < 0.5 * dists[0]).all())


def test_bootstrap_on_the_krylov_and_operator_paths(monkeypatch):
    monkeypatch.setattr(AS_PLAN, "DENSE_TOPK_MAX", 0)
    p = mlp_problem(40)
    ref = active_subspace(p.model, "cross_entropy", p.data, k=2, bootstrap=8, generator=_gen(1))
    assert "Krylov" in ref.algorithm
    op = active_subspace(p.model, "cross_entropy", p.data, k=2, bootstrap=8, generator=_gen(1), method="operator",
                         batch_size=20)
    for res in (ref, op):
        assert bool((res.eigenvalue_lower <= res.eigenvalue_upper).all())
        assert float(res.bootstrap_distances.max()) <= 1.0 and res.subspace_distance_mean.shape == (2,)
        # every replicate is the exact decomposition of a resampled C: bounded by the full-data spread
        assert float(res.bootstrap_eigenvalues.max()) < 10 * float(ref.eigenvalues[0])


@pytest.mark.parametrize("N, k", [(60, None), (60, 3), (20, None)])
def test_bootstrap_of_a_float32_model_matches_float64(N, k):
    """Issue 10: bootstrap on a float32 model crashed in torch.quantile (dtype of the levels). With N < P the
    replicates are rank-deficient (their bases completed at random): the resamples must not depend on that."""
    p = mlp_problem(N)
    ref = active_subspace(p.model, "cross_entropy", p.data, k=k, bootstrap=20, confidence=0.9, generator=_gen(3))
    model32 = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    model32.load_state_dict({n: t.float() for n, t in p.model.state_dict().items()})
    res = active_subspace(model32, "cross_entropy", (p.X.float(), p.y), k=k, bootstrap=20, confidence=0.9,
                          generator=_gen(3))
    assert res.eigenvalues.dtype == torch.float32 and res.eigenvalue_lower.dtype == torch.float32
    top = 3  # the leading eigenvalues: well above float32 rounding of the smallest ones
    for name in ("eigenvalues", "eigenvalue_lower", "eigenvalue_upper"):
        torch.testing.assert_close(getattr(res, name)[:top].double(), getattr(ref, name)[:top], rtol=1e-4, atol=0)
    torch.testing.assert_close(res.subspace_distance_upper[:2], ref.subspace_distance_upper[:2], rtol=0, atol=1e-3)
    assert bool((res.eigenvalue_lower[:top] <= res.eigenvalues[:top]).all())
    assert bool((res.eigenvalues[:top] <= res.eigenvalue_upper[:top]).all())


@pytest.mark.parametrize("N", [12, 48])
def test_bootstrap_of_all_eigenpairs(monkeypatch, N):
    """Gram (N < P) and eigh-of-C (N ≥ P) paths: replicates with repeated rows have lower rank."""
    monkeypatch.setattr(AS_PLAN, "DENSE_SVD_MAX", 0)
    p = mlp_problem(N)
    res = active_subspace(p.model, "cross_entropy", p.data, bootstrap=4, generator=_gen(2))
    r = min(N, 32)
    assert res.bootstrap_eigenvalues.shape == (4, r) and res.bootstrap_distances.shape == (4, r)
    L = res.bootstrap_eigenvalues
    assert bool((L >= 0).all()) and bool((L[:, :-1] >= L[:, 1:]).all())
    assert bool((res.bootstrap_distances >= 0).all()) and bool((res.bootstrap_distances <= 1).all())
    # the trace is the mean squared gradient norm: each replicate's lies within the per-sample range
    sq = oracle_gradients(p).square().sum(1)
    assert bool((L.sum(1) >= sq.min() - 1e-12).all()) and bool((L.sum(1) <= sq.max() + 1e-12).all())


# ---- distances and layer sensitivity ---------------------------------------------------------------------------
def test_subspace_distance_known_values():
    gen = _gen(2)
    Q, _ = torch.linalg.qr(torch.randn(12, 6, generator=gen, dtype=D))
    R, _ = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=D))
    assert float(subspace_distance(Q[:, :3], Q[:, :3] @ R)) < 1e-14  # the same subspace, another basis
    assert float(subspace_distance(Q[:, :3], Q[:, 3:6])) == pytest.approx(1.0, abs=1e-14)  # orthogonal
    t = 1e-9  # small angles keep their accuracy
    for angle in (t, 0.3):
        rotated = math.cos(angle) * Q[:, :2] + math.sin(angle) * Q[:, 2:4] @ torch.tensor([[1.0, 0], [0, 0]], dtype=D)
        rotated[:, 1] = Q[:, 1]
        assert float(subspace_distance(Q[:, :2], rotated)) == pytest.approx(math.sin(angle), rel=1e-10)
    d = subspace_distances(Q[:, :3], torch.stack([Q[:, 0], Q[:, 2], Q[:, 1]], dim=1))
    torch.testing.assert_close(d, torch.tensor([0.0, 1.0, 0.0], dtype=D), atol=1e-14, rtol=0)
    with pytest.raises(ValueError, match="same shape"):
        subspace_distance(Q[:, :2], Q[:, :3])


def test_layer_sensitivity_sums_to_one_and_matches_a_hand_computation():
    p = mlp_problem(20)
    res = active_subspace(p.model, "cross_entropy", p.data, k=4)
    S = res.layer_sensitivity()
    assert S.shape == (4, 4) and list(res.layout.names) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    torch.testing.assert_close(S.sum(0), torch.ones(4, dtype=D))
    hand = torch.stack([res.eigenvectors[a:b].square().sum(0) for a, b in res.layout.offsets().values()])
    torch.testing.assert_close(S, hand)
    numels = torch.tensor([15.0, 5.0, 10.0, 2.0], dtype=D)
    torch.testing.assert_close(res.layer_sensitivity(by_size=True), hand / (numels / 32)[:, None])
    E = torch.zeros(32, 2, dtype=D)  # direction 1 in 0.weight; direction 2 split between 0.bias and 2.bias
    E[0, 0] = 1.0
    E[15, 1] = E[31, 1] = 2 ** -0.5
    made = dataclasses.replace(res, eigenvectors=E, eigenvalues=res.eigenvalues[:2])
    torch.testing.assert_close(made.layer_sensitivity(), torch.tensor([[1.0, 0], [0, 0.5], [0, 0], [0, 0.5]],
                                                                         dtype=D))
    with pytest.raises(ValueError, match="expected eigenvectors"):
        dataclasses.replace(res, eigenvectors=None).layer_sensitivity()


# ---- convergence in the number of samples ------------------------------------------------------------------------
def test_convergence_errors_decrease_with_more_samples():
    scales = (3.0, 2.0, 1.2, 0.6)
    p = linear_problem(4096, scales=scales)
    g = lambda out, y: out[:, 0]  # noqa: E731 - C = E[x̃x̃ᵀ] on (w_0, b_0)
    sizes = [16, 256, 4096]
    conv = active_subspace_convergence(p.model, data=p.X, g=g, sample_sizes=sizes, k=3, generator=_gen(0))
    assert conv.sample_sizes.tolist() == sizes and conv.eigenvalue_errors.shape == (3, 3)
    assert float(conv.eigenvalue_errors[-1].abs().max()) == 0 and float(conv.subspace_distances[-1].max()) < 1e-12
    assert float(conv.eigenvalue_errors[0].max()) > float(conv.eigenvalue_errors[1].max())
    torch.testing.assert_close(conv.eigenvalues[1], conv.results[1].eigenvalues)
    assert [r.num_samples for r in conv.results] == sizes
    torch.testing.assert_close(conv.samples_per_parameter, torch.tensor(sizes, dtype=D) / 10)
    # against the population C = diag(scales², 1) on (w_0, b_0): errors fall about as 1/√N
    res = active_subspace(p.model, data=p.X, g=g, k=5)
    E = torch.zeros(10, 5, dtype=D)
    E[[0, 1, 2, 8, 3], torch.arange(5)] = 1.0
    truth = dataclasses.replace(res, eigenvalues=torch.tensor([9.0, 4.0, 1.44, 1.0, 0.36], dtype=D), eigenvectors=E)
    conv = active_subspace_convergence(p.model, data=p.X, g=g, sample_sizes=sizes, k=3, reference=truth,
                                       generator=_gen(0), method="operator")
    assert conv.reference_num_samples is None
    err, dist = conv.eigenvalue_errors.max(1).values, conv.subspace_distances[:, 2]
    assert bool((err[1:] < err[:-1]).all()) and bool((dist[1:] < dist[:-1]).all())
    assert float(err[-1]) < 0.25 * float(err[0]) and float(dist[-1]) < 0.25 * float(dist[0])  # 256× the samples
    assert float(err[-1]) < 0.1 and float(dist[-1]) < 0.1
    with pytest.raises(ValueError, match=r"1 ≤ k ≤ min\(sample_sizes\) = 16"):
        active_subspace_convergence(p.model, data=p.X, g=g, sample_sizes=sizes, k=30)
    with pytest.raises(ValueError, match="≤ the 4096 kept samples"):
        active_subspace_convergence(p.model, data=p.X, g=g, sample_sizes=[10, 5000], k=3)
    with pytest.raises(ValueError, match="reference with ≥ 3 eigenvectors"):
        active_subspace_convergence(p.model, data=p.X, g=g, sample_sizes=sizes, k=3,
                                    reference=dataclasses.replace(truth, eigenvectors=None))


# ---- sampler ----------------------------------------------------------------------------------------------------
def test_sampler_path_with_a_model_output():
    p = linear_problem(8)
    scales = torch.tensor([2.0, 1.0, 0.5, 0.25], dtype=D)

    def sampler(n, generator):
        return torch.randn(n, 4, generator=generator, dtype=D) * scales

    res = active_subspace(p.model, g=lambda out, y: out[:, 1], sampler=sampler, num_samples=500, k=5,
                          generator=_gen(9))
    X = sampler(500, _gen(9))  # the same draw
    Xt = torch.cat([X, torch.ones(500, 1, dtype=D)], dim=1)
    torch.testing.assert_close(res.eigenvalues, torch.linalg.eigvalsh(Xt.T @ Xt / 500).flip(0), rtol=1e-10, atol=0)
    population = torch.tensor([4.0, 1.0, 1.0, 0.25, 0.0625], dtype=D)  # E[x̃x̃ᵀ] = diag(scales², 1)
    torch.testing.assert_close(res.eigenvalues, population, rtol=0.2, atol=0)
    # with targets the loss works too, and weights follow the draw order
    res = active_subspace(p.model, "mse", sampler=lambda n, gen: (sampler(n, gen), torch.zeros(n, 2, dtype=D)),
                          num_samples=50, k=2, weights=torch.ones(50, dtype=D))
    assert res.num_samples == 50


def test_sampler_errors_come_before_any_heavy_work():
    p = linear_problem(8)
    before = contract.snapshot(p.model)
    calls = []

    def wrong_count(n, generator):
        calls.append(n)
        return torch.randn(n + 1, 4, generator=generator, dtype=D)

    with pytest.raises(ValueError, match=r"returned inputs with leading dimension 3"):
        active_subspace(p.model, g=lambda out, y: out[:, 0], sampler=wrong_count, num_samples=10_000)
    assert calls == [2]

    def wrong_features(n, generator):
        calls.append(n)
        return torch.randn(n, 5, generator=generator, dtype=D)

    calls.clear()
    with pytest.raises(ValueError, match="model .or g. failed on a small draw"):
        active_subspace(p.model, g=lambda out, y: out[:, 0], sampler=wrong_features, num_samples=10_000)
    assert calls == [2]
    inputs_only = lambda n, generator: torch.randn(n, 4, generator=generator, dtype=D)  # noqa: E731
    with pytest.raises(ValueError, match="g='loss' needs targets"):
        active_subspace(p.model, "mse", sampler=inputs_only, num_samples=10)
    with pytest.raises(ValueError, match="needs num_samples"):
        active_subspace(p.model, g=lambda out, y: out[:, 0], sampler=inputs_only)
    with pytest.raises(TypeError, match="either data or sampler"):
        active_subspace(p.model, "mse", p.data, sampler=inputs_only, num_samples=10)
    with pytest.raises(ValueError, match=r"num_samples applies to draws only.*sampler=.*prior="):
        active_subspace(p.model, "mse", p.data, num_samples=10)
    contract.assert_unchanged(before, contract.snapshot(p.model))


# ---- errors and the model ------------------------------------------------------------------------------------------
def test_documented_errors():
    p = mlp_problem(12)
    args = (p.model, "cross_entropy", p.data)
    for k in (0, 13, 2.5):
        with pytest.raises(ValueError, match=r"expected 1 ≤ k ≤ min\(N, P\) = 12|positive integer or None"):
            active_subspace(*args, k=k)
    with pytest.raises(ValueError, match="positive, finite memory_budget"):
        active_subspace(*args, memory_budget=0)
    with pytest.raises(ValueError, match="positive, finite memory_budget"):
        active_subspace(*args, memory_budget=float("inf"))
    with pytest.raises(TypeError, match="memory_budget as a number of bytes"):
        active_subspace(*args, memory_budget="1GB")
    with pytest.raises(ValueError, match="expected the snapshot path to fit memory_budget=1,000 bytes"):
        active_subspace(*args, k=2, method="snapshot", memory_budget=1000)
    with pytest.raises(ValueError, match="method in"):
        active_subspace(*args, method="fast")
    with pytest.raises(ValueError, match="bootstrap to be a non-negative integer"):
        active_subspace(*args, bootstrap=-1)
    with pytest.raises(ValueError, match="0 < confidence < 1"):
        active_subspace(*args, confidence=1.0)
    with pytest.raises(ValueError, match="tol > 0"):
        active_subspace(*args, tol=0)
    with pytest.raises(TypeError, match="torch.Generator"):
        active_subspace(*args, generator=0)


@pytest.mark.parametrize("method", ["snapshot", "operator"])
def test_model_left_untouched_also_after_an_error(method):
    p = mlp_problem(16)
    p.model.train()
    p.model[0].weight.grad = torch.ones_like(p.model[0].weight)
    before = contract.snapshot(p.model)
    active_subspace(p.model, "cross_entropy", p.data, k=2, method=method, bootstrap=2, center=True, batch_size=5)
    active_subspace(p.model, "cross_entropy", p.data, method=method, batch_size=5)

    def failing(out, y):
        if out.shape[0] == 1:  # the last batch
            raise RuntimeError("g failed")
        return out[:, 0]

    with pytest.raises(RuntimeError, match="g failed"):
        active_subspace(p.model, "cross_entropy", p.data, k=2, g=failing, method=method, batch_size=5)
    contract.assert_unchanged(before, contract.snapshot(p.model))
