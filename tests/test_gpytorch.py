"""The GPyTorch bridge: curvops operators as LinearOperators, GPyTorch's algorithms on them, the NTK kernel."""

from __future__ import annotations

import math
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


# ---- every curvature operator through the bridge, in every autograd context (issue 10) ------
# GPyTorch multiplies inside ``autograd.Function.forward`` (Matmul, Solve, InvQuadLogdet,
# PivotedCholesky), where grad mode is off: the wrapper must give the operator's own matrix
# there, under ``no_grad`` and under ``inference_mode`` (contract rule 8), to 1e-10 relative.
RTOL_PRODUCT = 1e-10
RTOL_SOLVE = 1e-8


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach(), expected.detach()
    return float((actual - expected).norm() / expected.norm())


def _classifier():
    """A 3-5-3 tanh MLP (P = 38) with cross-entropy on 6 samples: every curvature is nonzero and
    the PSD ones have rank ≤ 12 < P (so a noise/damping term makes them definite)."""
    net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).to(DT)
    with torch.no_grad():
        for i, p in enumerate(net.parameters()):
            p.copy_(torch.randn(p.shape, generator=gen(20 + i), dtype=DT))
    X = torch.randn(6, 3, generator=gen(30), dtype=DT)
    y = torch.randint(0, 3, (6,), generator=gen(31))
    return net, X, y


def _jacobian_gram(net, X, y):
    J = curvops.Jacobian(net, X)
    return J.T @ J


CURVATURE = {  # name: (builder(net, X, y), kind)
    "Hessian": (lambda net, X, y: curvops.Hessian(net, "cross_entropy", (X, y)), "symmetric"),
    "GGN": (lambda net, X, y: curvops.GGN(net, "cross_entropy", (X, y)), "psd"),
    "Fisher": (lambda net, X, y: curvops.Fisher(net, "cross_entropy", (X, y)), "psd"),
    "Fisher-mc": (lambda net, X, y: curvops.Fisher(net, "cross_entropy", (X, y), mc_samples=3, seed=1), "psd"),
    "EmpiricalFisher": (lambda net, X, y: curvops.EmpiricalFisher(net, "cross_entropy", (X, y)), "psd"),
    "GradientCovariance": (lambda net, X, y: curvops.GradientCovariance(net, "cross_entropy", (X, y), center=True),
                           "psd"),
    "NTK": (lambda net, X, y: curvops.NTK(net, X), "psd"),
    "JtJ": (_jacobian_gram, "psd"),
    "Jacobian": (lambda net, X, y: curvops.Jacobian(net, X), "rectangular"),
    "CrossHessian": (lambda net, X, y: curvops.CrossHessian(net, "cross_entropy", (X, y), rows=net[0], cols=net[2]),
                     "rectangular"),
    "ActivationHessian": (lambda net, X, y: curvops.ActivationHessian(net, "cross_entropy", (X, y), layer="1"),
                          "symmetric"),
    "OutputHessian": (lambda net, X, y: curvops.OutputHessian(net, X, torch.randn(6, 3, generator=gen(32), dtype=DT)),
                      "symmetric"),
    "HessianResidual": (lambda net, X, y: curvops.HessianResidual(net, "cross_entropy", (X, y)), "symmetric"),
}
PSD_OPS = [name for name, (_, kind) in CURVATURE.items() if kind == "psd"]


def _build(name: str):
    net, X, y = _classifier()
    return CURVATURE[name][0](net, X, y), net


class _InForward(torch.autograd.Function):
    """Calls ``fn()`` inside ``Function.forward``, where autograd records nothing (as GPyTorch's do)."""

    @staticmethod
    def forward(ctx, fn, anchor):
        assert not torch.is_grad_enabled()
        return fn()

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - never differentiated
        return None, None


def _in_contexts(product, V: torch.Tensor) -> dict:
    """``product(V)`` plainly, under no_grad, under inference_mode (V an inference tensor) and inside
    an ``autograd.Function.forward`` whose input requires grad."""
    out = {"plain": product(V)}
    with torch.no_grad():
        out["no_grad"] = product(V)
    with torch.inference_mode():
        Vi = V.clone()
        assert Vi.is_inference()
        out["inference_mode"] = product(Vi)
    out["Function.forward"] = _InForward.apply(lambda: product(V), torch.zeros(1, dtype=DT, requires_grad=True))
    return out


@pytest.mark.parametrize("name", list(CURVATURE))
def test_bridge_products_equal_the_operator_in_every_autograd_context(name):
    A, _ = _build(name)
    L = to_linear_operator(A)
    assert L.shape == A.shape and L.dtype == DT
    V = torch.randn(A.shape[1], 3, generator=gen(40), dtype=DT)
    W = torch.randn(A.shape[0], 2, generator=gen(41), dtype=DT)
    ref, ref_t = A @ V, A.T @ W  # the operator itself, plain context
    assert float(ref.norm()) > 0 and float(ref_t.norm()) > 0
    cases = {**{f"L @ V ({c})": (r, ref) for c, r in _in_contexts(lambda M: L @ M, V).items()},
             **{f"L.mT @ W ({c})": (r, ref_t) for c, r in _in_contexts(lambda M: L.mT @ M, W).items()},
             "L.matmul(v)": (L.matmul(V[:, 0]), ref[:, 0]),
             "L._matmul(V) in Function.forward": (
                 _InForward.apply(lambda: L._matmul(V), torch.zeros(1, dtype=DT, requires_grad=True)), ref)}
    if A.shape[0] != A.shape[1]:  # GPyTorch's own composite of a rectangular wrapper
        cases["(L.mT @ L) @ V"] = ((L.mT @ L) @ V, A.T @ (A @ V))
    errors = {what: _rel(got, want) for what, (got, want) in cases.items()}
    assert max(errors.values()) <= RTOL_PRODUCT, errors


# GPyTorch's iterative path, set up so that it is exact to rounding on a kernel of rank r < n
# plus a diagonal (K + δI): no Cholesky (max_cholesky_size 0); a pivoted-Cholesky preconditioner
# P = LLᵀ + δI of rank up to n, run until its relative trace error is below 1e-13, so that P = K + δI
# to rounding (its rows come from products with unit vectors inside PivotedCholesky.forward);
# preconditioned CG to a relative residual of 1e-10 (at most 100 iterations, products inside
# Solve/InvQuadLogdet.forward); log det = log det P (exact, by QR) + SLQ on P⁻¹(K + δI) ≈ I
# (8 probes × 10 Lanczos steps, whose error is then rounding, not the usual SLQ percent).
def _iterative(n: int) -> tuple:
    s = gpytorch.settings
    return (s.max_cholesky_size(0), s.max_preconditioner_size(n), s.min_preconditioning_size(1),
            s.preconditioner_tolerance(1e-13), s.cg_tolerance(1e-10), s.max_cg_iterations(100),
            s.num_trace_samples(8), s.max_lanczos_quadrature_iterations(10), s.skip_posterior_variances(True),
            gpytorch.settings.max_eager_kernel_size(0))  # predictions too: no dense test×train block


class _Recorder:
    """Records the grad mode of every bridge product and refuses densification (so a test shows
    GPyTorch took its iterative path, multiplying inside its autograd Functions)."""

    def __init__(self, monkeypatch):
        self.grad_modes: list[bool] = []
        matmul = CurvopsLinearOperator._matmul

        def recording(lo, rhs):
            self.grad_modes.append(torch.is_grad_enabled())
            return matmul(lo, rhs)

        def refuse(lo):
            raise AssertionError("GPyTorch densified the operator: the iterative path was not taken")

        monkeypatch.setattr(CurvopsLinearOperator, "_matmul", recording)
        monkeypatch.setattr(CurvopsLinearOperator, "to_dense", refuse)

    def check(self, at_least: int) -> None:
        assert len(self.grad_modes) >= at_least
        assert self.grad_modes.count(False) >= at_least, "products were expected inside autograd Functions"


def _run_iterative(n: int, fn):
    import contextlib

    with contextlib.ExitStack() as stack:
        for setting in _iterative(n):
            stack.enter_context(setting)
        return fn()


@pytest.mark.parametrize("name", PSD_OPS)
def test_gpytorch_solve_logdet_and_log_prob_on_every_psd_curvature_equal_dense(name, monkeypatch):
    # GGN + δI etc. as the covariance of a linear-Gaussian model over parameters (or, for the NTK,
    # over outputs): GPyTorch's CG solve, inv_quad_logdet and MultivariateNormal.log_prob.
    A, _ = _build(name)
    D = A.to_dense()  # the dense answer, from products in the plain context
    n = D.shape[0]
    delta = 0.1 * float(D.diagonal().mean())
    C = D + delta * torch.eye(n, dtype=DT)
    b = torch.randn(n, 2, generator=gen(42), dtype=DT)
    theta = torch.randn(n, generator=gen(43), dtype=DT)
    L = to_linear_operator(A).add_diagonal(torch.tensor(delta, dtype=DT))
    rec = _Recorder(monkeypatch)

    def gpytorch_side():
        x = L.solve(b)
        iq, ld = L.inv_quad_logdet(b, logdet=True)
        lp = gpytorch.distributions.MultivariateNormal(torch.zeros(n, dtype=DT), L).log_prob(theta)
        return x, iq, ld, lp

    x, iq, ld, lp = _run_iterative(n, gpytorch_side)
    rec.check(at_least=10)
    want_lp = torch.distributions.MultivariateNormal(torch.zeros(n, dtype=DT), covariance_matrix=C).log_prob(theta)
    errors = {"solve": _rel(x, torch.linalg.solve(C, b)),
              "inv_quad": _rel(iq, (b * torch.linalg.solve(C, b)).sum()),
              "logdet": _rel(ld, torch.logdet(C)),
              "log_prob": _rel(lp, want_lp)}
    assert max(errors.values()) <= RTOL_SOLVE, errors


def test_gpytorch_plain_cg_on_a_curvature_does_what_it_does_on_the_dense_matrix():
    # Unpreconditioned CG and SLQ (GPyTorch's defaults for small n): with the same probes, the
    # wrapper gives what GPyTorch gives on a DenseLinearOperator of the same matrix.
    A, _ = _build("GGN")
    D = A.to_dense() + 0.5 * torch.eye(A.shape[0], dtype=DT)
    b = torch.randn(A.shape[0], 1, generator=gen(44), dtype=DT)
    s = gpytorch.settings
    results = []
    for L in (to_linear_operator(A).add_diagonal(torch.tensor(0.5, dtype=DT)), DenseLinearOperator(D)):
        torch.manual_seed(12)
        with s.max_cholesky_size(0), s.max_preconditioner_size(0), s.cg_tolerance(1e-10), \
                s.num_trace_samples(4), s.max_lanczos_quadrature_iterations(10), s.max_cg_iterations(60):
            results.append((L.solve(b), *L.inv_quad_logdet(b, logdet=True)))
    for ours, ref in zip(*results):
        assert _rel(ours, ref) <= 1e-9
    # and near the exact answer at the accuracy GPyTorch's linear_cg reaches (see the module caveats)
    assert _rel(results[0][0], torch.linalg.solve(D, b)) <= 1e-4


# ---- a GP regression with the NTK kernel, solved by GPyTorch's iterative path ---------------------
def test_ntk_gp_regression_through_gpytorch_equals_dense_solve(monkeypatch):
    # 30 training points, a 2-6-1 tanh net (P = 25 < 30: the NTK has rank 25, as in an NTK-GP),
    # noise σ² = 0.3 · mean diag K.  Posterior mean K_*X (K + σ²I)⁻¹ y and the log marginal
    # likelihood −½(yᵀ(K + σ²I)⁻¹y + log det(K + σ²I) + n log 2π)/n against torch.linalg.
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1)).to(DT)
    n = 30
    X = torch.randn(n, 2, generator=gen(50), dtype=DT)
    y = torch.sin(X.sum(1)) + 0.1 * torch.randn(n, generator=gen(51), dtype=DT)
    Xs = torch.randn(10, 2, generator=gen(52), dtype=DT)
    K, Ks = _oracle_ntk(net, X, X), _oracle_ntk(net, Xs, X)
    noise = 0.3 * float(K.diagonal().mean())
    C = K + noise * torch.eye(n, dtype=DT)
    mean_ref = Ks @ torch.linalg.solve(C, y)
    mll_ref = -0.5 * (y @ torch.linalg.solve(C, y) + torch.logdet(C) + n * math.log(2 * math.pi)) / n

    class NTKGP(gpytorch.models.ExactGP):
        def __init__(self, likelihood):
            super().__init__(X, y, likelihood)
            self.mean_module = gpytorch.means.ZeroMean()
            self.covar_module = NTKKernel(net)

        def forward(self, x):
            return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))

    likelihood = gpytorch.likelihoods.FixedNoiseGaussianLikelihood(noise=torch.full((n,), noise, dtype=DT))
    gp = NTKGP(likelihood).to(DT)
    rec = _Recorder(monkeypatch)

    def gpytorch_side():
        gp.train(), likelihood.train()
        mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, gp)(gp(X), y)
        gp.eval(), likelihood.eval()
        return mll, likelihood(gp(Xs)).mean

    mll, mean = _run_iterative(n, gpytorch_side)
    rec.check(at_least=10)
    assert _rel(mean, mean_ref) <= RTOL_SOLVE
    assert _rel(mll, mll_ref) <= RTOL_SOLVE


# ---- the wrapper follows the model: GPyTorch's memo is keyed on the parameters ------------------
def test_bridge_caches_follow_the_model():
    A, net = _build("GGN")
    L = to_linear_operator(A)
    V = torch.randn(A.shape[1], 2, generator=gen(45), dtype=DT)
    first = L.to_dense()
    assert L.to_dense() is first  # unchanged model: GPyTorch's memo is used
    root = L.root_decomposition().root.to_dense()
    changes = {
        "in-place update": lambda: net[0].weight.data.mul_(1.3),
        "reassigned .data": lambda: setattr(net[0].bias, "data", net[0].bias.data + 0.5),
        "load_state_dict": lambda: net.load_state_dict(
            {k: v + 0.1 * torch.ones_like(v) for k, v in net.state_dict().items()}),
        "vector_to_parameters": lambda: torch.nn.utils.vector_to_parameters(
            torch.nn.utils.parameters_to_vector(net.parameters()).detach() * 0.9, net.parameters()),
    }
    for what, change in changes.items():
        with torch.no_grad():
            change()
        D = A.to_dense()
        assert _rel(D, first) > 1e-3, what  # the matrix did change
        assert _rel(L.to_dense(), D) <= RTOL_PRODUCT, what
        assert _rel(L @ V, D @ V) <= RTOL_PRODUCT, what
        R = L.root_decomposition().root.to_dense()
        assert _rel(R @ R.mT, D) <= 1e-6, what  # a Cholesky of the singular GGN, with GPyTorch's 1e-8 jitter
        assert R.shape != root.shape or not torch.equal(R, root), what
        root, first = R, D
