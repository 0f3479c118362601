r"""Influence functions on any curvops curvature: which training samples move a query's loss.

:func:`influence` gives the train × query matrix of influence scores

.. math:: \mathcal{I}_{ij} = -\nabla_\theta \ell(z^{q}_j)^\top (C + \delta I)^{-1} \nabla_\theta \ell(z_i),

the derivative of query j's loss with respect to an extra weight ε on training sample i's loss in the
training objective (Koh & Liang 2017), for any curvature ``C`` — the GGN (default), the Hessian, the
empirical or the true Fisher, or an operator with its own damped inverse (KFAC, EKFAC: the
EK-FAC influence of Grosse et al. 2023). :func:`self_influence` gives
$\nabla\ell(z_i)^\top (C + \delta I)^{-1}\nabla\ell(z_i)$ per training sample.

Conventions (docs/guide/influence.md):

* ``ℓ(z)`` is the loss of one sample alone, as torch computes it on that sample with the loss's own
  reduction over its elements (as in :class:`~curvops.EmpiricalFisher`);
* ``C`` is normalized like the training loss ``L`` (a mean or a sum over the training data, as the
  loss says; docs/conventions.md), and ``δ`` is the damping: the scores are exact derivatives for the
  training objective $L(\theta) + \frac{\delta}{2}\|\theta\|^2$ at its minimum when ``C`` is its
  Hessian;
* removing training sample i is ``ε = −w_i`` with ``L = Σ_i w_i ℓ_i`` (``w_i = 1/N`` for a mean,
  1 for a sum): :meth:`InfluenceResult.removal_effect` is the predicted change of each query loss.

The inverse is applied to the query gradients (few), never to the training ones: one block solve
with a column per query sample (one data pass per iteration for all of them), then the training
gradients stream through in chunks, each multiplied by the solved block.

References:
    Koh, Liang (2017). *Understanding Black-box Predictions via Influence Functions*. ICML.
    Grosse et al. (2023). *Studying Large Language Model Generalization with Influence Functions*.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from ..linalg._checks import check_flag, check_optional_int, check_real
from ..objective import Objective
from ..operators import GGN
from ._influence_grads import (check_curvature, check_damping, damped_inverse, inverse_apply, loss_weights,
                               resolve_solver, stream_gradients)
from ._influence_result import InfluenceResult, SelfInfluenceResult

__all__ = ["influence", "self_influence", "InfluenceResult", "SelfInfluenceResult"]


def _objective(model, loss, data, kwargs: dict, what: str, api: str) -> Objective:
    if data is None:
        raise TypeError(f"{api}: expected {what} (an (X, y) pair, a list of batches or a DataLoader), got None.")
    if loss is None:
        raise TypeError(f"{api}: expected a loss (a name such as 'cross_entropy', a torch loss or a callable "
                        f"with reduction=); influence is defined through the per-sample losses.")
    if isinstance(model, Objective):
        raise TypeError(f"{api}: expected the model (an nn.Module or a function f(params, x)), got an Objective; "
                        f"pass the model, the loss and the data, with params=/batch_size= as keywords.")
    obj = Objective(model, loss, data, **kwargs)
    if obj.process_group is not None:
        raise ValueError(f"{api}: data sharded over torch.distributed ranks is not supported; run it in one process.")
    return obj


def _settings(damping, rtol, atol, max_iters, chunk_size, strict, api):
    damping = check_damping(damping, api)
    rtol = check_real(rtol, "rtol", api, minimum=0.0, expected="rtol >= 0")
    atol = check_real(atol, "atol", api, minimum=0.0, expected="atol >= 0")
    max_iters = check_optional_int(max_iters, "max_iters", api, minimum=0, expected="max_iters >= 0")
    chunk_size = check_optional_int(chunk_size, "chunk_size", api, minimum=1, expected="chunk_size >= 1")
    check_flag(strict, "strict", api)
    return damping, rtol, atol, max_iters, chunk_size


def _describe(C) -> str:
    return f"{type(C).__name__} {C.shape[0]}×{C.shape[1]}"


def influence(model, loss=None, train_data=None, query_data=None, *, curvature=None, damping: float = 0.0,
              solver: str = "auto", rtol: float = 1e-8, atol: float = 0.0, max_iters: int | None = None,
              chunk_size: int | None = None, query_chunk_size: int | None = None, strict: bool = False,
              **objective_kwargs) -> InfluenceResult:
    r"""Influence of every training sample on the loss of every query sample.

    .. math:: \mathcal{I}_{ij} = -\nabla\ell(z^{q}_j)^\top (C + \delta I)^{-1} \nabla\ell(z_i)
              \qquad (i: \text{training sample},\ j: \text{query sample})

    ``scores[i, j] > 0``: up-weighting training sample i raises query j's loss (a harmful sample;
    removing it is predicted to lower the loss by ``w_i · scores[i, j]``); ``< 0``: a helpful one.
    Sign, normalization and the per-sample losses are those of the module docstring and
    :class:`InfluenceResult`.

    **Cost**: one pass for the query gradients (``vmap(grad)``, memory ``N_query · P``, or
    ``query_chunk_size · P`` with query chunks); the solve:
    with ``solver="inverse"`` one product with the operator's own damped inverse, with ``"cg"`` or
    ``"minres"`` one block solve whose iterations each cost one product of ``C`` with the
    ``N_query`` columns still iterating (one data pass); one pass for the training gradients in
    chunks of ``chunk_size`` samples (memory ``chunk · P``, never ``N_train · P``); two passes that
    read only the targets (the per-sample weights).  With ``query_chunk_size`` the solve and the
    training pass run once per chunk of queries.  The model is left as found.

    Args:
        model: an ``nn.Module`` or a function ``f(params, x)`` (with ``params=``), at the trained
            parameters.
        loss: the training loss (``"cross_entropy"``, ``"mse"``, a torch loss, a callable with
            ``reduction=``), as for :class:`~curvops.Objective`.
        train_data: the training data (an ``(X, y)`` pair, a list of batches, a non-shuffling DataLoader).
        query_data: the samples whose losses are explained (test points), in the same forms.
        curvature: a curvops operator on the same parameters — ``GGN``, ``Hessian``,
            ``EmpiricalFisher``, ``Fisher``, ``KFAC``/``EKFAC``, a composite — or None for
            ``GGN`` over ``train_data``.
        damping: δ ≥ 0 added to the curvature (needed when ``C`` is singular or, for a Hessian,
            indefinite).  With ``solver="inverse"`` it is passed to ``curvature.inverse(damping=δ)``
            and means what that operator's inverse says (KFAC: see its docstring).
        solver: ``"auto"`` (the operator's own ``inverse`` if it has one, else CG for a PSD
            curvature and MINRES for a symmetric one), ``"inverse"``, ``"cg"``, ``"minres"``.
        rtol, atol, max_iters: tolerances of the iterative solve (see :func:`~curvops.solve`).
        chunk_size: training (and query) samples per ``vmap(grad)`` chunk (default: about 4M
            gradient entries).
        query_chunk_size: None (all query gradients at once: one solve, one training pass), or the
            number of queries per solve, bounding the memory of the query gradients and solutions
            at ``2 · query_chunk_size · P`` (one training pass per chunk).
        strict: raise :class:`~curvops.linalg.ConvergenceError` when the solve does not converge
            (otherwise a :class:`~curvops.linalg.ConvergenceWarning` and ``result.converged`` False).
        **objective_kwargs: passed to both :class:`~curvops.Objective`\ s (``params=``,
            ``batch_size=``, ``reduction=``, ...).

    Returns:
        :class:`InfluenceResult` (``scores [N_train, N_query]``, ``top_k``, ``harmful``, ``helpful``,
        ``removal_effect``, solver diagnostics, timings).

    Raises:
        TypeError: a missing loss or data, a curvature that is not a curvops operator.
        ValueError: a curvature on other parameters (shape, names, dtype, device), a solver that
            does not fit the curvature (``"cg"`` on a Hessian, ``"inverse"`` without an ``inverse``
            method), a negative damping, bad tolerances or chunk size — all before any pass.
        ConvergenceError: with ``strict=True`` when the solve did not converge.

    Example:
        >>> import torch, curvops
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
        >>> X, y = torch.randn(40, 2, dtype=torch.float64), torch.randint(0, 3, (40,))
        >>> res = curvops.analysis.influence(model, "cross_entropy", (X, y), (X[:2], y[:2]), damping=1e-2)
        >>> res.scores.shape, res.solver, res.converged
        (torch.Size([40, 2]), 'cg', True)
        >>> bool(res.scores[0, 0] < 0) and bool(res.scores[1, 1] < 0)   # a sample helps its own loss
        True
    """
    api = "influence"
    damping, rtol, atol, max_iters, chunk_size = _settings(damping, rtol, atol, max_iters, chunk_size, strict, api)
    query_chunk_size = check_optional_int(query_chunk_size, "query_chunk_size", api, minimum=1,
                                          expected="query_chunk_size >= 1")
    train = _objective(model, loss, train_data, objective_kwargs, "train_data", api)
    query = _objective(model, loss, query_data, objective_kwargs, "query_data", api)
    C = GGN(train) if curvature is None else check_curvature(curvature, train, api)
    method = resolve_solver(C, solver, api)
    inv = damped_inverse(C, method, damping, api)
    P = train.num_params
    timings = {"query_gradients": 0.0, "solve": 0.0, "train_gradients": 0.0}
    w_query, w_train = loss_weights(query), loss_weights(train)
    kept_query = w_query > 0 if query.reduction == "mean" else torch.ones_like(w_query, dtype=torch.bool)
    kept_train = w_train > 0 if train.reduction == "mean" else torch.ones_like(w_train, dtype=torch.bool)
    scores = torch.zeros(w_train.shape[0], w_query.shape[0], dtype=train.dtype, device=train.device)
    solves: list = []

    def explain(cols: Tensor, Q: Tensor) -> None:
        """The scores of the queries ``cols`` (gradients ``Q [c, P]``): one solve, one training pass."""
        t0 = time.perf_counter()
        X, result = inverse_apply(C, inv, Q.T.contiguous(), solver=method, damping=damping, rtol=rtol, atol=atol,
                                  max_iters=max_iters, strict=strict, api=api)  # [P, c]
        timings["solve"] += time.perf_counter() - t0
        if result is not None:
            solves.append(result)
        t0 = time.perf_counter()
        cols = cols.to(scores.device)

        def score(rows: Tensor, G: Tensor) -> None:
            scores[rows.to(scores.device)[:, None], cols[None, :]] = -(G @ X)

        stream_gradients(train, kept_train, score, chunk_size)
        timings["train_gradients"] += time.perf_counter() - t0

    t0 = time.perf_counter()
    if query_chunk_size is None:
        Q = torch.zeros(w_query.shape[0], P, dtype=train.dtype, device=train.device)  # [M, P]

        def put(rows: Tensor, G: Tensor) -> None:
            Q[rows.to(Q.device)] = G

        stream_gradients(query, kept_query, put, chunk_size)
        timings["query_gradients"] = time.perf_counter() - t0
        explain(torch.arange(Q.shape[0]), Q)
    else:
        def chunk(rows: Tensor, G: Tensor) -> None:  # the query pass runs a solve and a training pass per chunk
            timings["query_gradients"] += time.perf_counter() - mark[0]
            explain(rows, G)
            mark[0] = time.perf_counter()

        mark = [t0]
        stream_gradients(query, kept_query, chunk, query_chunk_size)
        timings["query_gradients"] += time.perf_counter() - mark[0]
    return InfluenceResult(scores=scores, loss_weights=w_train, solver=method, damping=damping,
                           solve=solves[0] if len(solves) == 1 else None, solves=solves, curvature=_describe(C),
                           chunk_size=chunk_size, timings=timings)


def self_influence(model, loss=None, train_data=None, *, curvature=None, damping: float = 0.0,
                   solver: str = "auto", rtol: float = 1e-8, atol: float = 0.0, max_iters: int | None = None,
                   chunk_size: int | None = None, strict: bool = False, **objective_kwargs) -> SelfInfluenceResult:
    r"""Self-influence of every training sample, $s_i = \nabla\ell(z_i)^\top (C + \delta I)^{-1}\nabla\ell(z_i)$.

    The negative of sample i's influence on its own loss (:func:`influence` with the query = the
    sample), so ``s_i ≥ 0`` for a positive definite ``C + δI``; large values flag samples that the
    model fits only by bending around them (mislabelled or atypical ones).

    **Cost**: one pass for the training gradients in chunks of ``chunk_size`` samples; per chunk one
    inverse product (``solver="inverse"``) or one block solve with a column per sample of the chunk
    (its iterations each cost one data pass with those columns) — N_train right-hand sides in all,
    so this costs about N_train / N_query times an :func:`influence` solve. Memory: a chunk's
    gradients and solutions (2 · chunk · P).

    Args:
        model, loss, train_data, curvature, damping, solver, rtol, atol, max_iters, chunk_size,
            strict, **objective_kwargs: as for :func:`influence`.

    Returns:
        :class:`SelfInfluenceResult` (``scores [N_train]``, ``top_k``, per-chunk solve diagnostics).

    Raises:
        As :func:`influence`.

    Example:
        >>> import torch, curvops
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
        >>> X, y = torch.randn(40, 2, dtype=torch.float64), torch.randint(0, 3, (40,))
        >>> s = curvops.analysis.self_influence(model, "cross_entropy", (X, y), damping=1e-2)
        >>> s.scores.shape, bool((s.scores > 0).all())
        (torch.Size([40]), True)
    """
    api = "self_influence"
    damping, rtol, atol, max_iters, chunk_size = _settings(damping, rtol, atol, max_iters, chunk_size, strict, api)
    train = _objective(model, loss, train_data, objective_kwargs, "train_data", api)
    C = GGN(_objective(model, loss, train_data, objective_kwargs, "train_data", api)) if curvature is None \
        else check_curvature(curvature, train, api)  # its own Objective: its passes run inside this one's
    method = resolve_solver(C, solver, api)
    inv = damped_inverse(C, method, damping, api)
    w = loss_weights(train)
    kept = w > 0 if train.reduction == "mean" else torch.ones_like(w, dtype=torch.bool)
    scores = torch.zeros(w.shape[0], dtype=train.dtype, device=train.device)
    solves: list = []
    t0 = time.perf_counter()

    def consume(rows: Tensor, G: Tensor) -> None:
        Xc, res = inverse_apply(C, inv, G.T.contiguous(), solver=method, damping=damping, rtol=rtol, atol=atol,
                                max_iters=max_iters, strict=strict, api=api)
        if res is not None:
            solves.append(res)
        scores[rows.to(scores.device)] = (G * Xc.T).sum(dim=1)

    stream_gradients(train, kept, consume, chunk_size)
    return SelfInfluenceResult(scores=scores, loss_weights=w, solver=method, damping=damping, solves=solves,
                               curvature=_describe(C), chunk_size=chunk_size,
                               timings={"total": time.perf_counter() - t0})
