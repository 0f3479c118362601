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

This module is the driver; the sections are in :mod:`~curvops.report.sections_curvature` (Hessian
and GGN) and :mod:`~curvops.report.sections_model` (overview, NTK, active subspace, landscape,
architecture), what they share in :mod:`~curvops.report.context`, the budgets in
:mod:`~curvops.report.budgets`, condition numbers made consistent with ranks in
:mod:`~curvops.report.consistency`, and ``summary.json`` in :mod:`~curvops.report.summary`.
Under torch.distributed (``distributed=True``, ``curvops report`` under ``torchrun``) the sharding,
the mode of each section and the agreement of the ranks after each section are in
:mod:`~curvops.report.ranks`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import asdict

from . import ranks as _ranks
from . import sections_curvature, sections_model
from .budgets import Budgets
from .context import Context, Pending, Skipped
from .summary import HTML_FILE, SUMMARY_FILE, environment, finish_summary, format_traceback, to_jsonable, write_summary

__all__ = ["SECTIONS", "Budgets", "build_report", "to_jsonable", "SUMMARY_FILE", "HTML_FILE"]

#: section keys, in the order they run and appear
SECTIONS = ("overview", "eigenvalues", "hessian_matrix", "density", "trace", "condition", "rank", "stationary",
            "ntk", "active_subspace", "active_subspace_prior", "landscape", "architecture")

#: section name → function(ctx) -> dict of its results
_SECTION_FUNCS = {**sections_model.SECTIONS, **sections_curvature.SECTIONS}
_SECTION_FUNCS = {name: _SECTION_FUNCS[name] for name in SECTIONS}


def build_report(model, loss, data, outdir, *, quick: bool = False, top_k: int | None = None, params=None,
                 progress: bool = True, seed: int = 0, batch_size: int | None = None, strict: bool = False,
                 source: dict | None = None, sections=None, warnings=None, distributed: bool = False,
                 process_group=None, active_subspace_prior: str = "off") -> dict:
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

    The report is written as it goes: after each section, ``summary.json`` and ``index.html``
    hold the sections done so far (``summary["complete"]`` is False and the first warning names
    the sections not run), so a run that is interrupted (Ctrl-C), killed, or stopped by a section
    error under ``strict`` keeps its finished sections; the error is then re-raised.  The final
    write sets ``complete`` to True.

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
        progress: tqdm progress bars on stderr: one over the sections, and one inside the running
            section counting its operator products (landscape: its loss evaluations).
        seed: the seed of every randomized step (see the module docstring).
        batch_size: split ``(X, y)`` into batches of this size.
        strict: re-raise the first section error instead of recording it.
        source: free-form description of where model and data came from (recorded).
        sections: run only these sections (default all but ``"active_subspace_prior"`` when that is
            off; ``"overview"`` always runs).
        active_subspace_prior: the optional active subspace over parameter draws
            (:mod:`~curvops.report.sections_prior`): ``"off"`` (default), ``"standard_normal"`` or
            ``"around:<sigma>"`` (θ ~ N(θ₀, σ²I)).  Asked for by name in ``sections`` while off,
            the section is recorded as skipped with the reason.
        warnings: sentences to show at the top of the report (e.g. "the weights are untrained");
            stored in ``summary["warnings"]`` before those about failed sections.
        distributed, process_group: run on the ranks of ``torch.distributed`` (``distributed=True``:
            the default group; ``curvops report`` under ``torchrun`` does this).  Every rank calls
            ``build_report`` with the same model and the *whole* data; each rank takes its contiguous
            shard (:func:`curvops.report.ranks.shard_data`).  The Hessian/GGN sections are
            data-parallel and equal the one-process report to rounding, and so is the loss
            landscape; the NTK, active-subspace and architecture sections run on rank 0 alone on the
            first samples of the whole data.  Only rank 0 writes files and shows
            progress; every rank returns rank 0's summary.  A section that fails on one rank fails
            on every rank.  See docs/distributed.md.

    Returns:
        The summary dict (JSON-native: lists, floats, strings; non-finite floats as ``"inf"``/``"nan"``).

    Raises:
        ValueError / TypeError: bad arguments (from :class:`~curvops.Objective` and the budgets),
            before any pass over the data; under torch.distributed a model or data that differs
            across ranks (on every rank); any section error when ``strict``.

    Example:
        >>> model, X, y = curvops.demo.demo_problem()                         # doctest: +SKIP
        >>> s = build_report(model, "cross_entropy", (X, y), "out", quick=True)  # doctest: +SKIP
        >>> s["sections"]["eigenvalues"]["hessian_top"]["eigenvalues"][0]      # doctest: +SKIP
        0.2402...
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    from .sections_prior import OFF, parse_prior_option

    prior_off = parse_prior_option(active_subspace_prior) is None  # a bad value fails here, before any work
    default = [s for s in SECTIONS if not (prior_off and s == "active_subspace_prior")]
    wanted = default if sections is None else ["overview"] + [s for s in sections if s != "overview"]
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown:
        raise ValueError(f"build_report: expected sections among {list(SECTIONS)}, got unknown {unknown}.")
    if not isinstance(seed, int):
        raise TypeError(f"build_report: expected an integer seed, got {type(seed).__name__}.")
    if warnings is not None and (isinstance(warnings, str) or not all(isinstance(w, str) for w in warnings)):
        raise TypeError(f"build_report: expected warnings as a list of strings, got {warnings!r}. "
                        f"Pass e.g. warnings=['the weights are untrained'].")
    ranks = _ranks.setup(process_group, distributed)
    if ranks is not None:
        _ranks.check_same(ranks, model, data)
        progress = progress and ranks.rank == 0
    ctx = Context(model, loss, data, params=params, batch_size=batch_size, budgets_kw=dict(quick=quick, top_k=top_k),
                  seed=seed, outdir=str(outdir), strict=strict, progress=progress, ranks=ranks)
    ctx.options = {"active_subspace_prior": active_subspace_prior if not prior_off else OFF}
    writer = ctx.rank == 0  # under torch.distributed only rank 0 writes
    if writer:
        os.makedirs(outdir, exist_ok=True)
    summary: dict = {
        "title": "curvops curvature report",
        "environment": environment(ctx.device, ctx.objective.dtype, ranks),
        "settings": {"quick": bool(quick), "seed": seed, "batch_size": batch_size,
                     "active_subspace_prior": str(active_subspace_prior),
                     "params": None if params is None else list(ctx.objective.layout.names),
                     "generator": "each randomized call: torch.Generator(device).manual_seed(seed)",
                     "budgets": asdict(ctx.budgets)},
        "source": source or {"model": type(model).__name__},
        "warnings": list(warnings or []), "failed_sections": [],
        "sections": {}, "timings": {}, "figures": {},
    }
    if ranks is not None:
        summary["distributed"] = ranks.record(wanted)
    bar = tqdm(total=len(wanted), desc="curvops report", unit="section", file=sys.stderr, disable=not progress,
               leave=False)
    try:
        for i, name in enumerate(wanted):
            bar.set_postfix_str(name)
            t0 = time.perf_counter()
            run = _run_section if ranks is None else _run_distributed
            summary["sections"][name] = run(name, ctx, summary, strict)
            summary["timings"][name] = time.perf_counter() - t0
            bar.update(1)
            if i + 1 < len(wanted) and writer:  # the report so far, in case the run stops before the next write
                _write_partial(summary, ctx, outdir, start, f"{i + 1} of {len(wanted)} sections done; not run yet: "
                                                            f"{', '.join(wanted[i + 1:])} (the run was stopped, or "
                                                            f"is still going)")
    except BaseException as err:  # KeyboardInterrupt, SystemExit, a section error under strict: keep what is done
        missing = [n for n in wanted if n not in summary["sections"]]
        if not writer:
            raise
        try:
            _write_partial(summary, ctx, outdir, start, f"the run stopped in the {missing[0]} section "
                                                        f"({type(err).__name__}); not run: {', '.join(missing)}"
                           if missing else f"the run stopped ({type(err).__name__}) before the final write")
        except Exception:  # noqa: S110 - the error that stopped the run is the one to report
            pass
        raise
    finally:
        bar.close()
    summary["timings"]["total"] = time.perf_counter() - start
    summary = finish_summary(summary, ctx.figures, complete=True)
    if writer:
        write_summary(summary, outdir)
    return summary if ranks is None else ranks.broadcast(summary)  # rank 0's summary on every rank


def _attempt(name: str, ctx: Context) -> tuple[dict, Exception | None]:
    """Run one section (with its inner progress bar): its result, or its status and error (and the error)."""
    try:
        with ctx.steps(name, unit="point" if name == "landscape" else "product"):
            return {"status": "ok", **_SECTION_FUNCS[name](ctx)}, None
    except Pending as why:
        return {"status": "pending", "message": str(why)}, None
    except Skipped as why:
        return {"status": "skipped", "message": str(why)}, None
    except Exception as err:
        return {"status": "error", "message": f"{type(err).__name__}: {err}", "traceback": format_traceback(err)}, err


def _run_section(name: str, ctx: Context, summary: dict, strict: bool) -> dict:
    """Run one section; a failure is recorded in the summary (re-raised when ``strict``)."""
    result, err = _attempt(name, ctx)
    if err is not None:
        if strict:
            raise err
        _record_failure(summary, name, result["message"])
    return result


def _record_failure(summary: dict, name: str, message: str) -> None:
    summary["failed_sections"].append(name)
    summary["warnings"].append(f"The {name} section failed: {message}")


def _run_distributed(name: str, ctx: Context, summary: dict, strict: bool) -> dict:
    """One section under torch.distributed, in its mode (:data:`curvops.report.ranks.MODES`), then one
    ``all_gather_object`` of every rank's status and result hash: a failure on any rank fails the
    section on every rank; results that differ across ranks are reported."""
    ranks = ctx.ranks
    mode = ranks.mode(name)
    if mode == "skip":
        return {"status": "skipped", "message": _ranks.skip_message(name)}
    result, err = {"status": "ok"}, None  # ranks other than 0 of a rank-0 section keep rank 0's result
    if mode == "all" or ranks.rank == 0:
        with ctx.local() if mode == "rank0" else contextlib.nullcontext():
            result, err = _attempt(name, ctx)
    if name == "overview" and result["status"] == "ok":  # the whole data's count, not the shard's
        with ctx.local():
            result["num_samples"] = _num_samples(ctx.objective)
    digest = _ranks.result_hash(result) if mode == "all" and result["status"] == "ok" else None
    seen = ranks.gather((result["status"], result.get("message"), digest))
    failed = [(r, m) for r, (status, m, _) in enumerate(seen) if status == "error"]
    if failed:
        message = "; ".join(f"rank {r}: {m}" for r, m in failed)
        if strict:
            raise err if err is not None else RuntimeError(f"The {name} section failed on another rank: {message}")
        result = {"status": "error", "message": message,
                  **({"traceback": result["traceback"]} if "traceback" in result else {})}
        _record_failure(summary, name, message)
        return result
    if mode == "rank0":
        result["computed_on"] = "rank 0 alone, on the first samples of the whole data (as one process)"
    differ = sorted({r for r, (_, _, d) in enumerate(seen) if d != seen[0][2]})
    if differ:
        summary["warnings"].append(f"The {name} section's numbers differ on ranks {differ} from rank 0's (shown); "
                                   f"the ranks' products were not bitwise identical.")
    return result


def _num_samples(objective) -> int | None:
    try:
        return objective.num_samples()
    except TypeError:
        return None


def _write_partial(summary: dict, ctx: Context, outdir, start: float, what: str) -> None:
    """Write the report of the sections done so far, marked incomplete (``what``: why and what is missing)."""
    partial = finish_summary(summary, ctx.figures, complete=False, note=f"The report is incomplete: {what}.")
    partial["timings"]["total"] = time.perf_counter() - start
    write_summary(partial, outdir)
