"""submatrix and CrossHessian against sub-blocks of dense torch.func oracles."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import curvops
from curvops import GGN, Dense, Hessian, restrict
from curvops.operators.blocks import CrossHessian, submatrix
from curvops.testing import contract, oracles
from curvops.testing.zoo import CASES, as_dataloader


@functools.lru_cache(maxsize=None)
def dense(kind: str, case: str, reduction: str = "mean") -> torch.Tensor:
    return oracles.ORACLES[kind](CASES[case].build(reduction))


def _idx(problem, names) -> torch.Tensor:
    sl = oracles.param_slices(problem)
    return torch.cat([torch.arange(sl[n].start, sl[n].stop) for n in names])


def block(D: torch.Tensor, problem, rows, cols) -> torch.Tensor:
    """Rows ``rows`` and columns ``cols`` (names in layout order) of a dense [P, P] matrix."""
    return D[_idx(problem, rows)][:, _idx(problem, cols)]


def _model_kw(problem) -> dict:
    return {"params": problem.params} if problem.params is not None else {}


def cross(problem, rows, cols, **kw) -> CrossHessian:
    return CrossHessian(problem.model, problem.loss_arg(), kw.pop("data", problem.data),
                        rows=rows, cols=cols, reduction=problem.reduction, **_model_kw(problem), **kw)


# (case, rows, cols, row names, col names); a string starting with "m:" names a submodule.
BLOCKS = [
    ("mlp_ce", ["0.weight"], ["2.weight", "2.bias"], ["0.weight"], ["2.weight", "2.bias"]),
    ("mlp_ce", "m:0", "m:2", ["0.weight", "0.bias"], ["2.weight", "2.bias"]),
    ("conv_ce", "m:0", ["3.bias"], ["0.weight", "0.bias"], ["3.bias"]),
    ("dict_mse", "m:a", ["b.weight", "m:head"], ["a.weight", "a.bias"], ["b.weight", "head.weight", "head.bias"]),
    ("bn_eval_mse", "m:1", "m:0", ["1.weight", "1.bias"], ["0.weight", "0.bias"]),
    ("function_ce", ["w1"], ["b1", "w2"], ["w1"], ["b1", "w2"]),
    ("mlp_bce", ["2.bias", "0.bias"], "0.weight", ["0.bias", "2.bias"], ["0.weight"]),
]
IDS = [f"{c}-{'+'.join(r)}-{'+'.join(k)}" for c, _, _, r, k in BLOCKS]


def _group(problem, spec):
    if isinstance(spec, str) and spec.startswith("m:"):
        return problem.model.get_submodule(spec[2:])
    if isinstance(spec, list):
        return [_group(problem, s) for s in spec]
    return spec


@pytest.mark.parametrize("case, rows, cols, row_names, col_names", BLOCKS, ids=IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_hessian_matches_dense_block(case, rows, cols, row_names, col_names, reduction):
    problem = CASES[case].build(reduction)
    C = cross(problem, _group(problem, rows), _group(problem, cols))
    D = dense("Hessian", case, reduction)
    want = block(D, problem, row_names, col_names)
    assert C.rows == tuple(row_names) and C.cols == tuple(col_names)
    assert C.shape == want.shape and C.tags == frozenset()
    assert C.hessian.domain.names == tuple(n for n in oracles.param_slices(problem)
                                           if n in set(row_names) | set(col_names))
    contract.check_products(C, want)
    contract.assert_matches(C.to_dense(), want, what="to_dense")
    contract.check_adjoint(C)
    # The adjoint is the swapped block, and the transpose of this one.
    swapped = cross(problem, _group(problem, cols), _group(problem, rows))
    contract.assert_matches(C.T.to_dense(), block(D, problem, col_names, row_names), what="C.T")
    contract.assert_matches(C.T.to_dense(), swapped.to_dense(), what="C.T vs swapped block")
    contract.assert_matches(submatrix(C.hessian, col_names, row_names).to_dense(), want.T, what="submatrix")


def test_parameter_dicts_on_both_sides():
    problem = CASES["dict_mse"].build("mean")
    model = problem.model
    C = cross(problem, model.a, model.head)
    want = block(dense("Hessian", "dict_mse"), problem, ["a.weight", "a.bias"], ["head.weight", "head.bias"])
    V = contract.probes(C.shape[1], 2)
    W = contract.probes(C.shape[0], 2, seed=1)
    shapes = {n: t.shape for n, t in oracles.param_dict(problem).items()}
    for cols in (None, 2):
        sl = slice(0, 1) if cols is None else slice(0, 2)
        vin = {"head.weight": V[:8, sl].reshape(*shapes["head.weight"], -1), "head.bias": V[8:, sl]}
        win = {"a.weight": W[:12, sl].reshape(*shapes["a.weight"], -1), "a.bias": W[12:, sl]}
        if cols is None:
            vin, win = {n: t[..., 0] for n, t in vin.items()}, {n: t[..., 0] for n, t in win.items()}
        out, back = C @ vin, C.T @ win
        assert list(out) == ["a.weight", "a.bias"] and list(back) == ["head.weight", "head.bias"]
        flat = torch.cat([t.reshape(12 if n == "a.weight" else 4, -1) for n, t in out.items()])
        contract.assert_matches(flat.reshape(-1, 1 if cols is None else 2), want @ V[:, sl], what="C @ dict")
        flat = torch.cat([t.reshape(8 if n == "head.weight" else 2, -1) for n, t in back.items()])
        contract.assert_matches(flat.reshape(-1, 1 if cols is None else 2), want.T @ W[:, sl], what="C.T @ dict")
    with pytest.raises(ValueError, match=r"missing \['head.bias'\], unexpected \['a.bias'\]"):
        C @ {"head.weight": vin["head.weight"], "a.bias": W[12:, 0]}


def test_overlapping_groups():
    problem = CASES["mlp_ce"].build("mean")
    rows, cols = ["0.weight", "0.bias"], ["0.bias", "2.weight"]
    C = cross(problem, rows, cols)
    contract.check_products(C, block(dense("Hessian", "mlp_ce"), problem, rows, cols))
    contract.check_adjoint(C)


@pytest.mark.parametrize("op, tags", [(Hessian, {"symmetric"}), (GGN, {"symmetric", "psd"})])
def test_diagonal_block_keeps_tags_and_equals_restrict(op, tags):
    problem = CASES["function_ce"].build("mean")
    A = problem.build(op)
    S = submatrix(A, ["w2", "b1", "w2"], "b1")  # repetition and order are ignored
    assert S.rows == ("b1", "w2") and S.cols == ("b1",) and S.tags == frozenset()
    S = submatrix(A, ["w2", "b1"], ["b1", "w2"])
    assert S.rows == S.cols == ("b1", "w2") and S.tags == tags
    contract.assert_matches(S.to_dense(), restrict(A, ["b1", "w2"]).to_dense())
    contract.assert_matches(S.to_dense(), block(dense(op.__name__, "function_ce"), problem, S.rows, S.cols))
    contract.check_tags(S)
    assert submatrix(A, ["w1"], ["b1", "w2"]).tags == frozenset()
    C = cross(problem, ["b1", "w2"], ["w2", "b1"])
    assert C.tags == {"symmetric"}
    contract.check_tags(C)


def test_submatrix_of_a_nonsymmetric_operator():
    # A = H G is not symmetric: the block's adjoint is the swapped block of Aᵀ.
    problem = CASES["mlp_ce"].build("mean")
    H, G = problem.build(Hessian), problem.build(GGN)
    A = H @ G
    D = dense("Hessian", "mlp_ce") @ dense("GGN", "mlp_ce")
    rows, cols = ["2.weight"], ["0.bias", "2.bias"]
    S = submatrix(A, rows, cols)
    contract.check_products(S, block(D, problem, rows, cols))
    contract.check_adjoint(S)
    contract.assert_matches(S.T.to_dense(), block(D.T, problem, cols, rows), what="S.T")
    contract.assert_matches(S.T.to_dense(), submatrix(A.T, cols, rows).to_dense(), what="S.T vs block of A.T")
    assert (S.T.to_dense() - submatrix(A, cols, rows).to_dense()).abs().max() > 1e-6  # A ≠ Aᵀ here


def test_cross_hessian_from_an_objective_and_hessian_options():
    problem = CASES["bn_eval_mse"].build("sum")
    obj = curvops.Objective(problem.model, problem.loss_arg(), problem.data, reduction="sum", batch_size=4)
    C = CrossHessian(obj, rows=problem.model[3], cols=["0.bias"], keep_graphs=True, max_columns=2)
    want = block(dense("Hessian", "bn_eval_mse", "sum"), problem, ["3.weight", "3.bias"], ["0.bias"])
    assert C.objective is obj
    for _ in range(2):  # second product on kept graphs
        contract.check_products(C, want)
    assert C.hessian.cache_bytes > 0


@pytest.mark.parametrize("case", ["mlp_ce", "dict_mse", "function_ce"])
def test_batch_split_invariance(case):
    problem = CASES[case].build("mean")
    spec = BLOCKS[[b[0] for b in BLOCKS].index(case)]
    rows, cols = _group(problem, spec[1]), _group(problem, spec[2])
    C = cross(problem, rows, cols)
    V, W = contract.probes(C.shape[1], 2), contract.probes(C.shape[0], 2, seed=1)
    ref, ref_T = C @ V, C.T @ W
    for size in range(1, problem.N + 1):
        B = cross(problem, rows, cols, batch_size=size)
        contract.assert_matches(B @ V, ref, rtol=1e-10, what=f"batch_size={size}")
        contract.assert_matches(B.T @ W, ref_T, rtol=1e-10, what=f"adjoint, batch_size={size}")
    uneven = [(problem.slice_inputs(slice(a, b)), problem.y[a:b]) for a, b in [(0, 5), (5, 6), (6, problem.N)]]
    contract.assert_matches(cross(problem, rows, cols, data=uneven) @ V, ref, rtol=1e-10, what="list")
    loader = as_dataloader(problem, batch_size=4)
    contract.assert_matches(cross(problem, rows, cols, data=loader) @ V, ref, rtol=1e-10, what="DataLoader")


@pytest.mark.parametrize("case", list(CASES))
def test_model_left_as_found(case):
    problem = CASES[case].build("mean")
    names = list(oracles.param_slices(problem))
    if isinstance(problem.model, nn.Module):
        for i, p in enumerate(problem.model.parameters()):
            p.grad = torch.full_like(p, float(i + 1)) if i % 2 == 0 else None
    C = cross(problem, names[:1], names[1:])
    before = contract.snapshot(problem.model, problem.params)
    V, W = contract.probes(C.shape[1], 3), contract.probes(C.shape[0], 2)
    C @ V[:, 0], C @ V, C.matvec(V[:, 0].numpy()), C.T @ W, C.rmatvec(W[:, 0].numpy())
    contract.assert_unchanged(before, contract.snapshot(problem.model, problem.params))


# ---- bad input ---------------------------------------------------------------------------
def test_cross_hessian_bad_groups():
    problem = CASES["mlp_ce"].build("mean")
    model = problem.model
    with pytest.raises(ValueError, match=r"expected rows= names among .*, got unknown parameter name '1.weight'"):
        cross(problem, ["1.weight"], ["2.bias"])
    with pytest.raises(ValueError, match="expected a non-empty cols= group, got no parameters from"):
        cross(problem, ["0.bias"], [])
    with pytest.raises(ValueError, match="non-empty rows= group.*a module without parameters"):
        cross(problem, model[1], ["0.bias"])  # nn.Tanh has no parameters
    with pytest.raises(ValueError, match="submodules of the model, got a Linear"):
        cross(problem, nn.Linear(2, 2), ["0.bias"])
    with pytest.raises(TypeError, match="entries to be names or modules, got int"):
        cross(problem, [0], ["0.bias"])
    with pytest.raises(TypeError, match="names and/or submodules, got int"):
        cross(problem, ["0.bias"], 3)
    with pytest.raises(TypeError, match="got params= as well"):
        cross(problem, ["0.bias"], ["2.bias"], params=["0.bias"])
    with pytest.raises(TypeError, match="got select= as well"):
        cross(problem, ["0.bias"], ["2.bias"], select=["0.bias"])
    fn = CASES["function_ce"].build("mean")
    with pytest.raises(TypeError, match="params= as the dict of all parameters"):
        CrossHessian(fn.model, fn.loss, fn.data, rows=["w1"], cols=["w2"])
    with pytest.raises(ValueError, match="submodules of the model"):
        cross(fn, model[0], ["w2"])
    obj = curvops.Objective(model, "cross_entropy", problem.data, params=model[0])
    with pytest.raises(ValueError, match=r"among the Objective's parameters .*, got \['2.bias'\]"):
        CrossHessian(obj, rows=["0.weight"], cols=["2.bias"])
    C = cross(problem, ["0.bias"], ["2.bias"])
    with pytest.raises(ValueError, match=r"expected a vector of length 3 \(parameters\), got shape \(6,\)"):
        C @ torch.zeros(6, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"CrossHessian.T @ v|expected a vector of length 6"):
        C.T @ torch.zeros(3, dtype=torch.float64)


def test_submatrix_bad_input():
    problem = CASES["mlp_ce"].build("mean")
    H = problem.build(Hessian)
    with pytest.raises(TypeError, match="no domain layout"):
        submatrix(Dense(torch.eye(3, dtype=torch.float64)), ["a"], ["b"])
    with pytest.raises(TypeError, match="expected a curvops Operator, got Tensor"):
        submatrix(torch.eye(3), ["a"], ["b"])
    with pytest.raises(ValueError, match=r"expected cols= names among .*, got unknown parameter names \['2.kernel'\]"):
        submatrix(H, ["0.bias"], ["2.kernel"])
    with pytest.raises(ValueError, match="non-empty rows= group, got no names"):
        submatrix(H, [], ["0.bias"])
    with pytest.raises(TypeError, match=r"rows= to hold parameter names \(str\), got entries of type \['Linear'\]"):
        submatrix(H, [problem.model[0]], ["0.bias"])
    with pytest.raises(TypeError, match="parameter name or a list of names, got int"):
        submatrix(H, ["0.bias"], 5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cross_hessian_on_gpu_matches_cpu():
    cpu, gpu = CASES["mlp_ce"].build("mean"), CASES["mlp_ce"].build("mean")
    gpu.model.cuda()
    C_cpu, C_gpu = (cross(p, p.model[0], ["2.weight"], batch_size=5) for p in (cpu, gpu))
    assert C_gpu.device.type == "cuda"
    V, W = contract.probes(C_cpu.shape[1], 3), contract.probes(C_cpu.shape[0], 2)
    contract.assert_matches((C_gpu @ V.cuda()).cpu(), C_cpu @ V)
    contract.assert_matches((C_gpu.T @ W.cuda()).cpu(), C_cpu.T @ W)
