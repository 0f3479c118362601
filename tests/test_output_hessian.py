"""OutputHessian and HessianResidual against dense torch.func oracles; Hessian = GGN + residual."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn
from torch.func import hessian, jacrev

import curvops
from curvops import GGN, Hessian
from curvops.operators.output_hessian import HessianResidual, OutputHessian
from curvops.testing import contract, oracles
from curvops.testing.zoo import CASES, as_dataloader

REDUCTIONS = ("mean", "sum")
GRID = [pytest.param(c, r, id=f"{c}-{r}") for c in CASES for r in REDUCTIONS]


# ---- oracles (torch.func on the concatenated data; no code shared with the operators) -----
def _outputs(problem):
    return oracles.forward(problem, oracles.flat_params(problem), problem.X).detach()


def weights_for(problem, seed: int = 11) -> torch.Tensor:
    """A seeded random weighting of the stacked outputs, [N, *out_shape]."""
    out = _outputs(problem)
    return contract.probes(out.numel(), 1, seed)[:, 0].reshape(out.shape)


def output_hessian_dense(problem, u: torch.Tensor) -> torch.Tensor:
    """∇²_θ ⟨u, f(θ, X)⟩ = Σ_{ik} u_ik ∇²_θ f_ik."""
    return hessian(lambda th: (u * oracles.forward(problem, th, problem.X)).sum())(oracles.flat_params(problem))


def residual_dense(problem) -> torch.Tensor:
    """Σ_ik (∂L/∂f_ik) ∇²_θ f_ik with L the whole-data loss of the concatenated data."""
    out = _outputs(problem)
    r = jacrev(lambda o: oracles.loss_fn(problem, o, problem.y))(out)
    return output_hessian_dense(problem, r)


@functools.lru_cache(maxsize=None)
def dense(kind: str, case: str, reduction: str = "mean") -> torch.Tensor:
    problem = CASES[case].build(reduction)
    if kind == "residual":
        return residual_dense(problem)
    if kind == "output":
        return output_hessian_dense(problem, weights_for(problem))
    return oracles.ORACLES[kind](problem)


def build_output(problem, weights=None, data=None, **kw) -> OutputHessian:
    if problem.params is not None:
        kw.setdefault("params", problem.params)
    u = weights_for(problem) if weights is None else weights
    return OutputHessian(problem.model, problem.X if data is None else data, u, **kw)


def _shapes(problem):
    return {n: t.shape for n, t in oracles.param_dict(problem).items()}


# ---- Hessian = GGN + residual ------------------------------------------------------------
@pytest.mark.parametrize("case, reduction", GRID)
def test_hessian_equals_ggn_plus_residual(case, reduction):
    problem = CASES[case].build(reduction)
    H, G, R = problem.build(Hessian), problem.build(GGN), problem.build(HessianResidual)
    H_d, G_d, R_d = H.to_dense(), G.to_dense(), R.to_dense()
    contract.assert_matches(G_d + R_d, H_d, rtol=1e-10, what="dense G + R vs H")
    V = contract.probes(H.shape[1], 3)
    contract.assert_matches((G + R) @ V, H @ V, rtol=1e-10, what="(G + R) @ V vs H @ V")
    contract.assert_matches(R_d, dense("Hessian", case, reduction) - dense("GGN", case, reduction),
                            rtol=1e-10, what="R vs oracle H - GGN")


@pytest.mark.parametrize("case, reduction", GRID)
def test_residual_matches_direct_oracle(case, reduction):
    problem = CASES[case].build(reduction)
    R = problem.build(HessianResidual)
    D = dense("residual", case, reduction)
    assert R.tags == {"symmetric"}
    contract.check_products(R, D)
    contract.check_dict_products(R, D, oracles.param_slices(problem), _shapes(problem))
    contract.check_adjoint(R)
    contract.check_tags(R)
    contract.check_dense_tags(R, D)


def test_residual_is_zero_for_a_model_linear_in_theta():
    problem = CASES["linear_mse"].build("mean")
    assert torch.count_nonzero(problem.build(HessianResidual).to_dense()) == 0
    assert torch.count_nonzero(build_output(problem).to_dense()) == 0


def _interpolation_problem(reduction: str, noise: float):
    """An over-parameterized tanh MLP (P = 35 > N·C = 6) whose targets are its own outputs."""
    gen = torch.Generator().manual_seed(21)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(21)
        model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2), nn.Tanh(), nn.Linear(2, 1)).double()
    X = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        y = model(X) + noise * torch.randn(6, 1, generator=gen, dtype=torch.float64)
    return model, X, y


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_residual_vanishes_at_an_interpolating_minimum(reduction):
    model, X, y = _interpolation_problem(reduction, noise=0.0)
    with torch.no_grad():
        assert float(nn.functional.mse_loss(model(X), y)) == 0.0  # θ* fits the data exactly
    H = Hessian(model, "mse", (X, y), reduction=reduction).to_dense()
    R = HessianResidual(model, "mse", (X, y), reduction=reduction, batch_size=4).to_dense()
    assert float(H.norm()) > 1e-3
    assert float(R.norm()) <= 1e-10 * float(H.norm())
    G = GGN(model, "mse", (X, y), reduction=reduction).to_dense()
    contract.assert_matches(G, H, rtol=1e-10, what="GGN = Hessian at the minimum")
    # Control: off the interpolating minimum the residual is a sizeable part of the Hessian.
    model, X, y = _interpolation_problem(reduction, noise=0.5)
    H = Hessian(model, "mse", (X, y), reduction=reduction).to_dense()
    R = HessianResidual(model, "mse", (X, y), reduction=reduction).to_dense()
    assert float(R.norm()) > 1e-2 * float(H.norm())


# ---- OutputHessian against dense oracles ---------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_output_hessian_random_weights_match_dense(case):
    problem = CASES[case].build("mean")
    A = build_output(problem, batch_size=5)
    D = dense("output", case)
    assert A.tags == {"symmetric"} and A.shape == D.shape
    contract.check_products(A, D)
    contract.check_dict_products(A, D, oracles.param_slices(problem), _shapes(problem))
    contract.check_adjoint(A)
    contract.check_tags(A)
    contract.check_dense_tags(A, D)


COMPONENTS = [("mlp_ce", 0, 0), ("mlp_ce", 13, 2), ("conv_ce", 7, (1,)), ("dict_mse", 9, 1),
              ("bn_eval_mse", 14, 0), ("function_ce", 12, 2), ("mlp_bce", 5, (1,))]


@pytest.mark.parametrize("case, sample, index", COMPONENTS, ids=[f"{c}-{i}-{k}" for c, i, k in COMPONENTS])
def test_one_component_matches_hessian_of_that_output(case, sample, index):
    problem = CASES[case].build("mean")
    k = index if isinstance(index, tuple) else (index,)
    D = hessian(lambda th: oracles.forward(problem, th, problem.X)[(sample, *k)])(oracles.flat_params(problem))
    kw = {"params": problem.params} if problem.params is not None else {}
    A = OutputHessian.component(problem.model, problem.X, sample=sample, index=index, batch_size=4, **kw)
    contract.assert_matches(A.to_dense(), D, what="component")
    u = torch.zeros_like(_outputs(problem))
    u[(sample, *k)] = 1
    contract.assert_matches(build_output(problem, u).to_dense(), D, what="one-hot weights tensor")
    assert float(D.abs().max()) > 1e-3  # a component with curvature: the check can fail


def test_output_hessian_with_loss_gradient_weights_is_the_residual():
    problem = CASES["mlp_ce"].build("sum")
    r = jacrev(lambda o: oracles.loss_fn(problem, o, problem.y))(_outputs(problem))
    R = problem.build(HessianResidual)
    V = contract.probes(R.shape[1], 3)
    contract.assert_matches(build_output(problem, r) @ V, R @ V)


@pytest.mark.parametrize("strategy", ["loop", "batched"])
def test_column_strategies_and_chunks(strategy):
    problem = CASES["bn_eval_mse"].build("mean")
    V = contract.probes(problem.build(Hessian).shape[1], 7)
    A = build_output(problem, column_strategy=strategy, max_columns=3, batch_size=6)
    contract.assert_matches(A @ V, dense("output", "bn_eval_mse") @ V)
    R = problem.build(HessianResidual, column_strategy=strategy, max_columns=3)
    contract.assert_matches(R @ V, dense("residual", "bn_eval_mse") @ V)
    want = {"loop": "reverse-over-reverse, column loop", "batched": "reverse-over-reverse, batched columns"}
    for op in (A, R):
        op @ V[:, :3]
        assert op.last_path == want[strategy]
        op @ V[:, 0]
        assert op.last_path == "reverse-over-reverse, one column"


# ---- data forms and batch-split invariance -------------------------------------------------
def test_output_hessian_data_forms_and_callable_weights():
    problem = CASES["dict_mse"].build("mean")
    u = weights_for(problem)
    V = contract.probes(problem.build(Hessian).shape[1], 2)
    ref = dense("output", "dict_mse") @ V
    forms = {
        "X": problem.X, "(X, None)": (problem.X, None), "(X, y)": problem.data,
        "batches": problem.batches(4), "DataLoader": as_dataloader(problem, batch_size=5),
    }
    for name, data in forms.items():
        contract.assert_matches(build_output(problem, u, data=data) @ V, ref, what=name)
    # A callable gets each batch; here the weights are a per-sample function of the inputs.
    W = torch.randn(3, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    u_fn = lambda b: torch.tanh(b.x["a"] @ W)  # noqa: E731
    full = output_hessian_dense(problem, torch.tanh(problem.X["a"] @ W)) @ V
    for size in (1, 4, 14):
        contract.assert_matches(build_output(problem, u_fn, batch_size=size) @ V, full, what=f"callable {size}")


@pytest.mark.parametrize("case, reduction", [("mlp_ce", "mean"), ("conv_ce", "sum"), ("dict_mse", "mean"),
                                             ("bn_eval_mse", "sum"), ("function_ce", "mean")])
def test_batch_split_invariance(case, reduction):
    problem = CASES[case].build(reduction)
    R = problem.build(HessianResidual)
    A = build_output(problem)
    V = contract.probes(R.shape[1], 2)
    ref_R, ref_A = R @ V, A @ V
    for size in range(1, problem.N + 1):
        contract.assert_matches(problem.build(HessianResidual, batch_size=size) @ V, ref_R, rtol=1e-10,
                                what=f"residual, batch_size={size}")
        contract.assert_matches(build_output(problem, batch_size=size) @ V, ref_A, rtol=1e-10,
                                what=f"output Hessian, batch_size={size}")
    cuts = [0, 5, 8, 9, problem.N]
    uneven = [(problem.slice_inputs(slice(a, b)), problem.y[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    contract.assert_matches(problem.build(HessianResidual, data=uneven) @ V, ref_R, rtol=1e-10, what="list")
    contract.assert_matches(build_output(problem, data=uneven) @ V, ref_A, rtol=1e-10, what="list")
    loader = as_dataloader(problem, batch_size=4)
    contract.assert_matches(problem.build(HessianResidual, data=loader) @ V, ref_R, rtol=1e-10, what="loader")
    contract.assert_matches(build_output(problem, data=loader) @ V, ref_A, rtol=1e-10, what="loader")


def test_residual_accepts_an_objective():
    problem = CASES["mlp_bce"].build("mean")
    obj = curvops.Objective(problem.model, problem.loss_arg(), problem.data, reduction="mean", batch_size=5)
    R = HessianResidual(obj, max_columns=2)
    assert R.objective is obj
    V = contract.probes(R.shape[1], 3)
    contract.assert_matches(R @ V, dense("residual", "mlp_bce") @ V)


# ---- the model is left exactly as found ----------------------------------------------------
def _give_some_grads(problem):
    if isinstance(problem.model, nn.Module):
        for i, p in enumerate(problem.model.parameters()):
            p.grad = torch.full_like(p, float(i + 1)) if i % 2 == 0 else None


@pytest.mark.parametrize("op", ["residual", "output"])
@pytest.mark.parametrize("case", list(CASES))
def test_model_left_as_found(op, case):
    problem = CASES[case].build("mean")
    _give_some_grads(problem)
    A = problem.build(HessianResidual) if op == "residual" else build_output(problem, batch_size=5)
    before = contract.snapshot(problem.model, problem.params)
    contract.exercise(A)
    contract.assert_unchanged(before, contract.snapshot(problem.model, problem.params))


def test_model_left_as_found_after_error_mid_pass():
    problem = CASES["mlp_ce"].build("mean")
    _give_some_grads(problem)
    u_fn = lambda b: torch.ones(b.n, 3 if b.index < 3 else 2, dtype=torch.float64)  # noqa: E731
    A = OutputHessian(problem.model, problem.X, u_fn, batch_size=4)
    before = contract.snapshot(problem.model)
    with pytest.raises(ValueError, match=r"outputs' shape \(4, 3\) on batch 3, got \(4, 2\)"):
        A @ contract.probes(A.shape[1], 2)
    contract.assert_unchanged(before, contract.snapshot(problem.model))


# ---- bad input ---------------------------------------------------------------------------
def test_output_hessian_bad_weights():
    problem = CASES["mlp_ce"].build("mean")
    model, X = problem.model, problem.X
    u = weights_for(problem)
    with pytest.raises(ValueError, match=r"one row per sample \(16 samples\), got shape \(15, 3\)"):
        OutputHessian(model, X, u[:15])
    with pytest.raises(TypeError, match="expected weights as a tensor"):
        OutputHessian(model, X, [[1.0] * 3] * 16)
    with pytest.raises(ValueError, match="expected finite weights"):
        OutputHessian(model, X, torch.full_like(u, float("nan")))
    with pytest.raises(ValueError, match="0-dim"):
        OutputHessian(model, X, torch.tensor(1.0))
    v = contract.probes(51, 1)[:, 0]
    with pytest.raises(ValueError, match=r"outputs' shape \(16, 3\) on batch 0, got \(16, 4\)"):
        OutputHessian(model, X, torch.ones(16, 4)) @ v
    with pytest.raises(TypeError, match="callable to return a tensor, got list"):
        OutputHessian(model, X, lambda b: [1.0]) @ v
    # Data whose size is only known during a pass: the row count is checked then.
    batches = problem.batches(5)
    with pytest.raises(ValueError, match="got 15 rows but the data has at least 16 samples \\(batch 3\\)"):
        OutputHessian(model, batches, u[:15]) @ v
    with pytest.raises(ValueError, match=r"one row per sample \(16 samples\), got shape \(17, 3\)"):
        OutputHessian(model, batches, torch.cat([u, u[:1]])) @ v
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, problem.y), batch_size=4, shuffle=True)
    with pytest.raises(ValueError, match="unshuffled DataLoader|DataLoader shuffles"):
        OutputHessian(model, loader, u)
    with pytest.raises(ValueError, match="column_strategy"):
        OutputHessian(model, X, u, column_strategy="vmap")


def test_output_hessian_bad_component_and_model():
    problem = CASES["mlp_ce"].build("mean")
    model, X = problem.model, problem.X
    with pytest.raises(ValueError, match=r"sample in \[0, 16\), got 16"):
        OutputHessian.component(model, X, sample=16, index=0)
    with pytest.raises(ValueError, match=r"sample in \[0, 16\), got 16"):
        OutputHessian.component(model, problem.batches(5), sample=16, index=0) @ contract.probes(51, 1)
    with pytest.raises(ValueError, match="integer ≥ 0"):
        OutputHessian.component(model, X, sample=-1, index=0)
    with pytest.raises(TypeError, match="index as an int"):
        OutputHessian.component(model, X, sample=0, index="a")
    with pytest.raises(ValueError, match=r"index in \[0, 3\)"):
        OutputHessian.component(model, X, sample=2, index=3) @ contract.probes(51, 1)
    with pytest.raises(ValueError, match=r"outputs of shape \(3,\), got \(0, 1\)"):
        OutputHessian.component(model, X, sample=2, index=(0, 1)) @ contract.probes(51, 1)
    obj = curvops.Objective(model, "cross_entropy", problem.data)
    with pytest.raises(TypeError, match="got an Objective"):
        OutputHessian(obj, X, weights_for(problem))
    with pytest.raises(TypeError, match="expected inputs as a tensor"):
        OutputHessian(model, ("abc", None), weights_for(problem))
    tupled = nn.Sequential(nn.Linear(4, 3)).double()
    tupled.register_forward_hook(lambda m, i, o: (o, o))
    with pytest.raises(TypeError, match="model to return a tensor, got tuple on batch 0"):
        OutputHessian(tupled, X, weights_for(problem)) @ contract.probes(15, 1)


# ---- GPU (skipped without CUDA) ------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_products_on_gpu_match_cpu():
    cpu = CASES["bn_eval_mse"].build("mean")
    gpu = CASES["bn_eval_mse"].build("mean")
    gpu.model.cuda()
    u = weights_for(cpu)  # weights and data stay on the host; batches and weights move to the device
    V = contract.probes(cpu.build(Hessian).shape[1], 5)
    for make in (lambda p: build_output(p, u, batch_size=4), lambda p: p.build(HessianResidual, batch_size=4)):
        A_cpu, A_gpu = make(cpu), make(gpu)
        assert A_gpu.device.type == "cuda" and A_gpu.column_strategy == "batched"
        out = A_gpu @ V.cuda()
        assert out.device.type == "cuda"
        contract.assert_matches(out.cpu(), A_cpu @ V)
