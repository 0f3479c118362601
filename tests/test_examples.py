"""The README's code and the examples run as documented.

Every script in ``examples/`` has the same command line: ``--help`` prints its usage and exits
before running anything, ``--quick`` runs it small (the sizes in its ``QUICK``), ``--out`` says
where the figure goes.  The tests below run each one through that command line with ``--quick``
and check what it computed, so CI exercises exactly what a user types.
"""

import pathlib
import re
import runpy
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
OTHERS: set = set()  # every example shares the command line (transformer_curvature.py: its numbers in tests/test_example_transformer.py)
EXAMPLES = sorted(p.name for p in (ROOT / "examples").glob("*.py") if p.name not in OTHERS)


def run_cli(name: str, *argv: str):
    """Run ``python examples/<name> *argv`` in this process; return (module globals, result)."""
    mod = runpy.run_path(str(ROOT / "examples" / name), run_name="example")
    return mod, mod["cli"](list(argv))


@pytest.mark.parametrize("name", EXAMPLES)
def test_help_prints_usage_and_runs_nothing(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [name, "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / "examples" / name), run_name="__main__")  # as `python examples/<name> --help`
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {name}") and "--quick" in out and "--out" in out
    assert list(tmp_path.iterdir()) == []  # no --help.png, no out/ folder


@pytest.mark.parametrize("name", EXAMPLES)
def test_every_example_has_the_common_command_line(name):
    mod = runpy.run_path(str(ROOT / "examples" / name), run_name="example")
    assert callable(mod["cli"]) and isinstance(mod["QUICK"], dict)
    assert "--quick" in mod["__doc__"]  # the docstring's Run: line shows it


def test_readme_example_runs():
    text = (ROOT / "README.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    H, G, R = scope["H"], scope["G"], scope["R"]
    assert R.shape == H.shape and R.is_symmetric
    assert sorted(scope["top"])[-1] > 0


def test_hessian_summary_example(tmp_path, capsys):
    _, res = run_cli("hessian_summary.py", "--quick", "--out", str(tmp_path / "spectra.png"))
    assert (tmp_path / "spectra.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    top = re.search(r"top-5 Hessian eigenvalues: \[([^\]]+)\]", out).group(1).split()
    exact = re.search(r"exact top-5 \(dense check\): \[([^\]]+)\]", out).group(1).split()
    assert [round(float(a), 4) for a in top] == [round(float(b), 4) for b in exact]
    assert "condition number of GGN" in out


def test_ntk_vs_gram_example(tmp_path):
    _, res = run_cli("ntk_vs_gram.py", "--quick", "--out", str(tmp_path / "fig.png"))
    assert (tmp_path / "fig.png").stat().st_size > 10_000
    assert res["exact_err"] < 1e-10  # the last layer's kernel is exactly (H Hᵀ + 11ᵀ) ⊗ I
    assert 0 < res["share"] < 1
    assert abs(res["top_h"][0] - res["top_g"][0]) < 0.1 * res["top_h"][0]  # near a fit, H ≈ GGN at the top


def test_quadratic_gd_example(tmp_path, capsys):
    _, res = run_cli("quadratic_gd.py", "--quick", "--out", str(tmp_path / "gd.png"))
    assert (tmp_path / "gd.png").stat().st_size > 10_000
    assert res["gap"] < 1e-12  # the loop and the closed form agree to round-off
    assert res["labels"] == ("diverges", "drifts", "frozen", "converges", "converges")
    assert res["kind"] == "none"  # a flat axis with a slope: no stationary point
    assert abs(res["lowest"] + 0.3) < 1e-8
    assert "a=+0.00: frozen" in capsys.readouterr().out


def test_saddle_landscape_example(tmp_path, capsys):
    _, res = run_cli("saddle_landscape.py", "--quick", "--out", str(tmp_path / "saddle.png"))
    assert (tmp_path / "saddle.png").stat().st_size > 20_000
    assert res["kind"] == "saddle" and res["grad_norm"] < 1e-12
    assert res["lam_min"] < -0.5 < 1.0 < res["lam_max"]
    # the landscape bends like ½ λ t² near 0 (second difference with h = 0.2: O(h²) off)
    assert abs(res["curvature"]["top"] - res["lam_max"]) < 1e-6  # the bias direction is exactly quadratic
    assert abs(res["curvature"]["bottom"] - res["lam_min"]) < 0.05 * abs(res["lam_min"])
    assert float(res["bottom"].min()) < res["base"] - 0.1  # the escape direction lowers the loss
    assert float(res["top"].min()) == res["base"]
    assert "verdict: saddle" in capsys.readouterr().out


def test_track_training_example(tmp_path, capsys):
    mod, res = run_cli("track_training.py", "--quick", "--out", str(tmp_path / "track.png"))
    assert (tmp_path / "track.png").stat().st_size > 20_000
    assert res["steps"].tolist() == [0, 1, 2, 4, 8]
    # the tracked extremes are the dense Hessian's at the last checkpoint
    model, X, y = mod["problem"]()
    last = mod["train"](model, X, y, 8, {8})[0][1]
    model.load_state_dict(last)
    import torch

    import curvops

    ev = torch.linalg.eigvalsh(curvops.Hessian(model, "cross_entropy", (X, y)).to_dense())
    torch.testing.assert_close(res["top"][-1, 0], ev[-1], rtol=1e-5, atol=0)
    torch.testing.assert_close(res["bottom"][-1, 0], ev[0], rtol=1e-4, atol=1e-8)
    assert float(res["ratio"][-1]) < 0.1 * float(res["ratio"][0])  # what this run shows (seeds/001)
    assert "falls below a tenth" in capsys.readouterr().out


def test_active_subspace_seed_example(tmp_path, capsys):
    mod, res = run_cli("active_subspace_seed.py", "--quick", "--out", str(tmp_path / "as"))
    for name in ("as_decay.png", "as_eigenvectors.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    lam = res["eigenvalues"]
    assert res["P"] == 1 * 8 + 8 + 2 * (8 * 8 + 8) + 8 + 1 and lam.shape == (res["P"],)
    assert bool((lam[:-1] >= lam[1:]).all()) and float(lam[-1]) >= 0
    # the snapshot spectrum is the dense one: C from torch.func per-sample gradients
    import torch
    from torch.func import functional_call, grad, vmap

    model = mod["seed_network"](8, 3)
    mod["fit"](model, *_seed_data(400), 100)
    X, y = _seed_data(400)
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss_i(p, x, t):
        return torch.nn.functional.mse_loss(functional_call(model, p, (x[None],)), t[None])

    G = vmap(grad(loss_i), in_dims=(None, 0, 0))(params, X, y)
    G = torch.cat([G[n].reshape(400, -1) for n in params], 1)
    exact = torch.linalg.eigvalsh(G.T @ G / 400).flip(0)
    torch.testing.assert_close(lam[:10], exact[:10], rtol=1e-8, atol=1e-14 * float(exact[0]))
    assert abs(sum(res["lead"].values()) - 1) < 1e-12
    conv = res["convergence"]
    assert float(conv.subspace_distances[-1].abs().max()) < 1e-12  # the reference is the largest N
    assert "subspace distance of the top-r subspace" in capsys.readouterr().out


def _seed_data(n):
    import torch

    gen = torch.Generator().manual_seed(0)
    X = 2 * torch.rand(n, 1, generator=gen, dtype=torch.float64) - 1
    return X, torch.sin(3 * X) + 0.3 * X**2


def test_ntk_gp_regression_example(tmp_path):
    pytest.importorskip("gpytorch")
    _, res = run_cli("ntk_gp_regression.py", "--quick", "--out", str(tmp_path / "gp.png"))
    assert (tmp_path / "gp.png").stat().st_size > 10_000
    assert res["err_kernel"] < 1e-12 and res["err_dense"] < 1e-6 and res["err_cg"] < 1e-4
