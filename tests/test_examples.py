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
