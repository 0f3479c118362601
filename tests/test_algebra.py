"""Operator algebra against dense algebra: values, tags (STYLE.md's table) and build-time errors."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import curvops
from curvops import Dense, Diagonal, Hessian, Identity, LowRank, Operator, block_diag, restrict, tag
from curvops.testing import contract, oracles
from curvops.testing.zoo import CASES

SYM, PSD = frozenset({"symmetric"}), frozenset({"symmetric", "psd"})
HESSIAN_CASE = "function_ce"  # indefinite Hessian, P = 35
P = 35


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@functools.lru_cache(maxsize=None)
def _hessian_problem():
    problem = CASES[HESSIAN_CASE].build("mean")
    return problem, oracles.hessian_dense(problem)


def square(name: str) -> tuple[Operator, torch.Tensor]:
    """A fresh P×P operator and its dense matrix."""
    if name == "hessian":
        problem, D = _hessian_problem()
        return problem.build(Hessian), D
    if name == "dense":
        M = _rand(P, P, seed=1)
        return Dense(M), M
    if name == "dense_psd":
        B = _rand(P, P, seed=2)
        return Dense(B.T @ B, tags=["psd"]), B.T @ B
    if name == "diag_pos":
        d = _rand(P, seed=3).abs() + 0.1
        return Diagonal(d), torch.diag(d)
    if name == "diag_mixed":
        d = _rand(P, seed=4)
        return Diagonal(d), torch.diag(d)
    if name == "lowrank_psd":
        U, S = _rand(P, 3, seed=5), torch.tensor([3.0, 2.0, 0.5], dtype=torch.float64)
        return LowRank(U, S), U @ torch.diag(S) @ U.T
    if name == "lowrank_indef":
        U, S = _rand(P, 3, seed=6), torch.tensor([3.0, -2.0, 0.5], dtype=torch.float64)
        return LowRank(U, S), U @ torch.diag(S) @ U.T
    if name == "identity":
        return Identity(P), torch.eye(P, dtype=torch.float64)
    raise KeyError(name)


SQUARE = ["hessian", "dense", "dense_psd", "diag_pos", "diag_mixed", "lowrank_psd", "lowrank_indef", "identity"]
EXPECTED_TAGS = {"hessian": SYM, "dense": frozenset(), "dense_psd": PSD, "diag_pos": PSD, "diag_mixed": SYM,
                 "lowrank_psd": PSD, "lowrank_indef": SYM, "identity": PSD}


def rect(name: str) -> tuple[Operator, torch.Tensor]:
    """P×4 operators (no tags)."""
    if name == "dense_rect":
        M = _rand(P, 4, seed=7)
        return Dense(M), M
    U, S, V = _rand(P, 2, seed=8), torch.tensor([1.5, -0.5], dtype=torch.float64), _rand(4, 2, seed=9)
    return LowRank(U, S, V), U @ torch.diag(S) @ V.T


RECT = ["dense_rect", "lowrank_rect"]


def assert_operator_equals(A, D):
    """Products with a block, a vector and the dense materialization all equal D."""
    assert isinstance(A, Operator)
    assert A.shape == tuple(D.shape)
    V = contract.probes(A.shape[1], 3, seed=11)
    contract.assert_matches(A @ V, D @ V, what="A @ V")
    contract.assert_matches(A @ V[:, 0], D @ V[:, 0], what="A @ v")
    contract.assert_matches(A.to_dense(), D, what="to_dense")


# ---- helpers themselves -----------------------------------------------------------------
@pytest.mark.parametrize("name", SQUARE + RECT)
def test_helpers_match_dense_and_their_tags(name):
    A, D = square(name) if name in SQUARE else rect(name)
    assert_operator_equals(A, D)
    assert A.tags == EXPECTED_TAGS.get(name, frozenset())
    contract.check_adjoint(A)
    contract.check_tags(A)
    contract.check_products(A, D)


# ---- sums, scaling, negation ------------------------------------------------------------
SUM_PAIRS = [("hessian", "diag_pos"), ("dense_psd", "lowrank_psd"), ("diag_mixed", "identity"),
             ("dense", "hessian"), ("lowrank_indef", "dense_psd")]


@pytest.mark.parametrize("a, b", SUM_PAIRS)
def test_sum_and_difference(a, b):
    (A, DA), (B, DB) = square(a), square(b)
    assert_operator_equals(A + B, DA + DB)
    assert (A + B).tags == A.tags & B.tags
    assert_operator_equals(A - B, DA - DB)
    assert (A - B).tags == A.tags & B.tags & SYM
    contract.check_adjoint(A + B)


def test_three_term_sum_keeps_common_tags():
    (A, DA), (B, DB), (C, DC) = square("dense_psd"), square("diag_pos"), square("lowrank_psd")
    S = A + B + C
    assert_operator_equals(S, DA + DB + DC)
    assert S.tags == PSD
    assert (S + square("hessian")[0]).tags == SYM


@pytest.mark.parametrize("name", ["hessian", "dense", "diag_pos", "lowrank_psd"])
@pytest.mark.parametrize("c", [2.5, 0.0, -1.5])
def test_scalar_multiple_and_division(name, c):
    A, D = square(name)
    want_tags = (A.tags & SYM) | (A.tags & PSD if c >= 0 else frozenset())
    for expr in (c * A, A * c):
        assert_operator_equals(expr, c * D)
        assert expr.tags == want_tags
    if c != 0:
        assert_operator_equals(A / c, D / c)
        assert (A / c).tags == want_tags
    assert_operator_equals(-A, -D)
    assert (-A).tags == A.tags & SYM


@settings(max_examples=30, deadline=None)
@given(c=st.floats(-1e3, 1e3, allow_nan=False), d=st.floats(-1e3, 1e3, allow_nan=False))
def test_nested_scaling_psd_rule(c, d):
    A, D = square("diag_pos")
    S = d * (c * A)
    contract.assert_matches(S.to_dense(), d * c * D)
    assert S.is_symmetric
    assert S.is_psd == (c * d >= 0)


def test_scaling_by_a_non_finite_number_raises():
    A, _ = square("diag_pos")
    with pytest.raises(ValueError, match="finite scalar"):
        float("nan") * A
    with pytest.raises(TypeError, match="expected a scalar"):
        A / np.ones(3)


# ---- products and the adjoint -----------------------------------------------------------
@pytest.mark.parametrize("a, b", [("hessian", "dense"), ("diag_pos", "lowrank_psd"), ("dense_psd", "diag_mixed")])
def test_product_matches_dense_and_promises_nothing(a, b):
    (A, DA), (B, DB) = square(a), square(b)
    assert_operator_equals(A @ B, DA @ DB)
    assert (A @ B).tags == frozenset()
    contract.check_adjoint(A @ B)


def test_product_chain_with_rectangular_factors():
    (A, DA), (R, DR), (Q, DQ) = square("hessian"), rect("dense_rect"), rect("lowrank_rect")
    chain = R.T @ A @ Q  # [4, P] [P, P] [P, 4]
    assert_operator_equals(chain, DR.T @ DA @ DQ)
    assert chain.tags == frozenset()
    assert_operator_equals(A @ A @ R, DA @ DA @ DR)
    assert_operator_equals(R @ Q.T, DR @ DQ.T)
    contract.check_adjoint(chain)


@pytest.mark.parametrize("name", RECT + ["dense", "hessian"])
def test_gram_product_is_psd(name):
    B, DB = rect(name) if name in RECT else square(name)
    G = B.T @ B
    assert_operator_equals(G, DB.T @ DB)
    assert G.tags == PSD
    contract.check_tags(G)


@pytest.mark.parametrize("middle", ["hessian", "diag_pos", "dense", "lowrank_indef"])
@pytest.mark.parametrize("outer", RECT)
def test_congruence_keeps_middle_tags(middle, outer):
    (M, DM), (B, DB) = square(middle), rect(outer)
    C = B.T @ M @ B
    assert_operator_equals(C, DB.T @ DM @ DB)
    assert C.tags == M.tags


def test_gram_of_a_composite_is_psd():
    # AᵀA is PSD also when A is itself a product (the chain is flattened into Qᵀ Rᵀ R Q).
    (R, DR), (Q, DQ) = rect("dense_rect"), square("dense")
    A = R.T @ Q  # [4, P]
    G = A.T @ A
    assert_operator_equals(G, (DR.T @ DQ).T @ (DR.T @ DQ))
    assert G.tags == PSD


@pytest.mark.parametrize("name", SQUARE + RECT)
def test_adjoint(name):
    A, D = square(name) if name in SQUARE else rect(name)
    assert_operator_equals(A.T, D.T)
    assert A.T.T is A or A.is_symmetric
    if A.is_symmetric:
        assert A.T is A
    W = contract.probes(A.shape[0], 2)
    contract.assert_matches(torch.from_numpy(A.rmatmat(W.numpy())), D.T @ W, what="scipy rmatmat")
    contract.assert_matches(torch.from_numpy(A.H @ W.numpy()), D.T @ W, what="A.H @ ndarray")


def test_composites_keep_both_faces():
    (H, DH), (Dg, DD) = square("hessian"), square("diag_pos")
    C = 0.5 * (H @ Dg) + Dg.T - H / 3
    want = 0.5 * DH @ DD + DD - DH / 3
    assert_operator_equals(C, want)
    x = contract.probes(P, 1, seed=3)[:, 0]
    out = C @ x.numpy()
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(out, (want @ x).numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(C.matvec(x.numpy()), (want @ x).numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(C.rmatvec(x.numpy()), (want.T @ x).numpy(), rtol=1e-9, atol=1e-12)
    assert_operator_equals(H ** 3, DH @ DH @ DH)


# ---- parameter dicts through composites -----------------------------------------------------
def _as_dict(problem, v):
    return {n: v[s].reshape(t.shape) for (n, s), t in zip(oracles.param_slices(problem).items(),
                                                         oracles.param_dict(problem).values())}


@pytest.mark.parametrize("expr", ["2*H", "H+0.1*I", "H@H", "-H", "(H+0.1*I).T", "H/4-H@H", "0.1*I+H"])
def test_parameter_dicts_through_composites(expr):
    # A sum's input and output spaces are those of every term, whatever their order.
    (H, DH), (I, DI) = square("hessian"), square("identity")
    C, want = eval(expr, {"H": H, "I": I}), eval(expr, {"H": DH, "I": DI})
    problem, _ = _hessian_problem()
    v = contract.probes(P, 1, seed=4)[:, 0]
    out = C @ _as_dict(problem, v)
    assert isinstance(out, dict), f"{expr} @ dict returned {type(out).__name__}"
    expected = _as_dict(problem, want @ v)
    assert list(out) == list(expected)
    for n in expected:
        contract.assert_matches(out[n], expected[n], what=n)


# ---- restriction and block diagonals -------------------------------------------------------
@pytest.mark.parametrize("name", ["hessian", "dense", "diag_pos", "lowrank_indef", "dense_psd"])
def test_restrict_by_basis(name):
    A, D = square(name)
    U = _rand(P, 4, seed=12)
    for basis in (U, Dense(U), U.numpy()):
        R = restrict(A, U=basis)
        assert_operator_equals(R, U.T @ D @ U)
        assert R.tags == A.tags


def test_restrict_of_a_product_keeps_its_tags():
    # STYLE.md: restrict keeps symmetric and psd; here A is itself a product (BᵀB, or a restriction).
    (B, DB), (H, DH) = square("dense"), square("hessian")
    U, W = _rand(P, 4, seed=13), _rand(4, 2, seed=14)
    G = restrict(B.T @ B, U=U)
    assert_operator_equals(G, U.T @ DB.T @ DB @ U)
    assert G.tags == PSD
    nested = restrict(restrict(H, U=U), U=W)
    assert_operator_equals(nested, W.T @ U.T @ DH @ U @ W)
    assert nested.tags == SYM


def test_restrict_by_params_of_a_composite():
    (H, DH), (Dg, DD) = square("hessian"), square("diag_pos")
    problem, _ = _hessian_problem()
    sl = oracles.param_slices(problem)
    idx = torch.cat([torch.arange(sl[n].start, sl[n].stop) for n in ("w1", "w2")])
    R = restrict(H + Dg, params=["w2", "w1"])
    assert_operator_equals(R, (DH + DD)[idx][:, idx])
    assert R.tags == SYM
    assert list(R @ {"w1": torch.ones(3, 5, dtype=torch.float64), "w2": torch.ones(5, 3, dtype=torch.float64)}) \
        == ["w1", "w2"]


@pytest.mark.parametrize("names", [("diag_pos", "lowrank_psd"), ("hessian", "diag_pos"), ("dense", "identity")])
def test_block_diag_square(names):
    (A, DA), (B, DB) = square(names[0]), square(names[1])
    Z = block_diag(A, B)
    assert_operator_equals(Z, torch.block_diag(DA, DB))
    assert Z.tags == A.tags & B.tags
    contract.check_adjoint(Z)


def test_block_diag_rectangular_and_mixed():
    (R, DR), (A, DA), (Q, DQ) = rect("dense_rect"), square("diag_mixed"), rect("lowrank_rect")
    Z = block_diag(R, A, Q.T)
    assert_operator_equals(Z, torch.block_diag(DR, DA, DQ.T))
    assert Z.tags == frozenset()
    assert_operator_equals(Z.T, torch.block_diag(DR, DA, DQ.T).T)
    M = _rand(3, 3, seed=15)
    assert_operator_equals(block_diag(M, square("identity")[0]), torch.block_diag(M, torch.eye(P, dtype=torch.float64)))


# ---- tags by promise --------------------------------------------------------------------
def test_tag_adds_promises_without_changing_values():
    (B, DB) = rect("dense_rect")
    G = B @ B.T  # the Gram product (Bᵀ)ᵀ Bᵀ
    assert_operator_equals(G, DB @ DB.T)
    assert G.tags == PSD
    A, D = square("dense")
    T = tag(A, "symmetric")
    assert T.tags == SYM and A.tags == frozenset()
    assert T.T is T
    assert_operator_equals(T, D)
    H, DH = square("hessian")
    assert tag(H, "psd").tags == PSD  # psd implies symmetric
    assert_operator_equals(tag(H, "psd"), DH)
    assert curvops.tag(A, "psd").is_symmetric


def test_tag_errors():
    A, _ = square("dense")
    with pytest.raises(ValueError, match="unknown"):
        tag(A, "positive")
    with pytest.raises(ValueError, match="need a square operator"):
        tag(rect("dense_rect")[0], "symmetric")


# ---- errors at build time ---------------------------------------------------------------
def test_shape_mismatch_raises_when_built():
    (A, _), (R, _) = square("hessian"), rect("dense_rect")
    with pytest.raises(ValueError, match="expected operators of one shape"):
        A + R
    with pytest.raises(ValueError, match="expected operators of one shape"):
        A - R
    with pytest.raises(ValueError, match="inner dimensions differ"):
        R @ A
    with pytest.raises(ValueError, match="inner dimensions differ"):
        A @ R @ R
    with pytest.raises(ValueError, match="expected a square operator"):
        restrict(R, U=_rand(P, 2))
    with pytest.raises(ValueError, match="expected U with 35 rows"):
        restrict(A, U=_rand(P + 1, 2))
    with pytest.raises(ValueError, match="unknown parameter names"):
        restrict(A, params=["w1", "nope"])
    with pytest.raises(ValueError, match="exactly one of"):
        restrict(A)
    with pytest.raises(TypeError, match="not a parameter space"):
        restrict(square("dense")[0], params=["w1"])
    with pytest.raises(ValueError, match="at least one"):
        block_diag()


def test_dtype_mismatch_raises_when_built():
    A, _ = square("diag_pos")
    B32 = Dense(torch.eye(P, dtype=torch.float32))
    with pytest.raises(TypeError, match="different dtypes"):
        A + B32
    with pytest.raises(TypeError, match="different dtypes"):
        A @ B32
    with pytest.raises(TypeError, match="different dtypes"):
        block_diag(A, B32)


@pytest.mark.parametrize("name", ["hessian", "diag_pos", "composite"])
def test_to_dense_size_guard(name):
    A = square(name)[0] if name != "composite" else square("dense")[0] @ square("diag_pos")[0]
    with pytest.raises(ValueError, match=r"to_dense: the matrix has 35×35 = 1,225 entries, above max_entries=1,000"):
        A.to_dense(max_entries=1000)
    assert_operator_equals(A, A.to_dense(max_entries=P * P))


# ---- errors of A @ v ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["hessian", "diag_pos", "dense_rect"])
def test_product_input_errors(name):
    A, _ = square(name) if name in SQUARE else rect(name)
    N = A.shape[1]
    with pytest.raises(ValueError, match=f"expected a vector of length {N}"):
        A @ torch.zeros(N + 1, dtype=torch.float64)
    with pytest.raises(ValueError, match=f"expected a vector of length {N}"):
        A @ np.zeros(N - 1)
    with pytest.raises(TypeError, match="expected dtype torch.float64, got torch.float32"):
        A @ torch.zeros(N, dtype=torch.float32)
    with pytest.raises(ValueError, match="expected a tensor on cpu, got one on meta"):
        A @ torch.zeros(N, dtype=torch.float64, device="meta")
    with pytest.raises(ValueError, match=r"expected a vector \[\d+\] or a block"):
        A @ torch.zeros(N, 2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="scalar operands are not allowed"):
        A @ 2.0
    with pytest.raises(TypeError, match="expected a torch.Tensor, a numpy array"):
        A @ None
    with pytest.raises(ValueError, match=f"expected a vector of length {A.shape[0]}"):
        A.T @ torch.zeros(A.shape[0] + 2, dtype=torch.float64)


def test_parameter_dict_errors():
    A, _ = square("hessian")
    v = {"w1": torch.zeros(3, 5, dtype=torch.float64), "b1": torch.zeros(5, dtype=torch.float64)}
    with pytest.raises(ValueError, match=r"missing \['w2'\]"):
        A @ v
    with pytest.raises(ValueError, match=r"unexpected \['extra'\]"):
        A @ {**v, "w2": torch.zeros(5, 3, dtype=torch.float64), "extra": torch.zeros(1, dtype=torch.float64)}
    with pytest.raises(ValueError, match="entry 'w2' has shape"):
        A @ {**v, "w2": torch.zeros(3, 5, dtype=torch.float64)}
    with pytest.raises(TypeError, match="not a parameter space"):
        square("dense")[0] @ v
