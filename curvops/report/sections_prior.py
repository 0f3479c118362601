"""The report's optional section on the active subspace over a *prior on the parameters*
(``seeds/002`` as written): C = E_{θ∼ρ}[∇L(θ)∇L(θ)ᵀ] with L the loss on the report's active-subspace
data subset, ρ = N(0, I) (``standard_normal``) or N(θ₀, σ²I) around the current parameters
(``around:<sigma>``).

Off unless asked: the section reads ``ctx.options["active_subspace_prior"]`` (default ``"off"``,
also when the context has no ``options``) and is skipped when it is off.  Its cost is budgeted by
the active-subspace budgets: N = ``subspace_samples`` parameter draws (512; ``--quick`` 128), each
a gradient of the loss on the first ``subspace_samples`` data samples (N gradients in vmapped
chunks, one pass, kept: N·P numbers, the section is skipped with the reason when they exceed 0.5 GiB),
then one top-k decomposition per sample size of the convergence evidence (k = ``subspace_k``, at
most N/8).
"""

from __future__ import annotations

import math

import torch

from .context import Context, Pending, Skipped
from .summary import floats

#: the option's key in ``ctx.options`` and its default
OPTION = "active_subspace_prior"
OFF = "off"
SPELLINGS = "off, standard_normal or around:<sigma> (e.g. around:0.1)"


def parse_prior_option(text) -> str | tuple | None:
    """``"off"`` → ``None``; ``"standard_normal"`` → itself; ``"around:<sigma>"`` → ``("around", sigma)``.

    Call it when the option is read (the command line), so a bad value fails before any work.

    Raises:
        ValueError: anything else, or a sigma that is not a positive, finite number.

    Example:
        >>> parse_prior_option("around:0.1")
        ('around', 0.1)
        >>> parse_prior_option("off") is None
        True
    """
    if text is None:
        return None
    if not isinstance(text, str):
        raise ValueError(f"--active-subspace-prior: expected {SPELLINGS}, got {text!r}.")
    t = text.strip()
    if t in ("", OFF):
        return None
    if t == "standard_normal":
        return t
    if t.startswith("around:"):
        try:
            sigma = float(t.split(":", 1)[1])
        except ValueError:
            sigma = float("nan")
        if not (sigma > 0 and math.isfinite(sigma)):
            raise ValueError(f"--active-subspace-prior: expected around:<sigma> with a positive, finite sigma, got "
                             f"{text!r}.")
        return ("around", sigma)
    raise ValueError(f"--active-subspace-prior: expected {SPELLINGS}, got {text!r}.")


def _sizes(N: int, k: int) -> list[int]:
    return sorted({max(k, N // 8), max(k, N // 4), max(k, N // 2), N})


def _active_subspace_prior(ctx: Context) -> dict:
    prior = parse_prior_option(getattr(ctx, "options", {}).get(OPTION, OFF))
    if prior is None:
        raise Skipped(f"off (pass --active-subspace-prior {SPELLINGS.split(', ', 1)[1]})")
    try:
        from ..analysis.active_subspace import DEFAULT_MEMORY_BUDGET, active_subspace_convergence
    except ImportError as err:
        raise Pending(f"curvops.analysis.active_subspace is not available ({err})") from None
    b = ctx.budgets
    P = ctx.num_params
    N = b.subspace_samples
    need = N * P * torch.empty((), dtype=ctx.objective.dtype).element_size()
    if need > DEFAULT_MEMORY_BUDGET // 2:  # kept G; the matrix-free path would redo the N gradients per product
        raise Skipped(f"the {N} draws' gradients of {P:,} parameters need {need / 2**30:.2f} GiB, over the "
                      f"{DEFAULT_MEMORY_BUDGET / 2**31:.1f} GiB the section may hold; select fewer parameters "
                      f"(--params) to include it")
    x, y, n_data = ctx.first_samples(b.subspace_samples)
    k = max(1, min(b.subspace_k, N // 8, P))
    sizes = _sizes(N, k)
    conv = active_subspace_convergence(ctx.model, ctx.loss, (x, y), prior=prior, num_samples=N, sample_sizes=sizes,
                                       k=k, generator=ctx.generator(), params=ctx.kw["params"],
                                       batch_size=ctx.kw["batch_size"])
    ctx.tick(N)
    res = conv.results[-1]
    lam = res.eigenvalues.to(torch.float64).cpu()
    fractions = res.layer_sensitivity().to(torch.float64).cpu()
    per_size = res.layer_sensitivity(by_size=True).to(torch.float64).cpu()
    dists = conv.subspace_distances.to(torch.float64).cpu()
    errors = conv.eigenvalue_errors.to(torch.float64).cpu()
    mass = fractions.mean(1)
    label = prior if isinstance(prior, str) else f"around:{prior[1]:g}"
    out = {
        "prior": label, "prior_description": res.algorithm.split("; prior ", 1)[-1],
        "num_draws": N, "num_data": n_data, "num_params": P, "draws_per_param": N / P, "k": k,
        "algorithm": res.algorithm, "converged": bool(all(r.converged for r in conv.results)),
        "eigenvalues": floats(lam), "directions": list(range(1, k + 1)),
        "gap_ratio_max": float(res.gap_ratios.max()) if res.gap_ratios.numel() else None,
        "layer_mass": {"names": list(res.layout.names), "numels": list(res.layout.numels),
                       "share": floats(mass), "share_per_size": floats(per_size.mean(1)),
                       "fractions": fractions.tolist()},
        "convergence": {"sample_sizes": [int(s) for s in conv.sample_sizes],
                        "reference": "the estimate from all N draws",
                        "distance_top1": floats(dists[:, 0]), "distance_topk": floats(dists[:, -1]),
                        "eigenvalue_error_top1": floats(errors[:, 0]),
                        "eigenvalue_error_max": floats(errors.max(1).values)},
        "seconds_gradients": conv.timings.get("gradients"),
    }
    ctx.figure("active_subspace_prior_decay", f"Eigenvalues of the prior active-subspace matrix (θ ~ "
               f"{out['prior_description'].replace('θ ~ ', '')}), the top {k} from {N} draws.",
               lambda plot, path: plot.plot_eigenvalue_decay(out["eigenvalues"], label=label, save=path))
    ctx.figure("active_subspace_prior_layers", "Share of each top prior active direction in each parameter tensor.",
               lambda plot, path: plot.plot_layer_sensitivity(fractions[:, :min(k, 8)].numpy(),
                                                              list(res.layout.names), save=path))
    return out


#: section name → function(ctx) -> dict
SECTIONS = {"active_subspace_prior": _active_subspace_prior}

__all__ = ["SECTIONS", "parse_prior_option", "OPTION", "OFF"]
