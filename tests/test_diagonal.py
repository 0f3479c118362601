"""Diagonal estimators (Hutchinson, XDiag, exact): exact cases, statistics, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import curvops
from curvops.linalg.diagonal import diagonal
from curvops.testing import oracles
from curvops.testing.zoo import CASES
from curvops.testing.spectra import gen, with_spectrum as designed

DT = torch.float64


def counting(A: torch.Tensor, tags=(), nan_at: int | None = None):
    calls = []

    def mm(V, M=A):
        calls.append(V.shape[1])
        out = M @ V
        return out * float("nan") if nan_at is not None and len(calls) >= nan_at else out

    op = curvops.func_operator(tuple(A.shape), mm, lambda W: mm(W, A.T), dtype=A.dtype, tags=tags)
    return op, calls


def test_exact_method_on_a_curvature_operator():
    problem = CASES["mlp_ce"].build("mean")
    H = problem.build(curvops.Hessian)
    res = diagonal(H, method="exact", block_size=20)
    torch.testing.assert_close(res.value, oracles.ORACLES["Hessian"](problem).diagonal(), rtol=1e-10, atol=1e-12)
    assert res.num_matvecs == H.shape[0] and res.method == "exact" and not res.stderr.any()


@pytest.mark.parametrize("symmetric", [True, False])
def test_xdiag_exact_on_low_rank(symmetric):
    U = torch.randn(70, 4, generator=gen(1), dtype=DT)
    A = U @ U.T if symmetric else U @ torch.randn(4, 70, generator=gen(2), dtype=DT)
    res = diagonal(curvops.Dense(A, tags=("symmetric",) if symmetric else ()), method="xdiag", num_matvecs=12,
                   generator=gen())
    torch.testing.assert_close(res.value, A.diagonal(), rtol=1e-10, atol=1e-10)
    assert res.num_matvecs == 12 and float(res.stderr.max()) < 1e-10


def test_full_budget_is_exact():
    A = designed(torch.linspace(-1.0, 1.0, 30))
    res = diagonal(A, method="xdiag", num_matvecs=30)
    assert res.method == "exact"
    torch.testing.assert_close(res.value, A.diagonal(), rtol=1e-13, atol=1e-14)


def test_rademacher_hutchinson_exact_on_diagonal_matrix():
    d = torch.linspace(-2.0, 4.0, 25, dtype=DT)
    res = diagonal(curvops.Diagonal(d), method="hutchinson", num_matvecs=1, generator=gen())
    torch.testing.assert_close(res.value, d, rtol=1e-15, atol=0.0)


def test_hutchinson_entries_within_error_estimates():
    # Target: |error| < 5 standard errors for every entry, and calibrated on average.
    A = designed(torch.linspace(0.0, 2.0, 60))
    res = diagonal(A, method="hutchinson", num_matvecs=200, generator=gen(3))
    z = ((res.value - A.diagonal()) / res.stderr).numpy()
    assert np.abs(z).max() < 5 and 0.4 < np.mean(z ** 2) < 2.5


def test_xdiag_beats_hutchinson_on_fast_decay():
    lam = 10 * 0.6 ** torch.arange(150, dtype=DT)
    A = designed(lam)
    op = curvops.Dense(A, tags=("psd",))
    e_x = float((diagonal(op, method="xdiag", num_matvecs=60, generator=gen()).value - A.diagonal()).norm())
    e_h = float((diagonal(op, method="hutchinson", num_matvecs=60, generator=gen()).value - A.diagonal()).norm())
    assert e_x < 1e-4 * e_h


def test_calls_blocks_and_reproducibility():
    A = designed(torch.linspace(0.1, 1.0, 40))
    op, calls = counting(A, tags=("symmetric",))
    a = diagonal(op, method="xdiag", num_matvecs=10, generator=gen(5))
    assert calls == [5, 5]
    calls.clear()
    b = diagonal(op, method="hutchinson", num_matvecs=10, generator=gen(5), block_size=4)
    assert calls == [4, 4, 2]
    torch.testing.assert_close(diagonal(op, method="xdiag", num_matvecs=10, generator=gen(5)).value, a.value,
                               rtol=0, atol=0)
    torch.testing.assert_close(diagonal(op, method="hutchinson", num_matvecs=10, generator=gen(5)).value, b.value,
                               rtol=1e-14, atol=1e-15)


def test_bad_input():
    with pytest.raises(ValueError, match=r"diagonal\(xdiag\): expected a square operator, got shape \(4, 3\)"):
        diagonal(curvops.Dense(torch.ones(4, 3, dtype=DT)))
    with pytest.raises(ValueError, match="expected method in"):
        diagonal(torch.eye(3, dtype=DT), method="xtrace")
    with pytest.raises(ValueError, match="expected num_matvecs >= 4, got 2"):
        diagonal(torch.eye(30, dtype=DT), method="xdiag", num_matvecs=2)
    op, _ = counting(torch.eye(20, dtype=DT), nan_at=1)
    with pytest.raises(ValueError, match=r"A @ V \(test vectors\) returned non-finite values"):
        diagonal(op, method="xdiag", num_matvecs=6, generator=gen())
    nonsym = curvops.func_operator((20, 20), lambda V: V, dtype=DT)  # no adjoint
    with pytest.raises(NotImplementedError, match="adjoint"):
        diagonal(nonsym, method="xdiag", num_matvecs=6, generator=gen())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["hutchinson", "xdiag", "exact"])
def test_on_gpu(method):
    U = torch.randn(50, 3, generator=gen(), dtype=DT)
    A = (U @ U.T).cuda()
    res = diagonal(curvops.Dense(A, tags=("psd",)), method=method, num_matvecs=10,
                   generator=torch.Generator(device="cuda").manual_seed(0))
    assert res.value.device.type == "cuda" and res.stderr.device.type == "cuda"
    if method != "hutchinson":
        torch.testing.assert_close(res.value, A.diagonal(), rtol=1e-10, atol=1e-10)
