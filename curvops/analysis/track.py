r"""Spectral summaries of a curvature operator tracked over training checkpoints.

``seeds/000`` asks how the quantities of a network evolve over time, $A(\theta_t)$.  For each
checkpoint θ_t, :func:`track` builds the operator (the Hessian, GGN, …) at θ_t and records

* ``top_eigenvalues`` / ``bottom_eigenvalues``: the k largest / smallest eigenvalues
  (:func:`~curvops.linalg.lanczos.eigsh`, ``which="LA"`` / ``"SA"``),
* ``trace``: :func:`~curvops.linalg.trace.trace`,
* ``density``: the spectral density by stochastic Lanczos quadrature
  (:func:`~curvops.linalg.density.spectral_density`; kept whole, one per step),
* ``cond``: the condition number (:func:`~curvops.linalg.summaries.cond`),
* ``loss`` and ``grad_norm``: $L(\theta_t)$ and $\|\nabla L(\theta_t)\|_2$,

in a tidy long table of rows ``(step, summary, index, value)``.
"""

from __future__ import annotations

import csv
import inspect
import numbers
import os
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from ..linalg import DensityResult, cond, eigsh, spectral_density, trace
from ..objective import Objective
from .averages import build_operator, model_at, resolve_operator, validate_checkpoints

SUMMARIES = ("top_eigenvalues", "bottom_eigenvalues", "trace", "density", "cond", "loss", "grad_norm")
#: summaries computed by a linear-algebra routine that accepts options
_ALGORITHMS = {"top_eigenvalues": eigsh, "bottom_eigenvalues": eigsh, "trace": trace, "density": spectral_density,
               "cond": cond}
COLUMNS = ("step", "summary", "index", "value")


@dataclass
class TrackResult:
    """Summaries per checkpoint as a tidy long table.

    Attributes:
        rows: one dict per value: ``{"step", "summary", "index", "value"}``.  Eigenvalues have
            ``index`` 0…k−1 (top: index 0 is the largest, descending; bottom: index 0 is the
            smallest, ascending); scalar summaries have ``index`` 0.  ``density`` adds no rows.
        steps: the step labels, one per checkpoint, in checkpoint order.
        densities: one :class:`~curvops.linalg.density.DensityResult` per step (``None``
            when ``density`` was not requested).
        diagnostics: one dict per (step, summary): ``num_matvecs``, ``converged``, ``seconds``.
        summaries: the summaries computed.
        k: eigenvalues per end.
        seed: seed of the per-step generators (every step uses the same random probes and start
            vectors).
        operator: the operator family's name.
    """

    rows: list[dict]
    steps: list
    densities: list[DensityResult | None]
    diagnostics: list[dict]
    summaries: tuple[str, ...]
    k: int
    seed: int
    operator: str = ""
    #: checkpoint position (0…T−1) of each row (steps may repeat)
    _positions: list[int] = field(default_factory=list, repr=False)

    def _check(self, summary: str, api: str) -> None:
        if summary not in self.summaries or summary == "density":
            have = [s for s in self.summaries if s != "density"]
            hint = " (densities are in .densities)" if summary == "density" else ""
            raise ValueError(f"TrackResult.{api}: expected a summary among {have}, got {summary!r}{hint}.")

    def column(self, summary: str, index: int | None = None) -> tuple[Tensor, Tensor]:
        """``(steps [T], values [T])`` of one summary (one eigenvalue index for eigenvalues).

        ``steps`` is int64 when every step label is an ``int``, float64 otherwise; ``values`` float64.

        Args:
            summary: a summary name in the table.
            index: which eigenvalue (0 = the largest for top, the smallest for bottom); may be
                left out for scalar summaries.

        Raises:
            ValueError: unknown summary, or ``index`` missing for eigenvalues / out of range.
        """
        self._check(summary, "column")
        rows = [r for r in self.rows if r["summary"] == summary]
        indices = sorted({r["index"] for r in rows})
        if index is None:
            if indices != [0]:
                raise ValueError(f"TrackResult.column: {summary!r} has indices {indices}; pass index= (or use "
                                 f".wide({summary!r})).")
            index = 0
        if index not in indices:
            raise ValueError(f"TrackResult.column: expected index in {indices} for {summary!r}, got {index!r}.")
        rows = [r for r in rows if r["index"] == index]
        steps = [r["step"] for r in rows]
        integral = all(isinstance(s, int) and not isinstance(s, bool) for s in steps)
        return (torch.tensor(steps, dtype=torch.long if integral else torch.float64),
                torch.tensor([r["value"] for r in rows], dtype=torch.float64))

    def wide(self, summary: str) -> Tensor:
        """``[T, k]`` float64 table of one summary (one row per step, NaN where a value is missing)."""
        self._check(summary, "wide")
        picked = [(t, r) for t, r in zip(self._positions, self.rows) if r["summary"] == summary]
        width = 1 + max(r["index"] for _, r in picked)
        out = torch.full((len(self.steps), width), float("nan"), dtype=torch.float64)
        for t, r in picked:
            out[t, r["index"]] = r["value"]
        return out

    def to_csv(self, path) -> None:
        """Write the table as CSV with header ``step,summary,index,value``."""
        with open(os.fspath(path), "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(COLUMNS)
            for r in self.rows:
                writer.writerow([r[c] for c in COLUMNS])

    def to_pandas(self):
        """The table as a ``pandas.DataFrame`` (pandas is optional, not a curvops dependency).

        Raises:
            ImportError: pandas is not installed.
        """
        try:
            import pandas as pd
        except ImportError as err:
            raise ImportError("TrackResult.to_pandas: pandas is not installed (it is not a curvops dependency); "
                              "install it, or use .rows / .to_csv(path).") from err
        return pd.DataFrame([{c: r[c] for c in COLUMNS} for r in self.rows], columns=list(COLUMNS))


def _objective_kwargs(kw: dict) -> dict:
    accepted = set(inspect.signature(Objective.__init__).parameters) - {"self", "model", "loss", "data"}
    return {k: v for k, v in kw.items() if k in accepted}


def _check_options(options, summaries, api: str) -> dict[str, dict]:
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise TypeError(f"{api}: expected options as a dict summary → dict of keyword arguments, "
                        f"got {type(options).__name__}.")
    out = {}
    for name, opts in options.items():
        if name not in _ALGORITHMS:
            raise ValueError(f"{api}: options apply to {sorted(_ALGORITHMS)}, got {name!r}.")
        if name not in summaries:
            raise ValueError(f"{api}: options for {name!r}, which is not among the summaries {list(summaries)}.")
        if not isinstance(opts, Mapping):
            raise TypeError(f"{api}: options[{name!r}] must be a dict of keyword arguments, got {type(opts).__name__}.")
        for banned in ("generator", "k", "which", "return_eigenvectors"):
            if banned in opts:
                raise ValueError(f"{api}: options[{name!r}] must not set {banned!r} (track sets it).")
        out[name] = dict(opts)
    return out


def _summaries(summaries, api: str) -> tuple[str, ...]:
    if isinstance(summaries, str):
        summaries = (summaries,)
    summaries = tuple(summaries)
    unknown = [s for s in summaries if s not in SUMMARIES]
    if unknown or not summaries:
        raise ValueError(f"{api}: expected summaries among {list(SUMMARIES)}, got {list(summaries)}.")
    if len(set(summaries)) != len(summaries):
        raise ValueError(f"{api}: summaries listed twice: {list(summaries)}.")
    return summaries


def _compute(name: str, A, objective_fn, k: int, opts: dict, gen) -> tuple[list[float], Any, int, bool]:
    """→ (values, raw result, num_matvecs, converged) of one summary at one step."""
    if name in ("top_eigenvalues", "bottom_eigenvalues"):
        which = "LA" if name == "top_eigenvalues" else "SA"
        if which == "SA":  # the small end of curvature spectra sits near 0: accuracy relative to ‖A‖
            opts = {"relative_to": "norm", **opts}
        res = eigsh(A, k, which=which, generator=gen, return_eigenvectors=False, **opts)
        vals = res.eigenvalues.tolist()  # ascending
        return (vals[::-1] if which == "LA" else vals), res, res.num_matvecs, res.converged
    if name == "trace":
        res = trace(A, generator=gen, **opts)
        return [res.value], res, res.num_matvecs, True
    if name == "density":
        res = spectral_density(A, generator=gen, **opts)
        return [], res, res.num_matvecs, True
    if name == "cond":
        res = cond(A, generator=gen, **opts)
        return [res.value], res, res.num_matvecs, res.converged
    obj = objective_fn()
    if name == "loss":
        return [obj.loss_value()], None, 0, True
    g = obj.gradient()
    return [float(torch.linalg.vector_norm(g.to(torch.float64)))], None, 0, True


def track(model, checkpoints, loss, data, *, operator="hessian", summaries: Sequence[str] = SUMMARIES, k: int = 5,
          steps: Sequence | None = None, options: Mapping[str, Mapping] | None = None,
          generator: torch.Generator | None = None, progress: bool = False, **kw) -> TrackResult:
    r"""Spectral summaries of a curvature operator at each of a sequence of checkpoints.

    For every checkpoint θ_t (loaded into a deep copy of ``model``; the model passed in is left
    untouched) the operator $A(\theta_t)$ is built on ``data`` and the requested summaries are
    computed by curvops' matrix-free linear algebra:

    ========================  =====================================================  ==========
    summary                   how                                                    rows/step
    ========================  =====================================================  ==========
    ``top_eigenvalues``       ``eigsh(A, k, which="LA")``, index 0 = λ_max           k
    ``bottom_eigenvalues``    ``eigsh(A, k, which="SA", relative_to="norm")``,       k
                              index 0 = λ_min
    ``trace``                 ``trace(A)`` (XTrace; exact once num_matvecs ≥ P)       1
    ``density``               ``spectral_density(A)`` → ``result.densities[t]``      0
    ``cond``                  ``cond(A)``                                            1
    ``loss``                  $L(\theta_t)$                                          1
    ``grad_norm``             $\|\nabla L(\theta_t)\|_2$                              1
    ========================  =====================================================  ==========

    Every step uses a fresh generator with one seed (drawn once from ``generator``), so the
    random probes and start vectors are the same at every checkpoint (common random numbers:
    step-to-step changes of a stochastic estimate reflect the model, not the probes).

    **Cost**: per checkpoint one load and one model copy, plus the products of each summary:
    eigsh typically 2–5 × its basis size (``ncv``, default ≈ 3k + 1) per end; trace
    ``num_matvecs`` (default 100, or P when P ≤ 100); density ``num_probes × num_steps``
    (default 10 × 80, in 80 passes); cond one both-ends eigsh (more for indefinite operators);
    loss and grad_norm one pass each.  Each product is one data pass for a curvature operator.

    Args:
        model: the ``nn.Module`` the checkpoints belong to.
        checkpoints: state dicts, file paths (``torch.load(path, weights_only=True,
            map_location=<model's device>)``) or modules of the same architecture; all are
            checked (keys, shapes) before any work.
        loss, data: as for :class:`curvops.Objective`.
        operator: ``"hessian"``, ``"ggn"`` (or another name in
            :data:`curvops.analysis.averages.OPERATORS`), an operator class, or a callable
            ``(model, loss, data, **kw) -> Operator``.
        summaries: which of the summaries above to compute.
        k: eigenvalues per end, 1 ≤ k < P.
        steps: one label per checkpoint (e.g. training iterations); default 0, 1, ….
        options: per-summary keyword arguments for the algorithm, e.g.
            ``{"top_eigenvalues": {"tol": 1e-8}, "trace": {"num_matvecs": 200},
            "density": {"num_steps": 40, "grid": torch.linspace(-1, 5, 200)}}`` (a shared grid
            makes densities comparable across steps).
        generator: random source of the seed (reproducibility); the global RNG when None.
        progress: show a tqdm progress bar over the checkpoints.
        **kw: passed to the operator (e.g. ``batch_size=``, ``params=``).

    Returns:
        :class:`TrackResult`: ``.rows``, ``.column(summary, index)``, ``.wide(summary)``,
        ``.to_csv(path)``, ``.to_pandas()``, ``.densities``, ``.diagnostics``.

    Raises:
        TypeError: a model that is not an ``nn.Module``, checkpoints of the wrong kind, bad options.
        ValueError: unknown summaries, a bad ``k`` or ``steps``, checkpoints that do not match
            the model (missing/unexpected keys, shapes) — before any product.

    Example:
        >>> res = track(model, ["ep1.pt", "ep2.pt", "ep3.pt"], "cross_entropy", (X, y),  # doctest: +SKIP
        ...             summaries=("top_eigenvalues", "trace", "loss"), k=3, steps=[1, 2, 3])
        >>> steps, lam_max = res.column("top_eigenvalues", index=0)                      # doctest: +SKIP
        >>> res.wide("top_eigenvalues").shape                                            # doctest: +SKIP
        torch.Size([3, 3])
    """
    api = "track"
    factory = resolve_operator(operator, api)
    names = _summaries(summaries, api)
    opts = _check_options(options, names, api)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{api}: expected a positive integer k, got {k!r}.")
    checkpoints = validate_checkpoints(model, checkpoints, api)
    T = len(checkpoints)
    steps = list(range(T)) if steps is None else list(steps)
    if len(steps) != T:
        raise ValueError(f"{api}: expected {T} steps (one per checkpoint), got {len(steps)}.")
    bad = [s for s in steps if isinstance(s, bool) or not isinstance(s, numbers.Real)]
    if bad:
        raise TypeError(f"{api}: expected numeric steps (e.g. iterations or epochs), got {bad[:3]}.")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{api}: expected a torch.Generator, got {type(generator).__name__}.")
    gdev = generator.device if generator is not None else torch.device("cpu")
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=gdev))
    op_name = operator if isinstance(operator, str) else getattr(operator, "__name__", type(operator).__name__)

    from tqdm.auto import tqdm

    rows, positions, diagnostics, densities = [], [], [], []
    bar = tqdm(total=T, desc=api, disable=not progress)
    try:
        for t, (ck, step) in enumerate(zip(checkpoints, steps)):
            twin = model_at(model, ck, t, api)
            A = build_operator(factory, twin, loss, data, kw, api, f"checkpoint {t}")
            n = A.shape[0]
            if any(s.endswith("eigenvalues") for s in names) and k >= n:
                raise ValueError(f"{api}: expected k < {n} (the operator's size) for eigenvalues, got k={k}.")
            cache: dict[str, Objective] = {}

            def objective_fn(A=A, twin=twin, cache=cache):
                if "obj" not in cache:
                    obj = getattr(A, "objective", None)
                    cache["obj"] = obj if isinstance(obj, Objective) else Objective(
                        twin, loss, data, **_objective_kwargs(kw))
                return cache["obj"]

            density = None
            for name in names:
                gen = torch.Generator(device=gdev).manual_seed(seed)
                start = time.perf_counter()
                values, raw, mv, ok = _compute(name, A, objective_fn, k, opts.get(name, {}), gen)
                if name == "density":
                    density = raw
                for i, v in enumerate(values):
                    rows.append({"step": step, "summary": name, "index": i, "value": float(v)})
                    positions.append(t)
                diagnostics.append({"step": step, "summary": name, "num_matvecs": mv, "converged": ok,
                                    "seconds": time.perf_counter() - start})
            densities.append(density)
            del A, twin
            bar.update(1)
    finally:
        bar.close()
    return TrackResult(rows=rows, steps=steps, densities=densities, diagnostics=diagnostics, summaries=names,
                       k=k, seed=seed, operator=op_name, _positions=positions)
