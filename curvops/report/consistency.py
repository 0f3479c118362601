"""Consistency of the figures: condition numbers stated so that they agree with the ranks.

:func:`cond_status` turns a :func:`~curvops.cond` result into a status, a display string, a
caveat and a note; :func:`reconcile` then corrects the condition numbers where the rank section
shows the operator numerically singular (κ = ∞ to working precision) or knows every eigenvalue
(κ exact), so the page never shows a finite κ beside a rank that says otherwise.
"""

from __future__ import annotations

import math


def cond_status(value: float, status: str, num_matvecs: int, zero_threshold: float, largest: float) -> dict:
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


def cutoff_text(r: dict) -> str:
    """``"λ₁·n·ε = 1.9e-14"``: the rank's cutoff by its rule's name and value."""
    rule = r["tol_rule"].split(" = ")[0] if " = " in r["tol_rule"] else r["tol_rule"]
    return f"{rule} = {r['tol']:.4g}"


def around_text(r: dict) -> str:
    sym, k = r["symbol"], r["value"]
    parts = [f"{sym}{k} = {r['above']:.4g}"] if k > 0 else []
    if not math.isnan(r["below"]):
        parts.append(f"{sym}{k + 1} = {r['below']:.4g}")
    return ", ".join(parts)


def reconcile(sections: dict) -> None:
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
