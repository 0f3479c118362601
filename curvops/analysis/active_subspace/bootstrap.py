r"""Bootstrap of an active-subspace estimate: resampled eigenvalues and subspace distances, with
percentile intervals (Constantine 2015, §3.3)."""

from __future__ import annotations

import torch
from torch import Tensor

from .distance import subspace_distances
from .eigenpairs import _decompose, _pad

#: bootstrap subspace distances are computed for r = 1 … min(k, this)
MAX_DISTANCE_DIMS = 100


def _bootstrap(factor, algorithm: str, k, lam: Tensor, W: Tensor, B: int, confidence: float, tol: float,
               gen: torch.Generator) -> dict:
    N = factor.shape[0]
    kk = lam.shape[0]
    d = min(kk, MAX_DISTANCE_DIMS)
    lams, dists = [], []
    # every resample drawn before any decomposition: the resamples do not depend on how many random
    # numbers a decomposition takes (rank-deficient replicates complete their bases at random, and
    # how many directions that takes depends on the dtype's rounding)
    draws = torch.randint(0, N, (B, N), generator=gen)
    for idx in draws:
        counts = torch.bincount(idx, minlength=N).to(dtype=lam.dtype, device=lam.device)
        rep = factor.reweight(counts)
        dec = _decompose(rep, algorithm, k, tol=tol, generator=gen, vectors=True, v0=W)
        lams.append(_pad(dec.eigenvalues, kk))
        dists.append(subspace_distances(W[:, :d], dec.eigenvectors[:, :d]))
        factor.num_matvecs += rep.num_matvecs
        factor.num_passes += rep.num_passes
    L, D = torch.stack(lams), torch.stack(dists)
    levels = ((1 - confidence) / 2, (1 + confidence) / 2)
    # each in its own dtype: the eigenvalues follow the model's (float32 too), the distances are float64
    lq, dq = _quantiles(L, levels), _quantiles(D, levels)
    return dict(eigenvalue_lower=lq[0], eigenvalue_upper=lq[1], subspace_distance_mean=D.mean(0),
                subspace_distance_lower=dq[0], subspace_distance_upper=dq[1], bootstrap_eigenvalues=L,
                bootstrap_distances=D)


def _quantiles(T: Tensor, levels: tuple[float, float]) -> Tensor:
    """``[2, ...]``: the ``levels`` quantiles of T over its first dimension (torch.quantile wants q in T's dtype)."""
    q = torch.tensor(levels, dtype=T.dtype, device=T.device)
    return torch.quantile(T, q, dim=0)
