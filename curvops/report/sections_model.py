"""The report's sections on the model as a whole: overview (parameters, loss, gradient), the
empirical NTK, the active subspace, the loss landscape along the top Hessian eigenvectors and
the architecture."""

from __future__ import annotations

import math

import torch

from .context import Context, Pending, Skipped
from .sections_prior import SECTIONS as _PRIOR_SECTIONS
from .summary import floats


def _overview(ctx: Context) -> dict:
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


def _ntk(ctx: Context) -> dict:
    from ..linalg import eigsh
    from ..operators import NTK

    b = ctx.budgets
    x, _, n = ctx.first_samples(b.ntk_samples)
    K = ctx.counted(NTK(ctx.model, x, params=ctx.kw["params"], batch_size=ctx.kw["batch_size"]))
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
           "complete": size <= b.ntk_dense_max, "eigenvalues": floats(evals), "trace": trace_value,
           "largest": float(evals[0]), "smallest": float(evals[-1])}
    if out["complete"]:
        top = evals.clamp_min(0)
        out["effective_rank"] = float(top.sum() / top[0]) if float(top[0]) > 0 else 0.0
        out["top_k_share"] = float(top[:b.top_k].sum() / top.sum()) if float(top.sum()) > 0 else 0.0
        out["top_k"] = min(b.top_k, size)
    _figure_ntk(ctx, out)
    return out


def _active_subspace(ctx: Context) -> dict:
    try:
        from ..analysis import active_subspace
    except ImportError as err:
        raise Pending(f"curvops.analysis.active_subspace is not available ({err})") from None
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
           "bootstrap": res.bootstrap, "confidence": res.confidence, "eigenvalues": floats(lam),
           "trace": float(lam.sum()), "top_k": shown, "top_k_share": float(lam[:shown].sum() / lam.sum())
           if float(lam.sum()) > 0 else 0.0,
           "largest_gap_after": r, "largest_gap_ratio": float(ratios[r - 1]) if ratios.numel() else None,
           "directions": list(range(1, shown + 1)),
           "layer_sensitivity": {"names": list(res.layout.names), "fractions": fractions.tolist()}}
    if res.bootstrap:
        out["eigenvalue_lower"] = floats(res.eigenvalue_lower)
        out["eigenvalue_upper"] = floats(res.eigenvalue_upper)
        d = res.subspace_distance_mean
        out["subspace_distance_mean"] = floats(d[:shown])
        out["subspace_distance_upper"] = floats(res.subspace_distance_upper[:shown])
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


def _landscape(ctx: Context) -> dict:
    try:
        from ..analysis import loss_along, loss_plane
    except ImportError as err:
        raise Pending(f"curvops.analysis.landscape is not available ({err})") from None
    if "hessian_top" not in ctx.cache:
        raise Skipped("needs the Hessian eigenvectors of the eigenvalues section")
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
        ctx.tick(b.landscape_points)
        loss = res.values["loss"].to(torch.float64)
        h = float(steps[1] - steps[0])
        mid = b.landscape_points // 2
        curvature = float((loss[mid + 1] - 2 * loss[mid] + loss[mid - 1]) / h ** 2) \
            if b.landscape_points % 2 == 1 else None
        curves.append({"label": label, "eigenvalue": float(lam[j]), "loss": floats(loss),
                       "loss_min": float(loss.min()), "loss_max": float(loss.max()),
                       "curvature_from_curve": curvature})
    plane = None
    if b.landscape_directions >= 2 and V.shape[1] >= 2:
        grid = torch.linspace(-radius, radius, b.landscape_grid, dtype=torch.float64).to(dtype)
        labels = (curves[0]["label"], curves[1]["label"])
        res = loss_plane(ctx.objective, directions=(V[:, 0], V[:, 1]), steps=(grid, grid), labels=labels)
        ctx.tick(b.landscape_grid ** 2)
        Z = res.values["loss"].to(torch.float64)
        plane = {"labels": list(labels), "alphas": floats(grid), "betas": floats(grid),
                 "loss": Z.cpu().tolist(), "loss_min": float(Z.min()), "loss_max": float(Z.max()),
                 "num_evaluations": int(res.num_evaluations)}
    out = {"radius": radius, "radius_rule": rule, "base_loss": base, "param_norm": theta_norm,
           "steps": floats(steps), "curves": curves, "plane": plane}
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


def _architecture(ctx: Context) -> dict:
    try:
        from ..plotting import architecture_table
    except ImportError as err:
        raise Pending(f"curvops.plotting is not available ({err})") from None
    if not isinstance(ctx.model, torch.nn.Module):
        raise Skipped("the model is a plain function, not an nn.Module")
    x, _, _ = ctx.first_samples(1)
    table = architecture_table(ctx.model, x)
    keep = ("name", "type", "kind", "input_shape", "output_shape", "param_shapes", "num_params")
    rows = [{k: r.get(k) for k in keep} for r in table]
    ctx.figure("architecture", "The network as vectors (strips) and matrices (blocks), with its forward formula.",
               lambda plot, path: plot.plot_architecture(ctx.model, x, save=path))
    return {"layers": rows, "num_layers": len(rows), "input_samples": 1}


def _figure_ntk(ctx, out):
    ctx.figure("ntk", "Eigenvalues of the empirical NTK on the input subset, largest first.",
               lambda plot, path: plot.plot_eigenvalues({"NTK": out["eigenvalues"]}, save=path,
                                                        title="NTK eigenvalues"))


#: section name → function(ctx) -> dict, for the sections of this module (and the optional prior
#: active-subspace section of :mod:`.sections_prior`, off unless ``ctx.options`` asks for it)
SECTIONS = {"overview": _overview, "ntk": _ntk, "active_subspace": _active_subspace, "landscape": _landscape,
            "architecture": _architecture, **_PRIOR_SECTIONS}
