"""The active subspace over a prior on the parameters (``prior=``, seeds/002 as written) against a naive
reference: per-draw ``torch.autograd.grad`` of the whole-data loss on a deep copy of the model, in a loop,
and a dense ``eigh`` of GᵀG/N — sharing no code with the package."""

import copy

import pytest
import torch
from torch import nn

from curvops.analysis.active_subspace import (PriorGradientCovariance, active_subspace, prior_gradients,
                                              subspace_distance)
from curvops.analysis.active_subspace.prior import DRAW_BLOCK
from curvops.testing import contract

D = torch.float64


def _problem(loss: str = "mse", seed: int = 0, n: int = 24):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 3), nn.Tanh(), nn.Linear(4 - 1, 2)).to(D)
    gen = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(n, 2, generator=gen, dtype=D)
    y = torch.randint(0, 2, (n,), generator=gen) if loss == "cross_entropy" else torch.randn(n, 2, generator=gen,
                                                                                             dtype=D)
    return model, X, y


def _num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _naive_gradients(model, loss: str, X, y, Theta, batch_size=None) -> torch.Tensor:
    """Row j: ∇L(θ_j) of the whole-data mean loss, one autograd.grad per draw (loop over draws)."""
    fn = nn.functional.mse_loss if loss == "mse" else nn.functional.cross_entropy
    rows = []
    m = copy.deepcopy(model)  # one copy; every draw written into its parameters
    params = list(m.parameters())
    for theta in Theta:
        nn.utils.vector_to_parameters(theta.clone(), params)
        value = fn(m(X), y)
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, params)]))
    return torch.stack(rows)


def _naive_eig(G):
    lam, W = torch.linalg.eigh(G.T @ G / G.shape[0])
    return lam.flip(0), W.flip(1)


class Recorder:
    """A callable prior that records every draw it hands out."""

    def __init__(self, P, scale=1.0):
        self.P, self.scale, self.calls = P, scale, []

    def __call__(self, n, generator):
        T = self.scale * torch.randn(n, self.P, generator=generator, dtype=D)
        self.calls.append(T.clone())
        return T


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("method,k", [("snapshot", None), ("snapshot", 4), ("operator", 4), ("operator", None)])
def test_matches_naive_reference(loss, method, k):
    model, X, y = _problem(loss)
    P = _num_params(model)
    prior = Recorder(P, scale=0.7)
    N = 40
    res = active_subspace(model, loss, (X, y), prior=prior, num_samples=N, k=k, method=method, chunk_size=7,
                          batch_size=10, tol=1e-12, generator=torch.Generator().manual_seed(3))
    assert len(prior.calls) == 1 and prior.calls[0].shape == (N, P)  # called once, with n = num_samples
    lam, W = _naive_eig(_naive_gradients(model, loss, X, y, prior.calls[0]))
    kk = res.k
    assert kk == (min(N, P) if k is None else k)
    torch.testing.assert_close(res.eigenvalues, lam[:kk], rtol=0, atol=1e-10 * float(lam[0]))
    # eigenvectors up to sign: the leading subspaces agree where the spectrum has gaps (all of them here)
    r = min(kk, 4)
    assert float(subspace_distance(res.eigenvectors[:, :r], W[:, :r])) < 1e-9
    for j in range(r):
        assert abs(abs(float(res.eigenvectors[:, j] @ W[:, j])) - 1) < 1e-10


def test_standard_normal_draws_and_chunking():
    model, X, y = _problem()
    P, N = _num_params(model), DRAW_BLOCK + 13  # two draw blocks
    G, Theta = prior_gradients(model, "mse", (X, y), num_samples=N, generator=torch.Generator().manual_seed(5),
                               chunk_size=50)
    assert Theta.shape == (N, P) and abs(float(Theta.std()) - 1) < 0.05 and abs(float(Theta.mean())) < 0.02
    torch.testing.assert_close(G, _naive_gradients(model, "mse", X, y, Theta), rtol=1e-12, atol=1e-12)
    # the same draws whatever the chunk size (a chunk smaller than N, one chunk, chunks crossing blocks)
    for chunk in (N, 1000, 17):
        G2, T2 = prior_gradients(model, "mse", (X, y), num_samples=N, generator=torch.Generator().manual_seed(5),
                                 chunk_size=chunk)
        assert torch.equal(T2, Theta)
        torch.testing.assert_close(G2, G, rtol=1e-13, atol=1e-13)
    lam, _ = _naive_eig(G)
    res = active_subspace(model, "mse", (X, y), prior="standard_normal", num_samples=N,
                          generator=torch.Generator().manual_seed(5), chunk_size=9)
    torch.testing.assert_close(res.eigenvalues, lam[:P], rtol=0, atol=1e-10 * float(lam[0]))


def test_chunk_smaller_than_n_gives_the_same_result():
    model, X, y = _problem()
    kw = dict(prior="standard_normal", num_samples=60, k=3, bootstrap=4)
    a = active_subspace(model, "mse", (X, y), chunk_size=60, generator=torch.Generator().manual_seed(1), **kw)
    b = active_subspace(model, "mse", (X, y), chunk_size=7, generator=torch.Generator().manual_seed(1), **kw)
    torch.testing.assert_close(a.eigenvalues, b.eigenvalues, rtol=1e-12, atol=0)
    torch.testing.assert_close(a.eigenvectors, b.eigenvectors, rtol=0, atol=1e-10)
    torch.testing.assert_close(a.eigenvalue_lower, b.eigenvalue_lower, rtol=1e-12, atol=0)
    c = active_subspace(model, "mse", (X, y), chunk_size=7, method="operator",
                        generator=torch.Generator().manual_seed(1), tol=1e-12, **kw)
    torch.testing.assert_close(c.eigenvalues, a.eigenvalues, rtol=1e-10, atol=0)
    assert c.method == "operator" and a.method == "snapshot"
    assert a.bootstrap_eigenvalues.shape == (4, 3)
    assert torch.all(a.eigenvalue_lower <= a.eigenvalue_upper)
    frac = a.layer_sensitivity()
    torch.testing.assert_close(frac.sum(0), torch.ones(3, dtype=D))


def test_around_prior_is_centred_on_the_model():
    model, X, y = _problem()
    theta0 = nn.utils.parameters_to_vector(model.parameters()).detach()
    G, Theta = prior_gradients(model, "mse", (X, y), prior=("around", 0.01), num_samples=30)
    assert float((Theta - theta0).abs().max()) < 0.1 and float((Theta - theta0).std()) == pytest.approx(0.01, rel=0.2)
    torch.testing.assert_close(G, _naive_gradients(model, "mse", X, y, Theta), rtol=1e-12, atol=1e-12)


def test_operator_products_match_dense():
    model, X, y = _problem("cross_entropy")
    P = _num_params(model)
    A = PriorGradientCovariance(model, "cross_entropy", (X, y), num_samples=33, chunk_size=8,
                                generator=torch.Generator().manual_seed(2))
    G = _naive_gradients(model, "cross_entropy", X, y, A.parameter_draws())
    V = torch.randn(P, 3, dtype=D)
    torch.testing.assert_close(A @ V, G.T @ (G @ V) / 33, rtol=1e-11, atol=1e-12)
    assert A.shape == (P, P) and A.is_symmetric
    d = {n: t.detach().clone() for n, t in model.named_parameters()}
    out = A @ d  # parameter dicts in, dicts out
    assert set(out) == set(d)


def test_deterministic_with_a_generator():
    model, X, y = _problem()
    a = active_subspace(model, "mse", (X, y), prior="standard_normal", num_samples=30, k=2,
                        generator=torch.Generator().manual_seed(4))
    b = active_subspace(model, "mse", (X, y), prior="standard_normal", num_samples=30, k=2,
                        generator=torch.Generator().manual_seed(4))
    c = active_subspace(model, "mse", (X, y), prior="standard_normal", num_samples=30, k=2,
                        generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.eigenvalues, b.eigenvalues) and not torch.equal(a.eigenvalues, c.eigenvalues)


def test_model_left_untouched():
    model, X, y = _problem()
    model.train()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    before = contract.snapshot(model)
    active_subspace(model, "mse", (X, y), prior=("around", 0.1), num_samples=20, k=2, bootstrap=2)
    active_subspace(model, "mse", (X, y), prior="standard_normal", num_samples=20, method="operator", k=2)
    contract.assert_unchanged(before, contract.snapshot(model))


def test_errors():
    model, X, y = _problem()
    P = _num_params(model)
    data = (X, y)
    with pytest.raises(TypeError, match="either sampler=.*or prior=.*not both"):
        active_subspace(model, "mse", None, prior="standard_normal", num_samples=10,
                        sampler=lambda n, g: (torch.randn(n, 2, dtype=D), torch.randn(n, 2, dtype=D)))
    with pytest.raises(ValueError, match="prior= needs num_samples"):
        active_subspace(model, "mse", data, prior="standard_normal")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="num_samples to be a positive integer"):
            active_subspace(model, "mse", data, prior="standard_normal", num_samples=bad)
    with pytest.raises(ValueError, match="expected prior to be 'standard_normal'"):
        active_subspace(model, "mse", data, prior="normal", num_samples=10)
    with pytest.raises(ValueError, match=r"needs a scale: pass prior=\('around', sigma\)"):
        active_subspace(model, "mse", data, prior="around", num_samples=10)
    for bad in (("around", 0), ("around", -1.0), ("around", float("inf"))):
        with pytest.raises(ValueError, match="positive, finite sigma"):
            active_subspace(model, "mse", data, prior=bad, num_samples=10)
    with pytest.raises(TypeError, match="expected prior to be"):
        active_subspace(model, "mse", data, prior=3, num_samples=10)
    with pytest.raises(ValueError, match=rf"return shape \(10, {P}\)"):
        active_subspace(model, "mse", data, prior=lambda n, g: torch.randn(n, P + 1, dtype=D), num_samples=10)
    with pytest.raises(TypeError, match="return a Tensor"):
        active_subspace(model, "mse", data, prior=lambda n, g: [0.0] * n, num_samples=10)
    with pytest.raises(ValueError, match="finite floating-point"):
        active_subspace(model, "mse", data, prior=lambda n, g: torch.full((n, P), float("nan"), dtype=D),
                        num_samples=10)
    with pytest.raises(ValueError, match="subset.*do not apply to prior="):
        active_subspace(model, "mse", data, prior="standard_normal", num_samples=10, subset=[0, 1])
    with pytest.raises(ValueError, match="center act on data samples and do not apply to prior="):
        active_subspace(model, "mse", data, prior="standard_normal", num_samples=10, center=True)
    with pytest.raises(ValueError, match="expected g='loss'"):
        active_subspace(model, "mse", data, prior="standard_normal", num_samples=10, g=lambda o, t: o[:, 0])
    with pytest.raises(TypeError, match="needs the data set"):
        active_subspace(model, "mse", None, prior="standard_normal", num_samples=10)
    with pytest.raises(ValueError, match="chunk_size to be a positive integer"):
        active_subspace(model, "mse", data, prior="standard_normal", num_samples=10, chunk_size=0)
    with pytest.raises(ValueError, match=r"1 ≤ k ≤ min\(N, P\) = 10"):
        active_subspace(model, "mse", data, prior="standard_normal", num_samples=10, k=11)
    with pytest.raises(ValueError, match="prior= needs num_samples"):
        PriorGradientCovariance(model, "mse", data)


def test_without_prior_the_data_path_is_unchanged():
    model, X, y = _problem()
    a = active_subspace(model, "mse", (X, y), k=3)
    assert "prior" not in a.algorithm and a.num_samples == X.shape[0]


def test_example_runs_quick(tmp_path, capsys):
    """examples/active_subspace_prior.py through its command line, small (as CI runs it)."""
    import pathlib
    import runpy

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "active_subspace_prior.py"
    mod = runpy.run_path(str(path), run_name="example")
    res = mod["cli"](["--quick", "--out", str(tmp_path / "asp")])
    for fig in ("eigenvalues", "eigenvectors"):
        assert (tmp_path / f"asp_{fig}.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "finding 1" in out and "finding 2" in out and "finding 3" in out and "vs the seed" in out
    assert res["agree"] < 1e-6 and res["agree_vec"] < 1e-6  # top-k against the dense decomposition
    # the spectrum is the dense eigendecomposition of GᵀG/N of the same draws (naive loop)
    full = res["full"]
    assert full.k == res["P"] and torch.all(full.eigenvalues[:-1] >= full.eigenvalues[1:])
    torch.testing.assert_close(res["lead"].sum(), torch.tensor(1.0, dtype=D))


@pytest.mark.parametrize("method", ["snapshot", "operator"])
def test_convergence_with_a_prior_matches_naive(method):
    """active_subspace_convergence(prior=...): the first N draws for each N, against the naive loop."""
    from curvops.analysis.active_subspace import active_subspace_convergence, subspace_distances

    model, X, y = _problem()
    P = _num_params(model)
    prior = Recorder(P)
    sizes, k = [12, 25, 40], 3
    conv = active_subspace_convergence(model, "mse", (X, y), prior=prior, sample_sizes=sizes, k=k, method=method,
                                       chunk_size=9, tol=1e-12, generator=torch.Generator().manual_seed(2))
    assert len(prior.calls) == 1 and prior.calls[0].shape == (max(sizes), P)  # num_samples defaults to max(sizes)
    G = _naive_gradients(model, "mse", X, y, prior.calls[0])
    ref_lam, ref_W = _naive_eig(G)
    for i, n in enumerate(sizes):
        lam, W = _naive_eig(G[:n])
        torch.testing.assert_close(conv.eigenvalues[i], lam[:k], rtol=0, atol=1e-10 * float(lam[0]))
        torch.testing.assert_close(conv.eigenvalue_errors[i], (lam[:k] - ref_lam[:k]).abs() / ref_lam[:k],
                                   rtol=0, atol=1e-9)
        torch.testing.assert_close(conv.subspace_distances[i], subspace_distances(ref_W[:, :k], W[:, :k]),
                                   rtol=0, atol=1e-8)
        assert conv.results[i].num_samples == n and "prior θ from a callable sampler" in conv.results[i].algorithm
    assert float(conv.subspace_distances[-1].max()) < 1e-8 and conv.reference_num_samples == 40
    # standard-normal draws: the same draws as prior_gradients with the same generator and num_samples
    conv2 = active_subspace_convergence(model, "mse", (X, y), prior="standard_normal", num_samples=50,
                                        sample_sizes=[20, 50], k=2, generator=torch.Generator().manual_seed(6))
    G2, _ = prior_gradients(model, "mse", (X, y), num_samples=50, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(conv2.eigenvalues[0], _naive_eig(G2[:20])[0][:2], rtol=1e-10, atol=0)


def test_convergence_prior_errors():
    from curvops.analysis.active_subspace import active_subspace_convergence

    model, X, y = _problem()
    with pytest.raises(ValueError, match=r"sample sizes ≤ the 10 parameter draws \(num_samples\)"):
        active_subspace_convergence(model, "mse", (X, y), prior="standard_normal", num_samples=10,
                                    sample_sizes=[5, 20], k=2)
    with pytest.raises(ValueError, match="weights act on data samples"):
        active_subspace_convergence(model, "mse", (X, y), prior="standard_normal", sample_sizes=[5, 10], k=2,
                                    weights=torch.ones(X.shape[0], dtype=D))
    with pytest.raises(TypeError, match="either sampler=.*or prior="):
        active_subspace_convergence(model, "mse", None, prior="standard_normal", sample_sizes=[5, 10], k=2,
                                    sampler=lambda n, g: (torch.randn(n, 2, dtype=D), torch.randn(n, 2, dtype=D)))


def test_topk_from_the_streamed_gram_matches_naive():
    """The one-pass top-k (C accumulated chunk by chunk, P² memory, never N·P): forced by a budget that
    holds C but not G."""
    model, X, y = _problem()
    P = _num_params(model)
    prior, N, k = Recorder(P), 800, 4
    chunk_bytes = 7 * PriorGradientCovariance(model, "mse", (X, y), num_samples=8).workspace_per_draw()
    budget = (P * P + 3 * P * P) * 8 + chunk_bytes + 1000
    assert budget < N * P * 8  # C, a Krylov basis and one chunk's measured workspace fit, G does not
    res = active_subspace(model, "mse", (X, y), prior=prior, num_samples=N, k=k, chunk_size=7, tol=1e-10,
                          memory_budget=budget, generator=torch.Generator().manual_seed(0))
    assert "G not kept" in res.algorithm and res.memory_estimate <= budget and res.num_passes == 1
    lam, W = _naive_eig(_naive_gradients(model, "mse", X, y, prior.calls[0]))
    torch.testing.assert_close(res.eigenvalues, lam[:k], rtol=0, atol=1e-10 * float(lam[0]))
    assert float(subspace_distance(res.eigenvectors, W[:, :k])) < 1e-8
    assert res.converged and float(res.residuals.max()) < 1e-10


def _report_context(tmp_path, model, X, y, options=None):
    from curvops.report.context import Context

    ctx = Context(model, "mse", (X, y), params=None, batch_size=None, budgets_kw=dict(quick=True), seed=0,
                  outdir=str(tmp_path), strict=True)
    if options is not None:
        ctx.options = options
    return ctx


def test_report_prior_section_is_off_unless_asked(tmp_path):
    from curvops.report.context import Skipped
    from curvops.report.sections_model import SECTIONS

    model, X, y = _problem()
    for options in (None, {}, {"active_subspace_prior": "off"}):
        with pytest.raises(Skipped, match="off"):
            SECTIONS["active_subspace_prior"](_report_context(tmp_path, model, X, y, options))


def test_report_prior_section_matches_naive(tmp_path):
    """The section's eigenvalues, layer mass and convergence are those of the naive loop over the same draws
    (N = subspace_samples draws from the report's seed), and it renders."""
    from curvops.analysis.active_subspace import subspace_distances
    from curvops.report import html
    from curvops.report.sections_model import SECTIONS

    model, X, y = _problem()
    ctx = _report_context(tmp_path, model, X, y, {"active_subspace_prior": "standard_normal"})
    out = SECTIONS["active_subspace_prior"](ctx)
    N, k = ctx.budgets.subspace_samples, out["k"]
    assert out["num_draws"] == N and out["num_data"] == X.shape[0] and k == min(ctx.budgets.subspace_k, N // 8)
    _, Theta = prior_gradients(model, "mse", (X, y), num_samples=N, generator=torch.Generator().manual_seed(0))
    G = _naive_gradients(model, "mse", X, y, Theta)
    lam, W = _naive_eig(G)
    torch.testing.assert_close(torch.tensor(out["eigenvalues"], dtype=D), lam[:k], rtol=0, atol=1e-10 * float(lam[0]))
    sizes = out["convergence"]["sample_sizes"]
    assert sizes[-1] == N and sizes[0] >= k
    for i, n in enumerate(sizes):
        _, Wn = _naive_eig(G[:n])
        d = subspace_distances(W[:, :k], Wn[:, :k])
        assert abs(out["convergence"]["distance_topk"][i] - float(d[-1])) < 1e-7
    share = torch.tensor(out["layer_mass"]["share"], dtype=D)
    assert abs(float(share.sum()) - 1) < 1e-12 and len(share) == len(list(model.parameters()))
    assert set(ctx.figures) == {"active_subspace_prior_decay", "active_subspace_prior_layers"}
    page = html._section("active_subspace_prior", {"status": "ok", **out}, {"figures": ctx.figures})
    assert "Active subspace over a parameter prior" in page and "Convergence in the number of draws" in page
    # around:<sigma> draws around the current parameters
    ctx2 = _report_context(tmp_path, model, X, y, {"active_subspace_prior": "around:0.05"})
    out2 = SECTIONS["active_subspace_prior"](ctx2)
    assert out2["prior"] == "around:0.05" and "0.05" in out2["prior_description"]


def test_report_prior_option_parsing():
    from curvops.report.sections_prior import parse_prior_option

    assert parse_prior_option("off") is None and parse_prior_option(None) is None
    assert parse_prior_option("standard_normal") == "standard_normal"
    assert parse_prior_option(" around:0.25 ") == ("around", 0.25)
    for bad in ("around:", "around:-1", "around:nan", "around:x", "normal", 3):
        with pytest.raises(ValueError, match="--active-subspace-prior: expected"):
            parse_prior_option(bad)


def test_report_prior_section_skips_what_it_cannot_hold(tmp_path, monkeypatch):
    import importlib

    from curvops.report.context import Skipped

    AS = importlib.import_module("curvops.analysis.active_subspace")  # the package (the name is also a function)
    from curvops.report.sections_model import SECTIONS

    model, X, y = _problem()
    monkeypatch.setattr(AS, "DEFAULT_MEMORY_BUDGET", 1000)  # N·P·8 bytes of G over half of it
    with pytest.raises(Skipped, match=r"gradients of 35 parameters need .* select fewer parameters"):
        SECTIONS["active_subspace_prior"](_report_context(tmp_path, model, X, y, {"active_subspace_prior":
                                                                                  "standard_normal"}))


def test_draw_rows_are_the_same_for_any_range_and_thread_count():
    """Blocks are drawn in parallel straight into the output: any [start, stop) is the same slice of
    the N draws, with one thread or several, and block b is torch.randn from its own seed."""
    model, X, y = _problem()
    N = 3 * DRAW_BLOCK + 5
    A = PriorGradientCovariance(model, "mse", (X, y), num_samples=N, generator=torch.Generator().manual_seed(3))
    draws = A.draws
    full = draws.rows(0, N)
    P = full.shape[1]
    for b in range(4):
        rows = min(DRAW_BLOCK, N - b * DRAW_BLOCK)
        g = torch.Generator().manual_seed(int(draws.seeds[b]))
        assert torch.equal(full[b * DRAW_BLOCK:b * DRAW_BLOCK + rows], torch.randn(rows, P, generator=g, dtype=D))
    threads = torch.get_num_threads()
    gen = torch.Generator().manual_seed(0)
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            for _ in range(12):
                a = int(torch.randint(0, N - 1, (1,), generator=gen))
                e = int(torch.randint(a + 1, N + 1, (1,), generator=gen))
                assert torch.equal(draws.rows(a, e), full[a:e]), (t, a, e)
            assert torch.equal(draws.rows(DRAW_BLOCK, 3 * DRAW_BLOCK), full[DRAW_BLOCK:3 * DRAW_BLOCK])
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("P", [35, 600])
def test_gram_accumulation_matches_the_product(dtype, P):
    """C += AᵀA chunk by chunk (BLAS syrk on the upper triangle for float32/64 on the CPU, blocked GEMMs
    otherwise), then mirrored: the full AᵀA, exactly symmetric; non-contiguous chunks too."""
    from curvops.analysis.active_subspace.factors import _add_gram, _finish_gram

    gen = torch.Generator().manual_seed(P)
    A = torch.randn(70, P, generator=gen, dtype=torch.float64)
    C = torch.zeros(P, P, dtype=dtype)
    _add_gram(C, A[:30].to(dtype))
    _add_gram(C, A[30:].to(dtype).T.contiguous().T)  # a column-major chunk
    _add_gram(C, A[:0].to(dtype))  # an empty chunk
    _finish_gram(C, None)
    ref = A.to(dtype).double().T @ A.to(dtype).double()
    eps = torch.finfo(dtype).eps
    tol = 4 * eps * float((A.square().sum(0).sqrt()[:, None] * A.square().sum(0).sqrt()[None]).max()) * 70**0.5
    assert float((C.double() - ref).abs().max()) <= tol
    assert torch.equal(C, C.T)


def test_all_eigenvalues_with_several_gram_updates_match_naive(monkeypatch):
    """The streamed all-eigenvalue plan gathers chunks before each rank-update of C; with a small
    gathering size (several updates, one cutting a chunk boundary) it still equals the naive spectrum."""
    from curvops.analysis.active_subspace import prior_estimate

    model, X, y = _problem()
    P = _num_params(model)
    monkeypatch.setattr(prior_estimate, "_GRAM_FLUSH_ENTRIES", 10 * P)  # every 10 rows: chunks of 7
    prior, N = Recorder(P), 3000  # min(N, P) > 2048 is not needed: force the streamed eigh by the budget
    res = active_subspace(model, "mse", (X, y), prior=prior, num_samples=N, chunk_size=7, method="snapshot",
                          memory_budget=N * P * 8 - 1, return_eigenvectors=False)
    assert "G not kept" in res.algorithm and res.timings["covariance"] > 0
    lam, _ = _naive_eig(_naive_gradients(model, "mse", X, y, prior.calls[0]))
    torch.testing.assert_close(res.eigenvalues, lam[:P], rtol=0, atol=1e-12 * float(lam[0]))


@pytest.mark.parametrize("center", [False, True])
def test_gram_lanczos_with_the_diagonal_start_matches_dense(center):
    """Stored G, N ≥ P, small k: block Lanczos on FᵀF from a diag(C)-scaled start block — the exact
    diag(C) (centred too), and the top-k of the dense C, also with a coordinate whose gradient is
    always zero (diagonal 0: the start keeps a floor in every direction) and k beyond the others."""
    from curvops.analysis.active_subspace.eigenpairs import _decompose
    from curvops.analysis.active_subspace.factors import _DenseRows

    gen = torch.Generator().manual_seed(4)
    N, P, k = 400, 120, 6
    G = torch.randn(N, P, generator=gen, dtype=D) * torch.logspace(0, -2, P, dtype=D)[None]
    G[:, 7] = 0
    w = torch.rand(N, generator=gen, dtype=D) + 0.5
    f = _DenseRows(G, w, center)
    p = w / w.sum()
    F = (G - (p @ G)[None]) if center else G
    C = F.T @ (F * p[:, None])
    torch.testing.assert_close(f.gram_diagonal(rows=37), C.diagonal(), rtol=1e-12, atol=1e-15)
    dec = _decompose(f, "krylov", k, tol=1e-10, generator=torch.Generator().manual_seed(0), vectors=True)
    lam, W = torch.linalg.eigh(C)
    torch.testing.assert_close(dec.eigenvalues, lam.flip(0)[:k], rtol=1e-9, atol=0)
    assert float(subspace_distance(dec.eigenvectors, W.flip(1)[:, :k])) < 1e-7


def _tanh_mlp(width, depth, points):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        layers, fan = [], 1
        for _ in range(depth):
            layers += [nn.Linear(fan, width), nn.Tanh()]
            fan = width
        model = nn.Sequential(*layers, nn.Linear(fan, 1)).to(D)
    X = torch.linspace(-1, 1, points, dtype=D)[:, None]
    return model, X, torch.sin(3 * X)


def test_chunk_size_follows_the_measured_workspace():
    """The default chunk is lowered until its measured workspace fits half the memory budget: the
    per-draw workspace grows with the batch (activations), the chunk shrinks, the plan counts it,
    and the result is the same as with any other chunk."""
    small, big = _tanh_mlp(16, 3, 20), _tanh_mlp(16, 3, 2000)
    A = PriorGradientCovariance(small[0], "mse", small[1:], num_samples=300)
    B = PriorGradientCovariance(big[0], "mse", big[1:], num_samples=300)
    P = _num_params(small[0])
    # 3 × what autograd saves: at least each tanh layer's output (the next linear's input) per point
    assert B.workspace_per_draw() >= 3 * (3 * 2000 * 16 * 8)
    assert B.workspace_per_draw() > 50 * A.workspace_per_draw() > 50 * 3 * P * 8
    budget = 2 * 40 * B.workspace_per_draw()  # half of it holds 40 draws
    from curvops.analysis.active_subspace.prior import default_chunk_size

    assert B.resolve_chunk_size(budget) == 40  # below one draw block: not rounded
    assert A.resolve_chunk_size(budget) == default_chunk_size(P) == 1024  # fits: the default
    assert B.resolve_chunk_size(10**12) == 40  # decided once
    kw = dict(prior="standard_normal", num_samples=300, k=3)
    res = active_subspace(big[0], "mse", big[1:], memory_budget=budget + 300 * P * 8 * 4 + 2**20,
                          generator=torch.Generator().manual_seed(1), **kw)
    ref = active_subspace(big[0], "mse", big[1:], chunk_size=300, generator=torch.Generator().manual_seed(1), **kw)
    assert res.memory_estimate >= 40 * B.workspace_per_draw()
    torch.testing.assert_close(res.eigenvalues, ref.eigenvalues, rtol=1e-10, atol=0)


def test_workspace_is_measured_on_the_largest_batch_held():
    model, X, y = _tanh_mlp(16, 3, 600)
    ws = {}
    for name, data in {"largest last": [(X[:50], y[:50]), (X[50:], y[50:])], "alone": [(X[50:], y[50:])],
                       "small alone": [(X[:50], y[:50])]}.items():
        ws[name] = PriorGradientCovariance(model, "mse", data, num_samples=4).workspace_per_draw()
    assert ws["largest last"] == ws["alone"] > 5 * ws["small alone"]


def test_workspace_measurement_leaves_buffers_as_found():
    model = nn.Sequential(nn.Linear(2, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1)).to(D)
    model.train()
    X, y = torch.randn(32, 2, dtype=D), torch.randn(32, 1, dtype=D)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    A = PriorGradientCovariance(model, "mse", (X, y), num_samples=4, allow_stochastic=True)
    assert A.workspace_per_draw() > 0
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and model.training


_PEAK = """
import sys, torch
from torch import nn
sys.path.insert(0, {tests!r})
from test_active_subspace_prior import _tanh_mlp
from curvops.analysis.active_subspace import PriorGradientCovariance
model, X, y = _tanh_mlp(24, 4, 3000)
A = PriorGradientCovariance(model, "mse", (X, y), num_samples=64, chunk_size=64)
per = A.workspace_per_draw()
def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) * 1024
def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) * 1024
base = rss()
open("/proc/self/clear_refs", "w").write("5")
for _ in A.gradient_chunks():
    pass
print(64 * per, hwm() - base)
"""


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/clear_refs"), reason="needs Linux /proc to read the peak")
def test_workspace_estimate_matches_the_peak_memory_of_a_chunk():
    """In a fresh process: the estimate for one 64-draw chunk of a 3000-point batch (≈ 0.27 GB) is
    within a factor 1.6 of the measured rise of the peak resident memory (calibrated at −17 % … +3 %)."""
    import os
    import subprocess
    import sys

    code = _PEAK.format(tests=os.path.dirname(__file__))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    estimate, measured = map(int, out.stdout.split())
    assert measured > 0 and measured / 1.6 <= estimate <= 1.6 * measured, (estimate, measured)


@pytest.mark.parametrize("center", [False, True])
def test_factor_from_row_blocks_equals_the_factor_from_one_tensor(center):
    """The stored factor over the gradient pass's chunks (uneven blocks, never copied for the Gram
    products) gives the same products as over one tensor; joined once, shared by reweighted copies."""
    from curvops.analysis.active_subspace.factors import _DenseRows

    gen = torch.Generator().manual_seed(7)
    G = torch.randn(50, 9, generator=gen, dtype=D)
    w = torch.rand(50, generator=gen, dtype=D) + 0.5
    blocks = [G[:13].clone(), G[13:14].clone(), G[14:].clone()]
    a, b = _DenseRows(G, w, center), _DenseRows(blocks, w, center)
    X, U = torch.randn(9, 3, generator=gen, dtype=D), torch.randn(50, 3, generator=gen, dtype=D)
    for rows in (4, 128):
        torch.testing.assert_close(b.gram_matmat(X, rows=rows), a.gram_matmat(X), rtol=1e-13, atol=1e-14)
        torch.testing.assert_close(b.gram_diagonal(rows=rows), a.gram_diagonal(), rtol=1e-13, atol=1e-14)
    m = torch.rand(50, generator=gen, dtype=D)
    ra, rb = a.reweight(m), b.reweight(m)
    torch.testing.assert_close(rb.matmat(X), ra.matmat(X), rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(rb.rmatmat(U), ra.rmatmat(U), rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(rb.covariance(), ra.covariance(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(b.dense(), a.dense(), rtol=0, atol=0)
    assert rb.G.data_ptr() == b.G.data_ptr() and torch.equal(b.G, G)  # joined once, shared


@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "autocast"])
def test_prior_estimate_is_the_same_in_any_grad_context(context):
    """The workspace measurement and the gradient pass run their own grad mode: under no_grad,
    inference_mode or a bf16 autocast the estimate equals the plain call's, bit for bit."""
    model, X, y = _problem()
    kw = dict(prior="standard_normal", num_samples=300, k=3)
    ref = active_subspace(model, "mse", (X, y), generator=torch.Generator().manual_seed(1), **kw)
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
           "autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}[context]
    with ctx():
        res = active_subspace(model, "mse", (X, y), generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(res.eigenvalues, ref.eigenvalues) and torch.equal(res.eigenvectors, ref.eigenvectors)
