"""`curvops report`: the report's numbers against direct library calls and dense truth, the HTML
against its summary, the CLI (in process and as `python -m curvops`), the user-model path and every
documented loading error."""

import html as htmllib
import json
import re
import subprocess
import sys
import textwrap
import time
from html.parser import HTMLParser
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import functional_call, jacrev  # noqa: E402

import curvops  # noqa: E402
from curvops.cli import main  # noqa: E402
from curvops.demo import demo_problem  # noqa: E402
from curvops.report.build import SECTIONS, build_report  # noqa: E402
from curvops.report.html import fmt, render_html  # noqa: E402
from curvops.report.loading import SpecError, load_problem, parse_spec  # noqa: E402
from curvops.testing.contract import assert_unchanged, snapshot  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---- the full default run (once) -------------------------------------------------------------------
@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("default") / "report"
    t0 = time.perf_counter()
    rc = main(["report", str(out), "--no-progress"])
    seconds = time.perf_counter() - t0
    summary = json.loads((out / "summary.json").read_text())
    return rc, seconds, out, summary


@pytest.fixture(scope="module")
def demo():
    """The demo problem exactly as the default run trains it (seed 0, float64)."""
    model, X, y = demo_problem(seed=0)
    H = curvops.Hessian(model, "cross_entropy", (X, y))
    return model, X, y, H, H.to_dense()


def warmed(A):
    """A after one product: its graphs are kept (keep_graphs="auto"), as the report's operators'
    are by the time they run an unconverged solver whose output depends on the product's rounding."""
    A @ torch.ones(A.shape[0], dtype=A.torch_dtype)
    return A


def test_default_run_finishes_in_time_with_every_section(default_run):
    rc, seconds, out, summary = default_run
    assert rc == 0
    assert seconds < 60, f"the default report took {seconds:.1f} s"
    default = [s for s in SECTIONS if s != "active_subspace_prior"]  # the prior section is off unless asked
    assert list(summary["sections"]) == default
    assert summary["settings"]["active_subspace_prior"] == "off"
    statuses = {k: v["status"] for k, v in summary["sections"].items()}
    assert all(s == "ok" for s in statuses.values()), statuses
    assert (out / "index.html").is_file()
    for key, fig in summary["figures"].items():
        assert fig["status"] == "ok", (key, fig)
        assert (out / fig["file"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["settings"]["seed"] == 0 and summary["settings"]["quick"] is False
    env = summary["environment"]
    assert env["curvops_version"] == curvops.__version__ and env["device"] == "cpu" and env["dtype"] == "float64"
    assert set(summary["timings"]) == set(default) | {"total"}
    assert all(v >= 0 for v in summary["timings"].values())


def test_overview_matches_the_model(default_run, demo):
    model, X, y, H, D = demo
    s = default_run[3]["sections"]["overview"]
    assert s["num_params"] == sum(p.numel() for p in model.parameters()) == 371
    assert [t["name"] for t in s["tensors"]] == [n for n, _ in model.named_parameters()]
    assert [t["shape"] for t in s["tensors"]] == [list(p.shape) for _, p in model.named_parameters()]
    with torch.no_grad():
        loss = nn.functional.cross_entropy(model(X), y)
    assert s["loss"] == pytest.approx(float(loss), rel=1e-12)  # the same model as the report's
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(nn.functional.cross_entropy(functional_call(model, params, (X,)), y),
                                list(params.values()))
    assert s["grad_norm"] == pytest.approx(float(torch.cat([g.reshape(-1) for g in grads]).norm()), rel=1e-10)
    for t, g in zip(s["tensors"], grads):
        assert t["grad_norm"] == pytest.approx(float(g.norm()), rel=1e-10, abs=1e-15)


def test_eigenvalues_match_library_calls_and_dense_truth(default_run, demo):
    model, X, y, H, D = demo
    summary = default_run[3]
    e, b = summary["sections"]["eigenvalues"], summary["settings"]["budgets"]
    exact = torch.linalg.eigvalsh(D)
    G = curvops.GGN(model, "cross_entropy", (X, y))
    top = curvops.eigsh(H, b["top_k"], which="LA", tol=b["eig_tol"], generator=gen())
    np.testing.assert_allclose(e["hessian_top"]["eigenvalues"], top.eigenvalues.flip(0).numpy(), rtol=1e-9)
    np.testing.assert_allclose(e["hessian_top"]["eigenvalues"], exact.flip(0)[:b["top_k"]].numpy(), rtol=1e-5)
    low = curvops.eigsh(H, b["k_negative"], which="SA", tol=b["eig_tol"], relative_to="norm", generator=gen())
    np.testing.assert_allclose(e["hessian_bottom"]["eigenvalues"], low.eigenvalues.numpy(), rtol=1e-9)
    np.testing.assert_allclose(e["hessian_bottom"]["eigenvalues"], exact[:b["k_negative"]].numpy(),
                               atol=1e-5 * float(exact.abs().max()))
    assert e["hessian_bottom"]["eigenvalues"][0] < 0  # the demo point is a saddle of the Hessian
    g_exact = torch.linalg.eigvalsh(G.to_dense()).flip(0)[:b["top_k"]]
    np.testing.assert_allclose(e["ggn_top"]["eigenvalues"], g_exact.numpy(), rtol=1e-5)


def test_trace_density_condition_rank_stationary_match(default_run, demo):
    model, X, y, H, D = demo
    summary = default_run[3]
    secs, b = summary["sections"], summary["settings"]["budgets"]
    tr = curvops.trace(H, method="xtrace", num_matvecs=b["trace_matvecs"], generator=gen())
    assert secs["trace"]["hessian"]["value"] == pytest.approx(tr.value, rel=1e-10)
    assert secs["trace"]["hessian"]["stderr"] == pytest.approx(tr.stderr, rel=1e-8)
    # the estimate is within a few of its stated standard errors of the exact trace
    assert abs(secs["trace"]["hessian"]["value"] - float(torch.trace(D))) < 5 * secs["trace"]["hessian"]["stderr"]

    dens = secs["density"]["hessian"]
    grid, phi = np.array(dens["grid"]), np.array(dens["density"])
    assert np.trapezoid(phi, grid) == pytest.approx(1.0, abs=2e-2)
    exact = torch.linalg.eigvalsh(D)
    tol = 1e-6 * float(exact.abs().max())
    assert float(exact[0]) - tol <= dens["node_min"] and dens["node_max"] <= float(exact[-1]) + tol

    # the eigensolver's own figure, with its status: Lanczos does not converge at the GGN's clustered
    # small end in the default budget, so its figure is a lower bound (below the exact ratio)
    G_exact = torch.linalg.eigvalsh(curvops.GGN(model, "cross_entropy", (X, y)).to_dense())
    c = secs["condition"]["ggn"]
    # the report's GGN has made products before (its graphs are kept), so every product of its
    # Lanczos runs on the kept graphs: warm the reference the same way.  The unconverged lower bound
    # moves with the rounding of the first product (~1e-3 here), so the two must run the same kernels.
    ref = curvops.cond(warmed(curvops.GGN(model, "cross_entropy", (X, y))), max_iters=b["cond_max_iters"],
                       generator=gen())
    assert c["eigensolver_value"] == pytest.approx(ref.value, rel=1e-8) and c["kind"] == "psd"
    assert c["eigensolver_status"] == ref.status == "lower bound" and c["lower_bound"] is True
    # issue 10: the demo GGN has eigenvalues below λ₁·n·ε: κ is infinite to working precision, and
    # the report says so instead of printing a finite figure beside "rank 321 of 371"
    eps = torch.finfo(torch.float64).eps
    cutoff = float(G_exact[-1]) * 371 * eps
    assert int((G_exact.abs() <= cutoff).sum()) > 0
    assert c["value"] == "inf" and c["status"] == "numerically singular" and c["display"] == "∞"

    r = secs["rank"]["hessian"]
    assert r["lower_bound"] is False  # the demo model is small: the exact dense path
    assert r["value"] == int((exact.abs() > r["tol"]).sum())
    assert r["tol"] == pytest.approx(float(exact.abs().max()) * 371 * eps, rel=1e-8)
    mags = exact.abs().sort(descending=True).values
    assert r["above"] == pytest.approx(float(mags[r["value"] - 1]), rel=1e-6)
    assert abs(r["below"]) < 1e-14 and r["well_defined"] and r["status"] == "well defined"
    assert r["display"] == f"{r['value']} of 371" and "clear gap" in r["caveat"]
    ch = secs["condition"]["hessian"]  # rank-deficient with a clear gap: κ on the numerical range as well
    assert ch["value"] == "inf" and ch["restricted_rank"] == r["value"]
    assert ch["restricted_value"] == pytest.approx(float(mags[0] / mags[r["value"] - 1]), rel=1e-6)
    # the GGN's spectrum decays smoothly through its cutoff: its rank is not presented as a fact
    rg = secs["rank"]["ggn"]
    near = int(((G_exact.abs() > cutoff / 10) & (G_exact.abs() <= cutoff * 10)).sum())
    assert rg["tol"] == pytest.approx(cutoff, rel=1e-8) and near > 2
    assert rg["well_defined"] is False and rg["display"] == "not well defined at this precision"
    assert rg["below"] <= rg["tol"] < rg["above"] and "no gap at the cutoff λ₁·n·ε" in rg["caveat"]
    assert c["restricted_value"] is None and "The rank is not well defined at this precision" in c["note"]
    assert c["caveat"] == f"numerically singular: {371 - rg['value']} of 371 eigenvalues ≤ the rank cutoff {fmt(cutoff)}"

    st = secs["stationary"]
    assert st["kind"] == "not_stationary" and st["curvature"] == "saddle"
    assert st["lambda_max"] == pytest.approx(float(exact[-1]), rel=1e-5)
    assert st["lambda_min"] == pytest.approx(float(exact[0]), rel=1e-3)


def test_ntk_eigenvalues_match_a_dense_jacobian(default_run, demo):
    model, X, y, H, D = demo
    s = default_run[3]["sections"]["ntk"]
    n = s["num_inputs"]
    params = {k: v.detach() for k, v in model.named_parameters()}
    jac = jacrev(lambda p: functional_call(model, p, (X[:n],)))(params)  # {name: [n, C, *shape]}
    J = torch.cat([j.reshape(n * 3, -1) for j in jac.values()], dim=1)
    K_eigs = torch.linalg.eigvalsh(J @ J.T).flip(0)
    assert s["size"] == n * 3 and s["complete"]
    np.testing.assert_allclose(s["eigenvalues"], K_eigs.numpy(), rtol=1e-8, atol=1e-9 * float(K_eigs[0]))
    assert s["trace"] == pytest.approx(float((J ** 2).sum()), rel=1e-10)


def test_landscape_matches_the_loss_along_eigenvectors(default_run, demo):
    model, X, y, H, D = demo
    s = default_run[3]["sections"]["landscape"]
    w, V = torch.linalg.eigh(D)
    params = dict(model.named_parameters())
    theta = torch.cat([p.detach().reshape(-1) for p in params.values()])
    for j, c in enumerate(s["curves"][:2]):
        v = V[:, -1 - j]
        assert c["eigenvalue"] == pytest.approx(float(w[-1 - j]), rel=1e-5)
        for t, value in list(zip(s["steps"], c["loss"]))[::10]:
            # ±v: eigenvectors have a sign ambiguity; the report's curve is one of the two
            losses = []
            for sign in (1, -1):
                flat = theta + sign * t * v
                p, start = {}, 0
                for name, q in params.items():
                    p[name] = flat[start:start + q.numel()].reshape(q.shape)
                    start += q.numel()
                losses.append(float(nn.functional.cross_entropy(functional_call(model, p, (X,)), y)))
            assert min(abs(value - loss) for loss in losses) < 1e-10
        # the curve's second difference at zero is the eigenvalue (the demo point is nearly stationary)
        assert c["curvature_from_curve"] == pytest.approx(c["eigenvalue"], rel=0.1)
    plane = s["plane"]
    Z = np.array(plane["loss"])
    mid = len(plane["alphas"]) // 2
    assert Z.shape == (len(plane["alphas"]), len(plane["betas"]))
    assert Z[mid, mid] == pytest.approx(s["base_loss"], rel=1e-10)


def test_architecture_and_active_subspace_sections(default_run, demo):
    model, X, y = demo[:3]
    secs = default_run[3]["sections"]
    layers = secs["architecture"]["layers"]
    assert [r["type"] for r in layers] == [type(m).__name__ for m in model]
    assert sum(r["num_params"] for r in layers) == 371
    assert layers[0]["param_shapes"] == {"weight": [16, 2], "bias": [16]}

    a = secs["active_subspace"]
    assert a["num_samples"] == 512 and a["k"] == 371  # all eigenpairs of the small demo problem
    # oracle: per-sample loss gradients, C = GᵀG / N
    params = {k: v.detach() for k, v in model.named_parameters()}

    def sample_loss(p, x, t):
        return nn.functional.cross_entropy(functional_call(model, p, (x[None],)), t[None])

    grads = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0))(params, X, y)
    G = torch.cat([g.reshape(512, -1) for g in grads.values()], dim=1)
    U, S, Vh = torch.linalg.svd(G / 512 ** 0.5, full_matrices=False)
    lam = S ** 2
    np.testing.assert_allclose(a["eigenvalues"], lam.numpy(), rtol=1e-7, atol=1e-12 * float(lam[0]))
    assert a["trace"] == pytest.approx(float((G ** 2).sum() / 512), rel=1e-10)
    k = a["top_k"]
    V = Vh[:k].T
    shares = torch.stack([(V[a_:b_] ** 2).sum(0) for a_, b_ in
                          curvops.Objective(model, "cross_entropy", (X, y)).layout.offsets().values()])
    np.testing.assert_allclose(a["layer_sensitivity"]["fractions"], shares.numpy(), atol=1e-6)
    lo, hi = np.array(a["eigenvalue_lower"]), np.array(a["eigenvalue_upper"])
    assert (lo <= hi).all() and a["bootstrap"] == 50


# ---- the HTML is a function of the summary ------------------------------------------------------
class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs, self.ids, self.tags, self.text, self._skip = [], set(), [], [], 0

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag in ("style", "script"):
            self._skip += 1
        for k, v in attrs:
            if k in ("src", "href", "srcset", "data", "poster", "action", "background"):
                self.refs.append((tag, k, v))
            if k == "id":
                self.ids.add(v)

    def handle_endtag(self, tag):
        if tag in ("style", "script"):
            self._skip -= 1

    def handle_data(self, data):
        if not self._skip:
            self.text.append(data)


def _leaves(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from _leaves(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _leaves(v)
    else:
        yield obj


_NUMBER = re.compile(r"\d+(?:\.\d+)?(?:e[+-]?\d+)?")


def check_report_html(out: Path, summary: dict) -> None:
    text = (out / "index.html").read_text(encoding="utf-8")
    assert render_html(json.loads((out / "summary.json").read_text())) == text  # rendered from summary.json alone
    parser = _Refs()
    parser.feed(text)
    assert not {"script", "link", "iframe", "object", "embed", "base"} & set(parser.tags)
    style = re.search(r"<style>(.*?)</style>", text, re.S).group(1)
    assert "url(" not in style and "@import" not in style and "@font-face" not in style
    assert "http://" not in text and "https://" not in text
    images = 0
    for tag, attr, value in parser.refs:
        assert not re.match(r"^[a-z][a-z0-9+.-]*:|^//", value), (tag, attr, value)  # no scheme, no host
        if value.startswith("#"):
            assert value[1:] in parser.ids, value
        else:
            assert (out / value).is_file(), value
            images += tag == "img"
    assert images == sum(1 for f in summary["figures"].values() if f["file"])
    # every number on the page is a number (or inside a string) of the summary
    allowed = set()
    for leaf in _leaves(summary):
        allowed.update(_NUMBER.findall(htmllib.unescape(fmt(leaf))))
    shown = _NUMBER.findall(htmllib.unescape(" ".join(parser.text)))
    assert shown and set(shown) <= allowed, sorted(set(shown) - allowed)


def test_html_is_rendered_from_the_summary_and_references_only_local_files(default_run):
    rc, seconds, out, summary = default_run
    check_report_html(out, summary)
    text = (out / "index.html").read_text()
    top = summary["sections"]["eigenvalues"]["hessian_top"]["eigenvalues"][0]
    assert fmt(top) in text and fmt(summary["sections"]["trace"]["hessian"]["value"]) in text


# ---- library API, quick mode, the model untouched -------------------------------------------------
def test_build_report_quick_leaves_the_model_untouched(tmp_path):
    model, X, y = demo_problem(num_samples=128, steps=100, seed=1)
    model.train()  # no dropout/BatchNorm: train mode is fine, and must stay
    model[0].weight.grad = torch.ones_like(model[0].weight)
    before = snapshot(model)
    summary = build_report(model, "cross_entropy", (X, y), tmp_path, quick=True, progress=False, seed=3,
                           strict=True)
    assert_unchanged(before, snapshot(model))
    assert summary == json.loads((tmp_path / "summary.json").read_text())
    assert summary["settings"]["quick"] and summary["settings"]["seed"] == 3
    assert summary["settings"]["budgets"]["top_k"] == 5
    assert all(s["status"] == "ok" for s in summary["sections"].values())
    top = curvops.eigsh(curvops.Hessian(model, "cross_entropy", (X, y)), 5, which="LA", generator=gen(3))
    np.testing.assert_allclose(summary["sections"]["eigenvalues"]["hessian_top"]["eigenvalues"],
                               top.eigenvalues.flip(0).numpy(), rtol=1e-9)
    check_report_html(tmp_path, summary)


def test_build_report_top_k_sections_and_failing_section(tmp_path, monkeypatch):
    from curvops.report import build

    model, X, y = demo_problem(num_samples=64, steps=50)

    def broken(ctx):
        raise RuntimeError("boom")

    monkeypatch.setitem(build._SECTION_FUNCS, "trace", broken)
    summary = build_report(model, "cross_entropy", (X, y), tmp_path, quick=True, top_k=3, progress=False,
                           sections=["eigenvalues", "trace"])
    assert list(summary["sections"]) == ["overview", "eigenvalues", "trace"]
    assert len(summary["sections"]["eigenvalues"]["hessian_top"]["eigenvalues"]) == 3
    err = summary["sections"]["trace"]
    assert set(err) == {"status", "message", "traceback"}
    assert err["status"] == "error" and err["message"] == "RuntimeError: boom"
    assert err["traceback"].startswith("Traceback") and "in broken" in err["traceback"]
    assert summary["failed_sections"] == ["trace"]
    assert summary["warnings"] == ["The trace section failed: RuntimeError: boom"]
    assert "RuntimeError: boom" in (tmp_path / "index.html").read_text()
    with pytest.raises(RuntimeError, match="boom"):
        build_report(model, "cross_entropy", (X, y), tmp_path, quick=True, progress=False, strict=True,
                     sections=["trace"])
    with pytest.raises(ValueError, match="build_report: expected sections among"):
        build_report(model, "cross_entropy", (X, y), tmp_path, sections=["nope"], progress=False)
    with pytest.raises(ValueError, match="build_report: expected top_k ≥ 1"):
        build_report(model, "cross_entropy", (X, y), tmp_path, top_k=0, progress=False)
    with pytest.raises(TypeError, match=r"build_report: expected warnings as a list of strings, got 'untrained'\. "
                                        r"Pass e\.g\. warnings="):
        build_report(model, "cross_entropy", (X, y), tmp_path, warnings="untrained", progress=False)


def test_an_interrupted_report_keeps_the_sections_done(tmp_path, monkeypatch, capsys):
    """Issue 12: the report is written after every section; Ctrl-C keeps what is done."""
    from curvops.report import build

    model, X, y = demo_problem(num_samples=64, steps=50)

    def interrupted(ctx):
        raise KeyboardInterrupt

    monkeypatch.setitem(build._SECTION_FUNCS, "condition", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_report(model, "cross_entropy", (X, y), tmp_path, quick=True, progress=False,
                     sections=["eigenvalues", "trace", "condition", "rank"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary["sections"]) == ["overview", "eigenvalues", "trace"]
    assert all(s["status"] == "ok" for s in summary["sections"].values())
    assert summary["complete"] is False
    assert summary["warnings"][0] == ("The report is incomplete: the run stopped in the condition section "
                                      "(KeyboardInterrupt); not run: condition, rank.")
    assert summary["figures"]["eigenvalues"]["status"] == "ok" and (tmp_path / "eigenvalues.png").is_file()
    top = curvops.eigsh(curvops.Hessian(model, "cross_entropy", (X, y)), 5, which="LA", generator=gen(0))
    np.testing.assert_allclose(summary["sections"]["eigenvalues"]["hessian_top"]["eigenvalues"],
                               top.eigenvalues.flip(0).numpy(), rtol=1e-9)
    page = (tmp_path / "index.html").read_text()
    assert "The report is incomplete" in page and '<section id="trace">' in page
    assert '<section id="condition">' not in page
    check_report_html(tmp_path, summary)
    # the command line says where the finished sections are, and exits with 130
    out = tmp_path / "cli"
    rc = main(["report", str(out), "--quick", "--no-progress", "--sections", "trace,condition"])
    assert rc == 130
    assert f"interrupted; the sections done are in {out / 'index.html'}" in capsys.readouterr().err
    assert list(json.loads((out / "summary.json").read_text())["sections"]) == ["overview", "trace"]


def test_report_written_after_each_section_and_complete_at_the_end(tmp_path, monkeypatch):
    from curvops.report import build, summary as summary_module

    written = []

    def record(summary, outdir):
        written.append((list(summary["sections"]), summary["complete"], summary["warnings"][:1]))
        return write(summary, outdir)

    write = summary_module.write_summary
    monkeypatch.setattr(build, "write_summary", record)
    model, X, y = demo_problem(num_samples=64, steps=50)
    summary = build_report(model, "cross_entropy", (X, y), tmp_path, quick=True, progress=False,
                           sections=["trace", "stationary"])
    assert written == [
        (["overview"], False, ["The report is incomplete: 1 of 3 sections done; not run yet: trace, stationary "
                               "(the run was stopped, or is still going)."]),
        (["overview", "trace"], False, ["The report is incomplete: 2 of 3 sections done; not run yet: stationary "
                                        "(the run was stopped, or is still going)."]),
        (["overview", "trace", "stationary"], True, []),
    ]
    assert summary["complete"] is True and json.loads((tmp_path / "summary.json").read_text()) == summary


def test_progress_inside_a_section_counts_the_products(tmp_path, capsys):
    """Issue 12: a long section moves its own bar, one step per operator product (column)."""
    from curvops.report.context import Context

    model, X, y = demo_problem(num_samples=64, steps=50)
    ctx = Context(model, "cross_entropy", (X, y), params=None, batch_size=None, budgets_kw={}, seed=0, outdir=".",
                  strict=False, progress=True)
    V = torch.randn(ctx.num_params, 3, dtype=torch.float64, generator=gen(1))
    with ctx.steps("rank") as bar:
        HV = ctx.H @ V
        G = ctx.G.to_dense()
        assert bar.n == 3 + ctx.num_params
    torch.testing.assert_close(HV, curvops.Hessian(model, "cross_entropy", (X, y)) @ V)
    torch.testing.assert_close(G, curvops.GGN(model, "cross_entropy", (X, y)).to_dense())
    assert "rank" in capsys.readouterr().err
    torch.testing.assert_close(ctx.H @ V, HV)  # outside a section: counted nowhere
    # in a report: the sections' bar and, below it, the running section's products (on stderr)
    build_report(model, "cross_entropy", (X, y), tmp_path, quick=True, progress=True, sections=["trace"])
    err = capsys.readouterr().err
    assert "curvops report" in err and "  trace: " in err and "product" in err


def test_report_help_lists_the_sections_and_an_own_model_example(capsys):
    from curvops.cli import SECTION_HELP

    assert main(["report", "--help"]) == 0
    text = capsys.readouterr().out
    assert list(SECTION_HELP) == list(SECTIONS)
    for name, line in SECTION_HELP.items():
        assert re.search(rf"^  {name} +{re.escape(line)}$", text, re.M), name
    assert "curvops report out/ --model mymodel:factory --data mymodel:loader --loss cross_entropy" in text
    assert "def factory():" in text and "def loader():" in text and "--checkpoint model.pt" in text


def test_quick_float32_condition_and_rank_carry_their_status(tmp_path):
    """The Lanczos paths (quick budgets: k_max = 40 < 371 parameters) on a float32 model, the issue's case: the
    float32 cutoff λ₁·n·ε falls inside a smooth run of GGN eigenvalues, and the Hessian's rank exceeds k_max."""
    model, X, y = demo_problem(num_samples=128, steps=100, dtype=torch.float32)
    summary = build_report(model, "cross_entropy", (X, y), tmp_path, quick=True, progress=False, strict=True,
                           sections=["condition", "rank"])
    secs = summary["sections"]
    G, H = (warmed(Op(model, "cross_entropy", (X, y))) for Op in (curvops.GGN, curvops.Hessian))
    ref = curvops.rank(G, k_max=40, generator=gen(0))
    r, c = secs["rank"]["ggn"], secs["condition"]["ggn"]
    assert r["value"] == ref.value < 40 and r["above"] == ref.above and r["below"] == ref.below
    assert r["tol"] == pytest.approx(float(ref.values[0]) * 371 * torch.finfo(torch.float32).eps, rel=1e-6)
    assert r["below"] <= r["tol"] < r["above"] < 10 * r["tol"]  # no gap: the rank is an artifact of the cutoff
    assert r["status"] == "not well defined" and r["display"] == "not well defined at this precision"
    assert r["caveat"] == (f"no gap at the cutoff λ₁·n·ε = {fmt(r['tol'])}: λ{r['value']} = {fmt(r['above'])}, "
                           f"λ{r['value'] + 1} = {fmt(r['below'])}")
    assert c["value"] == "inf" and c["status"] == "numerically singular" and c["restricted_value"] is None
    assert c["caveat"] == f"numerically singular: {371 - r['value']} of 371 eigenvalues ≤ the rank cutoff {fmt(r['tol'])}"

    rh, ch = secs["rank"]["hessian"], secs["condition"]["hessian"]
    assert rh["lower_bound"] and rh["status"] == "lower bound" and rh["display"] == "≥ 40 of 371"
    assert rh["caveat"].startswith("a lower bound: all 40 computed values exceed the cutoff max|λ|·n·ε")
    # a lower-bound rank says nothing about κ: the eigensolver's figure stays, with its own status
    cref = curvops.cond(H, max_iters=150, generator=gen(0))
    assert ch["source"] == "eigensolver" and ch["status"] == cref.status == "infinite" and ch["display"] == "∞"
    floor = abs(cref.largest) / cref.zero_threshold
    assert f"≥ {fmt(floor)} for certain" in ch["caveat"] and floor > 1
    check_report_html(tmp_path, summary)


def test_a_failed_analysis_is_shown_in_the_console_the_html_and_the_summary(tmp_path, monkeypatch, capsys):
    """Issue 10: the report never drops a section silently."""
    def failing(*args, **kwargs):
        raise RuntimeError("quantile() q tensor must be same dtype as the input tensor")

    # the report calls the package-level function (curvops.analysis.active_subspace, the function)
    monkeypatch.setattr(curvops.analysis, "active_subspace", failing)
    out = tmp_path / "rep"
    rc = main(["report", str(out), "--quick", "--no-progress", "--sections", "trace,active_subspace"])
    assert rc == 1
    console = capsys.readouterr()
    message = "RuntimeError: quantile() q tensor must be same dtype as the input tensor"
    assert f"WARNING: The active_subspace section failed: {message}" in console.out
    assert f"active_subspace: FAILED ({message})" in console.out
    assert "sections failed: active_subspace" in console.err
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["sections"]) == ["overview", "trace", "active_subspace"]
    sec = summary["sections"]["active_subspace"]
    assert sec["status"] == "error" and sec["message"] == message and "in failing" in sec["traceback"]
    assert summary["sections"]["trace"]["status"] == "ok" and summary["failed_sections"] == ["active_subspace"]
    page = (out / "index.html").read_text()
    top = page.index('id="warnings"')
    assert top < page.index('class="cards"') < page.index('<section id="active_subspace">')
    assert htmllib.escape(message, quote=False) in page[top:page.index('class="cards"')]
    assert '<a href="#active_subspace">' in page[top:page.index('class="cards"')]
    section = page[page.index('<section id="active_subspace">'):]
    assert "This section failed: " + htmllib.escape(message, quote=False) in section and "<details>" in section
    check_report_html(out, summary)


# ---- the command line -----------------------------------------------------------------------------
def test_python_dash_m_curvops_quick(tmp_path):
    out = tmp_path / "rep"
    proc = subprocess.run([sys.executable, "-m", "curvops", "report", str(out), "--quick", "--no-progress",
                           "--sections", "eigenvalues,trace"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    top = summary["sections"]["eigenvalues"]["hessian_top"]["eigenvalues"]
    assert "Hessian top eigenvalues: " + " ".join(fmt(v) for v in top) in proc.stdout
    assert proc.stderr == ""  # --no-progress: nothing on stderr


def test_cli_usage_errors(tmp_path, capsys):
    assert main(["--version"]) == 0
    assert main([]) == 2
    assert main(["report", str(tmp_path / "a"), "--top-k", "0"]) == 2
    assert "--top-k: expected a positive integer" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "a"), "--sections", "eigenvalues,bogus"]) == 2
    assert "--sections: expected names among" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "a"), "--data", "m:f"]) == 2
    assert "--data: given without --model" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "a"), "--model", "m:f"]) == 2
    assert "--model: expected --data and --loss as well" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "a"), "--params", "nope"]) == 2
    assert "--params: expected names of the model's parameters" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


# ---- a user's model: factory, checkpoint, loader -------------------------------------------------
USER_MODULE = '''
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

def make_model():
    torch.manual_seed(123)  # the factory's own init; the checkpoint overwrites it
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 4)).double()

def make_wide():
    return nn.Sequential(nn.Linear(3, 9), nn.Tanh(), nn.Linear(9, 4)).double()

def make_longer():
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 4), nn.Linear(4, 4)).double()

def make_shorter():
    return nn.Sequential(nn.Linear(3, 8)).double()

def not_a_model():
    return 42

def broken_factory():
    raise RuntimeError("no GPU here")

def _xy():
    g = torch.Generator().manual_seed(7)
    X = torch.randn(40, 3, generator=g, dtype=torch.float64)
    return X, (X[:, 0] > 0).long() + 2 * (X[:, 1] > 0).long()

def load_data():
    return _xy()

def load_loader():
    X, y = _xy()
    return DataLoader(TensorDataset(X, y), batch_size=16)

def load_wrong_features():
    X, y = _xy()
    return torch.cat([X, X], dim=1), y

def load_bad_targets():
    X, y = _xy()
    return X, y + 10

def load_nothing():
    return "data"
'''


@pytest.fixture
def user(tmp_path, monkeypatch):
    name = f"user_mod_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    g = torch.Generator().manual_seed(0)
    ref = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    ckpt = tmp_path / "model.pt"
    torch.save(ref.state_dict(), ckpt)
    yield name, ckpt, ref
    sys.modules.pop(name, None)


def _user_args(name, ckpt, out, *extra, model="make_model", data="load_data", loss="cross_entropy"):
    args = ["report", str(out), "--model", f"{name}:{model}", "--data", f"{name}:{data}", "--loss", loss,
            "--no-progress", "--quick"]
    if ckpt is not None:
        args += ["--checkpoint", str(ckpt)]
    return args + list(extra)


def test_user_model_report_uses_the_checkpoint(user, tmp_path, capsys):
    name, ckpt, ref = user
    out = tmp_path / "user"
    assert main(_user_args(name, ckpt, out, "--top-k", "4")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert all(s["status"] == "ok" for s in summary["sections"].values()), summary["sections"]
    X = torch.randn(40, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    y = (X[:, 0] > 0).long() + 2 * (X[:, 1] > 0).long()
    with torch.no_grad():
        loss = float(nn.functional.cross_entropy(ref(X), y))
    assert summary["sections"]["overview"]["loss"] == pytest.approx(loss, rel=1e-12)
    H = curvops.Hessian(ref, "cross_entropy", (X, y))
    exact = torch.linalg.eigvalsh(H.to_dense()).flip(0)[:4]
    np.testing.assert_allclose(summary["sections"]["eigenvalues"]["hessian_top"]["eigenvalues"], exact.numpy(),
                               rtol=1e-5)
    assert summary["source"]["checkpoint"] == str(ckpt)
    assert summary["warnings"] == [] and "WARNING" not in capsys.readouterr().out  # trained weights: no warning
    check_report_html(out, summary)


def test_user_model_dataloader_params_float32_and_wrapped_checkpoint(user, tmp_path):
    name, ckpt, ref = user
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, wrapped)
    out = tmp_path / "user2"
    assert main(_user_args(name, wrapped, out, "--params", "2.weight,2.bias", "--dtype", "float32",
                           "--sections", "eigenvalues", data="load_loader")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["environment"]["dtype"] == "float32"
    assert summary["sections"]["overview"]["num_params"] == 8 * 4 + 4
    assert summary["settings"]["params"] == ["2.weight", "2.bias"]
    X = torch.randn(40, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    y = (X[:, 0] > 0).long() + 2 * (X[:, 1] > 0).long()
    H = curvops.Hessian(ref, "cross_entropy", (X, y), params=["2.weight", "2.bias"])
    exact = torch.linalg.eigvalsh(H.to_dense()).flip(0)[:5]
    np.testing.assert_allclose(summary["sections"]["eigenvalues"]["hessian_top"]["eigenvalues"], exact.numpy(),
                               rtol=1e-4)


def test_user_float32_model_with_bootstrap_and_no_checkpoint_has_every_section(user, tmp_path, capsys):
    """Issue 10: `--model` on a float32 model with the active-subspace bootstrap (crashed in torch.quantile, and
    the section went missing); without --checkpoint the report says it is on the factory's initial weights."""
    import importlib

    name, ckpt, ref = user
    out = tmp_path / "user32"
    assert main(_user_args(name, None, out, "--dtype", "float32")) == 0
    console = capsys.readouterr().out.splitlines()
    summary = json.loads((out / "summary.json").read_text())
    default = [s for s in SECTIONS if s != "active_subspace_prior"]  # off unless asked
    assert list(summary["sections"]) == default
    assert {k: v["status"] for k, v in summary["sections"].items()} == {k: "ok" for k in default}
    assert summary["environment"]["dtype"] == "float32" and summary["failed_sections"] == []
    # the bootstrap bands equal those of the same (initial) weights in float64, to float32 accuracy
    a = summary["sections"]["active_subspace"]
    assert a["bootstrap"] == summary["settings"]["budgets"]["subspace_bootstrap"] == 20
    model64 = importlib.import_module(name).make_model()
    X = torch.randn(40, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    y = (X[:, 0] > 0).long() + 2 * (X[:, 1] > 0).long()
    from curvops.analysis import active_subspace

    res = active_subspace(model64, "cross_entropy", (X, y), bootstrap=20, generator=gen(0))
    for key, attr in (("eigenvalues", "eigenvalues"), ("eigenvalue_lower", "eigenvalue_lower"),
                      ("eigenvalue_upper", "eigenvalue_upper")):
        np.testing.assert_allclose(a[key][:3], getattr(res, attr)[:3].numpy(), rtol=1e-4)
    assert all(lo <= v <= hi for lo, v, hi in zip(a["eigenvalue_lower"][:3], a["eigenvalues"][:3],
                                                  a["eigenvalue_upper"][:3]))
    # untrained weights: said at the top of the console, the page and the summary
    warning = summary["warnings"][0]
    assert warning.startswith(f"No --checkpoint: this report is on the weights that {name}:make_model returns")
    assert console[1] == f"  WARNING: {warning}"
    page = (out / "index.html").read_text()
    assert page.index(htmllib.escape(warning, quote=False)) < page.index('class="cards"')
    assert summary["source"]["checkpoint"] is None and "no --checkpoint" in summary["source"]["weights"]
    check_report_html(out, summary)


def test_load_problem_leaves_a_given_checkpoint_and_loads_it(user):
    name, ckpt, ref = user
    p = load_problem(model=f"{name}:make_model", data=f"{name}:load_data", loss="cross_entropy",
                     checkpoint=str(ckpt), params="0.weight, 0.bias")
    assert not p.model.training and p.params == ["0.weight", "0.bias"]
    for (k, a), b in zip(p.model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("case, match", [
    (dict(model="no_colon"), r"--model: expected a spec of the form 'pkg.module:name'"),
    (dict(model="bad spec:make_model"), r"--model: expected a spec of the form"),
    (dict(data="{name}:"), r"--data: expected a spec of the form"),
    (dict(model="curvops_no_such_module_xyz:f"), r"--model: expected an importable module, got "
                                                 r"'curvops_no_such_module_xyz'"),
    (dict(model="{name}:missing"), r"--model: expected module '.*' to define 'missing', but it has no attribute"),
    (dict(data="{name}:missing"), r"--data: expected module '.*' to define 'missing'"),
    (dict(model="{name}:not_a_model"), r"--model: expected '.*:not_a_model' to return a torch.nn.Module, got int"),
    (dict(model="{name}:broken_factory"), r"--model: calling broken_factory\(\) failed: RuntimeError: no GPU here"),
    (dict(checkpoint="{tmp}/missing.pt"), r"--checkpoint: expected an existing file, got '.*missing.pt' \(not found\)"),
    (dict(model="{name}:make_longer"), r"--checkpoint: expected the keys of the model's state_dict\(\), got "
                                       r"missing keys \['3.weight', '3.bias'\] in"),
    (dict(model="{name}:make_shorter"), r"--checkpoint: expected the keys of the model's state_dict\(\), got "
                                        r"unexpected keys \['2.weight', '2.bias'\] in"),
    (dict(model="{name}:make_wide"), r"--checkpoint: expected tensors shaped like the model's, got mismatched "
                                     r"shapes \(0.weight: checkpoint \(8, 3\) vs model \(9, 3\)"),
    (dict(checkpoint="{tmp}/garbage.pt"), r"--checkpoint: expected a file saved with torch.save"),
    (dict(checkpoint="{tmp}/list.pt"), r"--checkpoint: expected a state dict"),
    (dict(data="{name}:load_wrong_features"), r"--data: expected inputs the model accepts, but the model failed on "
                                              r"the first sample \(input shape \(1, 6\) float64\)"),
    (dict(data="{name}:load_bad_targets"), r"--loss: expected targets that fit 'cross_entropy'.*class targets"),
    (dict(data="{name}:load_nothing"), r"--data: expected '.*:load_nothing' to return \(X, y\) tensors or a torch "
                                       r"DataLoader, got a str"),
    (dict(loss="hinge"), r"--loss: expected one of \['mse', 'cross_entropy', 'bce_with_logits', 'causal_lm', 'token_cross_entropy'\], got 'hinge' "
                         r"\(unknown loss\)"),
    (dict(params="0.weight,nope"), r"--params: expected names of the model's parameters, got unknown \['nope'\]"),
    (dict(dtype="float16"), r"--dtype: expected one of \['float32', 'float64'\], got 'float16'"),
    (dict(batch_size=8, data="{name}:load_loader"), r"--batch-size: applies to data returned as \(X, y\)"),
])
def test_loading_errors(user, tmp_path, capsys, case, match):
    name, ckpt, ref = user
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    kw = dict(model=f"{name}:make_model", data=f"{name}:load_data", loss="cross_entropy", checkpoint=str(ckpt))
    kw.update({k: v.format(name=name, tmp=tmp_path) if isinstance(v, str) else v for k, v in case.items()})
    with pytest.raises((ValueError, TypeError, ImportError, OSError), match=match):
        load_problem(**kw)
    # the command: the message on stderr, no traceback, exit status 2, nothing written
    out = tmp_path / "never"
    args = ["report", str(out), "--model", kw["model"], "--data", kw["data"], "--loss", kw["loss"],
            "--checkpoint", kw["checkpoint"], "--no-progress"]
    for opt in ("params", "dtype", "batch_size"):
        if opt in kw:
            args += [f"--{opt.replace('_', '-')}", str(kw[opt])]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("curvops report: error: ") and re.search(match, err) and "Traceback" not in err
    assert not out.exists()


def test_parse_spec_and_file_specs(tmp_path):
    assert parse_spec("a.b.c:make.build", "--model") == ("a.b.c", "make.build")
    with pytest.raises(SpecError, match="--model: expected a spec"):
        parse_spec("a.b", "--model")
    f = tmp_path / "models_file.py"
    f.write_text("import torch\nfrom torch import nn\n\ndef make():\n    return nn.Linear(2, 3).double()\n\n"
                 "def data():\n    return torch.zeros(5, 2).double(), torch.zeros(5, 3).double()\n")
    p = load_problem(model=f"{f}:make", data=f"{f}:data", loss="mse")
    assert isinstance(p.model, nn.Linear)
    with pytest.raises(FileNotFoundError, match="--model: expected an existing Python file"):
        load_problem(model=f"{tmp_path}/nope.py:make", data=f"{f}:data", loss="mse")


def test_cli_active_subspace_prior_option(tmp_path, capsys):
    """--active-subspace-prior turns the optional section on (its numbers are checked against a naive
    per-draw loop in tests/test_active_subspace_prior.py); a bad value is a usage error before any work."""
    out = tmp_path / "prior"
    rc = main(["report", str(out), "--no-progress", "--quick", "--sections", "active_subspace_prior",
               "--active-subspace-prior", "around:0.1"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["active_subspace_prior"] == "around:0.1"
    assert summary["sections"]["active_subspace_prior"]["status"] == "ok"
    assert "active_subspace_prior" in (out / "index.html").read_text() or "prior" in (out / "index.html").read_text()
    capsys.readouterr()
    assert main(["report", str(tmp_path / "bad"), "--active-subspace-prior", "laplace"]) == 2
    assert "--active-subspace-prior" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_console_script_is_installed():
    import shutil

    exe = shutil.which("curvops")
    if exe is None:
        pytest.skip("the curvops console script is not installed (pip install -e .)")
    proc = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"curvops {curvops.__version__}"
