"""Memory-bounded products and estimators (issue 15): wide blocks in ``max_columns`` slices, probes
streamed block by block, the NTK's kernel assembled in place (with a size guard and a grouped
fallback), and numpy's BLAS threads during scipy ARPACK solves.  Every result is checked against an
independent dense oracle built with plain autograd on a small float64 model."""

import numpy as np
import pytest
import scipy.sparse.linalg as spla
import torch
from torch import nn

import curvops
from curvops.linalg import diagonal, trace
from curvops.linalg._probe_stream import ProbeStream
from curvops.operators import _threads

D = torch.float64


def _mlp(seed=0, d_in=3, width=5, d_out=2, norm=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(d_in, width), nn.Tanh()]
    if norm:
        layers.append(nn.LayerNorm(width))  # parameters outside nn.Linear: explicit Jacobian rows
    layers.append(nn.Linear(width, d_out))
    return nn.Sequential(*layers).to(D)


def _data(n=11, d_in=3, classes=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g, dtype=D), torch.randint(0, classes, (n,), generator=g)


def _dense_hessian(model, X, y):
    """Row by row reverse-over-reverse autograd of the mean cross-entropy (no curvops code)."""
    params = list(model.parameters())
    loss = nn.functional.cross_entropy(model(X), y)
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params, create_graph=True)])
    rows = [torch.cat([t.reshape(-1) for t in torch.autograd.grad(g[i], params, retain_graph=True)])
            for i in range(g.numel())]
    return torch.stack(rows).detach()


def _dense_jacobian(model, X):
    """[N·C, P], rows sample-major, by one autograd pass per output entry."""
    params = list(model.parameters())
    out = model(X).reshape(-1)
    rows = [torch.cat([t.reshape(-1) for t in torch.autograd.grad(out[i], params, retain_graph=True)])
            for i in range(out.numel())]
    return torch.stack(rows).detach()


# ---- wide blocks in max_columns slices --------------------------------------------------------
def test_wide_block_is_sliced_and_equals_the_dense_product():
    model = _mlp()
    X, y = _data()
    Hd = _dense_hessian(model, X, y)
    H = curvops.Hessian(model, "cross_entropy", (X, y), batch_size=4, max_columns=3)
    widths = []
    inner = H._matmat_torch
    H._matmat_torch = lambda V: (widths.append(V.shape[1]), inner(V))[1]
    V = torch.randn(Hd.shape[0], 10, dtype=D)
    out = H @ V
    assert widths == [3, 3, 3, 1]  # each slice at most max_columns wide, written into one output
    torch.testing.assert_close(out, Hd @ V, rtol=1e-10, atol=1e-12)
    wide = curvops.Hessian(model, "cross_entropy", (X, y), batch_size=4, max_columns=64) @ V
    torch.testing.assert_close(out, wide, rtol=1e-12, atol=1e-14)  # slicing changes rounding at most


def test_sliced_adjoint_of_a_jacobian_equals_the_dense_one():
    model = _mlp()
    X, _ = _data()
    Jd = _dense_jacobian(model, X)
    J = curvops.Jacobian(model, X, batch_size=4, max_columns=4)
    W = torch.randn(Jd.shape[0], 9, dtype=D)
    torch.testing.assert_close(J.T @ W, Jd.T @ W, rtol=1e-10, atol=1e-12)
    V = torch.randn(Jd.shape[1], 9, dtype=D)
    torch.testing.assert_close(J @ V, Jd @ V, rtol=1e-10, atol=1e-12)


def test_to_dense_fills_one_output_in_chunks():
    A = torch.randn(7, 7, dtype=D)
    for chunk in (1, 3, 7, 100):
        torch.testing.assert_close(curvops.Dense(A).to_dense(chunk=chunk), A, rtol=0, atol=0)


# ---- probes streamed block by block -------------------------------------------------------------
@pytest.mark.parametrize("distribution", ["rademacher", "gaussian", "sphere"])
def test_probe_blocks_do_not_depend_on_the_grouping(distribution):
    n, m = 50, 13
    stream = lambda: ProbeStream(n, m, distribution, torch.Generator().manual_seed(3), D,  # noqa: E731
                                 torch.device("cpu"), "t")
    whole = stream().block(0, m)
    assert whole.dtype == D and whole.shape == (n, m)
    parts = torch.cat([b for _, _, b in stream().blocks(4)], dim=1)
    torch.testing.assert_close(parts, whole, rtol=0, atol=0)
    if distribution == "rademacher":
        assert set(whole.unique().tolist()) == {-1.0, 1.0}
    if distribution == "sphere":
        torch.testing.assert_close(whole.norm(dim=0), torch.full((m,), n ** 0.5, dtype=D))
    other = ProbeStream(n, m, distribution, torch.Generator().manual_seed(4), D, torch.device("cpu"), "t")
    assert not torch.equal(other.block(0, m), whole)


def test_hutchinson_estimates_do_not_depend_on_block_size_and_are_deterministic():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(40, 40, generator=g, dtype=D)
    A = curvops.Dense(M + M.T)
    ref = trace(A, method="hutchinson", num_matvecs=30, generator=5)
    for bs in (1, 7, 30):
        res = trace(A, method="hutchinson", num_matvecs=30, generator=5, block_size=bs)
        torch.testing.assert_close(res.samples, ref.samples, rtol=1e-13, atol=1e-12)
    assert trace(A, method="hutchinson", num_matvecs=30, generator=5).value == ref.value
    assert trace(A, method="hutchinson", num_matvecs=30, generator=6).value != ref.value
    d1 = diagonal(A, method="hutchinson", num_matvecs=30, generator=5, block_size=4)
    d2 = diagonal(A, method="hutchinson", num_matvecs=30, generator=5)
    torch.testing.assert_close(d1.value, d2.value, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d1.stderr, d2.stderr, rtol=1e-10, atol=1e-12)


def test_streamed_diagonal_moments_equal_the_explicit_ones():
    g = torch.Generator().manual_seed(1)
    M = torch.randn(25, 25, generator=g, dtype=D)
    W = ProbeStream(25, 17, "rademacher", torch.Generator().manual_seed(9), D, torch.device("cpu"), "t").block(0, 17)
    samples = W * (M @ W)  # the explicit per-probe estimates, [n, m]
    res = diagonal(curvops.Dense(M), method="hutchinson", num_matvecs=17,
                   generator=torch.Generator().manual_seed(9), block_size=5)
    torch.testing.assert_close(res.value, samples.mean(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(res.stderr, samples.std(1) / 17 ** 0.5, rtol=1e-10, atol=1e-12)


def test_trace_estimates_use_the_streamed_probes_of_a_hessian():
    model = _mlp()
    X, y = _data()
    Hd = _dense_hessian(model, X, y)
    H = curvops.Hessian(model, "cross_entropy", (X, y), batch_size=4, max_columns=4)
    W = ProbeStream(Hd.shape[0], 12, "rademacher", torch.Generator().manual_seed(2), D,
                    torch.device("cpu"), "t").block(0, 12)
    expected = (W * (Hd @ W)).sum(0)
    res = trace(H, method="hutchinson", num_matvecs=12, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(res.samples, expected, rtol=1e-10, atol=1e-12)


# ---- NTK: guard, in-place assembly, grouped fallback ---------------------------------------------
def test_ntk_to_dense_refuses_a_huge_kernel_before_any_work():
    X = torch.zeros(8193, 2, dtype=D)  # (8193·1)² entries > 2**26
    K = curvops.NTK(nn.Linear(2, 1).to(D), X)
    K._features = lambda: pytest.fail("the guard must come before any pass over the data")
    with pytest.raises(ValueError, match=r"NTK.to_dense: the kernel has 8193×8193 = 67,125,249 entries .*"
                                         r"above max_entries=67,108,864.*pass max_entries=67125249"):
        K.to_dense()
    with pytest.raises(ValueError, match="above max_entries=10"):
        curvops.NTK(nn.Linear(2, 1).to(D), X[:4]).to_dense(max_entries=10)


@pytest.mark.parametrize("norm", [False, True], ids=["linear_only", "with_rest_rows"])
def test_ntk_grouped_fallback_is_exact(norm):
    model = _mlp(norm=norm)
    X, _ = _data(n=13)
    Jd = _dense_jacobian(model, X)
    K = curvops.NTK(model, X, batch_size=3, memory_budget=600)  # a few batches per group
    dense = K.to_dense()
    assert K._over_budget and K.last_dense_groups > 1
    torch.testing.assert_close(dense, Jd @ Jd.T, rtol=1e-10, atol=1e-12)
    whole = curvops.NTK(model, X, batch_size=3).to_dense()  # features fit: one group
    torch.testing.assert_close(whole, Jd @ Jd.T, rtol=1e-10, atol=1e-12)


def test_ntk_grouped_cross_kernel_and_reduction_are_exact():
    model = _mlp()
    X1, _ = _data(n=7, seed=2)
    X2, _ = _data(n=10, seed=3)
    J1, J2 = _dense_jacobian(model, X1), _dense_jacobian(model, X2)
    K = curvops.NTK(model, X1, X2, batch_size=2, memory_budget=300)
    torch.testing.assert_close(K.to_dense(), J1 @ J2.T, rtol=1e-10, atol=1e-12)
    assert K.last_dense_groups > 1
    S1 = J1.reshape(7, 2, -1).sum(1)
    S2 = J2.reshape(10, 2, -1).sum(1)
    Ks = curvops.NTK(model, X1, X2, batch_size=2, memory_budget=100, output_reduction="sum")
    torch.testing.assert_close(Ks.to_dense(), S1 @ S2.T, rtol=1e-10, atol=1e-12)


# ---- BLAS threads during scipy ARPACK solves ------------------------------------------------------
def _blas_threads():
    import threadpoolctl

    return [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]


def test_scipy_eigsh_runs_blas_on_one_thread_and_leaves_the_settings_as_found():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    if not _blas_threads():
        pytest.skip("no BLAS library visible to threadpoolctl")
    A = curvops.Dense(torch.diag(torch.arange(1.0, 61.0, dtype=D)))
    seen = []
    inner = A._matmat_torch
    A._matmat_torch = lambda V: (seen.append((_threads.active(), _blas_threads())), inner(V))[1]
    with threadpoolctl.threadpool_limits(2, user_api="blas"):  # a known starting point above one
        before = _blas_threads()
        vals = spla.eigsh(A, k=3, return_eigenvectors=False)
        after = _blas_threads()
        inside = seen[:]
        A.matvec(np.ones(60))  # a plain numpy product outside a solver: no limit
        plain = seen[-1]
    np.testing.assert_allclose(np.sort(vals), [58.0, 59.0, 60.0])
    assert all(active and set(n) == {1} for active, n in inside)
    assert after == before == [2] * len(before) and not _threads.active()
    assert plain == (False, before)


def test_blas_limit_is_released_when_the_solver_fails():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    A = curvops.Dense(torch.diag(torch.arange(1.0, 61.0, dtype=D)))
    calls = [0]
    inner = A._matmat_torch

    def failing(V):
        calls[0] += 1
        if calls[0] > 3:
            raise RuntimeError("boom")
        return inner(V)

    A._matmat_torch = failing
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        before = _blas_threads()
        with pytest.raises(RuntimeError, match="boom"):
            spla.eigsh(A, k=3)
        import gc

        gc.collect()
        assert not _threads.active() and _blas_threads() == before
