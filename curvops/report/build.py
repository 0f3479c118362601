r"""The curvature report: computations → one JSON-able summary dict → figures and HTML.

:func:`build_report` measures a model at its current parameters, section by section (see
:data:`SECTIONS`), with the library's own algorithms:

* overview — parameter count and per-tensor shapes, loss $L(\theta)$, ‖∇L‖ (per tensor too);
* extremal eigenvalues of the Hessian $H = \nabla^2_\theta L$ (top ``top_k`` and the most
  negative) and of the GGN $G = J^\top H_\ell J$ (:func:`~curvops.eigsh`), and the Hessian itself
  as a heat map when it is small;
* spectral densities of H and G (stochastic Lanczos quadrature, :func:`~curvops.spectral_density`);
* traces (:func:`~curvops.trace`, XTrace), condition numbers (:func:`~curvops.cond`), numerical
  ranks (:func:`~curvops.rank`), the stationary-point verdict
  (:func:`~curvops.classify_stationary_point`);
* the spectrum of the empirical NTK $K = J J^\top$ on a subset of the inputs (:class:`~curvops.NTK`);
* the active subspace of the per-sample loss gradients (eigenvalue decay with bootstrap bands,
  per-layer sensitivity, eigenvector magnitudes;
  :func:`~curvops.analysis.active_subspace.active_subspace`);
* the loss along the top Hessian eigenvectors (1-D curves) and on the plane of the top two;
* the architecture (a strip/block drawing and a table).

Every number shown in ``index.html`` is a value of the summary (the HTML is rendered from the
summary alone, see :mod:`curvops.report.html`), which is also written as ``summary.json``.
Randomized steps are reproducible: each randomized call gets a fresh ``torch.Generator`` on the
model's device seeded with ``seed``, so a direct library call with the same arguments and
``generator=torch.Generator().manual_seed(seed)`` returns the same numbers.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

#: section keys, in the order they run and appear
SECTIONS = ("overview", "eigenvalues", "hessian_matrix", "density", "trace", "condition", "rank", "stationary",
            "ntk", "active_subspace", "landscape", "architecture")

SUMMARY_FILE = "summary.json"
HTML_FILE = "index.html"


# ---- budgets --------------------------------------------------------------------------------------
@dataclass
class Budgets:
    """How much work each section does (recorded in the summary; ``--quick`` lowers them).

    Attributes:
        top_k: eigenpairs from the top of the Hessian and GGN spectra (and of the NTK when it is
            too large to decompose densely).
        k_negative: eigenpairs from the bottom of the Hessian spectrum.
        eig_tol: eigensolver tolerance (relative to each eigenvalue at the top; relative to ‖H‖
            at the bottom, where eigenvalues near zero have no relative accuracy).
        density_probes, density_steps, density_points: SLQ probes, Lanczos steps, grid points.
        trace_matvecs: products per trace estimate (XTrace).
        cond_max_iters: Lanczos steps cap of each condition-number eigensolve (None: default).
        rank_k_max: largest rank that can be certified (the whole size: exact dense path).
        heatmap_max_params: draw the dense Hessian only up to this many parameters.
        ntk_samples: inputs of the NTK subset (the first ones of the data).
        ntk_dense_max: NTK sizes up to this are decomposed densely (all eigenvalues).
        subspace_samples: samples of the active-subspace estimate (the first ones of the data).
        subspace_k: leading active directions analysed (layer sensitivity, gaps, bootstrap distances).
        subspace_all_max: all min(N, P) active-subspace eigenpairs when that is at most this,
            else the top ``subspace_k``.
        subspace_bootstrap: bootstrap replicates of the active subspace.
        subspace_heatmap_columns: eigenvectors drawn in the eigenvector heat map.
        landscape_directions: top Hessian eigenvectors the loss is traced along.
        landscape_points: points per 1-D curve.
        landscape_grid: points per side of the 2-D plane.
        landscape_radius: the curves and plane span [-r, r] in units of the (unit) eigenvectors;
            ``None``: r = sqrt(8·max(L, 0.01)/λ₁) (the quadratic model's loss rises by 4·max(L, 0.01)
            at the edge along the top eigenvector), capped at ‖θ‖.
    """

    top_k: int = 10
    k_negative: int = 5
    eig_tol: float = 1e-6
    density_probes: int = 10
    density_steps: int = 80
    density_points: int = 400
    trace_matvecs: int = 100
    cond_max_iters: int | None = None
    rank_k_max: int = 100
    heatmap_max_params: int = 1000
    ntk_samples: int = 64
    ntk_dense_max: int = 1500
    subspace_samples: int = 512
    subspace_k: int = 20
    subspace_all_max: int = 512
    subspace_bootstrap: int = 50
    subspace_heatmap_columns: int = 200
    landscape_directions: int = 3
    landscape_points: int = 41
    landscape_grid: int = 21
    landscape_radius: float | None = None

    @classmethod
    def make(cls, num_params: int, *, quick: bool = False, top_k: int | None = None) -> "Budgets":
        """Budgets for a model with ``num_params`` parameters (every k capped below the size)."""
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"build_report: expected top_k ≥ 1, got {top_k!r}.")
        if quick:
            b = cls(top_k=5, k_negative=3, density_probes=4, density_steps=30, density_points=200,
                    trace_matvecs=40, cond_max_iters=150, rank_k_max=num_params if num_params <= 128 else 40,
                    heatmap_max_params=400, ntk_samples=32, subspace_samples=128, subspace_k=10,
                    subspace_bootstrap=20, landscape_directions=2, landscape_points=21, landscape_grid=11)
        else:
            b = cls(rank_k_max=num_params if num_params <= 512 else 100)
        if top_k is not None:
            b.top_k = top_k
        cap = max(1, num_params - 1)
        b.top_k = min(b.top_k, cap)
        b.k_negative = min(b.k_negative, b.top_k, cap)
        b.rank_k_max = min(b.rank_k_max, num_params)
        b.subspace_k = min(b.subspace_k, cap)
        b.landscape_directions = min(b.landscape_directions, b.top_k)
        return b


# ---- JSON ------------------------------------------------------------------------------------------
def to_jsonable(obj):
    """Tensors/arrays → lists, numpy scalars → Python numbers, tuples → lists, non-finite floats →
    the strings ``"inf"``, ``"-inf"``, ``"nan"`` (so the file is standard JSON)."""
    if isinstance(obj, Tensor):
        return to_jsonable(obj.detach().cpu().tolist() if obj.dim() else obj.item())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return to_jsonable(obj.item())
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else ("nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf"))
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (torch.dtype, torch.device, torch.Size)):
        return str(obj) if not isinstance(obj, torch.Size) else list(obj)
    raise TypeError(f"to_jsonable: cannot store a {type(obj).__name__} in the summary.")


def _floats(t) -> list[float]:
    return [float(v) for v in torch.as_tensor(t).detach().to("cpu", torch.float64).reshape(-1)]


# ---- the context the sections share ----------------------------------------------------------------
class _Context:
    """The model's operators, budgets, the seed, cached results and the figures written so far."""

    def __init__(self, model, loss, data, *, params, batch_size, budgets_kw, seed, outdir, strict):
        from ..objective import Objective
        from ..operators import GGN, Hessian

        self.model, self.loss, self.data, self.outdir, self.seed = model, loss, data, outdir, seed
        self.strict = strict
        self.kw = dict(params=params, batch_size=batch_size)
        self.objective = Objective(model, loss, data, **self.kw)
        self.H = Hessian(model, loss, data, **self.kw)
        self.G = GGN(model, loss, data, **self.kw)
        self.num_params = self.objective.num_params
        self.device = self.objective.device
        self.budgets = Budgets.make(self.num_params, **budgets_kw)
        self.cache: dict[str, Any] = {}
        self.figures: dict[str, dict] = {}

    def generator(self) -> torch.Generator:
        """A fresh generator on the model's device, seeded with the report's seed."""
        return torch.Generator(device=self.device).manual_seed(self.seed)

    def first_samples(self, n: int):
        """``(x, y)`` of the first ``n`` samples of the data (on the device, in the model's dtype)."""
        xs, ys, count = [], [], 0
        for batch in self.objective.batches():
            take = min(batch.n, n - count)
            xs.append(_tree_slice(batch.x, take))
            ys.append(_tree_slice(batch.y, take))
            count += take
            if count >= n:
                break
        return _tree_cat(xs), _tree_cat(ys), count

    def figure(self, key: str, caption: str, draw: Callable) -> None:
        """Save ``<key>.png`` drawn by ``draw(plot, path)`` (``plot`` = :mod:`curvops.plotting`; it draws on a
        new figure and saves it to ``path``), close that figure and record it.  A missing plot
        module or a failing plot is recorded for this figure only (re-raised when strict)."""
        try:
            from .. import plotting as plot
        except ImportError as err:
            self.figures[key] = {"file": None, "caption": caption, "status": "pending",
                                 "message": f"curvops.plotting is not available ({err})"}
            return
        import matplotlib.pyplot as plt

        name = f"{key}.png"
        ax = None
        try:
            ax = draw(plot, os.path.join(self.outdir, name))
        except Exception as err:
            if self.strict:
                raise
            self.figures[key] = {"file": None, "caption": caption, "status": "error",
                                 "message": f"{type(err).__name__}: {err}"}
            return
        finally:
            if ax is not None:
                plt.close(ax.figure)
        self.figures[key] = {"file": name, "caption": caption, "status": "ok"}


def _tree_slice(x, n):
    if isinstance(x, Tensor):
        return x[:n] if x.dim() > 0 else x
    if isinstance(x, dict):
        return {k: _tree_slice(v, n) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_tree_slice(v, n) for v in x)
    return x


def _tree_cat(parts):
    first = parts[0]
    if isinstance(first, Tensor):
        return torch.cat(parts) if first.dim() > 0 else first
    if isinstance(first, dict):
        return {k: _tree_cat([p[k] for p in parts]) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(_tree_cat([p[i] for p in parts]) for i in range(len(first)))
    return first


# ---- sections ---------------------------------------------------------------------------------------
def _overview(ctx: _Context) -> dict:
    obj = ctx.objective
    loss = obj.loss_value()
    grad = obj.gradient()
    ctx.cache["grad"] = grad
    ctx.cache["overview"] = loss
    offsets = obj.layout.offsets()
    tensors = [{"name": n, "shape": list(s), "numel": k,
                "grad_norm": float(grad[offsets[n][0]:offsets[n][1]].norm())}
               for n, s, k in zip(obj.layout.names, obj.layout.shapes, obj.layout.numels)]
    try:
        num_samples = obj.num_samples()
    except TypeError:
        num_samples = None
    model = ctx.model
    total = sum(p.numel() for p in model.parameters()) if isinstance(model, torch.nn.Module) else ctx.num_params
    return {
        "model_class": type(model).__name__,
        "num_params": ctx.num_params,
        "num_params_total": int(total),
        "num_tensors": len(tensors),
        "num_samples": num_samples,
        "loss_name": ctx.loss if isinstance(ctx.loss, str) else type(ctx.loss).__name__,
        "reduction": obj.reduction,
        "loss": loss,
        "grad_norm": float(grad.norm()),
        "tensors": tensors,
    }


def _eig_summary(res, descending: bool) -> dict:
    order = torch.argsort(res.eigenvalues, descending=descending)
    return {
        "eigenvalues": _floats(res.eigenvalues[order]),
        "residuals": _floats(res.residuals[order]),
        "converged": bool(res.converged),
        "num_matvecs": int(res.num_matvecs),
        "iterations": int(res.iterations),
    }


def _eigenvalues(ctx: _Context) -> dict:
    from ..linalg import eigsh

    b = ctx.budgets
    top = eigsh(ctx.H, b.top_k, which="LA", tol=b.eig_tol, generator=ctx.generator())
    order = torch.argsort(top.eigenvalues, descending=True)
    ctx.cache["hessian_top"] = (top.eigenvalues[order], top.eigenvectors[:, order])
    bottom = eigsh(ctx.H, b.k_negative, which="SA", tol=b.eig_tol, relative_to="norm", generator=ctx.generator(),
                   return_eigenvectors=False)
    ggn = eigsh(ctx.G, b.top_k, which="LA", tol=b.eig_tol, generator=ctx.generator(), return_eigenvectors=False)
    out = {
        "hessian_top": {"which": "LA", "k": b.top_k, "tol": b.eig_tol, "relative_to": "eigenvalue",
                        **_eig_summary(top, True)},
        "hessian_bottom": {"which": "SA", "k": b.k_negative, "tol": b.eig_tol, "relative_to": "norm",
                           **_eig_summary(bottom, False)},
        "ggn_top": {"which": "LA", "k": b.top_k, "tol": b.eig_tol, "relative_to": "eigenvalue",
                    **_eig_summary(ggn, True)},
    }
    _figure_eigenvalues(ctx, out)
    return out


def _hessian_matrix(ctx: _Context) -> dict:
    b = ctx.budgets
    if ctx.num_params > b.heatmap_max_params:
        return {"shown": False, "size": ctx.num_params, "max_params": b.heatmap_max_params}
    D = ctx.H.to_dense()
    sym_err = float((D - D.T).abs().max() / D.abs().max().clamp_min(1e-300))
    _figure_heatmap(ctx, D)
    return {"shown": True, "size": ctx.num_params, "max_params": b.heatmap_max_params,
            "max_abs_entry": float(D.abs().max()), "symmetry_error": sym_err,
            "frobenius_norm": float(torch.linalg.matrix_norm(D))}


def _density(ctx: _Context) -> dict:
    from ..linalg import spectral_density

    b = ctx.budgets
    out, results = {}, {}
    for key, A in (("hessian", ctx.H), ("ggn", ctx.G)):
        res = spectral_density(A, num_probes=b.density_probes, num_steps=b.density_steps,
                               num_points=b.density_points, generator=ctx.generator())
        results["Hessian" if key == "hessian" else "GGN"] = res
        out[key] = {"num_probes": b.density_probes, "num_steps": b.density_steps, "sigma": float(res.sigma),
                    "num_matvecs": int(res.num_matvecs), "node_min": float(res.nodes.min()),
                    "node_max": float(res.nodes.max()), "grid": _floats(res.grid),
                    "density": _floats(res.density)}
    _figure_density(ctx, results)
    return out


def _trace(ctx: _Context) -> dict:
    from ..linalg import trace

    m = ctx.budgets.trace_matvecs
    out = {}
    for key, A in (("hessian", ctx.H), ("ggn", ctx.G)):
        res = trace(A, method="xtrace", num_matvecs=m, generator=ctx.generator())
        out[key] = {"value": float(res.value), "stderr": float(res.stderr), "method": res.method,
                    "num_matvecs": int(res.num_matvecs), "requested_method": "xtrace"}
    return out


def _condition(ctx: _Context) -> dict:
    from ..linalg import cond

    out = {}
    for key, A in (("ggn", ctx.G), ("hessian", ctx.H)):
        res = cond(A, max_iters=ctx.budgets.cond_max_iters, generator=ctx.generator())
        out[key] = {"value": float(res.value), "kind": res.kind, "largest": float(res.largest),
                    "smallest": float(res.smallest), "method": res.method, "num_matvecs": int(res.num_matvecs),
                    "converged": bool(res.converged), "max_iters": ctx.budgets.cond_max_iters,
                    "lower_bound": bool(res.lower_bound), "zero_threshold": float(res.zero_threshold),
                    "eigensolver_value": float(res.value), "eigensolver_status": res.status,
                    "source": "eigensolver", **_cond_status(res.value, res.status, res.num_matvecs,
                                                            res.zero_threshold, res.largest)}
    return out


def _cond_status(value: float, status: str, num_matvecs: int, zero_threshold: float, largest: float) -> dict:
    """``status``, a ``display`` string, a short ``caveat`` and a one-sentence ``note`` for a :func:`cond` result."""
    if status == "infinite":
        floor = abs(largest) / zero_threshold if zero_threshold > 0 else math.inf
        return {"status": "infinite", "display": "∞",
                "caveat": f"the smallest eigenvalue is below the eigensolve's resolution {zero_threshold:.4g}: "
                          f"infinite to that resolution, ≥ {floor:.4g} for certain",
                "note": f"Infinite as far as the eigensolve can tell: the smallest eigenvalue (in magnitude) is at "
                        f"most {zero_threshold:.4g}, the smallest value it resolves, so the condition number is at "
                        f"least {floor:.4g} and may be infinite."}
    if status == "converged":
        return {"status": "converged", "display": f"{value:.4g}", "caveat": "Lanczos converged",
                "note": "The eigensolver converged at both ends of the spectrum."}
    if status == "lower bound":
        return {"status": "lower bound", "display": f"≥ {value:.4g}",
                "caveat": f"a lower bound: Lanczos did not converge in {num_matvecs} products",
                "note": f"A lower bound, not a value: the eigensolver did not converge in {num_matvecs} products; "
                        f"its Ritz values lie inside the spectrum, so the true condition number is at least this."}
    return {"status": "not converged", "display": f"≈ {value:.4g}",
            "caveat": f"not converged in {num_matvecs} products, and not a bound",
            "note": f"An unconverged estimate, not a bound: the eigensolver did not converge in {num_matvecs} "
                    f"products."}


def _cutoff(r: dict) -> str:
    """``"λ₁·n·ε = 1.9e-14"``: the rank's cutoff by its rule's name and value."""
    rule = r["tol_rule"].split(" = ")[0] if " = " in r["tol_rule"] else r["tol_rule"]
    return f"{rule} = {r['tol']:.4g}"


def _around(r: dict) -> str:
    sym, k = r["symbol"], r["value"]
    parts = [f"{sym}{k} = {r['above']:.4g}"] if k > 0 else []
    if not math.isnan(r["below"]):
        parts.append(f"{sym}{k + 1} = {r['below']:.4g}")
    return ", ".join(parts)


def _rank(ctx: _Context) -> dict:
    from ..linalg import rank

    out = {}
    for key, A in (("ggn", ctx.G), ("hessian", ctx.H)):
        res = rank(A, k_max=ctx.budgets.rank_k_max, generator=ctx.generator())
        size = ctx.num_params
        r = {"value": int(res.value), "tol": float(res.tol), "lower_bound": bool(res.lower_bound),
             "k_max": ctx.budgets.rank_k_max, "size": size, "method": res.method,
             "num_matvecs": int(res.num_matvecs), "converged": bool(res.converged),
             "status": res.status, "well_defined": bool(res.well_defined), "tol_rule": res.tol_rule,
             "symbol": res.symbol, "above": res.above, "below": res.below, "gap_factor": res.gap_factor,
             "largest": float(res.values[0]) if res.values.numel() else 0.0,
             "smallest": float(res.values[-1]) if res.values.numel() else 0.0,
             "complete": bool(res.complete), "note": res.explain()}
        if res.lower_bound:
            r["display"] = f"≥ {res.value} of {size}"
            r["caveat"] = f"a lower bound: all {res.values.numel()} computed values exceed the cutoff {_cutoff(r)}"
        elif res.well_defined:
            r["display"] = f"{res.value} of {size}"
            r["caveat"] = f"cutoff {_cutoff(r)}; clear gap: {_around(r)}"
        else:
            r["display"] = "not well defined at this precision"
            r["caveat"] = f"no gap at the cutoff {_cutoff(r)}: {_around(r)}"
        if not res.converged:
            r["caveat"] += f"; the eigensolver did not converge in {res.num_matvecs} products"
        out[key] = r
    return out


def _reconcile(sections: dict) -> None:
    """Make the condition numbers agree with the ranks, where both sections ran.

    A numerically rank-deficient operator (eigenvalues at or below the rank's cutoff λ₁·n·ε, far
    below what a Lanczos estimate of κ resolves) has an infinite condition number to working
    precision (κ > 1/(n·ε)); the condition number on the numerical range (largest over smallest
    *counted* value) is given beside it when the rank is well defined.  A full-rank operator
    whose eigenvalues are all known (dense rank path) gets κ from them, exactly.  The
    eigensolver's own figure and status stay in ``eigensolver_value`` / ``eigensolver_status``.
    """
    cond, rank = sections.get("condition", {}), sections.get("rank", {})
    if cond.get("status") != "ok" or rank.get("status") != "ok":
        return
    for key in ("ggn", "hessian"):
        c, r = cond.get(key), rank.get(key)
        if not c or not r or r["lower_bound"] or c.get("kind") == "general":
            continue
        lanczos = f"The eigensolver alone gave {c['display']} ({c['eigensolver_status']})."
        if r["value"] < r["size"]:
            zeros = r["size"] - r["value"]
            restricted = r["largest"] / r["above"] if r["value"] > 0 and r["well_defined"] else None
            c.update(value=math.inf, status="numerically singular", display="∞", source="rank",
                     restricted_value=restricted, restricted_rank=r["value"])
            c["caveat"] = f"numerically singular: {zeros} of {r['size']} eigenvalues ≤ the rank cutoff {r['tol']:.4g}"
            if restricted is not None:
                c["caveat"] += f"; {restricted:.4g} on the {r['value']}-dimensional numerical range"
                tail = (f" On the {r['value']}-dimensional numerical range (the counted eigenvalues) it is "
                        f"{restricted:.4g} ({r['symbol']}1 / {r['symbol']}{r['value']}).")
            else:
                tail = (" The rank is not well defined at this precision (no clear gap at the cutoff), so neither "
                        "is a condition number on the numerical range.")
            c["note"] = (f"Infinite to working precision: the operator is numerically rank-deficient, {zeros} of "
                         f"{r['size']} eigenvalues at or below the rank cutoff {r['tol']:.4g} ({r['tol_rule']})."
                         f"{tail} {lanczos}")
        elif r["complete"]:
            value = r["largest"] / r["smallest"]
            c.update(value=value, status="exact", display=f"{value:.4g}", source="rank",
                     caveat=f"from all {r['size']} eigenvalues (dense)",
                     note=f"From all {r['size']} eigenvalues (dense, exact to rounding): "
                          f"{r['symbol']}1 / {r['symbol']}{r['size']}. {lanczos}")


def _stationary(ctx: _Context) -> dict:
    from ..analysis.stationary import classify_stationary_point

    grad = ctx.cache.get("grad")
    if grad is None:
        grad = ctx.objective.gradient()
    res = classify_stationary_point(ctx.H, grad, generator=ctx.generator())
    return {"kind": res.kind, "curvature": res.curvature, "lambda_min": res.lambda_min, "lambda_max": res.lambda_max,
            "residual_min": res.residual_min, "residual_max": res.residual_max, "grad_norm": res.grad_norm,
            "grad_tol": res.grad_tol, "tol": res.tol, "zero_threshold": res.zero_threshold,
            "num_matvecs": int(res.num_matvecs), "converged": bool(res.converged), "explanation": res.explanation}


def _ntk(ctx: _Context) -> dict:
    from ..linalg import eigsh
    from ..operators import NTK

    b = ctx.budgets
    x, _, n = ctx.first_samples(b.ntk_samples)
    K = NTK(ctx.model, x, params=ctx.kw["params"], batch_size=ctx.kw["batch_size"])
    size = K.shape[0]
    if size <= b.ntk_dense_max:
        D = K.to_dense()
        evals = torch.linalg.eigvalsh((D + D.T) / 2).flip(0)
        method, mv, trace_value = f"dense ({size} products, then eigvalsh)", size, float(torch.trace(D))
    else:
        k = min(b.top_k, size - 1)
        res = eigsh(K, k, which="LA", tol=b.eig_tol, generator=ctx.generator(), return_eigenvectors=False)
        evals = res.eigenvalues.flip(0)
        method, mv, trace_value = f"Lanczos, the top {k}", res.num_matvecs, None
    evals = evals.to(torch.float64).cpu()
    out = {"num_inputs": n, "num_outputs": size // max(n, 1), "size": size, "method": method, "num_matvecs": mv,
           "complete": size <= b.ntk_dense_max, "eigenvalues": _floats(evals), "trace": trace_value,
           "largest": float(evals[0]), "smallest": float(evals[-1])}
    if out["complete"]:
        top = evals.clamp_min(0)
        out["effective_rank"] = float(top.sum() / top[0]) if float(top[0]) > 0 else 0.0
        out["top_k_share"] = float(top[:b.top_k].sum() / top.sum()) if float(top.sum()) > 0 else 0.0
        out["top_k"] = min(b.top_k, size)
    _figure_ntk(ctx, out)
    return out


def _traceback(err: BaseException, limit: int = 4000) -> str:
    """The error's traceback (its last ``limit`` characters), for the report."""
    import traceback

    text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    return text if len(text) <= limit else "…" + text[-limit:]


class _Pending(Exception):
    """A section whose library module is not available (recorded, not an error)."""


class _Skipped(Exception):
    """A section that does not apply to this model (recorded with the reason)."""


def _active_subspace(ctx: _Context) -> dict:
    try:
        from ..analysis.active_subspace import active_subspace
    except ImportError as err:
        raise _Pending(f"curvops.analysis.active_subspace is not available ({err})") from None
    b = ctx.budgets
    x, y, n = ctx.first_samples(b.subspace_samples)
    P = ctx.num_params
    k = None if min(n, P) <= b.subspace_all_max else min(b.subspace_k, n, P)
    res = active_subspace(ctx.model, ctx.loss, (x, y), k=k, bootstrap=b.subspace_bootstrap,
                          generator=ctx.generator(), params=ctx.kw["params"])
    lam = res.eigenvalues.to(torch.float64).cpu()
    shown = min(b.subspace_k, res.k)
    fractions = res.layer_sensitivity()[:, :shown].to(torch.float64).cpu()
    ratios = res.gap_ratios[: max(shown - 1, 1)].to(torch.float64).cpu()
    finite = torch.where(torch.isfinite(ratios), ratios, torch.zeros_like(ratios))
    r = int(torch.argmax(finite)) + 1 if ratios.numel() else 1
    out = {"num_samples": res.num_samples, "num_params": res.num_params, "samples_per_param": res.num_samples / P,
           "k": res.k, "method": res.method, "algorithm": res.algorithm, "converged": bool(res.converged),
           "bootstrap": res.bootstrap, "confidence": res.confidence, "eigenvalues": _floats(lam),
           "trace": float(lam.sum()), "top_k": shown, "top_k_share": float(lam[:shown].sum() / lam.sum())
           if float(lam.sum()) > 0 else 0.0,
           "largest_gap_after": r, "largest_gap_ratio": float(ratios[r - 1]) if ratios.numel() else None,
           "directions": list(range(1, shown + 1)),
           "layer_sensitivity": {"names": list(res.layout.names), "fractions": fractions.tolist()}}
    if res.bootstrap:
        out["eigenvalue_lower"] = _floats(res.eigenvalue_lower)
        out["eigenvalue_upper"] = _floats(res.eigenvalue_upper)
        d = res.subspace_distance_mean
        out["subspace_distance_mean"] = _floats(d[:shown])
        out["subspace_distance_upper"] = _floats(res.subspace_distance_upper[:shown])
        out["subspace_distance_at_gap"] = float(d[r - 1]) if d.numel() >= r else None
    band = {"lower": out["eigenvalue_lower"], "upper": out["eigenvalue_upper"]} if res.bootstrap else {}
    ctx.figure("active_subspace_decay", "Eigenvalues of the active-subspace matrix, largest first, with the "
               "bootstrap interval.", lambda plot, path: plot.plot_eigenvalue_decay(out["eigenvalues"], **band,
                                                                                     save=path))
    ctx.figure("layer_sensitivity", "Share of each top active direction in each parameter tensor.",
               lambda plot, path: plot.plot_layer_sensitivity(fractions.numpy(), list(res.layout.names),
                                                              save=path))
    cols = min(res.k, b.subspace_heatmap_columns)
    ctx.figure("active_subspace_eigenvectors", "Magnitudes of the active-subspace eigenvectors (log scale), "
               "parameter tensors marked.",
               lambda plot, path: plot.plot_eigenvector_heatmap(res.eigenvectors[:, :cols].cpu().numpy(),
                                                                layout=res.layout, save=path))
    return out


def _landscape(ctx: _Context) -> dict:
    try:
        from ..analysis.landscape import loss_along, loss_plane
    except ImportError as err:
        raise _Pending(f"curvops.analysis.landscape is not available ({err})") from None
    if "hessian_top" not in ctx.cache:
        raise _Skipped("needs the Hessian eigenvectors of the eigenvalues section")
    b = ctx.budgets
    lam, V = ctx.cache["hessian_top"]
    base = float(ctx.objective.loss_value()) if "overview" not in ctx.cache else ctx.cache["overview"]
    lam1 = float(lam[0])
    theta_norm = math.sqrt(sum(float((t.double() ** 2).sum()) for t in ctx.objective.theta()))
    if b.landscape_radius is None:
        # the quadratic model's loss rises by 4·max(L, 0.01) at the edge along the top eigenvector
        radius = math.sqrt(8 * max(base, 1e-2) / lam1) if lam1 > 0 else 1.0
        radius = min(radius, max(theta_norm, 1e-3))
        rule = "sqrt(8 max(L, 0.01) / λ₁), capped at ‖θ‖"
    else:
        radius, rule = float(b.landscape_radius), "fixed"
    dtype = ctx.objective.dtype
    steps = torch.linspace(-radius, radius, b.landscape_points, dtype=torch.float64).to(dtype)
    curves = []
    for j in range(b.landscape_directions):
        label = f"eigenvector {j + 1} (λ = {float(lam[j]):.3g})"
        res = loss_along(ctx.objective, direction=V[:, j], steps=steps, label=label)
        loss = res.values["loss"].to(torch.float64)
        h = float(steps[1] - steps[0])
        mid = b.landscape_points // 2
        curvature = float((loss[mid + 1] - 2 * loss[mid] + loss[mid - 1]) / h ** 2) \
            if b.landscape_points % 2 == 1 else None
        curves.append({"label": label, "eigenvalue": float(lam[j]), "loss": _floats(loss),
                       "loss_min": float(loss.min()), "loss_max": float(loss.max()),
                       "curvature_from_curve": curvature})
    plane = None
    if b.landscape_directions >= 2 and V.shape[1] >= 2:
        grid = torch.linspace(-radius, radius, b.landscape_grid, dtype=torch.float64).to(dtype)
        labels = (curves[0]["label"], curves[1]["label"])
        res = loss_plane(ctx.objective, directions=(V[:, 0], V[:, 1]), steps=(grid, grid), labels=labels)
        Z = res.values["loss"].to(torch.float64)
        plane = {"labels": list(labels), "alphas": _floats(grid), "betas": _floats(grid),
                 "loss": Z.cpu().tolist(), "loss_min": float(Z.min()), "loss_max": float(Z.max()),
                 "num_evaluations": int(res.num_evaluations)}
    out = {"radius": radius, "radius_rule": rule, "base_loss": base, "param_norm": theta_norm,
           "steps": _floats(steps), "curves": curves, "plane": plane}
    series = {c["label"]: c["loss"] for c in curves}
    ctx.figure("landscape_1d", "The loss along the top Hessian eigenvectors (unit norm); zero is the current point.",
               lambda plot, path: plot.plot_landscape_1d(out["steps"], series, xlabel="step along the eigenvector",
                                                         save=path))
    if plane is not None:
        ctx.figure("landscape_2d", "The loss on the plane of the top two Hessian eigenvectors.",
                   lambda plot, path: plot.plot_landscape_2d(plane["alphas"], plane["betas"], plane["loss"],
                                                             xlabel=plane["labels"][0], ylabel=plane["labels"][1],
                                                             save=path))
    return out


def _architecture(ctx: _Context) -> dict:
    try:
        from ..plotting import architecture_table
    except ImportError as err:
        raise _Pending(f"curvops.plotting is not available ({err})") from None
    if not isinstance(ctx.model, torch.nn.Module):
        raise _Skipped("the model is a plain function, not an nn.Module")
    x, _, _ = ctx.first_samples(1)
    table = architecture_table(ctx.model, x)
    keep = ("name", "type", "kind", "input_shape", "output_shape", "param_shapes", "num_params")
    rows = [{k: r.get(k) for k in keep} for r in table]
    ctx.figure("architecture", "The network as vectors (strips) and matrices (blocks), with its forward formula.",
               lambda plot, path: plot.plot_architecture(ctx.model, x, save=path))
    return {"layers": rows, "num_layers": len(rows), "input_samples": 1}


_SECTION_FUNCS = {
    "overview": _overview, "eigenvalues": _eigenvalues, "hessian_matrix": _hessian_matrix, "density": _density,
    "trace": _trace, "condition": _condition, "rank": _rank, "stationary": _stationary, "ntk": _ntk,
    "active_subspace": _active_subspace, "landscape": _landscape, "architecture": _architecture,
}


# ---- figures (drawn by curvops.plotting from the results) ---------------------------------------------
def _figure_eigenvalues(ctx, out):
    series = {"Hessian": out["hessian_top"]["eigenvalues"], "GGN": out["ggn_top"]["eigenvalues"]}
    ctx.figure("eigenvalues", "Top eigenvalues of the Hessian and the GGN, largest first.",
               lambda plot, path: plot.plot_eigenvalues(series, save=path, title="Top eigenvalues"))


def _figure_heatmap(ctx, D):
    ctx.figure("hessian_matrix", "The Hessian as a matrix, parameter tensors marked (symmetric-log colour scale).",
               lambda plot, path: plot.plot_heatmap(D.cpu().numpy(), layout=ctx.objective.layout, log=True,
                                                    save=path, title=""))


def _figure_density(ctx, results):
    ctx.figure("density", "Spectral densities of the Hessian and the GGN (log scale), Ritz nodes as ticks.",
               lambda plot, path: plot.plot_density(results, log=True, save=path))


def _figure_ntk(ctx, out):
    ctx.figure("ntk", "Eigenvalues of the empirical NTK on the input subset, largest first.",
               lambda plot, path: plot.plot_eigenvalues({"NTK": out["eigenvalues"]}, save=path,
                                                        title="NTK eigenvalues"))


# ---- the driver -------------------------------------------------------------------------------------
def _environment(ctx: _Context) -> dict:
    from .. import __version__

    dev = ctx.device
    env = {"curvops_version": __version__, "torch_version": torch.__version__, "numpy_version": np.__version__,
           "python_version": platform.python_version(), "platform": platform.platform(),
           "device": str(dev), "dtype": str(ctx.objective.dtype).replace("torch.", ""),
           "num_threads": torch.get_num_threads()}
    if dev.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(dev)
    return env


def build_report(model, loss, data, outdir, *, quick: bool = False, top_k: int | None = None, params=None,
                 progress: bool = True, seed: int = 0, batch_size: int | None = None, strict: bool = False,
                 source: dict | None = None, sections=None, warnings=None) -> dict:
    r"""Measure a model's curvature and write a report directory; return the summary.

    Writes to ``outdir`` (created if needed): ``index.html`` (self-contained: inline CSS, no
    scripts, images by relative path), one PNG per figure, and ``summary.json`` — the returned
    dict, which holds every number the HTML shows, the settings, per-section timings, the
    environment (library versions, device, dtype) and the seed.

    Sections (:data:`SECTIONS`) run in order; a section that fails is recorded with its error
    (``summary["sections"][name]`` is ``{"status": "error", "message": "<Type>: <text>",
    "traceback": "..."}``), listed in ``summary["failed_sections"]`` and ``summary["warnings"]``,
    shown at the top of the page and in its place, and the others still run, unless ``strict``.
    No section is ever left out silently.  A section whose library module is missing is
    recorded as ``"pending"``.

    Every figure carries its status: eigensolves their ``converged`` flag; a condition number
    its ``status`` (``"converged"``, ``"lower bound"`` when the eigensolver stopped early,
    ``"infinite"``, ``"numerically singular"`` when the rank section finds eigenvalues below its
    cutoff, ``"exact"`` from all eigenvalues) with a ``display`` string and a ``note``; a rank its
    cutoff rule, the values just above and below the cutoff and whether the rank is well defined
    there (:func:`~curvops.rank`).

    **Cost** (defaults; ``quick`` about a third): a few hundred Hessian/GGN products (one data
    pass each): top-k eigensolves, 2 × 10 × 80 for the densities, 2 × 100 for the traces, a few
    hundred for the condition numbers, up to ``P`` for an exact rank and the heat map of small
    models; the NTK on 64 inputs; two gradient passes over the active-subspace samples per
    product; one forward pass per landscape point.  The built-in demo model (371 parameters,
    512 samples) takes about 10 s on one CPU core (``quick``: about 3 s).

    Args:
        model: the model (``nn.Module``; the parameters measured are ``params``). Left as found.
        loss: ``"mse"``, ``"cross_entropy"``, ``"bce_with_logits"`` or a torch loss module.
        data: ``(X, y)``, a list of batches or a ``DataLoader``.
        outdir: the report directory.
        quick: a fast pass: fewer eigenpairs, coarser densities and landscapes, smaller subsets.
        top_k: eigenpairs from the top of each spectrum (default 10; 5 when ``quick``).
        params: parameter selection as in :class:`~curvops.Objective` (names, modules, predicate).
        progress: tqdm progress bar over the sections, on stderr.
        seed: the seed of every randomized step (see the module docstring).
        batch_size: split ``(X, y)`` into batches of this size.
        strict: re-raise the first section error instead of recording it.
        source: free-form description of where model and data came from (recorded).
        sections: run only these sections (default all; ``"overview"`` always runs).
        warnings: sentences to show at the top of the report (e.g. "the weights are untrained");
            stored in ``summary["warnings"]`` before those about failed sections.

    Returns:
        The summary dict (JSON-native: lists, floats, strings; non-finite floats as ``"inf"``/``"nan"``).

    Raises:
        ValueError / TypeError: bad arguments (from :class:`~curvops.Objective` and the budgets),
            before any pass over the data; any section error when ``strict``.

    Example:
        >>> model, X, y = curvops.demo.demo_problem()                         # doctest: +SKIP
        >>> s = build_report(model, "cross_entropy", (X, y), "out", quick=True)  # doctest: +SKIP
        >>> s["sections"]["eigenvalues"]["hessian_top"]["eigenvalues"][0]      # doctest: +SKIP
        0.2402...
    """
    from tqdm.auto import tqdm

    from .html import write_html

    start = time.perf_counter()
    wanted = list(SECTIONS) if sections is None else ["overview"] + [s for s in sections if s != "overview"]
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown:
        raise ValueError(f"build_report: expected sections among {list(SECTIONS)}, got unknown {unknown}.")
    if not isinstance(seed, int):
        raise TypeError(f"build_report: expected an integer seed, got {type(seed).__name__}.")
    if warnings is not None and (isinstance(warnings, str) or not all(isinstance(w, str) for w in warnings)):
        raise TypeError(f"build_report: expected warnings as a list of strings, got {warnings!r}. "
                        f"Pass e.g. warnings=['the weights are untrained'].")
    ctx = _Context(model, loss, data, params=params, batch_size=batch_size,
                   budgets_kw=dict(quick=quick, top_k=top_k), seed=seed, outdir=str(outdir), strict=strict)
    os.makedirs(outdir, exist_ok=True)
    summary: dict = {
        "title": "curvops curvature report",
        "environment": _environment(ctx),
        "settings": {"quick": bool(quick), "seed": seed, "batch_size": batch_size,
                     "params": None if params is None else list(ctx.objective.layout.names),
                     "generator": "each randomized call: torch.Generator(device).manual_seed(seed)",
                     "budgets": asdict(ctx.budgets)},
        "source": source or {"model": type(model).__name__},
        "warnings": list(warnings or []), "failed_sections": [],
        "sections": {}, "timings": {}, "figures": {},
    }
    bar = tqdm(total=len(wanted), desc="curvops report", unit="section", file=sys.stderr, disable=not progress,
               leave=False)
    try:
        for name in wanted:
            bar.set_postfix_str(name)
            t0 = time.perf_counter()
            try:
                result = {"status": "ok", **_SECTION_FUNCS[name](ctx)}
            except _Pending as why:
                result = {"status": "pending", "message": str(why)}
            except _Skipped as why:
                result = {"status": "skipped", "message": str(why)}
            except Exception as err:
                if strict:
                    raise
                result = {"status": "error", "message": f"{type(err).__name__}: {err}",
                          "traceback": _traceback(err)}
                summary["failed_sections"].append(name)
                summary["warnings"].append(f"The {name} section failed: {type(err).__name__}: {err}")
            summary["sections"][name] = result
            summary["timings"][name] = time.perf_counter() - t0
            bar.update(1)
    finally:
        bar.close()
    _reconcile(summary["sections"])
    summary["figures"] = ctx.figures
    for key, fig in ctx.figures.items():
        if fig.get("status") == "error":
            summary["warnings"].append(f"The figure {key} was not drawn: {fig.get('message')}")
    summary["timings"]["total"] = time.perf_counter() - start
    summary = to_jsonable(summary)
    with open(os.path.join(outdir, SUMMARY_FILE), "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=1, allow_nan=False)
    write_html(summary, outdir)
    return summary
