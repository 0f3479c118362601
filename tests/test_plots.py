"""curvops.plotting: every figure's drawn data equals its inputs; saving, errors, models left untouched."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import copy
from types import SimpleNamespace

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.collections import PolyCollection
from matplotlib.contour import ContourSet
from torch import nn

import curvops
from curvops.layout import ParamLayout
from curvops.linalg.density import DensityResult
from curvops.plotting import (
    architecture_table, direction_label, forward_formula, plot_architecture, plot_density, plot_eigenvalue_decay,
    plot_eigenvalues, plot_eigenvector_heatmap, plot_heatmap, plot_landscape_1d, plot_landscape_2d,
    plot_layer_sensitivity, plot_spectrum_evolution,
)
from curvops.plotting._common import BOUNDARY_GID
from curvops.plotting.architecture import is_chain
from curvops.plotting.spectra import RUG_GID
from curvops.testing.contract import assert_unchanged, snapshot

DT = torch.float64
PNG = b"\x89PNG\r\n\x1a\n"
LAYOUT = ParamLayout(("w1", "b1", "w2"), (torch.Size([3, 2]), torch.Size([3]), torch.Size([1, 3])))  # 6 + 3 + 3


@pytest.fixture(autouse=True)
def _close_new_figures():
    before = set(plt.get_fignums())
    yield
    for num in set(plt.get_fignums()) - before:
        plt.close(num)


def boundary_positions(ax, axis: str) -> list[float]:
    """Positions of the boundary lines (vertical lines: x, horizontal lines: y)."""
    out = []
    for line in ax.lines:
        if line.get_gid() != BOUNDARY_GID:
            continue
        xs, ys = np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)
        if axis == "x" and xs[0] == xs[-1] and ys[0] != ys[-1]:
            out.append(float(xs[0]))
        if axis == "y" and ys[0] == ys[-1] and xs[0] != xs[-1]:
            out.append(float(ys[0]))
    return sorted(out)


def tick_texts(ax, axis: str) -> list[str]:
    ticks = ax.get_yticklabels() if axis == "y" else ax.get_xticklabels()
    return [t.get_text() for t in ticks]


# ---- eigenvalues ---------------------------------------------------------------------------------
LAM = torch.tensor([0.003, 50.0, -0.8, 12.0, -2.0, 0.05, 3.0], dtype=DT)


def test_eigenvalues_sorted_and_coloured_by_sign():
    ax = plot_eigenvalues(LAM)
    want = np.sort(LAM.numpy())[::-1]
    np.testing.assert_array_equal(ax.lines[0].get_ydata(), want)
    np.testing.assert_array_equal(ax.lines[0].get_xdata(), np.arange(1, 8))
    pos, neg = ax.collections[0].get_offsets(), ax.collections[1].get_offsets()
    np.testing.assert_array_equal(pos[:, 1], want[want >= 0])
    np.testing.assert_array_equal(neg[:, 1], want[want < 0])
    assert not np.allclose(ax.collections[0].get_facecolor(), ax.collections[1].get_facecolor())
    assert ax.get_yscale() == "symlog"  # both signs over four decades


def test_eigenvalues_scale_choice_and_unsigned():
    assert plot_eigenvalues(torch.tensor([1.0, 2.0, 3.0])).get_yscale() == "linear"
    assert plot_eigenvalues(np.array([1e-3, 1.0, 10.0])).get_yscale() == "log"
    ax = plot_eigenvalues(LAM, signed=False)
    mags = np.abs(LAM.numpy())
    np.testing.assert_array_equal(ax.lines[0].get_ydata(), np.sort(mags)[::-1])
    assert ax.get_yscale() == "log"
    ax = plot_eigenvalues(LAM, sort=False, yscale="linear")
    np.testing.assert_array_equal(ax.lines[0].get_ydata(), LAM.numpy())


def test_eigenvalues_dict_of_series():
    ggn = LAM.abs()[:5]
    ax = plot_eigenvalues({"Hessian": LAM, "GGN": ggn})
    np.testing.assert_array_equal(ax.lines[0].get_ydata(), np.sort(LAM.numpy())[::-1])
    np.testing.assert_array_equal(ax.lines[1].get_ydata(), np.sort(ggn.numpy())[::-1])
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[:2] == ["Hessian", "GGN"]
    ax = plot_eigenvalues({"a": LAM, "b": ggn}, labels=["H", "G"])
    assert [t.get_text() for t in ax.get_legend().get_texts()][:2] == ["H", "G"]


def test_eigenvalues_errors():
    with pytest.raises(ValueError, match="plot_eigenvalues: expected 2 labels"):
        plot_eigenvalues({"a": LAM, "b": LAM}, labels=["x"])
    with pytest.raises(ValueError, match="expected finite values"):
        plot_eigenvalues(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="expected eigenvalues to be 1-D"):
        plot_eigenvalues(torch.ones(2, 2))
    with pytest.raises(TypeError, match="expected eigenvalues as a torch tensor"):
        plot_eigenvalues("1 2 3")
    with pytest.raises(ValueError, match="expected yscale"):
        plot_eigenvalues(LAM, yscale="loglog")


# ---- density -------------------------------------------------------------------------------------
def test_density_from_result_with_rug():
    lam = torch.tensor([-1.0, 0.0, 0.5, 2.0, 4.0], dtype=DT)
    A = curvops.Dense(torch.diag(lam))
    res = curvops.spectral_density(A, num_probes=2, num_steps=5, generator=torch.Generator().manual_seed(0))
    ax = plot_density(res)
    np.testing.assert_array_equal(ax.lines[0].get_xdata(), res.grid.numpy())
    np.testing.assert_array_equal(ax.lines[0].get_ydata(), res.density.numpy())
    rug = [line for line in ax.lines if line.get_gid() == RUG_GID]
    assert len(rug) == 1
    shown = np.sort(np.asarray(rug[0].get_xdata()))
    kept = res.nodes.numpy().ravel()[res.weights.numpy().ravel() > 1e-12]
    np.testing.assert_array_equal(shown, np.sort(kept))
    # m = n steps: the Ritz nodes are the exact eigenvalues
    np.testing.assert_allclose(np.unique(np.round(shown, 8)), lam.numpy(), atol=1e-8)
    ax = plot_density(res, log=True, rug=False)
    assert ax.get_yscale() == "log" and not any(line.get_gid() == RUG_GID for line in ax.lines)


def test_density_from_arrays_and_dict():
    grid = np.linspace(-1, 1, 50)
    dens = np.exp(-grid**2)
    ax = plot_density(grid, dens, nodes=[0.1, 0.2])
    np.testing.assert_array_equal(ax.lines[0].get_ydata(), dens)
    r = DensityResult(torch.as_tensor(grid), torch.as_tensor(dens), torch.zeros(1, 1), torch.ones(1, 1), 1)
    ax = plot_density({"Hessian": r, "GGN": (grid, 2 * dens)})
    np.testing.assert_array_equal(ax.lines[1].get_ydata(), 2 * dens)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["Hessian", "GGN"]


def test_density_errors():
    with pytest.raises(ValueError, match="plot_density: expected grid and density of the same length"):
        plot_density(np.zeros(5), np.zeros(4))
    with pytest.raises(TypeError, match="expected a DensityResult, or grid and density"):
        plot_density(np.zeros(5))
    with pytest.raises(ValueError, match="expected a non-negative density"):
        plot_density(np.zeros(3), np.array([0.0, -1.0, 0.0]))


# ---- heatmap -------------------------------------------------------------------------------------
def test_heatmap_signed_matrix_diverging_centred():
    A = torch.randn(12, 12, dtype=DT)
    ax = plot_heatmap(A)
    im = ax.images[0]
    np.testing.assert_array_equal(im.get_array(), A.numpy())
    m = A.abs().max().item()
    assert im.norm.vmin == pytest.approx(-m) and im.norm.vmax == pytest.approx(m)
    assert im.get_cmap().name.startswith("RdBu_r")
    assert im.get_extent() == [0, 12, 12, 0]
    ax = plot_heatmap(A.abs(), symmetric=True)
    assert ax.images[0].get_cmap().name.startswith("viridis")
    assert ax.images[0].norm.vmin == pytest.approx(A.abs().min().item())


def test_heatmap_log_keeps_data_and_changes_norm():
    A = torch.randn(6, 6, dtype=DT)
    ax = plot_heatmap(A, log=True)
    np.testing.assert_array_equal(ax.images[0].get_array(), A.numpy())
    assert isinstance(ax.images[0].norm, matplotlib.colors.SymLogNorm)
    ax = plot_heatmap(A.abs() + 1e-3, log=True)
    assert isinstance(ax.images[0].norm, matplotlib.colors.LogNorm)


def test_heatmap_layout_boundaries_at_cumulative_sizes():
    A = torch.randn(12, 12, dtype=DT)
    ax = plot_heatmap(A, layout=LAYOUT)
    assert boundary_positions(ax, "x") == [6.0, 9.0]
    assert boundary_positions(ax, "y") == [6.0, 9.0]
    assert tick_texts(ax, "y") == ["w1", "b1", "w2"] and tick_texts(ax, "x") == ["w1", "b1", "w2"]
    ax = plot_heatmap(A, boundaries=[(0, "first"), (4, "second")])
    assert boundary_positions(ax, "y") == [4.0]
    assert tick_texts(ax, "y") == ["first", "second"]
    ax = plot_heatmap(torch.randn(3, 3), labels=["a", "b", "c"])
    assert tick_texts(ax, "x") == ["a", "b", "c"]


def test_heatmap_of_operators():
    lin = nn.Linear(3, 2).double()
    X, y = torch.randn(8, 3, dtype=DT), torch.randn(8, 2, dtype=DT)
    H = curvops.Hessian(lin, "mse", (X, y))
    ax = plot_heatmap(H)
    np.testing.assert_allclose(ax.images[0].get_array(), H.to_dense().numpy(), rtol=1e-12, atol=1e-12)
    assert boundary_positions(ax, "y") == [6.0] and tick_texts(ax, "x") == ["weight", "bias"]
    J = curvops.Jacobian(lin, X)  # (8·2)×8: the parameter layout fits the columns only
    ax = plot_heatmap(J)
    assert boundary_positions(ax, "x") == [6.0] and boundary_positions(ax, "y") == []


def test_heatmap_refuses_large_operators_before_any_product():
    calls = []

    def matmat(V):
        calls.append(V.shape)
        return V

    A = curvops.func_operator((5000, 5000), matmat)
    with pytest.raises(ValueError, match=r"plot_heatmap: expected an operator of at most 4096×4096"):
        plot_heatmap(A)
    assert calls == []
    with pytest.raises(ValueError, match="expected a layout of 5 parameters"):
        plot_heatmap(torch.zeros(5, 5), layout=LAYOUT)
    with pytest.raises(ValueError, match="expected either layout or boundaries"):
        plot_heatmap(torch.zeros(12, 12), layout=LAYOUT, boundaries=[(0, "a")])
    with pytest.raises(ValueError, match="expected strictly increasing boundary positions"):
        plot_heatmap(torch.zeros(4, 4), boundaries=[(2, "a"), (1, "b")])
    with pytest.raises(ValueError, match="expected 3 labels"):
        plot_heatmap(torch.zeros(3, 3), labels=["a"])


# ---- eigenvalue decay ----------------------------------------------------------------------------
def test_decay_sorted_with_band():
    lam = torch.tensor([0.1, 10.0, 1.0, 0.01], dtype=DT)
    lo, hi = 0.5 * lam, 2.0 * lam
    ax = plot_eigenvalue_decay(lam, lower=lo, upper=hi)
    np.testing.assert_array_equal(ax.lines[0].get_ydata(), [10.0, 1.0, 0.1, 0.01])
    assert ax.get_yscale() == "log"
    band = [c for c in ax.collections if isinstance(c, PolyCollection)][0]
    verts = band.get_paths()[0].vertices
    for value in np.concatenate([[5.0, 0.5, 0.05, 0.005], [20.0, 2.0, 0.2, 0.02]]):
        assert np.isclose(verts[:, 1], value).any(), value
    ax = plot_eigenvalue_decay(lam, normalize=True)
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [1.0, 0.1, 0.01, 0.001])


def test_decay_masks_non_positive_values():
    """Documented: values ≤ 0 are masked (NaN gaps) and counted in the legend; raise only if none is > 0."""
    ax = plot_eigenvalue_decay(torch.tensor([3.0, 0.0, -1.0, 1.0]))
    y = np.asarray(ax.lines[0].get_ydata())
    np.testing.assert_array_equal(y[:2], [3.0, 1.0])
    assert np.isnan(y[2:]).all()
    assert "2 ≤ 0 not shown" in ax.get_legend().get_texts()[0].get_text()
    with pytest.raises(ValueError, match="plot_eigenvalue_decay: expected at least one positive eigenvalue"):
        plot_eigenvalue_decay(torch.tensor([0.0, -1.0]))
    with pytest.raises(ValueError, match="expected both lower and upper"):
        plot_eigenvalue_decay(torch.ones(3), lower=torch.ones(3))
    with pytest.raises(ValueError, match="expected lower and upper of length 3"):
        plot_eigenvalue_decay(torch.ones(3), lower=torch.ones(2), upper=torch.ones(3))


# ---- eigenvectors and layer shares -----------------------------------------------------------------
def test_eigenvector_heatmap_is_log_magnitude_with_boundaries():
    V = torch.linalg.qr(torch.randn(12, 4, dtype=DT))[0]
    V[0, 0] = 0.0
    ax = plot_eigenvector_heatmap(V, layout=LAYOUT, floor=1e-6)
    want = np.log10(np.maximum(np.abs(V.numpy()), 1e-6))
    np.testing.assert_allclose(ax.images[0].get_array(), want)
    assert ax.images[0].get_array()[0, 0] == pytest.approx(-6.0)
    assert boundary_positions(ax, "y") == [6.0, 9.0]
    assert tick_texts(ax, "y") == ["w1", "b1", "w2"]
    res = SimpleNamespace(eigenvalues=torch.tensor([1.0, 3.0, 2.0, 0.5]), eigenvectors=V)
    ax = plot_eigenvector_heatmap(res)
    np.testing.assert_allclose(ax.images[0].get_array(), np.log10(np.maximum(np.abs(V.numpy()[:, [1, 2, 0, 3]]), 1e-8)))
    with pytest.raises(ValueError, match="plot_eigenvector_heatmap: expected floor > 0"):
        plot_eigenvector_heatmap(V, floor=0.0)
    with pytest.raises(ValueError, match="expected a layout of 13 parameters"):
        plot_eigenvector_heatmap(torch.ones(13, 2), layout=LAYOUT)


def test_layer_sensitivity_bars_stack_the_shares():
    V = torch.linalg.qr(torch.randn(12, 3, dtype=DT))[0]
    shares = torch.stack([(V[a:b] ** 2).sum(0) for a, b in LAYOUT.offsets().values()])
    torch.testing.assert_close(shares.sum(0), torch.ones(3, dtype=DT))
    ax = plot_layer_sensitivity(shares, LAYOUT.names)
    assert len(ax.containers) == 3
    bottom = np.zeros(3)
    for t, bars in enumerate(ax.containers):
        np.testing.assert_allclose([b.get_height() for b in bars], shares[t].numpy())
        np.testing.assert_allclose([b.get_y() for b in bars], bottom)
        bottom += shares[t].numpy()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(LAYOUT.names)[::-1]  # top of stack first
    ax = plot_layer_sensitivity(shares, LAYOUT, kind="heatmap")
    np.testing.assert_allclose(ax.images[0].get_array(), shares.numpy())
    with pytest.raises(ValueError, match="plot_layer_sensitivity: expected 3 names"):
        plot_layer_sensitivity(shares, ["a"])
    with pytest.raises(ValueError, match="expected non-negative shares"):
        plot_layer_sensitivity(-shares, LAYOUT.names)
    with pytest.raises(ValueError, match="expected kind 'bars' or 'heatmap'"):
        plot_layer_sensitivity(shares, LAYOUT.names, kind="pie")


# ---- spectrum evolution --------------------------------------------------------------------------
def test_spectrum_evolution_one_line_per_rank():
    steps = np.array([0, 10, 20])
    E = np.array([[0.5, -1.0, 20.0], [1.0, -2.0, 30.0], [0.001, -3.0, 40.0]])
    ax = plot_spectrum_evolution(steps, E)
    assert len(ax.lines) == 3 + 1  # three ranks and the zero line
    for i in range(3):
        np.testing.assert_array_equal(ax.lines[i].get_xdata(), steps)
        np.testing.assert_array_equal(ax.lines[i].get_ydata(), -np.sort(-E, axis=1)[:, i])
    assert ax.get_yscale() == "symlog"
    ax = plot_spectrum_evolution(steps, {"Hessian": E, "GGN": np.abs(E)}, signed=False)
    assert len(ax.lines) == 6
    np.testing.assert_array_equal(ax.lines[3].get_ydata(), -np.sort(-np.abs(E), axis=1)[:, 0])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["Hessian", "GGN"]
    with pytest.raises(ValueError, match="plot_spectrum_evolution: expected 3 rows of eigenvalues"):
        plot_spectrum_evolution(steps, E[:2])


# ---- landscapes ----------------------------------------------------------------------------------
def test_landscape_1d_curves():
    a = np.linspace(-1, 1, 21)
    ax = plot_landscape_1d(a, {"v1": 3 * a**2, "v2": a**2}, xlabel=direction_label(1, 3.2))
    np.testing.assert_array_equal(ax.lines[0].get_xdata(), a)
    np.testing.assert_array_equal(ax.lines[1].get_ydata(), a**2)
    assert ax.get_xlabel() == "eigenvector 1 (λ = 3.2)"
    assert direction_label(2, torch.tensor(-0.123456), digits=2) == "eigenvector 2 (λ = -0.12)"
    with pytest.raises(ValueError, match="plot_landscape_1d: expected 21 values"):
        plot_landscape_1d(a, a[:-1])
    with pytest.raises(ValueError, match="expected positive values for logy"):
        plot_landscape_1d(a, a, logy=True)


def test_landscape_2d_contours_span_values_and_mark_origin():
    a, b = np.linspace(-1, 1, 15), np.linspace(-2, 2, 11)
    Z = 3 * a[:, None] ** 2 - b[None, :] ** 2 + 0.5 * a[:, None] * b[None, :]
    ax = plot_landscape_2d(a, b, Z, xlabel="x1", ylabel="x2", levels=12)
    sets = [c for c in ax.collections if isinstance(c, ContourSet)]
    assert len(sets) == 2 and sets[0].filled and not sets[1].filled
    levels = sets[0].levels
    assert levels[0] <= Z.min() and levels[-1] >= Z.max()
    np.testing.assert_array_equal(sets[1].levels, levels)
    origin = [line for line in ax.lines if line.get_label() == "origin"][0]
    assert list(origin.get_xdata()) == [0.0] and list(origin.get_ydata()) == [0.0]
    best = [line for line in ax.lines if line.get_label() == "grid minimum"][0]
    i, j = np.unravel_index(np.argmin(Z), Z.shape)
    assert (best.get_xdata()[0], best.get_ydata()[0]) == (a[i], b[j])
    ax = plot_landscape_2d(a, b, np.exp(Z), log=True)
    lv = [c for c in ax.collections if isinstance(c, ContourSet)][0].levels
    assert lv[0] <= Z.min() / np.log(10) + 1e-12 and lv[-1] >= Z.max() / np.log(10) - 1e-12
    with pytest.raises(ValueError, match=r"plot_landscape_2d: expected values of shape \(15, 11\)"):
        plot_landscape_2d(a, b, Z.T)


# ---- architecture --------------------------------------------------------------------------------
def mlp_1_35_35_1() -> nn.Sequential:
    return nn.Sequential(nn.Linear(1, 35), nn.Tanh(), nn.Linear(35, 35), nn.Tanh(), nn.Linear(35, 1)).double()


def test_architecture_table_of_mlp():
    model = mlp_1_35_35_1()
    rows = architecture_table(model, torch.zeros(4, 1, dtype=DT))
    got = [(r["name"], r["type"], r["input_shape"], r["output_shape"], r["param_shapes"], r["input_from"])
           for r in rows]
    assert got == [
        ("0", "Linear", (4, 1), (4, 35), {"weight": (35, 1), "bias": (35,)}, "input"),
        ("1", "Tanh", (4, 35), (4, 35), {}, 0),
        ("2", "Linear", (4, 35), (4, 35), {"weight": (35, 35), "bias": (35,)}, 1),
        ("3", "Tanh", (4, 35), (4, 35), {}, 2),
        ("4", "Linear", (4, 35), (4, 1), {"weight": (1, 35), "bias": (1,)}, 3),
    ]
    assert [r["num_params"] for r in rows] == [70, 0, 1260, 0, 36]
    assert [r["kind"] for r in rows] == ["linear", "activation", "linear", "activation", "linear"]
    assert is_chain(rows)
    assert forward_formula(rows) == [r"f(x) = W_{3} \tanh(W_{2} \tanh(W_{1} x + b_{1}) + b_{2}) + b_{3}"]
    assert forward_formula(rows, nested=False) == [
        r"h_{1} = \tanh(W_{1} x + b_{1})", r"h_{2} = \tanh(W_{2} h_{1} + b_{2})", r"\hat{y} = W_{3} h_{2} + b_{3}",
    ]


def test_architecture_figure_shows_shapes_and_formula(tmp_path):
    model = mlp_1_35_35_1()
    ax = plot_architecture(model, torch.zeros(2, 1, dtype=DT), save=tmp_path / "deep" / "arch.png")
    texts = [t.get_text() for t in ax.texts]
    assert r"$f(x) = W_{3} \tanh(W_{2} \tanh(W_{1} x + b_{1}) + b_{2}) + b_{3}$" in texts
    assert r"$h_{1} \in \mathbb{R}^{35}$" in texts and r"$x \in \mathbb{R}^{1}$" in texts
    assert "$W_{1} \\in \\mathbb{R}^{35 \\times 1}$\n$b_{1} \\in \\mathbb{R}^{35}$" in texts
    assert "$W_{3} \\in \\mathbb{R}^{1 \\times 35}$\n$b_{3} \\in \\mathbb{R}^{1}$" in texts
    assert texts.count("tanh") == 2
    assert ax.get_title() == "Sequential: 1,366 parameters"  # 70 + 1260 + 36
    assert (tmp_path / "deep" / "arch.png").read_bytes()[:8] == PNG


def test_architecture_conv_net_and_kernels():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 3)).double()
    rows = architecture_table(model, torch.zeros(2, 1, 8, 8, dtype=DT))
    assert [r["output_shape"] for r in rows] == [(2, 4, 8, 8), (2, 4, 8, 8), (2, 4, 4, 4), (2, 64), (2, 3)]
    assert rows[0]["param_shapes"] == {"weight": (4, 1, 3, 3), "bias": (4,)}
    assert forward_formula(rows) == [
        r"f(x) = W_{2} \mathrm{vec}(\mathrm{maxpool}(\mathrm{relu}(K_{1} \ast x + b_{1}))) + b_{2}"]
    ax = plot_architecture(model, torch.zeros(2, 1, 8, 8, dtype=DT))
    texts = [t.get_text() for t in ax.texts]
    assert "$K_{1} \\in \\mathbb{R}^{4 \\times 1 \\times 3 \\times 3}$\n$b_{1} \\in \\mathbb{R}^{4}$" in texts
    assert r"$h_{1} \in \mathbb{R}^{64}$" in texts and "relu, max pool, flatten" in texts


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.out = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.a(x)) + x)  # functional tanh and a skip: not a chain


def test_architecture_generic_fallback_for_non_chains():
    model = Residual().double()
    rows = architecture_table(model, torch.zeros(3, 4, dtype=DT))
    assert [r["name"] for r in rows] == ["a", "out"] and rows[1]["input_from"] is None
    assert not is_chain(rows) and forward_formula(rows) is None
    ax = plot_architecture(model, torch.zeros(3, 4, dtype=DT))
    texts = [t.get_text() for t in ax.texts]
    assert "a\nweight 4×4\nbias 4\n→ 4" in texts and "out\nweight 2×4\nbias 2\n→ 2" in texts
    assert any(t.startswith("no formula") for t in texts)


def test_architecture_leaves_the_model_untouched():
    model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 2)).double()
    model.train()
    model[4].weight.grad = torch.ones_like(model[4].weight)
    model[0].weight.requires_grad_(False)
    hooks_before = {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()}
    state = copy.deepcopy(model.state_dict())
    X = torch.randn(5, 3, dtype=DT)
    before = snapshot(model)
    ax = plot_architecture(model, X)
    assert_unchanged(before, snapshot(model))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # running stats too
    assert {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()} == hooks_before
    texts = [t.get_text() for t in ax.texts]
    assert r"$f(x) = W_{3} \mathrm{relu}(\mathrm{BN}_{2}(W_{1} x + b_{1})) + b_{3}$" in texts


def test_architecture_cleans_up_when_the_forward_fails():
    model = mlp_1_35_35_1().train()
    before = snapshot(model)
    with pytest.raises(RuntimeError):
        architecture_table(model, torch.zeros(2, 3, dtype=DT))  # wrong input width
    assert_unchanged(before, snapshot(model))
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(TypeError, match="architecture_table: expected an nn.Module"):
        plot_architecture(lambda x: x, torch.zeros(1))


# ---- common behaviour ----------------------------------------------------------------------------
def test_draws_on_given_axes_saves_png_and_leaves_rcparams(tmp_path):
    rc = dict(matplotlib.rcParams)
    fig, axes = plt.subplots(1, 2)
    out = plot_eigenvalues(LAM, ax=axes[1], save=tmp_path / "a" / "b" / "eig.png")
    assert out is axes[1] and axes[1].lines and not axes[0].lines
    assert plt.fignum_exists(fig.number)  # nothing closed
    assert (tmp_path / "a" / "b" / "eig.png").read_bytes()[:8] == PNG
    plot_heatmap(torch.eye(3), ax=axes[0], save=str(tmp_path / "heat.png"))
    assert (tmp_path / "heat.png").read_bytes()[:8] == PNG
    assert dict(matplotlib.rcParams) == rc
    with pytest.raises(TypeError, match="plot_eigenvalues: expected a file path for save"):
        plot_eigenvalues(LAM, save=123)
    with pytest.raises(TypeError, match="expected a matplotlib Axes"):
        plot_eigenvalues(LAM, ax="left")


class DictInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 3)

    def forward(self, x, scale):
        return self.lin(x) * scale


def test_architecture_input_conventions_and_lazy_modules():
    """Inputs are passed as curvops.Objective does: a dict → keyword arguments, a tuple → positional."""
    x = torch.zeros(4, 2)
    rows = architecture_table(DictInput(), {"x": x, "scale": 2.0})
    assert rows[0]["input_shape"] == (4, 2) and rows[0]["output_shape"] == (4, 3) and rows[0]["input_from"] == "input"
    assert architecture_table(DictInput(), (x, 2.0))[0]["output_shape"] == (4, 3)
    assert not is_chain(rows)  # the product with `scale` happens outside the leaf modules
    lazy = nn.Sequential(nn.LazyLinear(3))
    with pytest.raises(ValueError, match="architecture_table: expected initialized parameters"):
        architecture_table(lazy, x)
    assert nn.parameter.is_lazy(lazy[0].weight)
