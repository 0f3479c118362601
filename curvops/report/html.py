"""The report page: one self-contained HTML file rendered from the summary dict alone.

:func:`render_html` is a pure function of the summary (as stored in ``summary.json``), so every
number on the page is a number of the summary, formatted by :func:`fmt`; the static text has no
digits of its own.  The page needs nothing from the network and runs no script: inline CSS,
system fonts, figures as ``<img>`` with paths relative to the report directory.
"""

from __future__ import annotations

import html
import os
from typing import Any, Callable

_CSS = """
:root { --fg: #1d2330; --muted: #5b6475; --line: #dde1e8; --accent: #2c5d9e; --bg: #f6f7f9;
        --ok: #1f7a4d; --warn: #9a6200; --bad: #a12a2a; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       color: var(--fg); background: var(--bg); }
header { background: #14243d; color: #fff; padding: 20px 32px; }
header h1 { margin: 0 0 4px; font-size: 24px; }
header p { margin: 2px 0; color: #c9d3e3; font-size: 13px; }
main { max-width: 1120px; margin: 0 auto; padding: 16px 32px 48px; }
nav { font-size: 13px; margin: 8px 0 16px; display: flex; flex-wrap: wrap; row-gap: 4px; }
nav a { color: var(--accent); margin-right: 12px; text-decoration: none; white-space: nowrap; }
section { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 16px 22px;
          margin: 16px 0; }
section { overflow-x: auto; }
section h2 { margin: 0 0 6px; font-size: 19px; }
section h3 { margin: 14px 0 6px; font-size: 15px; }
p.note { color: var(--muted); margin: 4px 0 10px; font-size: 14px; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr)); gap: 10px; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 10px 12px; }
.card .label { color: var(--muted); font-size: 12px; }
.card .value { font-size: 19px; font-weight: 600; font-variant-numeric: tabular-nums; }
table { border-collapse: collapse; margin: 6px 0 10px; font-size: 13.5px; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #f0f2f5; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; font-family: ui-monospace, Menlo, Consolas, monospace; }
figure { margin: 10px 0; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; }
figcaption { color: var(--muted); font-size: 13px; }
.status { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px; color: #fff; }
.status.ok { background: var(--ok); } .status.skipped { background: #6b7280; }
.status.pending { background: var(--warn); } .status.error { background: var(--bad); }
.box { border-left: 4px solid var(--warn); background: #fff8e8; padding: 8px 12px; margin: 8px 0; }
.box.error { border-color: var(--bad); background: #fdeeee; }
.verdict { font-size: 18px; font-weight: 600; }
p.caveat { margin: 4px 0; font-size: 14px; }
.box ul { margin: 6px 0; padding-left: 20px; }
pre { white-space: pre-wrap; font-size: 12px; }
.timing { color: var(--muted); font-size: 12px; float: right; }
.flex { display: flex; flex-wrap: wrap; gap: 20px; align-items: flex-start; }
.flex > div { flex: 1 1 280px; min-width: 0; }
footer { color: var(--muted); font-size: 12px; text-align: center; padding: 16px; }
"""

_TITLES = {
    "overview": "Model and data",
    "eigenvalues": "Extremal eigenvalues",
    "hessian_matrix": "The Hessian as a matrix",
    "density": "Spectral density",
    "trace": "Trace",
    "condition": "Condition number",
    "rank": "Numerical rank",
    "stationary": "Stationary point",
    "ntk": "Neural tangent kernel",
    "active_subspace": "Active subspace",
    "active_subspace_prior": "Active subspace over a parameter prior",
    "landscape": "Loss landscape",
    "architecture": "Architecture",
}

_NOTES = {
    "overview": "The parameters measured, the loss over the whole data set and its gradient at these parameters.",
    "eigenvalues": "Eigenvalues of the Hessian and of the generalized Gauss-Newton matrix (GGN) by Lanczos: "
                   "the largest first, and the most negative of the Hessian. The Hessian is the GGN plus a "
                   "residual term weighted by the loss gradient with respect to the outputs; near a good fit "
                   "the two agree at the top of the spectrum.",
    "hessian_matrix": "Every entry of the Hessian, parameters in layout order (tensor by tensor).",
    "density": "The density of eigenvalues estimated by stochastic Lanczos quadrature, smoothed by a Gaussian.",
    "trace": "The sum of all eigenvalues, estimated from products with random vectors (XTrace).",
    "condition": "The ratio of the largest to the smallest eigenvalue magnitude, with what it rests on: a "
                 "converged eigensolve, a lower bound from one that stopped early, or all eigenvalues. An "
                 "operator with eigenvalues below the numerical rank cutoff is singular to working precision.",
    "rank": "How many eigenvalues exceed the cutoff (largest magnitude times size times machine epsilon, unless "
            "stated), with the eigenvalues just above and below it. The count is a fact only when the cutoff "
            "falls in a clear gap; where the spectrum decays smoothly through it, the rank is not well defined "
            "at this precision.",
    "stationary": "The gradient norm decides whether this is a stationary point; the signs of the extremal "
                  "Hessian eigenvalues decide its kind.",
    "ntk": "The empirical neural tangent kernel of a subset of the inputs: the Gram matrix of the output "
           "Jacobian rows, one row per sample and output.",
    "active_subspace": "Eigenvalues of the uncentered covariance of per-sample loss gradients and how the "
                       "dominant directions split over the layers.",
    "active_subspace_prior": "Eigenvalues of E[∇L(θ)∇L(θ)ᵀ] over parameter draws θ from a prior (the loss on the "
                             "active-subspace data subset), where the top directions live, and how the estimate "
                             "moves as the number of draws grows (against the estimate from all draws).",
    "landscape": "The loss along the top Hessian eigenvectors and on the plane spanned by the top two.",
    "architecture": "The network drawn as vectors (strips) and matrices (blocks), and its layers.",
}


# ---- formatting -------------------------------------------------------------------------------------
def fmt(x) -> str:
    """How a summary value is printed: integers as is, floats to four significant digits,
    ``"inf"``/``"nan"`` as ∞/NaN, booleans as yes/no, ``None`` as a dash; strings escaped."""
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return f"{x:.4g}"
    if x in ("inf", "-inf", "nan"):
        return {"inf": "∞", "-inf": "−∞", "nan": "NaN"}[x]
    return html.escape(str(x))


def _shape(shape) -> str:
    return " × ".join(fmt(s) for s in shape) if shape else "scalar"


def _table(header: list[str], rows: list[list[str]], numeric: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(r))
        + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _kv(pairs: list[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr><th>{k}</th><td class=\"num\">{v if isinstance(v, _Raw) else fmt(v)}</td></tr>"
                   for k, v in pairs)
    return f"<table><tbody>{rows}</tbody></table>"


class _Raw(str):
    """Already-rendered HTML."""


def _figure(summary: dict, key: str) -> str:
    fig = summary.get("figures", {}).get(key)
    if not fig:
        return ""
    caption = html.escape(fig.get("caption", ""))
    if fig.get("file"):
        src = html.escape(fig["file"], quote=True)
        return f'<figure><img src="{src}" alt="{caption}"><figcaption>{caption}</figcaption></figure>'
    cls = "error" if fig.get("status") == "error" else ""  # a pending or failed figure
    return (f'<div class="box {cls}">Figure not drawn ({fmt(fig.get("status"))}): '
            f'{fmt(fig.get("message"))}</div>')


def _sec(summary: dict, name: str) -> dict:
    return summary.get("sections", {}).get(name) or {}


# ---- sections -----------------------------------------------------------------------------------------
def _overview(s: dict, summary: dict) -> str:
    rows = [[html.escape(t["name"]), _shape(t["shape"]), fmt(t["numel"]), fmt(t["grad_norm"])] for t in s["tensors"]]
    return (_kv([("model", s["model_class"]), ("parameters measured", s["num_params"]),
                 ("parameters in the model", s["num_params_total"]), ("parameter tensors", s["num_tensors"]),
                 ("samples", s["num_samples"]), ("loss function", s["loss_name"]), ("reduction", s["reduction"]),
                 ("loss", s["loss"]), ("gradient norm", s["grad_norm"])])
            + "<h3>Parameter tensors</h3>" + _table(["name", "shape", "entries", "gradient norm"], rows, {2, 3}))


def _eig_block(title: str, e: dict) -> str:
    rows = [[fmt(v), fmt(r)] for v, r in zip(e["eigenvalues"], e["residuals"])]
    meta = (f'<p class="note">which = {fmt(e["which"])}, k = {fmt(e["k"])}, tolerance {fmt(e["tol"])} relative '
            f'to the {fmt(e["relative_to"])}; {fmt(e["num_matvecs"])} products, converged: {fmt(e["converged"])}.</p>')
    return f"<div><h3>{title}</h3>{meta}{_table(['eigenvalue', 'residual'], rows, {0, 1})}</div>"


def _eigenvalues(s: dict, summary: dict) -> str:
    return ('<div class="flex">' + _eig_block("Hessian, top", s["hessian_top"])
            + _eig_block("Hessian, most negative", s["hessian_bottom"]) + _eig_block("GGN, top", s["ggn_top"])
            + "</div>" + _figure(summary, "eigenvalues"))


def _hessian_matrix(s: dict, summary: dict) -> str:
    if not s.get("shown"):
        return (f'<p class="note">Not drawn: the model has {fmt(s["size"])} parameters, above the limit of '
                f'{fmt(s["max_params"])} for a dense Hessian.</p>')
    return (_kv([("size", s["size"]), ("largest entry magnitude", s["max_abs_entry"]),
                 ("Frobenius norm", s["frobenius_norm"]), ("relative asymmetry", s["symmetry_error"])])
            + _figure(summary, "hessian_matrix"))


def _density(s: dict, summary: dict) -> str:
    rows = [[name, fmt(d["node_min"]), fmt(d["node_max"]), fmt(d["sigma"]), fmt(d["num_probes"]),
             fmt(d["num_steps"]), fmt(d["num_matvecs"])] for name, d in (("Hessian", s["hessian"]), ("GGN", s["ggn"]))]
    return (_table(["matrix", "lowest node", "highest node", "broadening", "probes", "Lanczos steps", "products"],
                   rows, {1, 2, 3, 4, 5, 6}) + _figure(summary, "density"))


def _trace(s: dict, summary: dict) -> str:
    rows = [[name, fmt(d["value"]), fmt(d["stderr"]), fmt(d["method"]), fmt(d["num_matvecs"])]
            for name, d in (("Hessian", s["hessian"]), ("GGN", s["ggn"]))]
    return _table(["matrix", "trace", "standard error", "method", "products"], rows, {1, 2, 4})


def _condition(s: dict, summary: dict) -> str:
    rows = [[name, fmt(d["display"]), fmt(d["status"]), fmt(d["largest"]), fmt(d["smallest"]), fmt(d["kind"]),
             fmt(d["num_matvecs"]), fmt(d["converged"])] for name, d in (("GGN", s["ggn"]), ("Hessian", s["hessian"]))]
    notes = "".join(f'<p class="caveat"><b>{name}:</b> {fmt(d["note"])}</p>'
                    for name, d in (("GGN", s["ggn"]), ("Hessian", s["hessian"])))
    return _table(["matrix", "condition number", "status", "largest (eigensolver)", "smallest (eigensolver)",
                   "formula", "products", "converged"], rows, {1, 3, 4, 6}) + notes


def _rank(s: dict, summary: dict) -> str:
    def sym(d, k):
        return f'{fmt(d["symbol"])}<sub>{fmt(k)}</sub>'

    rows = [[name, fmt(d["display"]), fmt(d["status"]), fmt(d["tol"]), fmt(d["tol_rule"]),
             (f'{sym(d, d["value"])} = {fmt(d["above"])}' if d["value"] > 0 else "—"),
             (f'{sym(d, d["value"] + 1)} = {fmt(d["below"])}' if d["below"] not in ("nan", None) else "—"),
             fmt(d["method"]), fmt(d["num_matvecs"])] for name, d in (("GGN", s["ggn"]), ("Hessian", s["hessian"]))]
    notes = "".join(f'<p class="caveat"><b>{name}:</b> {fmt(d["note"])}</p>'
                    for name, d in (("GGN", s["ggn"]), ("Hessian", s["hessian"])))
    return _table(["matrix", "rank", "status", "cutoff", "cutoff rule", "just above", "just below", "method",
                   "products"], rows, {3, 5, 6, 8}) + notes


def _stationary(s: dict, summary: dict) -> str:
    kind = fmt(s["kind"]).replace("_", " ")
    return (f'<p class="verdict">{kind}</p><p>{fmt(s["explanation"])}</p>'
            + _kv([("curvature says", s["curvature"]), ("smallest eigenvalue", s["lambda_min"]),
                   ("largest eigenvalue", s["lambda_max"]), ("gradient norm", s["grad_norm"]),
                   ("gradient threshold", s["grad_tol"]), ("zero threshold", s["zero_threshold"]),
                   ("products", s["num_matvecs"]), ("converged", s["converged"])]))


def _ntk(s: dict, summary: dict) -> str:
    pairs = [("inputs", s["num_inputs"]), ("outputs per input", s["num_outputs"]), ("kernel size", s["size"]),
             ("method", s["method"]), ("largest eigenvalue", s["largest"]), ("smallest eigenvalue", s["smallest"])]
    if s.get("complete"):
        pairs += [("trace", s["trace"]), ("effective rank (trace over largest)", s["effective_rank"]),
                  (_Raw(f"share of the top {fmt(s['top_k'])} in the trace"), s["top_k_share"])]
    shown = s["eigenvalues"][: summary["settings"]["budgets"]["top_k"]]
    return (_kv(pairs) + "<h3>Largest eigenvalues</h3>" + _table(["eigenvalue"], [[fmt(v)] for v in shown], {0})
            + _figure(summary, "ntk"))


def _active_subspace(s: dict, summary: dict) -> str:
    pairs = [("samples", s["num_samples"]), ("parameters", s["num_params"]),
             ("samples per parameter", s["samples_per_param"]), ("eigenpairs", s["k"]),
             ("algorithm", s["algorithm"]), ("converged", s["converged"]), ("trace", s["trace"]),
             (_Raw(f"share of the top {fmt(s['top_k'])} in the trace"), s["top_k_share"]),
             ("largest ratio of consecutive eigenvalues (top directions), after direction", s["largest_gap_after"]),
             ("that ratio", s["largest_gap_ratio"]), ("bootstrap replicates", s["bootstrap"])]
    if s["bootstrap"]:
        pairs += [("confidence of the intervals", s["confidence"]),
                  ("bootstrap subspace distance at that dimension", s["subspace_distance_at_gap"])]
    n = len(s["directions"])
    lower, upper = s.get("eigenvalue_lower"), s.get("eigenvalue_upper")
    rows = [[fmt(d), fmt(s["eigenvalues"][i])] + ([fmt(lower[i]), fmt(upper[i])] if lower else [])
            for i, d in enumerate(s["directions"])]
    head = ["direction", "eigenvalue"] + (["lower", "upper"] if lower else [])
    sens = s["layer_sensitivity"]
    shown = s["directions"][: min(n, 8)]
    srows = [[html.escape(name)] + [fmt(f[i]) for i in range(len(shown))]
             for name, f in zip(sens["names"], sens["fractions"])]
    return (_kv(pairs) + '<div class="flex"><div><h3>Leading eigenvalues</h3>'
            + _table(head, rows, set(range(1, len(head)))) + "</div><div>"
            + _figure(summary, "active_subspace_decay") + "</div></div>"
            + "<h3>Share of each direction in each tensor</h3>"
            + _table(["tensor"] + [f"direction {fmt(d)}" for d in shown], srows, set(range(1, len(shown) + 1)))
            + '<div class="flex"><div>' + _figure(summary, "layer_sensitivity") + "</div><div>"
            + _figure(summary, "active_subspace_eigenvectors") + "</div></div>")


def _active_subspace_prior(s: dict, summary: dict) -> str:
    pairs = [("prior", s["prior_description"]), ("parameter draws N", s["num_draws"]),
             ("data samples in the loss", s["num_data"]), ("parameters", s["num_params"]),
             ("draws per parameter", s["draws_per_param"]), ("eigenpairs", s["k"]), ("algorithm", s["algorithm"]),
             ("converged", s["converged"])]
    rows = [[fmt(d), fmt(v)] for d, v in zip(s["directions"], s["eigenvalues"])]
    m = s["layer_mass"]
    mrows = [[html.escape(n), fmt(c), fmt(a), fmt(b)] for n, c, a, b in
             zip(m["names"], m["numels"], m["share"], m["share_per_size"])]
    c = s["convergence"]
    crows = [[fmt(n), fmt(a), fmt(b), fmt(e1), fmt(em)] for n, a, b, e1, em in
             zip(c["sample_sizes"], c["distance_top1"], c["distance_topk"], c["eigenvalue_error_top1"],
                 c["eigenvalue_error_max"])]
    return (_kv(pairs) + '<div class="flex"><div><h3>Leading eigenvalues</h3>'
            + _table(["direction", "eigenvalue"], rows, {1}) + "</div><div>"
            + _figure(summary, "active_subspace_prior_decay") + "</div></div>"
            + f"<h3>Mass of the top {fmt(s['k'])} directions per tensor</h3>"
            + _table(["tensor", "entries", "share", "share / size share"], mrows, {1, 2, 3})
            + _figure(summary, "active_subspace_prior_layers")
            + f"<h3>Convergence in the number of draws (against {fmt(c['reference'])})</h3>"
            + _table(["draws", "distance, top 1", f"distance, top {fmt(s['k'])}", "λ₁ rel. error",
                      "max rel. error"], crows, {0, 1, 2, 3, 4})
            + '<p class="note">Distance: the sine of the largest principal angle between the subspaces. '
              "Distances near 1 mean the draws do not yet determine those directions.</p>")


def _landscape(s: dict, summary: dict) -> str:
    rows = [[fmt(c["label"]), fmt(c["eigenvalue"]), fmt(c["curvature_from_curve"]), fmt(c["loss_min"]),
             fmt(c["loss_max"])] for c in s["curves"]]
    out = (_kv([("loss at the current point", s["base_loss"]), ("step range (±)", s["radius"]),
                ("range rule", s["radius_rule"]), ("parameter norm", s["param_norm"])])
           + "<h3>Along single eigenvectors</h3>"
           + _table(["direction", "eigenvalue", "second difference at zero", "lowest loss", "highest loss"],
                    rows, {1, 2, 3, 4})
           + '<p class="note">Near a minimum the second difference of the curve at zero equals the '
             "eigenvalue: where they differ, the quadratic model stops holding.</p>"
           + _figure(summary, "landscape_1d"))
    p = s.get("plane")
    if p:
        out += ("<h3>On the plane of the top two</h3>"
                + _kv([("lowest loss", p["loss_min"]), ("highest loss", p["loss_max"]),
                       ("grid points evaluated", p["num_evaluations"])]) + _figure(summary, "landscape_2d"))
    return out


def _params_text(shapes: dict) -> str:
    return ", ".join(f"{html.escape(k)}: {_shape(v)}" for k, v in (shapes or {}).items()) or "—"


def _architecture(s: dict, summary: dict) -> str:
    rows = [[fmt(r["name"]) or "(root)", fmt(r["type"]), fmt(r["kind"]),
             _shape(r["input_shape"]) if r["input_shape"] is not None else "—",
             _shape(r["output_shape"]) if r["output_shape"] is not None else "—",
             _params_text(r["param_shapes"]), fmt(r["num_params"])] for r in s["layers"]]
    return (_figure(summary, "architecture") + "<h3>Layers in call order</h3>"
            + _table(["module", "type", "kind", "input shape", "output shape", "parameters", "entries"], rows, {6}))


def _generic(s: dict, summary: dict) -> str:
    pairs = [(html.escape(k), v) for k, v in s.items() if k != "status" and isinstance(v, (int, float, str, bool))]
    return _kv(pairs)


_RENDER: dict[str, Callable[[dict, dict], str]] = {
    "overview": _overview, "eigenvalues": _eigenvalues, "hessian_matrix": _hessian_matrix, "density": _density,
    "trace": _trace, "condition": _condition, "rank": _rank, "stationary": _stationary, "ntk": _ntk,
    "landscape": _landscape, "architecture": _architecture, "active_subspace": _active_subspace,
    "active_subspace_prior": _active_subspace_prior,
}


def _section(name: str, s: dict, summary: dict) -> str:
    title = _TITLES.get(name, html.escape(name))
    status = s.get("status", "ok")
    timing = summary.get("timings", {}).get(name)
    head = (f'<h2>{title} <span class="status {status}">{status}</span>'
            + (f'<span class="timing">{fmt(timing)} s</span>' if timing is not None else "") + "</h2>")
    note = f'<p class="note">{_NOTES.get(name, "")}</p>'
    if status != "ok":
        cls = "error" if status == "error" else ""
        said = "failed" if status == "error" else f"{status}"
        trace = (f'<details><summary>traceback</summary><pre>{fmt(s["traceback"])}</pre></details>'
                 if s.get("traceback") else "")
        return (f'<section id="{name}">{head}{note}<div class="box {cls}">This section {"is " * (status != "error")}'
                f'{said}: {fmt(s.get("message"))}{trace}</div></section>')
    body = _RENDER.get(name, _generic)(s, summary)
    return f'<section id="{name}">{head}{note}{body}</section>'


def _cards(summary: dict) -> str:
    secs = summary.get("sections", {})
    ok = {k: v for k, v in secs.items() if v.get("status") == "ok"}
    items = []
    if "overview" in ok:
        o = ok["overview"]
        items += [("parameters", o["num_params"]), ("loss", o["loss"]), ("gradient norm", o["grad_norm"])]
    if "eigenvalues" in ok:
        e = ok["eigenvalues"]
        items += [("largest Hessian eigenvalue", e["hessian_top"]["eigenvalues"][0]),
                  ("smallest Hessian eigenvalue", e["hessian_bottom"]["eigenvalues"][0]),
                  ("largest GGN eigenvalue", e["ggn_top"]["eigenvalues"][0])]
    if "trace" in ok:
        items.append(("Hessian trace", ok["trace"]["hessian"]["value"]))
    if "condition" in ok:
        c = ok["condition"]["ggn"]
        items.append(("GGN condition number", _Raw(fmt(c["display"])), c["status"]))
    if "rank" in ok:
        r = ok["rank"]["ggn"]
        items.append(("GGN rank", _Raw(fmt(r["display"]) if r["well_defined"] or r["lower_bound"] else "—"),
                      r["status"]))
    if "stationary" in ok:
        items.append(("point", _Raw(fmt(ok["stationary"]["kind"]).replace("_", " "))))
    if "ntk" in ok:
        items.append(("largest NTK eigenvalue", ok["ntk"]["largest"]))
    cards = "".join(f'<div class="card"><div class="label">{item[0]}</div>'
                    f'<div class="value">{item[1] if isinstance(item[1], _Raw) else fmt(item[1])}</div>'
                    + (f'<div class="label">{fmt(item[2])}</div>' if len(item) > 2 else "") + "</div>"
                    for item in items)
    return f'<div class="cards">{cards}</div>'


def _warnings(summary: dict) -> str:
    """The warnings of the summary (untrained weights, failed sections, undrawn figures), at the top of the page."""
    items = summary.get("warnings") or []
    if not items:
        return ""
    failed = summary.get("failed_sections") or []
    cls = "box error" if failed else "box"
    links = "".join(f' <a href="#{html.escape(n, quote=True)}">{_TITLES.get(n, html.escape(n))}</a>' for n in failed)
    rows = "".join(f"<li>{fmt(w)}</li>" for w in items)
    return (f'<div class="{cls}" id="warnings"><b>Read this first.</b><ul>{rows}</ul>'
            + (f"<p>Failed sections:{links}</p>" if failed else "") + "</div>")


def _settings(summary: dict) -> str:
    env, st = summary.get("environment", {}), summary.get("settings", {})
    pairs = [(html.escape(k), v) for k, v in env.items()]
    pairs += [("quick", st.get("quick")), ("seed", st.get("seed")), ("random generators", st.get("generator")),
              ("batch size", st.get("batch_size"))]
    pairs += [(html.escape(f"budget: {k}"), v) for k, v in st.get("budgets", {}).items()]
    timings = [[_TITLES.get(k, html.escape(k)), fmt(v)] for k, v in summary.get("timings", {}).items()]
    return (f'<section id="settings"><h2>Settings and environment</h2>{_kv(pairs)}'
            f'<h3>Timings (seconds)</h3>{_table(["section", "seconds"], timings, {1})}</section>')


def render_html(summary: dict) -> str:
    """The report page for a summary dict (the content of ``summary.json``)."""
    env, st, src = summary.get("environment", {}), summary.get("settings", {}), summary.get("source", {})
    sections = summary.get("sections", {})
    source = "; ".join(f"{html.escape(str(k))}: {fmt(v)}" for k, v in src.items() if v is not None)
    nav = "".join(f'<a href="#{n}">{_TITLES.get(n, html.escape(n))}</a>' for n in sections) \
        + '<a href="#settings">Settings</a>'
    body = "".join(_section(n, s, summary) for n, s in sections.items())
    total = summary.get("timings", {}).get("total")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{fmt(summary.get('title', 'curvops report'))}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>{fmt(summary.get('title', 'curvops report'))}</h1><p>{source}</p>"
        f"<p>curvops {fmt(env.get('curvops_version'))} · torch {fmt(env.get('torch_version'))} · "
        f"{fmt(env.get('device'))} · {fmt(env.get('dtype'))} · seed {fmt(st.get('seed'))}"
        f"{' · quick' if st.get('quick') else ''} · {fmt(total)} s</p></header>"
        f"<main><nav>{nav}</nav>{_warnings(summary)}{_cards(summary)}{body}{_settings(summary)}</main>"
        "<footer>Generated by curvops report. Every number on this page is in summary.json.</footer>"
        "</body></html>\n"
    )


def write_html(summary: dict, outdir) -> str:
    """Write ``index.html`` for ``summary`` into ``outdir``; return its path."""
    path = os.path.join(outdir, "index.html")
    with open(path + ".tmp", "w", encoding="utf-8") as fh:  # renamed when complete: never a truncated page
        fh.write(render_html(summary))
    os.replace(path + ".tmp", path)
    return path
