"""The README's code and the examples run as documented."""

import pathlib
import re
import runpy

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_example_runs():
    text = (ROOT / "README.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    H, G, R = scope["H"], scope["G"], scope["R"]
    assert R.shape == H.shape and R.is_symmetric
    assert sorted(scope["top"])[-1] > 0


def test_hessian_summary_example(capsys):
    runpy.run_path(str(ROOT / "examples" / "hessian_summary.py"), run_name="__main__")
    out = capsys.readouterr().out
    top = re.search(r"top-5 Hessian eigenvalues: \[([^\]]+)\]", out).group(1).split()
    exact = re.search(r"exact top-5 \(dense check\): \[([^\]]+)\]", out).group(1).split()
    assert [round(float(a), 4) for a in top] == [round(float(b), 4) for b in exact]
    assert "condition number of GGN" in out


def test_ntk_vs_gram_example(tmp_path):
    mod = runpy.run_path(str(ROOT / "examples" / "ntk_vs_gram.py"), run_name="example")
    res = mod["main"](str(tmp_path / "fig.png"), num_kernel=40)
    assert (tmp_path / "fig.png").stat().st_size > 10_000
    assert res["exact_err"] < 1e-10  # the last layer's kernel is exactly (H Hᵀ + 11ᵀ) ⊗ I
    assert 0 < res["share"] < 1
    assert abs(res["top_h"][0] - res["top_g"][0]) < 0.1 * res["top_h"][0]  # near a fit, H ≈ GGN at the top


def test_quadratic_gd_example(tmp_path, capsys):
    mod = runpy.run_path(str(ROOT / "examples" / "quadratic_gd.py"), run_name="example")
    res = mod["main"](str(tmp_path / "gd.png"), steps=30)
    assert (tmp_path / "gd.png").stat().st_size > 10_000
    assert res["gap"] < 1e-12  # the loop and the closed form agree to round-off
    assert res["labels"] == ("diverges", "drifts", "frozen", "converges", "converges")
    assert res["kind"] == "none"  # a flat axis with a slope: no stationary point
    assert abs(res["lowest"] + 0.3) < 1e-8
    assert "a=+0.00: frozen" in capsys.readouterr().out


def test_saddle_landscape_example(tmp_path, capsys):
    mod = runpy.run_path(str(ROOT / "examples" / "saddle_landscape.py"), run_name="example")
    res = mod["main"](str(tmp_path / "saddle.png"), num_steps=21)
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
    mod = runpy.run_path(str(ROOT / "examples" / "track_training.py"), run_name="example")
    res = mod["main"](str(tmp_path / "track.png"), steps=8, k=2)
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
    mod = runpy.run_path(str(ROOT / "examples" / "active_subspace_seed.py"), run_name="example")
    res = mod["main"](str(tmp_path / "as"), num_samples=400, width=8, depth=3, train_steps=100, bootstrap=5,
                      top=10, sample_sizes=[100, 200, 400])
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
