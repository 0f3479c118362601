"""The report's sections on the Hessian and the GGN: extremal eigenvalues, the matrix itself
(small models), spectral densities, traces, condition numbers, ranks, the stationary point."""

from __future__ import annotations

import torch

from .consistency import around_text, cond_status, cutoff_text
from .context import Context
from .summary import floats


def _eig_summary(res, descending: bool) -> dict:
    order = torch.argsort(res.eigenvalues, descending=descending)
    return {
        "eigenvalues": floats(res.eigenvalues[order]),
        "residuals": floats(res.residuals[order]),
        "converged": bool(res.converged),
        "num_matvecs": int(res.num_matvecs),
        "iterations": int(res.iterations),
    }


def _eigenvalues(ctx: Context) -> dict:
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


def _hessian_matrix(ctx: Context) -> dict:
    b = ctx.budgets
    if ctx.num_params > b.heatmap_max_params:
        return {"shown": False, "size": ctx.num_params, "max_params": b.heatmap_max_params}
    D = ctx.H.to_dense()
    sym_err = float((D - D.T).abs().max() / D.abs().max().clamp_min(1e-300))
    _figure_heatmap(ctx, D)
    return {"shown": True, "size": ctx.num_params, "max_params": b.heatmap_max_params,
            "max_abs_entry": float(D.abs().max()), "symmetry_error": sym_err,
            "frobenius_norm": float(torch.linalg.matrix_norm(D))}


def _density(ctx: Context) -> dict:
    from ..linalg import spectral_density

    b = ctx.budgets
    out, results = {}, {}
    for key, A in (("hessian", ctx.H), ("ggn", ctx.G)):
        res = spectral_density(A, num_probes=b.density_probes, num_steps=b.density_steps,
                               num_points=b.density_points, generator=ctx.generator())
        results["Hessian" if key == "hessian" else "GGN"] = res
        out[key] = {"num_probes": b.density_probes, "num_steps": b.density_steps, "sigma": float(res.sigma),
                    "num_matvecs": int(res.num_matvecs), "node_min": float(res.nodes.min()),
                    "node_max": float(res.nodes.max()), "grid": floats(res.grid),
                    "density": floats(res.density)}
    _figure_density(ctx, results)
    return out


def _trace(ctx: Context) -> dict:
    from ..linalg import trace

    m = ctx.budgets.trace_matvecs
    out = {}
    for key, A in (("hessian", ctx.H), ("ggn", ctx.G)):
        res = trace(A, method="xtrace", num_matvecs=m, generator=ctx.generator())
        out[key] = {"value": float(res.value), "stderr": float(res.stderr), "method": res.method,
                    "num_matvecs": int(res.num_matvecs), "requested_method": "xtrace"}
    return out


def _condition(ctx: Context) -> dict:
    from ..linalg import cond

    out = {}
    for key, A in (("ggn", ctx.G), ("hessian", ctx.H)):
        res = cond(A, max_iters=ctx.budgets.cond_max_iters, generator=ctx.generator())
        out[key] = {"value": float(res.value), "kind": res.kind, "largest": float(res.largest),
                    "smallest": float(res.smallest), "method": res.method, "num_matvecs": int(res.num_matvecs),
                    "converged": bool(res.converged), "max_iters": ctx.budgets.cond_max_iters,
                    "lower_bound": bool(res.lower_bound), "zero_threshold": float(res.zero_threshold),
                    "eigensolver_value": float(res.value), "eigensolver_status": res.status,
                    "source": "eigensolver", **cond_status(res.value, res.status, res.num_matvecs,
                                                            res.zero_threshold, res.largest)}
    return out


def _rank(ctx: Context) -> dict:
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
            r["caveat"] = f"a lower bound: all {res.values.numel()} computed values exceed the cutoff {cutoff_text(r)}"
        elif res.well_defined:
            r["display"] = f"{res.value} of {size}"
            r["caveat"] = f"cutoff {cutoff_text(r)}; clear gap: {around_text(r)}"
        else:
            r["display"] = "not well defined at this precision"
            r["caveat"] = f"no gap at the cutoff {cutoff_text(r)}: {around_text(r)}"
        if not res.converged:
            r["caveat"] += f"; the eigensolver did not converge in {res.num_matvecs} products"
        out[key] = r
    return out


def _stationary(ctx: Context) -> dict:
    from ..analysis import classify_stationary_point

    grad = ctx.cache.get("grad")
    if grad is None:
        grad = ctx.objective.gradient()
    res = classify_stationary_point(ctx.H, grad, generator=ctx.generator())
    return {"kind": res.kind, "curvature": res.curvature, "lambda_min": res.lambda_min, "lambda_max": res.lambda_max,
            "residual_min": res.residual_min, "residual_max": res.residual_max, "grad_norm": res.grad_norm,
            "grad_tol": res.grad_tol, "tol": res.tol, "zero_threshold": res.zero_threshold,
            "num_matvecs": int(res.num_matvecs), "converged": bool(res.converged), "explanation": res.explanation}


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


#: section name → function(ctx) -> dict, for the sections of this module
SECTIONS = {"eigenvalues": _eigenvalues, "hessian_matrix": _hessian_matrix, "density": _density, "trace": _trace,
            "condition": _condition, "rank": _rank, "stationary": _stationary}
