"""track: spectral summaries over checkpoints against dense matrices and direct calls."""

import copy
import csv
import math
import sys

import pytest
import torch
from torch import nn
from torch.func import grad

from curvops import GGN, Dense, spectral_density
from curvops.analysis.track import SUMMARIES, TrackResult, track
from curvops.testing import contract, oracles
from curvops.testing.zoo import Problem

D = torch.float64
K = 3
STEPS = [10, 20, 30]


def setup():
    """A 3-4-2 tanh MLP (26 parameters) with MSE on 24 samples, and 3 checkpoints."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(D)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(24, 3, generator=g, dtype=D)
    y = torch.randn(24, 2, generator=g, dtype=D)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    states = [{k: v + 0.4 * t * torch.randn(v.shape, generator=g, dtype=D) for k, v in base.items()} for t in range(3)]
    return model, X, y, states


def problem_at(model, X, y, state):
    twin = copy.deepcopy(model)
    twin.load_state_dict(state)
    return Problem("track", twin, X, y, "mse", "mean")


OPTIONS = {"top_eigenvalues": {"tol": 1e-10}, "bottom_eigenvalues": {"tol": 1e-10}, "cond": {"tol": 1e-10},
           "density": {"num_probes": 4, "num_steps": 26, "sigma": 0.05}}


@pytest.mark.parametrize("operator", ["hessian", "ggn"])
def test_every_summary_matches_dense_and_direct_calls(operator):
    model, X, y, states = setup()
    before = contract.snapshot(model)
    summaries = SUMMARIES if operator == "hessian" else ("top_eigenvalues", "bottom_eigenvalues", "trace", "cond")
    res = track(model, states, "mse", (X, y), operator=operator, summaries=summaries, k=K, steps=STEPS,
                options={s: o for s, o in OPTIONS.items() if s in summaries},
                generator=torch.Generator().manual_seed(0), batch_size=10)
    contract.assert_unchanged(before, contract.snapshot(model))  # incl. the global RNG: a generator was given

    # the table: one row per value, tidy columns, step labels
    per_step = sum({"top_eigenvalues": K, "bottom_eigenvalues": K, "density": 0}.get(s, 1) for s in summaries)
    assert len(res.rows) == len(STEPS) * per_step
    assert all(list(r) == ["step", "summary", "index", "value"] for r in res.rows)
    assert res.steps == STEPS and res.summaries == tuple(summaries)
    assert len(res.diagnostics) == len(STEPS) * len(summaries) and all(d["converged"] for d in res.diagnostics)
    assert res.wide("top_eigenvalues").shape == (3, K) and res.wide("trace").shape == (3, 1)
    steps, _ = res.column("trace")
    assert steps.tolist() == STEPS

    tops, bottoms = res.wide("top_eigenvalues"), res.wide("bottom_eigenvalues")
    for t, state in enumerate(states):
        p = problem_at(model, X, y, state)
        M = oracles.hessian_dense(p) if operator == "hessian" else oracles.ggn_dense(p)
        lam = torch.linalg.eigvalsh(M)
        scale = float(lam.abs().max())
        # eigenvalues: Lanczos at tol=1e-10 against dense eigvalsh (top descending, bottom ascending)
        torch.testing.assert_close(tops[t], lam[-K:].flip(0), rtol=1e-8, atol=1e-10 * scale)
        torch.testing.assert_close(bottoms[t], lam[:K], rtol=1e-8, atol=1e-9 * scale)
        # trace: the default budget (100) exceeds P = 26, so it is exact
        assert res.column("trace")[1][t].item() == pytest.approx(float(M.trace()), rel=1e-10, abs=1e-12)
        # cond: PSD → λmax/λmin; symmetric indefinite → max|λ| / min|λ|
        want = float(lam.abs().max() / lam.abs().min())
        assert res.column("cond")[1][t].item() == pytest.approx(want, rel=1e-5)
        if operator != "hessian":
            continue
        theta = oracles.flat_params(p)
        assert res.column("loss")[1][t].item() == pytest.approx(float(oracles.total_loss(p, theta)), rel=1e-12)
        gnorm = float(grad(lambda th: oracles.total_loss(p, th))(theta).norm())
        assert res.column("grad_norm")[1][t].item() == pytest.approx(gnorm, rel=1e-10)
        # density: the same call on the dense matrix with the step's seed gives the same result ...
        dens = res.densities[t]
        direct = spectral_density(Dense(M), generator=torch.Generator().manual_seed(res.seed), **OPTIONS["density"])
        torch.testing.assert_close(dens.grid, direct.grid, rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(dens.density, direct.density, rtol=1e-6, atol=1e-8 * float(direct.density.max()))
        # ... and with num_steps = P each probe's weighted Ritz values are eigenvalues of M
        live = dens.nodes[dens.weights > 1e-6]
        dist = (live[:, None] - lam[None]).abs().min(dim=1).values
        assert float(dist.max()) < 1e-6 * scale
    # the checkpoints really differ, so a test comparing against one of them could not pass by accident
    assert float((tops[0] - tops[2]).abs().max()) > 0.1


def test_common_random_numbers_and_callable_operator(tmp_path):
    model, X, y, states = setup()
    paths = []
    for t, s in enumerate(states):
        paths.append(tmp_path / f"step{t}.pt")
        torch.save(s, paths[-1])
    opts = {"trace": {"method": "hutchinson", "num_matvecs": 8}}
    by_name = track(model, paths, "mse", (X, y), operator="ggn", summaries=("trace",), options=opts,
                    generator=torch.Generator().manual_seed(5))
    by_callable = track(model, states, "mse", (X, y), operator=lambda m, l, d, **kw: GGN(m, l, d, **kw),
                        summaries=("trace",), options=opts, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(by_name.wide("trace"), by_callable.wide("trace"), rtol=1e-12, atol=0)
    # every step reuses the same probes: a Hutchinson estimate on the same matrix repeats exactly
    same = track(model, [states[1]] * 3, "mse", (X, y), operator="ggn", summaries=("trace",), options=opts,
                 generator=torch.Generator().manual_seed(5))
    vals = same.column("trace")[1]
    assert vals[0] == vals[1] == vals[2]
    # and the estimate is the Rademacher Hutchinson sum for those probes, near the true trace
    M = oracles.ggn_dense(problem_at(model, X, y, states[1]))
    assert float(vals[0]) == pytest.approx(float(M.trace()), rel=0.5)


def test_table_exports(tmp_path, monkeypatch):
    model, X, y, states = setup()
    res = track(model, states, "mse", (X, y), summaries=("top_eigenvalues", "loss"), k=2, steps=[0.5, 1.5, 2.5],
                generator=torch.Generator().manual_seed(0))
    path = tmp_path / "track.csv"
    res.to_csv(path)
    with open(path) as fh:
        read = list(csv.DictReader(fh))
    assert list(read[0]) == ["step", "summary", "index", "value"] and len(read) == len(res.rows) == 9
    for r, want in zip(read, res.rows):
        assert float(r["step"]) == want["step"] and r["summary"] == want["summary"]
        assert int(r["index"]) == want["index"] and float(r["value"]) == want["value"]
    steps, lam1 = res.column("top_eigenvalues", index=1)
    assert steps.tolist() == [0.5, 1.5, 2.5]
    torch.testing.assert_close(lam1, res.wide("top_eigenvalues")[:, 1])
    monkeypatch.setitem(sys.modules, "pandas", None)  # pandas is optional: a clear ImportError without it
    with pytest.raises(ImportError, match="pandas is not installed"):
        res.to_pandas()
    monkeypatch.undo()
    try:
        import pandas  # noqa: F401
    except ImportError:
        return
    df = res.to_pandas()
    assert list(df.columns) == ["step", "summary", "index", "value"] and len(df) == 9


def test_progress_bar(capsys):
    model, X, y, states = setup()
    track(model, states[:2], "mse", (X, y), summaries=("loss",), progress=True)
    assert "track" in capsys.readouterr().err


def test_errors_before_any_product():
    model, X, y, states = setup()
    calls = []

    def factory(m, l, d, **kw):
        calls.append(1)
        return GGN(m, l, d, **kw)

    bad = {k: v for k, v in states[0].items() if k != "2.bias"}
    with pytest.raises(ValueError, match=r"checkpoint 2 does not match.*missing keys \['2.bias'\]"):
        track(model, [states[0], states[1], bad], "mse", (X, y), operator=factory)
    with pytest.raises(ValueError, match="expected summaries among"):
        track(model, states, "mse", (X, y), operator=factory, summaries=("trace", "spectrum"))
    with pytest.raises(ValueError, match="positive integer k"):
        track(model, states, "mse", (X, y), operator=factory, k=0)
    with pytest.raises(ValueError, match="expected 3 steps"):
        track(model, states, "mse", (X, y), operator=factory, steps=[1, 2])
    with pytest.raises(TypeError, match="expected numeric steps"):
        track(model, states, "mse", (X, y), operator=factory, steps=["a", "b", "c"])
    with pytest.raises(ValueError, match="options apply to"):
        track(model, states, "mse", (X, y), operator=factory, options={"loss": {}})
    with pytest.raises(ValueError, match="must not set 'generator'"):
        track(model, states, "mse", (X, y), operator=factory, options={"trace": {"generator": None}})
    with pytest.raises(TypeError, match="expected the model as an nn.Module"):
        track(oracles.forward, states, "mse", (X, y), operator=factory)
    assert not calls
    with pytest.raises(ValueError, match=r"expected k < 26"):
        track(model, states, "mse", (X, y), operator=factory, k=26)
    assert len(calls) == 1  # built for the first checkpoint, no product spent


def test_result_accessor_errors():
    rows = [{"step": s, "summary": "top_eigenvalues", "index": i, "value": float(s + i)} for s in (0, 1) for i in (0, 1)]
    rows += [{"step": s, "summary": "trace", "index": 0, "value": 2.0 * s} for s in (0, 1)]
    res = TrackResult(rows=rows, steps=[0, 1], densities=[None, None], diagnostics=[],
                      summaries=("top_eigenvalues", "trace", "density"), k=2, seed=0, _positions=[0, 0, 1, 1, 0, 1])
    torch.testing.assert_close(res.wide("top_eigenvalues"), torch.tensor([[0.0, 1.0], [1.0, 2.0]], dtype=D))
    assert res.column("trace")[1].tolist() == [0.0, 2.0]
    with pytest.raises(ValueError, match="pass index="):
        res.column("top_eigenvalues")
    with pytest.raises(ValueError, match=r"expected index in \[0, 1\]"):
        res.column("top_eigenvalues", index=2)
    with pytest.raises(ValueError, match=r"densities are in .densities"):
        res.wide("density")
    with pytest.raises(ValueError, match="expected a summary among"):
        res.column("cond")
    assert math.isnan(TrackResult(rows=rows[:3], steps=[0, 1], densities=[None, None], diagnostics=[],
                                  summaries=("top_eigenvalues",), k=2, seed=0,
                                  _positions=[0, 0, 1]).wide("top_eigenvalues")[1, 1])
