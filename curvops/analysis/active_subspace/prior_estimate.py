r"""``active_subspace(..., prior=...)``: the eigendecomposition of the prior active-subspace matrix
(:mod:`.prior`) by the same plans and decompositions as the data-sample version (:mod:`.plan`,
:mod:`.eigenpairs`), with the same bootstrap (over the draws) and result type.

Factor F = G/√N (rows weighted by the bootstrap counts):

* ``stored``: G in memory (chunked gradients written in place), then any dense algorithm;
* ``streamed``: C = GᵀG/N accumulated chunk by chunk, G never held: all eigenpairs (``eigh``), or
  the top-k by block Krylov on C when G does not fit the memory budget (``gram-krylov``: one
  gradient pass, memory P² + one chunk, never N·P; eigenvalues to about ε·λ₁ absolutely, so the
  top-k relative accuracy holds for λ_k ≳ ε·λ₁/tol — always for the flat spectra of these priors);
* ``matfree``: products F V and Fᵀ U recompute the gradients chunk by chunk (one gradient pass
  per product; memory chunk·P plus the Krylov basis) — the top-k path when neither N·P nor P² fits.

Why not one pass with chunk-sized memory: a randomized range finder / Nyström sketch of C from one
pass (C Ω accumulated chunk by chunk) does not reach 1e-6 on these flat spectra — at the seed's
size (P = 5146, λ₂₀/λ₁ ≈ 0.72) a sketch of 2000 columns still errs by 1e-2 in the top-20
(docs/active-subspace-prior.md); the top-k at ``tol`` needs G kept (Krylov SVD, the fastest) or C.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from ...objective import Objective
from .factors import _add_gram, _DenseRows, _finish_gram
from .inputs import _check_common, _check_k
from .plan import _choose
from .prior import PriorGradientCovariance, _check_chunk, _check_num_samples, _parse_prior
from .result import ActiveSubspaceResult
from .summarize import _decompose_and_summarize


#: gradient entries gathered before each rank-update of C (:meth:`_PriorPasses.covariance`)
_GRAM_FLUSH_ENTRIES = 2**23


class _PriorPasses:
    """F = D G with G recomputed chunk by chunk on every call (streamed and matrix-free paths)."""

    def __init__(self, A: PriorGradientCovariance, multipliers: Tensor | None = None):
        self.A = A
        N, P = A.num_samples, A.shape[0]
        w = torch.ones(N, dtype=A.torch_dtype, device=A.device)
        w = w if multipliers is None else w * multipliers
        self.d = (w / w.sum()).sqrt()
        self.shape = (N, P)
        self.dtype, self.device = A.torch_dtype, A.device
        self.num_matvecs = 0
        self.num_passes = 0
        self.gradient_seconds = 0.0
        self.covariance_seconds = 0.0  # forming C from the chunks (part of the decomposition)

    def reweight(self, multipliers: Tensor) -> "_PriorPasses":
        return _PriorPasses(self.A, multipliers)

    def _chunks(self):
        self.num_passes += 1
        row, it = 0, iter(self.A.gradient_chunks())
        while True:
            t0 = time.perf_counter()
            Gc = next(it, None)
            self.gradient_seconds += time.perf_counter() - t0
            if Gc is None:
                return
            yield row, Gc * self.d[row:row + Gc.shape[0], None]
            row += Gc.shape[0]

    def matmat(self, V: Tensor) -> Tensor:  # [P, b] -> [N, b]
        self.num_matvecs += V.shape[1]
        out = torch.empty(self.shape[0], V.shape[1], dtype=V.dtype, device=V.device)
        for row, Fc in self._chunks():
            out[row:row + Fc.shape[0]] = Fc @ V
        return out

    def rmatmat(self, U: Tensor) -> Tensor:  # [N, b] -> [P, b]
        self.num_matvecs += U.shape[1]
        out = torch.zeros(self.shape[1], U.shape[1], dtype=U.dtype, device=U.device)
        for row, Fc in self._chunks():
            out.addmm_(Fc.T, U[row:row + Fc.shape[0]])
        return out

    def covariance(self) -> Tensor:
        """C = FᵀF from one gradient pass; the chunks are gathered into about 2²³ entries (64 MB in
        float64) before each rank-update: scipy's BLAS threads keep spinning after a ``syrk`` and
        slow the next chunk's gradients (at the seed's size 0.6–0.8 s over 20 updates of 512 rows)."""
        P = self.shape[1]
        C = torch.zeros(P, P, dtype=self.dtype, device=self.device)
        rows = max(1, _GRAM_FLUSH_ENTRIES // max(1, P))
        buf: list[Tensor] = []

        def flush():
            t0 = time.perf_counter()
            _add_gram(C, buf[0] if len(buf) == 1 else torch.cat(buf))
            buf.clear()
            self.covariance_seconds += time.perf_counter() - t0

        for _, Fc in self._chunks():
            buf.append(Fc)
            if sum(b.shape[0] for b in buf) >= rows:
                flush()
        if buf:
            flush()
        t0 = time.perf_counter()
        _finish_gram(C, None)
        self.covariance_seconds += time.perf_counter() - t0
        return C


def _reject(api: str, sampler, weights, center, subset, classes, g, has_data: bool) -> None:
    if sampler is not None:
        raise TypeError(f"{api}: pass either sampler= (inputs x ~ ρ at fixed parameters) or prior= (parameters "
                        f"θ ~ ρ over the fixed data set), not both.")
    if not has_data:
        raise TypeError(f"{api}: prior= averages the whole-data loss gradient over parameter draws; it needs the "
                        f"data set (data=, or an Objective), got none.")
    bad = [name for name, value in (("weights", weights), ("subset", subset), ("classes", classes))
           if value is not None] + (["center"] if center else [])
    if bad:
        raise ValueError(f"{api}: {', '.join(bad)} act on data samples and do not apply to prior= "
                         f"(the loss is over the whole data set); drop them or leave out prior=.")
    if not (isinstance(g, str) and g == "loss"):
        raise ValueError(f"{api}: prior= uses the whole-data loss L(θ); expected g='loss', got {g!r}.")


def _prior_active_subspace(model_or_objective, loss, data, *, prior, num_samples, g, k, method, memory_budget,
                           sampler, weights, center, subset, classes, bootstrap, confidence, tol,
                           return_eigenvectors, chunk_size, generator, objective_kwargs) -> ActiveSubspaceResult:
    """The ``prior=`` branch of :func:`~curvops.analysis.active_subspace.active_subspace` (documented there)."""
    api = "active_subspace"
    total_start = time.perf_counter()
    _reject(api, sampler, weights, center, subset, classes, g,
            data is not None or isinstance(model_or_objective, Objective))
    spec = _parse_prior(prior, api)
    N = _check_num_samples(num_samples, api)
    _check_chunk(chunk_size, api)
    gen = _check_common(method, memory_budget, tol, generator, api)
    A = PriorGradientCovariance(model_or_objective, loss, data, prior=spec,
                                num_samples=N, generator=gen, chunk_size=chunk_size, **objective_kwargs)
    P = A.shape[0]
    _check_k(k, N, P, api)
    item = torch.empty((), dtype=A.torch_dtype).element_size()
    chunk = A.resolve_chunk_size(memory_budget)
    vectors = bool(return_eigenvectors) or bootstrap > 0
    plan = _choose(method, int(memory_budget), k, N, P, item, chunk, bootstrap, vectors, api, gram_topk=True,
                   chunk_bytes=chunk * A.workspace_per_draw())

    timings: dict[str, float] = {}
    factor = _prior_factor(plan, A, timings)
    return _decompose_and_summarize(
        factor, plan, k, streamed=isinstance(factor, _PriorPasses), tol=tol, generator=gen, vectors=vectors,
        return_eigenvectors=return_eigenvectors, bootstrap=bootstrap, confidence=confidence, timings=timings,
        total_start=total_start, layout=A.objective.layout, method=plan.method,
        algorithm=f"{_describe(plan)}; prior {spec.description}", num_samples=N, total_weight=float(N), num_params=P)


def _prior_factor(plan, A: PriorGradientCovariance, timings: dict):
    """F = G/√N over the draws: G computed once and kept (``stored``), or recomputed chunk by chunk on
    every pass (``streamed``, ``matfree``); the seconds go to ``timings["gradients"]``."""
    start = time.perf_counter()
    if plan.path == "stored":
        # the chunks as they come (no copy into one N×P tensor unless a product needs G whole)
        factor = _DenseRows(list(A.gradient_chunks()), torch.ones(A.num_samples, dtype=A.torch_dtype, device=A.device),
                            False)
        factor.num_passes = 1
    else:
        factor = _PriorPasses(A)
    timings["gradients"] = time.perf_counter() - start
    return factor


def _describe(plan) -> str:
    if plan.path == "matfree":
        return ("block Krylov SVD of F, gradients recomputed in chunks per product" if plan.algorithm == "krylov"
                else "eigh of C accumulated from chunked gradients")
    return plan.description


__all__: list[str] = []
