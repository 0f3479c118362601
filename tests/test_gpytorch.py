"""The GPyTorch bridge: curvops operators as LinearOperators, GPyTorch's algorithms on them, the NTK kernel."""

from __future__ import annotations

import pathlib
import runpy

import pytest
import torch

gpytorch = pytest.importorskip("gpytorch")
linear_operator = pytest.importorskip("linear_operator")

import curvops  # noqa: E402
from curvops.interop.gpytorch import CurvopsLinearOperator, NTKKernel, to_linear_operator  # noqa: E402
from curvops.testing.spectra import gen
from linear_operator.operators import DenseLinearOperator  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore:CG terminated in"),
              pytest.mark.filterwarnings("ignore:Sparse invariant checks")]

DT = torch.float64
ROOT = pathlib.Path(__file__).resolve().parents[1]


def spd(n: int = 40, seed: int = 0) -> torch.Tensor:
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen(seed), dtype=DT))
    A = (Q * torch.linspace(0.5, 4.0, n, dtype=DT)) @ Q.T
    return (A + A.T) / 2


def counting(A: torch.Tensor, tags=("psd",)):
    calls = []

    def mm(V, M=A):
        calls.append(V.shape[1])
        return M @ V

    return curvops.func_operator(tuple(A.shape), mm, lambda W: mm(W, A.T), dtype=A.dtype, tags=tags), calls


A40 = spd()


# ---- the LinearOperator contract -----------------------------------------------------------
def test_products_shapes_and_batches():
    op, calls = counting(A40)
    L = to_linear_operator(op)
    assert isinstance(L, CurvopsLinearOperator) and L.shape == (40, 40) and L.dtype == DT and L.device.type == "cpu"
    V = torch.randn(40, 3, generator=gen(1), dtype=DT)
    torch.testing.assert_close(L @ V, A40 @ V)
    torch.testing.assert_close(L.matmul(V[:, 0]), A40 @ V[:, 0])
    Vb = torch.randn(2, 5, 40, 3, generator=gen(2), dtype=DT)
    calls.clear()
    torch.testing.assert_close(L.matmul(Vb), A40 @ Vb)
    assert calls == [30]  # the batch folded into one call of 2·5·3 columns
    Lb = L.unsqueeze(0).expand(4, 40, 40)
    assert Lb.shape == (4, 40, 40)
    torch.testing.assert_close(Lb @ V, (A40 @ V).expand(4, 40, 3))
    assert Lb[1:3].shape == (2, 40, 40) and Lb[2].shape == (40, 40)
    assert Lb.unsqueeze(0).expand(3, 4, 40, 40).permute(1, 0, 2, 3).shape == (4, 3, 40, 40)


def test_transpose_and_rectangular():
    J = torch.randn(7, 4, generator=gen(3), dtype=DT)
    L = to_linear_operator(curvops.Dense(J))
    assert L.mT.shape == (4, 7)
    torch.testing.assert_close(L.mT @ torch.ones(7, 2, dtype=DT), J.T @ torch.ones(7, 2, dtype=DT))
    torch.testing.assert_close(L.to_dense(), J)
    sym = to_linear_operator(curvops.Dense(A40, tags=("psd",)))
    assert sym.mT is sym


def test_round_trips_dtype_and_device():
    L = to_linear_operator(curvops.Dense(A40, tags=("psd",)))
    L32 = L.to(torch.float32)
    assert L32.dtype == torch.float32 and L32.op is L.op
    out = L32 @ torch.ones(40, 1, dtype=torch.float32)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, (A40 @ torch.ones(40, 1, dtype=DT)).float())
    for rebuilt in (L.double(), L.detach(), L.clone(), L.cpu(), L32.double(),
                    L.representation_tree()(*L.representation())):
        assert isinstance(rebuilt, CurvopsLinearOperator) and rebuilt.op is L.op and rebuilt.dtype == DT
        torch.testing.assert_close(rebuilt.to_dense(), A40)


@pytest.mark.parametrize("kind", ["dense", "diagonal", "lowrank", "identity", "generic"])
def test_diagonal_and_entries(kind):
    d = torch.linspace(1.0, 2.0, 40, dtype=DT)
    U = torch.randn(40, 3, generator=gen(4), dtype=DT)
    op, dense = {
        "dense": (curvops.Dense(A40), A40),
        "diagonal": (curvops.Diagonal(d), torch.diag(d)),
        "lowrank": (curvops.LowRank(U, torch.tensor([3.0, 2.0, 1.0], dtype=DT)), U @ torch.diag(torch.tensor(
            [3.0, 2.0, 1.0], dtype=DT)) @ U.T),
        "identity": (curvops.Identity(40), torch.eye(40, dtype=DT)),
        "generic": (counting(A40)[0], A40),
    }[kind]
    L = to_linear_operator(op)
    torch.testing.assert_close(L.diagonal(), dense.diagonal())
    rows, cols = torch.tensor([0, 5, 5, 39]), torch.tensor([3, 5, 7, 39])
    torch.testing.assert_close(L[rows, cols], dense[rows, cols])
    torch.testing.assert_close(L[rows][:, cols].to_dense(), dense[rows][:, cols])
    torch.testing.assert_close(L._get_indices(rows[:, None], cols[None, :]), dense[rows[:, None], cols[None, :]])


def test_generic_entries_cost_one_product_per_distinct_column():
    op, calls = counting(A40, tags=())
    L = to_linear_operator(op)
    vals = L._get_indices(torch.tensor([1, 2, 3, 4]), torch.tensor([9, 9, 9, 20]))
    torch.testing.assert_close(vals, A40[[1, 2, 3, 4], [9, 9, 9, 20]])
    assert calls == [2]
    calls.clear()
    L.diagonal()
    assert sum(calls) == 40


# ---- GPyTorch's algorithms on it -------------------------------------------------------------
def test_gpytorch_cg_lanczos_and_logdet_match_a_dense_linear_operator():
    # With the same seed, GPyTorch's iterative algorithms must do on the wrapper exactly what
    # they do on a DenseLinearOperator of the same matrix; and be close to the exact answers.
    b = torch.randn(40, 2, generator=gen(5), dtype=DT)
    ours = to_linear_operator(counting(A40)[0])
    ref = DenseLinearOperator(A40)
    settings = (gpytorch.settings.max_cholesky_size(0), gpytorch.settings.cg_tolerance(1e-10),
                gpytorch.settings.num_trace_samples(64), gpytorch.settings.max_lanczos_quadrature_iterations(40),
                gpytorch.settings.max_preconditioner_size(0), gpytorch.settings.max_cg_iterations(100))
    results = []
    for L in (ours, ref):
        torch.manual_seed(11)
        with settings[0], settings[1], settings[2], settings[3], settings[4], settings[5]:
            x = L.solve(b)
            iq, ld = L.inv_quad_logdet(b, logdet=True)
        results.append((x, iq, ld))
    (x, iq, ld), (x_ref, iq_ref, ld_ref) = results
    torch.testing.assert_close(x, x_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(iq, iq_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ld, ld_ref, rtol=1e-10, atol=1e-12)
    # GPyTorch's linear_cg stalls near a relative residual of 6e-6 here (on the dense operator too)
    torch.testing.assert_close(x, torch.linalg.solve(A40, b), rtol=1e-4, atol=1e-5)
    assert float(ld) == pytest.approx(float(torch.logdet(A40)), rel=0.05)
    Q, T = linear_operator.utils.lanczos.lanczos_tridiag(
        ours._matmul, 10, dtype=DT, device=torch.device("cpu"), matrix_shape=(40, 40),
        init_vecs=torch.ones(40, 1, dtype=DT))
    torch.testing.assert_close(Q.T @ A40 @ Q, T, rtol=1e-8, atol=1e-8)


def test_documented_caveat_eigvalsh_clamps_negative_eigenvalues():
    L = to_linear_operator(curvops.Dense(torch.diag(torch.tensor([3.0, -2.0, 1.0], dtype=DT)), tags=("symmetric",)))
    torch.testing.assert_close(L.eigvalsh(), torch.tensor([0.0, 1.0, 3.0], dtype=DT))  # not −2: GPyTorch assumes PSD


# ---- the NTK kernel ----------------------------------------------------------------------------
def _net(outputs: int = 1):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, outputs)).to(DT)


def _oracle_ntk(net, X1, X2):
    params = {k: v.detach() for k, v in net.named_parameters()}

    def jac(X):
        J = torch.func.jacrev(lambda p: torch.func.functional_call(net, p, (X,)).reshape(-1))(params)
        return torch.cat([t.reshape(t.shape[0], -1) for t in J.values()], dim=1)

    return jac(X1) @ jac(X2).T


def test_ntk_kernel_blocks_and_diagonal():
    net = _net()
    X1 = torch.randn(9, 2, generator=gen(6), dtype=DT)
    X2 = torch.randn(5, 2, generator=gen(7), dtype=DT)
    k = NTKKernel(net)
    assert list(k.parameters()) == []  # the network's weights are not GP hyperparameters
    cross = k(X1, X2)
    assert cross.shape == (9, 5)
    torch.testing.assert_close(cross.to_dense(), _oracle_ntk(net, X1, X2), rtol=1e-10, atol=1e-12)
    full = k(X1).evaluate_kernel()
    assert full.op.is_psd
    torch.testing.assert_close(full @ torch.ones(9, 1, dtype=DT), _oracle_ntk(net, X1, X1) @ torch.ones(9, 1, dtype=DT))
    torch.testing.assert_close(k(X1, diag=True), _oracle_ntk(net, X1, X1).diagonal(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(k(X1)[2:5, 1:4].to_dense(), _oracle_ntk(net, X1[2:5], X1[1:4]), rtol=1e-10, atol=1e-12)


def test_ntk_kernel_multi_output_and_bad_input():
    net = _net(outputs=2)
    X = torch.randn(4, 2, generator=gen(8), dtype=DT)
    k = NTKKernel(net)
    assert k.num_outputs_per_input(X, X) == 2
    torch.testing.assert_close(k(X).to_dense(), _oracle_ntk(net, X, X), rtol=1e-10, atol=1e-12)
    assert NTKKernel(net, output_reduction="sum").num_outputs_per_input(X, X) == 1
    with pytest.raises(ValueError, match=r"NTKKernel: expected inputs of shape \[n, d\], got \(3, 4, 2\)"):
        k.forward(torch.zeros(3, 4, 2, dtype=DT), torch.zeros(3, 4, 2, dtype=DT))


def test_ntk_gp_regression_example(tmp_path):
    mod = runpy.run_path(str(ROOT / "examples" / "ntk_gp_regression.py"), run_name="example")
    res = mod["main"](str(tmp_path / "fig.png"), n_train=20, n_test=25)
    assert (tmp_path / "fig.png").stat().st_size > 10_000
    assert res["err_kernel"] < 1e-12  # the wrapped NTK is the torch.func oracle's kernel
    assert res["err_dense"] < 1e-6  # GPyTorch's posterior mean = closed form K_*X (K_XX + σ²I)⁻¹ y
    assert res["err_curvops"] < 1e-8
    assert res["err_cg"] < 1e-4  # GPyTorch's own CG path, products with the NTK only


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_gpu():
    op = curvops.Dense(A40.cuda(), tags=("psd",))
    L = to_linear_operator(op)
    assert L.device.type == "cuda" and L.dtype == DT
    b = torch.ones(40, 2, dtype=DT, device="cuda")
    torch.testing.assert_close(L @ b, A40.cuda() @ b)
    torch.testing.assert_close(L.diagonal(), A40.diagonal().cuda())
    Lcpu = L.cpu()  # products still run on the GPU, results come back to the CPU
    assert Lcpu.device.type == "cpu" and Lcpu.op.device.type == "cuda"
    torch.testing.assert_close(Lcpu @ b.cpu(), A40 @ b.cpu())
    net = _net().cuda()
    X = torch.randn(6, 2, dtype=DT, device="cuda")
    K = NTKKernel(net)(X).to_dense()
    assert K.device.type == "cuda"
    torch.testing.assert_close(K, _oracle_ntk(net, X, X), rtol=1e-10, atol=1e-12)
