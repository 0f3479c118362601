"""The operator contract over operator × zoo model × reduction, against dense torch.func oracles."""

from __future__ import annotations

import functools

import pytest
import torch

import curvops
from curvops import GGN, EmpiricalFisher, Fisher, Hessian
from curvops.testing import contract, oracles
from curvops.testing.zoo import CASES, as_dataloader, linear_mse_hessian

OPS = {"Hessian": Hessian, "GGN": GGN, "Fisher": Fisher, "EmpiricalFisher": EmpiricalFisher}
TAGS = {"Hessian": {"symmetric"}, "GGN": {"symmetric", "psd"}, "Fisher": {"symmetric", "psd"},
        "EmpiricalFisher": {"symmetric", "psd"}}
REDUCTIONS = ("mean", "sum")
FISHER_LOSSES = ("mse", "cross_entropy", "bce_with_logits")

GRID = [
    pytest.param(op, case, red, id=f"{op}-{case}-{red}")
    for op in OPS for case in CASES for red in REDUCTIONS
    if op != "Fisher" or CASES[case].loss in FISHER_LOSSES
]


@functools.lru_cache(maxsize=None)
def dense(op: str, case: str, reduction: str) -> torch.Tensor:
    """The dense oracle of a fresh build (cached; never mutate the result)."""
    return oracles.ORACLES[op](CASES[case].build(reduction))


def build(op: str, case: str, reduction: str, **kw):
    problem = CASES[case].build(reduction)
    return problem, problem.build(OPS[op], **kw)


# ---- products, adjoint, tags, spectrum ---------------------------------------------------
@pytest.mark.parametrize("op, case, reduction", GRID)
def test_products_match_dense(op, case, reduction):
    problem, A = build(op, case, reduction)
    D = dense(op, case, reduction)
    assert A.shape == D.shape
    contract.check_products(A, D)
    shapes = {n: t.shape for n, t in oracles.param_dict(problem).items()}
    contract.check_dict_products(A, D, oracles.param_slices(problem), shapes)


@pytest.mark.parametrize("op, case, reduction", GRID)
def test_adjoint_and_tags(op, case, reduction):
    _, A = build(op, case, reduction)
    assert A.tags == TAGS[op]
    contract.check_adjoint(A)
    contract.check_tags(A)
    contract.check_dense_tags(A, dense(op, case, reduction))


@pytest.mark.parametrize("op, case", [(op, case) for op in OPS for case in CASES])
def test_eigsh_matches_dense_top_eigenvalues(op, case):
    _, A = build(op, case, "mean")
    contract.check_eigsh(A, dense(op, case, "mean"), k=3)


@pytest.mark.parametrize("op", list(OPS))
def test_column_chunks_and_objective_argument(op):
    # K = 7 columns in chunks of max_columns = 3; an Objective in place of (model, loss, data).
    problem = CASES["bn_eval_mse"].build("sum")
    obj = curvops.Objective(problem.model, problem.loss_arg(), problem.data, reduction="sum", batch_size=6)
    A = OPS[op](obj, max_columns=3)
    assert A.objective is obj
    V = contract.probes(A.shape[1], 7)
    contract.assert_matches(A @ V, dense(op, "bn_eval_mse", "sum") @ V)


# ---- batch-split invariance -------------------------------------------------------------
@pytest.mark.parametrize("op, case, reduction", GRID)
def test_batch_split_invariance(op, case, reduction):
    problem, A = build(op, case, reduction)
    V = contract.probes(A.shape[1], 2)
    ref = A @ V
    for size in range(1, problem.N + 1):
        B = problem.build(OPS[op], batch_size=size)
        contract.assert_matches(B @ V, ref, rtol=1e-10, what=f"batch_size={size}")
    cuts = [0, 5, 8, 9, problem.N]  # uneven batches: 5, 3, 1, rest
    uneven = [(problem.slice_inputs(slice(a, b)), problem.y[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    contract.assert_matches(problem.build(OPS[op], data=uneven) @ V, ref, rtol=1e-10, what="list of batches")
    loader = as_dataloader(problem, batch_size=4)
    contract.assert_matches(problem.build(OPS[op], data=loader) @ V, ref, rtol=1e-10, what="DataLoader")


# ---- the model is left exactly as found -------------------------------------------------
def _give_some_grads(problem):
    """Nontrivial .grad on every other parameter (None on the rest), so a change shows."""
    if not isinstance(problem.model, torch.nn.Module):
        return
    for i, p in enumerate(problem.model.parameters()):
        p.grad = torch.full_like(p, float(i + 1)) if i % 2 == 0 else None


@pytest.mark.parametrize("op", list(OPS) + ["Fisher-mc", "Hessian-keep"])
@pytest.mark.parametrize("case", list(CASES))
def test_model_left_as_found(op, case):
    problem = CASES[case].build("mean")
    _give_some_grads(problem)
    kw = {"Fisher-mc": {"mc_samples": 3}, "Hessian-keep": {"keep_graphs": True}}.get(op, {})
    A = problem.build(OPS[op.split("-")[0]], **kw)
    before = contract.snapshot(problem.model, problem.params)
    contract.exercise(A)
    contract.assert_unchanged(before, contract.snapshot(problem.model, problem.params))


@pytest.mark.parametrize("op", list(OPS))
def test_model_left_as_found_after_error_mid_pass(op):
    problem = CASES["mlp_ce"].build("mean")
    _give_some_grads(problem)
    bad = problem.batches(4)
    bad[-1] = (bad[-1][0], bad[-1][1][:-1])  # wrong number of targets in the last batch
    A = problem.build(OPS[op], data=bad)
    before = contract.snapshot(problem.model)
    with pytest.raises(ValueError, match="batch 3"):
        A @ contract.probes(A.shape[1], 2)
    contract.assert_unchanged(before, contract.snapshot(problem.model))


def test_train_mode_model_is_not_switched_to_eval():
    problem = CASES["mlp_ce"].build("mean")
    problem.model.train()
    before = contract.snapshot(problem.model)
    contract.exercise(problem.build(Hessian))
    contract.assert_unchanged(before, contract.snapshot(problem.model))
    assert problem.model.training


# ---- Hessian with kept graphs ---------------------------------------------------------
@pytest.mark.parametrize("case", ["mlp_ce", "bn_eval_mse", "function_ce"])
def test_hessian_keep_graphs_equals_hessian(case):
    problem, A = build("Hessian", case, "mean", keep_graphs=True)
    V = contract.probes(A.shape[1], 3)
    D = dense("Hessian", case, "mean")
    contract.assert_matches(A @ V, D @ V, what="first product")
    assert A.cache_bytes > 0
    contract.assert_matches(A @ V, D @ V, what="second product (cached graphs)")
    contract.assert_matches(A @ V[:, 1], D @ V[:, 1], what="single column (cached graphs)")


def _update_in_place(tensor, seed=3):
    with torch.no_grad():
        tensor.add_(0.3 * contract.probes(tensor.numel(), 1, seed).reshape(tensor.shape))


@pytest.mark.parametrize("batch_size", [None, 5])
def test_hessian_cache_invalidated_by_in_place_update(batch_size):
    problem, A = build("Hessian", "mlp_ce", "mean", keep_graphs=True, batch_size=batch_size)
    V = contract.probes(A.shape[1], 2)
    A @ V
    _update_in_place(problem.model[0].weight)
    contract.assert_matches(A @ V, oracles.hessian_dense(problem) @ V, what="after an in-place step")


def test_hessian_cache_invalidated_by_update_of_unselected_parameter():
    # The cached graphs depend on every parameter, not only the differentiated ones.
    problem, A = build("Hessian", "mlp_ce", "mean", keep_graphs=True, params=["0.weight", "0.bias"])
    V = contract.probes(A.shape[1], 2)
    A @ V
    _update_in_place(problem.model[2].weight)
    full = oracles.hessian_dense(problem)
    sl = oracles.param_slices(problem)
    idx = torch.cat([torch.arange(P.start, P.stop) for P in (sl["0.weight"], sl["0.bias"])])
    contract.assert_matches(A @ V, full[idx][:, idx] @ V, what="after an in-place step of 2.weight")


def test_hessian_cache_invalidated_by_update_of_a_buffer():
    # BatchNorm running statistics are constants of the cached graphs too (e.g. after a training step).
    problem, A = build("Hessian", "bn_eval_mse", "mean", keep_graphs=True)
    V = contract.probes(A.shape[1], 2)
    A @ V
    _update_in_place(problem.model[1].running_mean)
    contract.assert_matches(A @ V, oracles.hessian_dense(problem) @ V, what="after running_mean changed")


@pytest.mark.parametrize("fraction", [0.0, 0.5])
def test_hessian_keep_graphs_beyond_memory_budget(fraction):
    # A budget of nothing, or of about half the graphs: the rest are recomputed every product.
    problem, A = build("Hessian", "mlp_ce", "sum", keep_graphs=True, batch_size=3)
    V = contract.probes(A.shape[1], 2)
    A @ V
    budget = max(1, int(fraction * A.cache_bytes))
    B = problem.build(Hessian, keep_graphs=True, max_graph_bytes=budget, batch_size=3)
    D = dense("Hessian", "mlp_ce", "sum")
    for _ in range(2):
        contract.assert_matches(B @ V, D @ V)
    assert B.cache_bytes <= budget and (B.cache_bytes > 0) == (fraction > 0)


def test_hessian_clear_cache():
    problem, A = build("Hessian", "mlp_ce", "mean", keep_graphs=True)
    V = contract.probes(A.shape[1], 1)
    A @ V
    assert A.cache_bytes > 0
    A.clear_cache()
    assert A.cache_bytes == 0
    contract.assert_matches(A @ V, dense("Hessian", "mlp_ce", "mean") @ V)


# ---- Fisher ---------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_exact_fisher_equals_ggn(case, reduction):
    problem = CASES[case].build(reduction)
    V = contract.probes(problem.build(GGN).shape[1], 3)
    contract.assert_matches(problem.build(Fisher) @ V, problem.build(GGN) @ V)
    contract.assert_matches(dense("Fisher", case, reduction), dense("GGN", case, reduction))


@pytest.mark.parametrize("case", ["mlp_ce", "mlp_bce", "dict_mse"])
def test_mc_fisher_is_a_fixed_matrix(case):
    problem = CASES[case].build("mean")
    A = problem.build(Fisher, mc_samples=2, seed=5, max_columns=2)
    V = contract.probes(A.shape[1], 3)
    first = A @ V
    contract.assert_matches(A @ V, first, rtol=1e-12, what="second product")
    contract.assert_matches(A @ V[:, 2], first[:, 2], rtol=1e-12, what="one column vs a block")
    contract.check_adjoint(A)
    contract.check_tags(A)
    again = problem.build(Fisher, mc_samples=2, seed=5) @ V
    contract.assert_matches(again, first, rtol=1e-12, what="same seed, new operator")
    other = problem.build(Fisher, mc_samples=2, seed=6) @ V
    assert (other - first).norm() > 1e-3 * first.norm(), "a different seed gave the same matrix"
    assert (first - dense("Fisher", case, "mean") @ V).norm() > 1e-3 * first.norm(), "2 samples = exact?"


@pytest.mark.parametrize("case", ["mlp_ce", "mlp_bce", "dict_mse"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mc_fisher_converges_to_exact(case, reduction):
    # Relative error ~ 1/sqrt(S·N) ≈ 0.6% for S = 2000; the target leaves a wide margin.
    problem = CASES[case].build(reduction)
    A = problem.build(Fisher, mc_samples=2000, seed=0)
    V = contract.probes(A.shape[1], 4)
    exact = dense("Fisher", case, reduction) @ V
    err = float((A @ V - exact).norm() / exact.norm())
    assert err < 0.05, f"MC Fisher (2000 samples) relative error {err:.3g}"


# ---- linear + MSE closed forms ----------------------------------------------------------
@pytest.mark.parametrize("op", list(OPS)[:3])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_mse_closed_form(op, reduction):
    problem = CASES["linear_mse"].build(reduction)
    closed = linear_mse_hessian(problem)
    A = problem.build(OPS[op])
    contract.assert_matches(A.to_dense(), closed, rtol=1e-12)
    contract.assert_matches(dense(op, "linear_mse", reduction), closed, rtol=1e-12, what="oracle")


# ---- parameter selection and restriction -----------------------------------------------
def _sub_block(full, problem, names):
    sl = oracles.param_slices(problem)
    idx = torch.cat([torch.arange(sl[n].start, sl[n].stop) for n in names])
    return full[idx][:, idx]


@pytest.mark.parametrize("select", ["names", "module", "predicate"])
def test_params_selection_gives_sub_block(select):
    problem = CASES["dict_mse"].build("mean")
    model = problem.model
    chosen = {"names": ["a.weight", "head.bias"], "module": model.b,
              "predicate": lambda n, p: n.endswith("weight")}[select]
    names = {"names": ["a.weight", "head.bias"], "module": ["b.weight"],
             "predicate": ["a.weight", "b.weight", "head.weight"]}[select]
    H = problem.build(Hessian, params=chosen)
    want = _sub_block(dense("Hessian", "dict_mse", "mean"), problem, names)
    contract.assert_matches(H.to_dense(), want)
    assert H.domain.names == tuple(names)


def test_function_select_gives_sub_block():
    problem = CASES["function_ce"].build("sum")
    H = problem.build(GGN, select=["b1", "w2"])
    contract.assert_matches(H.to_dense(), _sub_block(dense("GGN", "function_ce", "sum"), problem, ["b1", "w2"]))


def test_frozen_parameters_are_left_out_by_default():
    problem = CASES["mlp_ce"].build("mean")
    problem.model[0].weight.requires_grad_(False)
    H = problem.build(Hessian)
    full = dense("Hessian", "mlp_ce", "mean")
    contract.assert_matches(H.to_dense(), _sub_block(full, CASES["mlp_ce"].build("mean"),
                                                     ["0.bias", "2.weight", "2.bias"]))


@pytest.mark.parametrize("names", [["2.weight"], ["0.bias", "2.bias"], ["2.bias", "0.weight"]])
def test_restrict_params_equals_sub_block(names):
    problem, H = build("Hessian", "mlp_ce", "mean")
    R = curvops.restrict(H, params=names)
    order = [n for n in oracles.param_slices(problem) if n in names]  # layout order
    want = _sub_block(dense("Hessian", "mlp_ce", "mean"), problem, order)
    contract.assert_matches(R.to_dense(), want)
    assert R.tags == H.tags
    contract.check_products(R, want)
