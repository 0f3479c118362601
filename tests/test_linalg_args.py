"""Argument validation of every public algorithm in curvops.linalg (issue 10).

Every integer budget is checked as an int (numpy integers accepted, ``bool`` and floats refused
with the fix), ``generator=`` is None, a ``torch.Generator`` or an int seed, reals and flags are
checked for their kind — and every error is raised before the first product with the operator
(a counting operator proves it).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import curvops
from curvops.linalg import (
    diagonal, eigsh, frobenius_norm, inverse, lanczos, logdet, nystrom, nystrom_preconditioner, randomized_svd,
    solve, spectral_density, trace,
)
from curvops.linalg._checks import check_choice, check_flag, check_generator, check_int, check_real

DT = torch.float64
N = 12


def counting(n: int = N, m: int | None = None):
    """A PSD diagonal operator (or an m×n rectangular one) that counts its products."""
    calls = [0]
    if m is None:
        D = torch.diag(torch.arange(1, n + 1, dtype=DT))
        tags = ("psd",)
    else:
        D = torch.arange(1, m * n + 1, dtype=DT).reshape(m, n).sin()
        tags = ()

    def mm(V):
        calls[0] += 1
        return D @ V

    def rmm(W):
        calls[0] += 1
        return D.T @ W

    return curvops.func_operator(tuple(D.shape), mm, rmm, dtype=DT, tags=tags), calls


RHS = torch.ones(N, dtype=DT)

# (id, function, positional args after A, keyword args, exception, regex)
BAD = [
    # ---- eigsh ----
    ("eigsh-k-float", eigsh, (), dict(k=5.0), TypeError, r"^eigsh: expected an integer k, got float 5\.0\. Pass k=5\.$"),
    ("eigsh-k-bool", eigsh, (), dict(k=True), TypeError, r"^eigsh: expected an integer k, got bool True\."),
    ("eigsh-k-str", eigsh, (), dict(k="3"), TypeError, r"^eigsh: expected an integer k, got str '3'\."),
    ("eigsh-k-range", eigsh, (), dict(k=N), ValueError, rf"^eigsh: expected 1 ≤ k < n = {N}, got k={N}\. For all"),
    ("eigsh-generator-str", eigsh, (), dict(k=2, generator="0"), TypeError,
     r"^eigsh: expected a torch\.Generator, an int seed or None for generator, got str '0'\. Pass generator="),
    ("eigsh-generator-numpy", eigsh, (), dict(k=2, generator=np.random.default_rng(0)), TypeError,
     r"^eigsh: expected a torch\.Generator, an int seed or None for generator, got Generator"),
    ("eigsh-generator-float", eigsh, (), dict(k=2, generator=1.0), TypeError, r"eigsh: .*generator, got float 1\.0"),
    ("eigsh-generator-bool", eigsh, (), dict(k=2, generator=True), TypeError, r"eigsh: .*generator, got bool True"),
    ("eigsh-generator-negative", eigsh, (), dict(k=2, generator=-1), ValueError,
     r"^eigsh: expected an int seed for generator in \[0, 2\*\*64 - 1\], got -1\."),
    ("eigsh-max_iters-float", eigsh, (), dict(k=2, max_iters=10.5), TypeError,
     r"^eigsh: expected an integer max_iters, got float 10\.5\. Pass a whole number as an int"),
    ("eigsh-max_iters-zero", eigsh, (), dict(k=2, max_iters=0), ValueError, r"^eigsh: expected max_iters ≥ 1, got 0\."),
    ("eigsh-ncv-float", eigsh, (), dict(k=2, ncv=8.0), TypeError, r"^eigsh: expected an integer ncv, got float 8\.0\. Pass ncv=8\."),
    ("eigsh-block_size-float", eigsh, (), dict(k=2, block_size=2.0), TypeError, r"^eigsh: expected an integer block_size"),
    ("eigsh-tol-str", eigsh, (), dict(k=2, tol="1e-6"), TypeError, r"^eigsh: expected a real number for tol, got str"),
    ("eigsh-tol-nan", eigsh, (), dict(k=2, tol=math.nan), ValueError, r"^eigsh: expected a finite tol ≥ 0, got nan\."),
    ("eigsh-tol-negative", eigsh, (), dict(k=2, tol=-1e-3), ValueError, r"^eigsh: expected a finite tol ≥ 0, got -0\.001\."),
    ("eigsh-which-none", eigsh, (), dict(k=2, which=None), ValueError, r"^eigsh: expected which in \('LA', .*got None\."),
    ("eigsh-return_eigenvectors-str", eigsh, (), dict(k=2, return_eigenvectors="no"), TypeError,
     r"^eigsh: expected True or False for return_eigenvectors, got str 'no'\."),
    # ---- lanczos ----
    ("lanczos-num_steps-float", lanczos, (RHS,), dict(num_steps=3.0), TypeError,
     r"^lanczos: expected an integer num_steps, got float 3\.0\. Pass num_steps=3\."),
    ("lanczos-reorthogonalize-str", lanczos, (RHS, 3), dict(reorthogonalize="no"), TypeError,
     r"^lanczos: expected True or False for reorthogonalize"),
    ("lanczos-generator-str", lanczos, (RHS, 3), dict(generator="x"), TypeError, r"^lanczos: expected a torch\.Generator"),
    # ---- spectral_density ----
    ("density-num_probes-float", spectral_density, (), dict(num_probes=2.0), TypeError,
     r"^spectral_density: expected an integer num_probes, got float 2\.0\. Pass num_probes=2\."),
    ("density-num_steps-float", spectral_density, (), dict(num_steps=5.5), TypeError,
     r"^spectral_density: expected an integer num_steps, got float 5\.5"),
    ("density-num_points-float", spectral_density, (), dict(num_points=100.0), TypeError,
     r"^spectral_density: expected an integer num_points, got float 100\.0"),
    ("density-num_points-one", spectral_density, (), dict(num_points=1), ValueError,
     r"^spectral_density: expected num_points ≥ 2, got 1\."),
    ("density-sigma-str", spectral_density, (), dict(sigma="0.1"), TypeError,
     r"^spectral_density: expected a real number for sigma, got str"),
    ("density-sigma-zero", spectral_density, (), dict(sigma=0.0), ValueError, r"^spectral_density: expected sigma > 0, got 0\.0\."),
    ("density-sigma-nan", spectral_density, (), dict(sigma=math.nan), ValueError, r"^spectral_density: expected sigma > 0, got nan"),
    ("density-batch-zero", spectral_density, (), dict(probe_batch_size=0), ValueError,
     r"^spectral_density: expected probe_batch_size ≥ 1, got 0\."),
    ("density-batch-float", spectral_density, (), dict(probe_batch_size=1.0), TypeError,
     r"^spectral_density: expected an integer probe_batch_size"),
    ("density-generator", spectral_density, (), dict(generator="x"), TypeError, r"^spectral_density: expected a torch\.Generator"),
    ("density-distribution", spectral_density, (), dict(distribution="gaussian"), ValueError,
     r"^spectral_density: expected distribution in \('rademacher', 'normal'\), got 'gaussian'\."),
    ("density-grid-2d", spectral_density, (), dict(grid=torch.zeros(3, 2)), ValueError,
     r"^spectral_density: expected a 1-D grid, got shape \(3, 2\)\."),
    ("density-grid-nan", spectral_density, (), dict(grid=[0.0, math.nan]), ValueError,
     r"^spectral_density: expected a grid of finite points"),
    ("density-grid-str", spectral_density, (), dict(grid="0:1"), TypeError, r"^spectral_density: expected grid as a 1-D tensor"),
    # ---- logdet ----
    ("logdet-damping-str", logdet, (), dict(damping="0"), TypeError, r"^logdet: expected a real number for damping, got str"),
    ("logdet-damping-negative", logdet, (), dict(damping=-1), ValueError, r"^logdet: expected damping ≥ 0, got -1\."),
    ("logdet-damping-inf", logdet, (), dict(damping=math.inf), ValueError, r"^logdet: expected damping ≥ 0, got inf\."),
    ("logdet-num_probes-numpy-float", logdet, (), dict(num_probes=np.float64(3)), TypeError,
     r"^logdet: expected an integer num_probes, got float64 3\.0\. Pass num_probes=3\."),
    ("logdet-assume_psd-str", logdet, (), dict(assume_psd="yes"), TypeError, r"^logdet: expected True or False for assume_psd"),
    ("logdet-generator-list", logdet, (), dict(generator=[1]), TypeError, r"^logdet: expected a torch\.Generator.*got list \[1\]"),
    # ---- trace ----
    ("trace-num_matvecs-float", trace, (), dict(num_matvecs=10.0), TypeError,
     r"^trace\(xtrace\): expected an integer num_matvecs, got float 10\.0\. Pass num_matvecs=10\.$"),
    ("trace-num_matvecs-small", trace, (), dict(num_matvecs=3), ValueError,
     r"^trace\(xtrace\): expected num_matvecs >= 4, got 3\. trace needs at least 4"),
    ("trace-block_size-zero", trace, (), dict(method="hutchinson", block_size=0), ValueError,
     r"^trace\(hutchinson\): expected block_size ≥ 1, got 0\."),
    ("trace-block_size-float", trace, (), dict(method="hutchinson", block_size=2.5), TypeError,
     r"^trace\(hutchinson\): expected an integer block_size"),
    ("trace-generator", trace, (), dict(generator="x"), TypeError, r"^trace\(xtrace\): expected a torch\.Generator"),
    ("trace-assume_psd-int", trace, (), dict(method="xnystrace", assume_psd=1), TypeError,
     r"^trace\(xnystrace\): expected True or False for assume_psd, got int 1\."),
    ("trace-method-none", trace, (), dict(method=None), ValueError, r"^trace: expected method in \("),
    ("trace-distribution", trace, (), dict(distribution="normal"), ValueError,
     r"^trace\(xtrace\): expected distribution in \('rademacher', 'gaussian', 'sphere'\), got 'normal'\."),
    # ---- frobenius_norm ----
    ("frobenius-num_matvecs-float", frobenius_norm, (), dict(num_matvecs=3.0), TypeError,
     r"^frobenius_norm\(hutch\+\+\): expected an integer num_matvecs"),
    ("frobenius-distribution-exact-path", frobenius_norm, (), dict(num_matvecs=100, distribution="x"), ValueError,
     r"^frobenius_norm\(hutch\+\+\): expected distribution in"),
    ("frobenius-block_size", frobenius_norm, (), dict(num_matvecs=100, block_size=-1), ValueError,
     r"^frobenius_norm\(hutch\+\+\): expected block_size ≥ 1, got -1\."),
    ("frobenius-generator", frobenius_norm, (), dict(generator=object()), TypeError,
     r"^frobenius_norm\(hutch\+\+\): expected a torch\.Generator"),
    # ---- diagonal ----
    ("diagonal-exact-block_size-zero", diagonal, (), dict(method="exact", block_size=0), ValueError,
     r"^diagonal\(exact\): expected block_size ≥ 1, got 0\."),
    ("diagonal-num_matvecs-float", diagonal, (), dict(num_matvecs=8.0), TypeError,
     r"^diagonal\(xdiag\): expected an integer num_matvecs, got float 8\.0\. Pass num_matvecs=8\."),
    ("diagonal-exact-num_matvecs-str", diagonal, (), dict(method="exact", num_matvecs="all"), TypeError,
     r"^diagonal\(exact\): expected an integer num_matvecs"),
    ("diagonal-distribution-exact-path", diagonal, (), dict(num_matvecs=100, distribution="x"), ValueError,
     r"^diagonal\(xdiag\): expected distribution in"),
    ("diagonal-generator", diagonal, (), dict(generator="x"), TypeError, r"^diagonal\(xdiag\): expected a torch\.Generator"),
    # ---- randomized_svd / nystrom ----
    ("rsvd-rank-float", randomized_svd, (2.0,), {}, TypeError,
     r"^randomized_svd: expected an integer rank, got float 2\.0\. Pass rank=2\."),
    ("rsvd-oversample-float", randomized_svd, (2,), dict(oversample=1.5), TypeError,
     r"^randomized_svd: expected an integer oversample"),
    ("rsvd-power_iters-negative", randomized_svd, (2,), dict(power_iters=-1), ValueError,
     r"^randomized_svd: expected a non-negative integer power_iters, got -1\."),
    ("rsvd-generator", randomized_svd, (2,), dict(generator="x"), TypeError, r"^randomized_svd: expected a torch\.Generator"),
    ("nystrom-assume_psd-str", nystrom, (2,), dict(assume_psd="True"), TypeError,
     r"^nystrom: expected True or False for assume_psd, got str 'True'\."),
    ("nystrom-oversample-bool", nystrom, (2,), dict(oversample=True), TypeError,
     r"^nystrom: expected an integer oversample, got bool True\."),
    ("nystrom-generator-float", nystrom, (2,), dict(generator=2.0), TypeError, r"^nystrom: expected a torch\.Generator"),
    ("nystrom_pre-damping-str", nystrom_preconditioner, (2,), dict(damping="x"), TypeError,
     r"^nystrom_preconditioner: expected a real number for damping, got str 'x'\."),
    ("nystrom_pre-damping-nan", nystrom_preconditioner, (2,), dict(damping=math.nan), ValueError,
     r"^nystrom_preconditioner: expected a finite damping >= 0, got nan\."),
    ("nystrom_pre-rank-float", nystrom_preconditioner, (2.0,), {}, TypeError,
     r"^nystrom_preconditioner: expected an integer rank, got float 2\.0\."),
    # ---- solve / inverse ----
    ("solve-max_iters-float", solve, (RHS,), dict(max_iters=10.0), TypeError,
     r"^solve\(cg\): expected an integer max_iters, got float 10\.0\. Pass max_iters=10\."),
    ("solve-max_iters-negative", solve, (RHS,), dict(max_iters=-1), ValueError,
     r"^solve\(cg\): expected max_iters >= 0, got -1\. Pass None for the default"),
    ("solve-rtol-nan", solve, (RHS,), dict(rtol=math.nan), ValueError, r"^solve\(cg\): expected rtol >= 0, got nan\."),
    ("solve-rtol-str", solve, (RHS,), dict(rtol="1e-6"), TypeError, r"^solve\(cg\): expected a real number for rtol"),
    ("solve-atol-negative", solve, (RHS,), dict(atol=-1.0), ValueError, r"^solve\(cg\): expected atol >= 0, got -1\.0\."),
    ("solve-damping-str", solve, (RHS,), dict(damping="0.1"), TypeError, r"^solve\(cg\): expected a real number for damping"),
    ("solve-damping-nan", solve, (RHS,), dict(damping=math.nan), ValueError, r"^solve\(cg\): expected a finite float damping"),
    ("solve-generator", solve, (RHS,), dict(generator="x"), TypeError, r"^solve\(cg\): expected a torch\.Generator"),
    ("solve-preconditioner_rank-float", solve, (RHS,), dict(preconditioner="nystrom", preconditioner_rank=5.0), TypeError,
     r"^solve\(cg\): expected an integer preconditioner_rank, got float 5\.0\. Pass preconditioner_rank=5\."),
    ("solve-strict-str", solve, (RHS,), dict(strict="yes"), TypeError, r"^solve\(auto\): expected True or False for strict"),
    ("solve-assume_psd-str", solve, (RHS,), dict(assume_psd="no"), TypeError, r"^solve\(auto\): expected True or False for assume_psd"),
    ("solve-x0-nan", solve, (RHS,), dict(x0=torch.full((N,), math.nan, dtype=DT)), ValueError,
     r"^solve\(cg\): expected a finite initial guess x0"),
    ("inverse-max_iters-float", inverse, (), dict(max_iters=2.5), TypeError, r"^inverse\(cg\): expected an integer max_iters"),
    ("inverse-warn-str", inverse, (), dict(warn="no"), TypeError, r"^inverse\(auto\): expected True or False for warn"),
    ("inverse-generator", inverse, (), dict(generator="x"), TypeError, r"^inverse\(cg\): expected a torch\.Generator"),
]


@pytest.mark.parametrize("fn, args, kwargs, exc, match", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_argument_is_named_before_any_product(fn, args, kwargs, exc, match):
    A, calls = counting()
    with pytest.raises(exc, match=match):
        fn(A, *args, **kwargs)
    assert calls[0] == 0, f"{calls[0]} products ran before the error"


def test_errors_name_api_argument_and_fix():
    """The eigsh cases of issue 10 verbatim: the type is the problem, not the range; no raw AttributeError."""
    A, _ = counting()
    with pytest.raises(TypeError) as info:
        eigsh(A, k=5.0)
    msg = str(info.value)
    assert "1 ≤ k < n" not in msg and "k=5" in msg and msg.startswith("eigsh: expected")
    with pytest.raises(TypeError) as info:
        eigsh(A, k=2, generator="seed")
    assert "generator" in str(info.value) and "generator=0" in str(info.value)


# ---- what is accepted, and gives the same numbers -------------------------------------------
def _same(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


SEEDED = [
    ("eigsh", lambda A, g: eigsh(A, k=2, tol=1e-3, generator=g).eigenvalues),
    ("spectral_density", lambda A, g: spectral_density(A, num_probes=3, num_steps=4, generator=g).density),
    ("logdet", lambda A, g: logdet(A, num_probes=3, num_steps=4, generator=g).value),
    ("trace-hutch++", lambda A, g: trace(A, method="hutch++", num_matvecs=9, generator=g).value),
    ("trace-hutchinson", lambda A, g: trace(A, method="hutchinson", num_matvecs=5, generator=g).value),
    ("frobenius_norm", lambda A, g: frobenius_norm(A, num_matvecs=6, generator=g).value),
    ("diagonal", lambda A, g: diagonal(A, num_matvecs=6, generator=g).value),
    ("randomized_svd", lambda A, g: randomized_svd(A, 2, oversample=1, generator=g).S),
    ("nystrom", lambda A, g: nystrom(A, 2, oversample=1, generator=g).S),
    ("solve-nystrom", lambda A, g: solve(A, RHS, preconditioner="nystrom", preconditioner_rank=3, max_iters=2,
                                         generator=g).x),
]


@pytest.mark.parametrize("run", [s[1] for s in SEEDED], ids=[s[0] for s in SEEDED])
@pytest.mark.parametrize("seed", [0, 7, np.int64(123)], ids=["0", "7", "np.int64"])
def test_int_seed_is_a_generator_on_the_operator_device(run, seed):
    """generator=seed gives exactly the numbers of torch.Generator(device=A.device).manual_seed(seed),
    every time (one generator per call, so e.g. Hutch++'s sketch and residual probes differ)."""
    A, _ = counting()
    torch.manual_seed(99)
    rng = torch.get_rng_state()
    by_seed = run(A, seed)
    again = run(A, seed)
    by_gen = run(A, torch.Generator(device=A.device).manual_seed(int(seed)))
    _same(by_seed, by_gen)
    _same(again, by_gen)
    assert torch.equal(torch.get_rng_state(), rng), "a seeded call must not touch the global RNG"


def test_hutchpp_int_seed_draws_distinct_blocks():
    """A seed must seed one generator, not be re-used for each block (that would correlate them)."""
    A = curvops.Dense(torch.diag(torch.arange(1, 41, dtype=DT)) + 0.1, tags=("symmetric",))
    g = torch.Generator().manual_seed(3)
    S = torch.randint(0, 2, (40, 3), generator=g).to(DT) * 2 - 1
    G = torch.randint(0, 2, (40, 3), generator=g).to(DT) * 2 - 1
    assert not torch.equal(S, G)
    _same(trace(A, method="hutch++", num_matvecs=9, generator=3).value,
          trace(A, method="hutch++", num_matvecs=9, generator=torch.Generator().manual_seed(3)).value)


NUMPY_INTS = [
    ("eigsh", lambda A, i: eigsh(A, k=i(2), ncv=i(8), max_iters=i(50), block_size=i(1), generator=0).eigenvalues,),
    ("lanczos", lambda A, i: lanczos(A, RHS, i(4)).alphas,),
    ("spectral_density", lambda A, i: spectral_density(A, num_probes=i(2), num_steps=i(3), num_points=i(5),
                                                       probe_batch_size=i(1), generator=0).density,),
    ("logdet", lambda A, i: logdet(A, num_probes=i(2), num_steps=i(3), generator=0).value,),
    ("trace", lambda A, i: trace(A, method="hutchinson", num_matvecs=i(5), block_size=i(2), generator=0).value,),
    ("frobenius_norm", lambda A, i: frobenius_norm(A, num_matvecs=i(6), generator=0).value,),
    ("diagonal", lambda A, i: diagonal(A, method="hutchinson", num_matvecs=i(6), block_size=i(4), generator=0).value,),
    ("randomized_svd", lambda A, i: randomized_svd(A, i(2), oversample=i(1), power_iters=i(1), generator=0).S,),
    ("nystrom", lambda A, i: nystrom(A, i(2), oversample=i(1), power_iters=i(0), generator=0).S,),
    ("solve", lambda A, i: solve(A, RHS, max_iters=i(3), preconditioner="nystrom", preconditioner_rank=i(3),
                                 generator=0).x,),
]


@pytest.mark.parametrize("run", [c[1] for c in NUMPY_INTS], ids=[c[0] for c in NUMPY_INTS])
@pytest.mark.parametrize("kind", [np.int64, np.int32, np.uint8], ids=["int64", "int32", "uint8"])
def test_numpy_integers_are_counts(run, kind):
    A, _ = counting()
    _same(run(A, kind), run(A, int))


def test_bool_is_not_a_count_and_integral_float_says_what_to_pass():
    A, _ = counting()
    with pytest.raises(TypeError, match=r"^trace\(xtrace\): expected an integer num_matvecs, got bool True\. "
                                        r"Pass a count, e.g\. num_matvecs=4\.$"):
        trace(A, num_matvecs=True)
    with pytest.raises(TypeError, match=r"^eigsh: expected an integer k, got float64 3\.0\. Pass k=3\.$"):
        eigsh(A, k=np.float64(3))
    with pytest.raises(TypeError, match=r"got float inf\. Pass a Python int"):
        eigsh(A, k=math.inf)


def test_real_arguments_accept_numpy_and_one_element_tensors():
    A, _ = counting()
    ref = solve(A, RHS, damping=0.5, rtol=1e-10).x
    torch.testing.assert_close(solve(A, RHS, damping=np.float32(0.5), rtol=np.float64(1e-10)).x, ref)
    torch.testing.assert_close(solve(A, RHS, damping=torch.tensor(0.5), rtol=torch.tensor(1e-10)).x, ref)
    with pytest.raises(TypeError, match=r"^solve\(cg\): expected a real number for damping, got Tensor"):
        solve(A, RHS, damping=torch.tensor([0.5, 0.5]))
    with pytest.raises(TypeError, match=r"^solve\(cg\): expected a real number for damping, got bool True"):
        solve(A, RHS, damping=True)


# ---- the validators themselves ----------------------------------------------------------------
def test_check_generator():
    assert check_generator(None, "api") is None
    g = torch.Generator()
    assert check_generator(g, "api") is g
    seeded = check_generator(5, "api", "cpu")
    assert isinstance(seeded, torch.Generator) and seeded.initial_seed() == 5 and seeded.device.type == "cpu"
    assert check_generator(2**64 - 1, "api").initial_seed() == 2**64 - 1
    assert check_generator(np.uint64(9), "api").initial_seed() == 9
    meta = check_generator(1, "api", torch.device("meta"))  # no generator there: a CPU one, moved afterwards
    assert meta.device.type == "cpu" and meta.initial_seed() == 1
    with pytest.raises(ValueError, match=r"^api: expected an int seed for generator in \[0, 2\*\*64 - 1\], got 18446744073709551616\."):
        check_generator(2**64, "api")
    with pytest.raises(TypeError, match=r"^api: expected a torch\.Generator, an int seed or None for generator, got "
                                        r"RandomState"):
        check_generator(np.random.RandomState(0), "api")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_int_seed_on_cuda_operator():
    A = curvops.Dense(torch.diag(torch.arange(1, 13, dtype=DT, device="cuda")), tags=("psd",))
    assert check_generator(3, "api", A.device).device.type == "cuda"
    _same(trace(A, num_matvecs=6, generator=3).value,
          trace(A, num_matvecs=6, generator=torch.Generator(device="cuda").manual_seed(3)).value)


def test_check_int_real_choice_flag():
    assert check_int(np.int16(4), "k", "api", minimum=1) == 4 and type(check_int(np.int16(4), "k", "api")) is int
    with pytest.raises(ValueError, match=r"^api: expected 1 ≤ k ≤ 3, got 4\.$"):
        check_int(4, "k", "api", minimum=1, maximum=3)
    with pytest.raises(ValueError, match=r"^api: expected k ≤ 3, got k=4\. Lower it\.$"):
        check_int(4, "k", "api", maximum=3, named=True, fix="Lower it.")
    with pytest.raises(TypeError, match=r"^api: expected an integer k, got NoneType None\."):
        check_int(None, "k", "api")
    assert check_real(np.float32(0.25), "tol", "api", minimum=0.0) == 0.25
    assert check_real(math.inf, "x", "api", allow_inf=True) == math.inf
    with pytest.raises(ValueError, match=r"^api: expected a finite x > 0, got 0\."):
        check_real(0, "x", "api", minimum=0.0, strict=True)
    with pytest.raises(TypeError, match=r"^api: expected a real number for x, got complex"):
        check_real(1j, "x", "api")
    assert check_choice("a", "m", ("a", "b"), "api") == "a"
    with pytest.raises(ValueError, match=r"^api: expected m in \('a', 'b'\), got \['a'\]\."):
        check_choice(["a"], "m", ("a", "b"), "api")
    assert check_flag(np.bool_(True), "f", "api") is True
    with pytest.raises(TypeError, match=r"^api: expected True or False for f, got int 0\. Pass f=True or f=False\.$"):
        check_flag(0, "f", "api")


# ---- summaries.py: checked under the name the user called, on every path ---------------------
@pytest.mark.parametrize("fn, kwargs, exc, match", [
    (curvops.rank, dict(k_max=2.0), TypeError, r"^rank: expected an integer k_max"),
    (curvops.rank, dict(block_size=1.5), TypeError, r"^rank: expected an integer block_size"),
    (curvops.rank, dict(max_iters=2.5), TypeError, r"^rank: expected an integer max_iters"),
    (curvops.rank, dict(generator="x"), TypeError, r"^rank: expected a torch\.Generator"),
    (curvops.rank, dict(tol="a"), TypeError, r"^rank: expected a real number for tol"),
    (curvops.cond, dict(damping="a"), TypeError, r"^cond: expected a real number for damping"),
    (curvops.cond, dict(generator="x"), TypeError, r"^cond: expected a torch\.Generator"),
    (curvops.spectral_norm, dict(max_iters=1.5), TypeError, r"^spectral_norm: expected an integer max_iters"),
    (curvops.nuclear_norm, dict(num_probes=3.0), TypeError, r"^nuclear_norm: expected an integer num_probes"),
    (curvops.nuclear_norm, dict(num_steps=2.5), TypeError, r"^nuclear_norm: expected an integer num_steps"),
    (curvops.nuclear_norm, dict(num_matvecs=10.0), TypeError, r"^nuclear_norm: expected an integer num_matvecs"),
    (curvops.nuclear_norm, dict(generator="x"), TypeError, r"^nuclear_norm: expected a torch\.Generator"),
], ids=["rank-k_max", "rank-block_size", "rank-max_iters", "rank-generator", "rank-tol", "cond-damping",
        "cond-generator", "spectral_norm-max_iters", "nuclear-num_probes", "nuclear-num_steps", "nuclear-num_matvecs",
        "nuclear-generator"])
def test_summaries_validate_their_arguments(fn, kwargs, exc, match):
    A, calls = counting(40)
    with pytest.raises(exc, match=match):
        fn(A, **kwargs)
    assert calls[0] == 0


# the same on the other paths (Lanczos rank, rectangular operators) and for the remaining arguments:
# never labelled by the eigsh/trace/slq underneath
SUMMARIES_MORE = [
    ("rank-lanczos-max_iters", curvops.rank, None, dict(k_max=5, max_iters=2.5), TypeError,
     r"^rank: expected an integer max_iters, got float 2\.5\."),
    ("rank-lanczos-generator", curvops.rank, None, dict(k_max=5, generator="x"), TypeError, r"^rank: expected a torch\.Generator"),
    ("rank-gram-block_size", curvops.rank, 30, dict(k_max=5, block_size=0), ValueError, r"^rank: expected block_size ≥ 1, got 0\."),
    ("rank-eig_tol", curvops.rank, None, dict(k_max=5, eig_tol="a"), TypeError, r"^rank: expected a real number for eig_tol"),
    ("rank-gap_factor-str", curvops.rank, None, dict(gap_factor="a"), TypeError, r"^rank: expected a real number for gap_factor"),
    ("rank-k_max-bool", curvops.rank, None, dict(k_max=True), TypeError, r"^rank: expected an integer k_max, got bool"),
    ("rank-tol-nan", curvops.rank, None, dict(tol=math.nan), ValueError, r"^rank: expected tol ≥ 0, got nan"),
    ("cond-tol", curvops.cond, None, dict(tol="a"), TypeError, r"^cond: expected a real number for tol"),
    ("cond-tol-negative", curvops.cond, None, dict(tol=-1.0), ValueError, r"^cond: expected a finite tol ≥ 0, got -1\.0\."),
    ("cond-max_iters", curvops.cond, None, dict(max_iters=2.5), TypeError, r"^cond: expected an integer max_iters"),
    ("cond-gram-generator", curvops.cond, 30, dict(generator=np.random.default_rng(0)), TypeError,
     r"^cond: expected a torch\.Generator"),
    ("cond-damping-inf", curvops.cond, None, dict(damping=math.inf), ValueError, r"^cond: expected damping ≥ 0, got inf"),
    ("spectral_norm-generator", curvops.spectral_norm, None, dict(generator="x"), TypeError,
     r"^spectral_norm: expected a torch\.Generator"),
    ("spectral_norm-gram-tol", curvops.spectral_norm, 30, dict(tol="a"), TypeError,
     r"^spectral_norm: expected a real number for tol"),
    ("spectral_norm-max_iters-0", curvops.spectral_norm, None, dict(max_iters=0), ValueError,
     r"^spectral_norm: expected max_iters ≥ 1, got 0\."),
    ("nuclear-trace_method", curvops.nuclear_norm, None, dict(trace_method="exact"), ValueError,
     r"^nuclear_norm: expected trace_method in \('hutchinson', 'hutch\+\+', 'xtrace', 'xnystrace'\), got 'exact'\."),
    ("nuclear-num_matvecs-budget", curvops.nuclear_norm, None, dict(num_matvecs=3), ValueError,
     r"^nuclear_norm: expected num_matvecs ≥ 4, got 3\. trace_method='xtrace' needs at least 4 products\.$"),
    ("nuclear-gram-num_steps", curvops.nuclear_norm, 30, dict(num_steps=2.5), TypeError,
     r"^nuclear_norm: expected an integer num_steps"),
    ("nuclear-gram-num_probes", curvops.nuclear_norm, 30, dict(num_probes=0), ValueError,
     r"^nuclear_norm: expected num_probes ≥ 1, got 0\."),
    ("nuclear-gram-num_matvecs", curvops.nuclear_norm, 30, dict(num_matvecs="10"), TypeError,
     r"^nuclear_norm: expected an integer num_matvecs"),
    ("nuclear-probe_batch_size", curvops.nuclear_norm, 30, dict(probe_batch_size=1.0), TypeError,
     r"^nuclear_norm: expected an integer probe_batch_size, got float 1\.0\. Pass probe_batch_size=1\.$"),
]


@pytest.mark.parametrize("fn, m, kwargs, exc, match", [c[1:] for c in SUMMARIES_MORE], ids=[c[0] for c in SUMMARIES_MORE])
def test_summaries_validate_on_every_path(fn, m, kwargs, exc, match):
    A, calls = counting(40, m)
    with pytest.raises(exc, match=match):
        fn(A, **kwargs)
    assert calls[0] == 0


def test_summaries_accept_numpy_counts_and_tensor_reals():
    A, _ = counting(40)
    R, _ = counting(40, 30)
    i, f = np.int64, np.float64
    ranked = curvops.rank(A, k_max=i(5), block_size=i(2), max_iters=i(50), eig_tol=f(1e-8), tol=torch.tensor(37.5),
                          gap_factor=f(1.01), generator=0)
    assert "Lanczos" in ranked.method and ranked.value == 3 and not ranked.lower_bound and ranked.well_defined
    assert curvops.rank(R, tol=np.float32(0.0)).value == 30
    ref = curvops.cond(A, damping=1.0, generator=0).value
    assert curvops.cond(A, damping=torch.tensor(1.0), tol=f(1e-6), max_iters=i(100), generator=i(0)).value == ref
    assert curvops.spectral_norm(R, tol=torch.tensor(1e-6), max_iters=i(100), generator=0).value == \
        curvops.spectral_norm(R, generator=0).value
    assert curvops.nuclear_norm(A, num_matvecs=i(40), trace_method="hutch++", generator=0).value == pytest.approx(820)
    assert curvops.nuclear_norm(R, num_probes=i(3), num_steps=i(5), probe_batch_size=i(2), generator=0).value == \
        curvops.nuclear_norm(R, num_probes=3, num_steps=5, probe_batch_size=2, generator=0).value


@pytest.mark.parametrize("fn", [curvops.rank, curvops.cond, curvops.spectral_norm, curvops.nuclear_norm],
                         ids=lambda f: f.__name__)
def test_summaries_accept_int_seeds(fn):
    A, _ = counting(40)
    a = fn(A, generator=4)
    b = fn(A, generator=torch.Generator().manual_seed(4))
    assert a.value == b.value
