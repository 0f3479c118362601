r"""Spectral and nuclear norm of an operator: Lanczos for the largest singular value, traces for the sum.

References:
    Golub, Kahan (1965). *Calculating the Singular Values and Pseudo-Inverse of a Matrix.*
    Hutchinson (1989). *A Stochastic Estimator of the Trace of the Influence Matrix for Laplacian
    Smoothing Splines.*
    Ubaru, Chen, Saad (2017). *Fast Estimation of tr(f(A)) via Stochastic Lanczos Quadrature.*
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ._checks import check_choice, check_generator, check_int, check_optional_int
from ._primitives import _check_eig_args, _gram, _nonempty_operator, apply, random_block
from .density import slq_trace
from .eigensolver import eigsh


#: methods of :func:`curvops.linalg.trace.trace` for ``nuclear_norm(trace_method=...)``, with the fewest
#: products each needs (as :func:`~curvops.linalg.trace.trace` requires them)
_TRACE_BUDGETS = {"hutchinson": 1, "hutch++": 3, "xtrace": 4, "xnystrace": 2}


@dataclass
class NormEstimate:
    """A norm estimate.

    Attributes:
        value: the estimate.
        method: how it was computed.
        num_matvecs: products with A (a product with Aᵀ counts as one).
        converged: the eigensolver met its tolerance (stochastic estimates: True).
        stderr: standard error of a stochastic estimate (NaN for deterministic ones).
        residual: eigen-residual of the extremal pair (NaN for stochastic estimates).
    """

    value: float
    method: str
    num_matvecs: int
    converged: bool
    stderr: float = float("nan")
    residual: float = float("nan")


def spectral_norm(A, *, tol: float = 1e-6, max_iters: int | None = None,
                  generator: torch.Generator | None = None) -> NormEstimate:
    r"""Spectral norm $\|A\|_2 = \sigma_{\max}(A)$ ($= \max_i |\lambda_i|$ for symmetric A).

    Symmetric (tagged) operators: the largest-magnitude eigenvalue by Lanczos.  Otherwise the
    largest eigenvalue of the Gram operator (AᵀA or AAᵀ), i.e. Golub-Kahan, and its square root.

    **Cost**: one :func:`eigsh` with k = 1: typically 10–40 products (twice that through the
    Gram operator; a product with Aᵀ counts as one).

    Args:
        A: operator, tensor, array or scipy LinearOperator.
        tol: eigensolver tolerance relative to the eigenvalue (the norm's relative accuracy is
            about ``tol`` symmetric, ``tol/2`` through the Gram operator).
        max_iters: Lanczos steps cap.
        generator: random source (reproducibility).

    Returns:
        :class:`NormEstimate`.

    Raises:
        TypeError: an argument of the wrong kind (a string ``tol``, a float ``max_iters``, a
            ``generator`` that is not None, a ``torch.Generator`` or an int seed).
        ValueError: a negative ``tol``, ``max_iters`` < 1, or a product returned NaN/Inf.
    """
    api = "spectral_norm"
    A = _nonempty_operator(A, api)
    tol, max_iters, generator = _check_eig_args(tol, max_iters, generator, A, api)
    kw = dict(tol=tol, max_iters=max_iters, generator=generator, return_eigenvectors=False)
    if A.is_symmetric:
        if A.shape[0] < 2:
            return _tiny_norm(A)
        res = eigsh(A, k=1, which="LM", **kw)
        return NormEstimate(value=abs(float(res.eigenvalues[0])), method="largest |λ| (Lanczos)",
                          num_matvecs=res.num_matvecs, converged=res.converged, residual=float(res.residuals[0]))
    op = _gram(A)
    if op.shape[0] < 2:
        return _tiny_norm(A)
    res = eigsh(op, k=1, which="LA", **kw)
    return NormEstimate(value=math.sqrt(max(float(res.eigenvalues[0]), 0.0)),
                      method="sqrt of the largest eigenvalue of the Gram operator (Golub-Kahan)",
                      num_matvecs=2 * res.num_matvecs, converged=res.converged, residual=float(res.residuals[0]))


def _tiny_norm(A) -> NormEstimate:
    M = A @ torch.eye(A.shape[1], dtype=A.torch_dtype, device=A.device)
    return NormEstimate(value=float(torch.linalg.matrix_norm(M, ord=2)), method="dense (A @ I)",
                      num_matvecs=A.shape[1], converged=True)


def nuclear_norm(A, *, num_matvecs: int = 100, num_probes: int = 30, num_steps: int = 30,
                 generator: torch.Generator | None = None, trace_method: str = "xtrace",
                 probe_batch_size: int | None = None) -> NormEstimate:
    r"""Nuclear norm $\|A\|_* = \sum_i \sigma_i(A)$, estimated stochastically.

    PSD (tagged) operators: $\|A\|_* = \operatorname{tr} A$, estimated by
    :func:`curvops.linalg.trace.trace` (``trace_method``, default XTrace; exact on low-rank
    operators with enough products) with ``num_matvecs`` products.  Otherwise
    $\|A\|_* = \operatorname{tr}(A^\top A)^{1/2}$ by stochastic Lanczos quadrature on the Gram
    operator with $f(x) = \sqrt{x}$ (``num_probes`` probes × ``num_steps`` steps); √ is not
    smooth at 0, so operators with many tiny singular values need more steps.

    **Cost**: PSD: ``num_matvecs`` products.  Otherwise ``num_probes × num_steps`` Gram
    products (2 each: one with A, one with Aᵀ).

    Args:
        A: operator, tensor, array or scipy LinearOperator.
        num_matvecs: product budget of the trace estimate (PSD operators).
        num_probes: random probes of the SLQ estimate (other operators).
        num_steps: Lanczos steps per probe (other operators).
        generator: random source (reproducibility).
        trace_method: method of :func:`~curvops.linalg.trace.trace` for PSD operators.
        probe_batch_size: SLQ probes per block (default all).

    Returns:
        :class:`NormEstimate` with ``stderr``.

    Every argument is checked on every path (a PSD operator's ``num_probes``/``num_steps`` too).

    Raises:
        TypeError: a count that is not an integer (``3.0`` included), a ``generator`` that is
            not None, a ``torch.Generator`` or an int seed.
        ValueError: a count < 1 (for PSD operators, ``num_matvecs`` below what ``trace_method``
            needs), an unknown ``trace_method``, or a product returned NaN/Inf.
    """
    api = "nuclear_norm"
    A = _nonempty_operator(A, api)
    num_matvecs = check_int(num_matvecs, "num_matvecs", api, minimum=1)
    num_probes = check_int(num_probes, "num_probes", api, minimum=1)
    num_steps = check_int(num_steps, "num_steps", api, minimum=1)
    probe_batch_size = check_optional_int(probe_batch_size, "probe_batch_size", api, minimum=1)
    check_choice(trace_method, "trace_method", tuple(_TRACE_BUDGETS), api)
    generator = check_generator(generator, api, A.device, operator=A)
    if A.is_psd:
        need = _TRACE_BUDGETS[trace_method]
        check_int(num_matvecs, "num_matvecs", api, minimum=need, expected=f"num_matvecs ≥ {need}",
                  fix=f"trace_method={trace_method!r} needs at least {need} products.")
        try:
            from .trace import trace
        except ImportError:  # the trace module is optional here: fall back to plain Hutchinson
            return _hutchinson(A, num_matvecs, generator, probe_batch_size, api)
        res = trace(A, method=trace_method, num_matvecs=num_matvecs, generator=generator)
        return NormEstimate(value=float(res.value), method=f"trace (PSD) by {res.method}",
                            num_matvecs=res.num_matvecs, converged=True, stderr=float(res.stderr))
    op = _gram(A)

    def sqrt(x: Tensor) -> Tensor:
        return x.clamp_min(0).sqrt()

    value, stderr, _, mv = slq_trace(op, sqrt, num_probes=num_probes, num_steps=num_steps, generator=generator,
                                     probe_batch_size=probe_batch_size, api=api)
    return NormEstimate(value=value, method="SLQ of tr (AᵀA)^½ on the Gram operator", num_matvecs=2 * mv,
                        converged=True, stderr=stderr)


def _hutchinson(A, num_probes: int, generator, probe_batch_size, api: str) -> NormEstimate:
    n = A.shape[0]
    batch = num_probes if probe_batch_size is None else int(probe_batch_size)
    samples = []
    for start in range(0, num_probes, batch):
        V = random_block(n, min(batch, num_probes - start), A.torch_dtype, A.device, generator, "rademacher")
        samples.append((V * apply(A, V, api, start // batch + 1)).sum(dim=0))
    s = torch.cat(samples).to(torch.float64 if A.device.type != "mps" else torch.float32)
    stderr = float(s.std() / math.sqrt(num_probes)) if num_probes > 1 else float("nan")
    return NormEstimate(value=float(s.mean()), method="trace (PSD) by Hutchinson, Rademacher probes",
                      num_matvecs=num_probes, converged=True, stderr=stderr)
