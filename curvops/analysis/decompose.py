r"""Decompositions of stacks of spectra, diagonals or small matrices: PCA and NMF.

``seeds/000`` suggests "a PCA or some other decomposition (like an NMF)", especially for
averages over data and training runs: stack one measurement per class, run or checkpoint
(a top-k spectrum, a diagonal, a flattened small block) into a matrix $X \in \mathbb{R}^{R\times D}$
(one row per item) and look for the few patterns the rows are made of.

* :func:`pca`: $X - \mathbf{1}\mu^\top = U \Sigma V^\top$; the components are the rows of
  $V^\top$, ordered by the variance they explain.
* :func:`nmf`: $X \approx W H$ with $W, H \ge 0$ for non-negative stacks (PSD spectra,
  Fisher/GGN diagonals, densities): parts-based, no cancellation between components.

Both accept a tensor ``[R, ...]`` or a list of ``R`` tensors of one shape; items are flattened
and the item shape is kept (``result.unflatten(result.components)`` gives ``[k, *shape]``).
The small dense factorizations run in float64 on the stack's device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


def _work_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _as_stack(stack, api: str) -> tuple[Tensor, tuple[int, ...], torch.dtype]:
    """→ (X [R, D] in the work dtype, item shape, output dtype)."""
    if isinstance(stack, (list, tuple)):
        if not stack:
            raise ValueError(f"{api}: expected a non-empty list of tensors, got an empty one.")
        items = [s if isinstance(s, Tensor) else torch.as_tensor(np.asarray(s)) for s in stack]
        shape = tuple(items[0].shape)
        for i, t in enumerate(items):
            if tuple(t.shape) != shape:
                raise ValueError(f"{api}: expected items of one shape, got {shape} (item 0) and {tuple(t.shape)} "
                                 f"(item {i}).")
        X = torch.stack([t.reshape(-1) for t in items])
    elif isinstance(stack, Tensor) or hasattr(stack, "__array__"):
        X = stack if isinstance(stack, Tensor) else torch.as_tensor(np.asarray(stack))
        if X.dim() < 2:
            raise ValueError(f"{api}: expected a stack [R, D] (one row per item) or [R, *shape], got shape "
                             f"{tuple(X.shape)}. Use stack[None] for a single item.")
        shape = tuple(X.shape[1:])
        X = X.reshape(X.shape[0], -1)
    else:
        raise TypeError(f"{api}: expected a tensor [R, D], an array, or a list of tensors of one shape, "
                        f"got {type(stack).__name__}.")
    if X.is_complex():
        raise TypeError(f"{api}: expected a real stack, got dtype {X.dtype}.")
    out_dtype = X.dtype if X.is_floating_point() else torch.float64
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"{api}: expected a non-empty stack, got {X.shape[0]} items of {X.shape[1]} entries.")
    X = X.detach().to(_work_dtype(X.device))
    if not bool(torch.isfinite(X).all()):
        raise ValueError(f"{api}: the stack contains NaN or Inf.")
    return X, shape, out_dtype


def _check_k(k, limit: int, api: str, what: str) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{api}: expected an integer k, got {type(k).__name__}.")
    if not 1 <= k <= limit:
        raise ValueError(f"{api}: expected 1 <= k <= {limit} ({what}), got k={k}.")
    return k


# ---- PCA --------------------------------------------------------------------------------------
@dataclass
class PCAResult:
    r"""Principal components of a stack ``X [R, D]``.

    Attributes:
        components: ``[k, D]`` orthonormal rows $v_j$, by decreasing variance; each one's sign is
            fixed so that its largest-magnitude entry is positive.
        scores: ``[R, k]`` coordinates of the (centred) rows: $(X - \mathbf 1\mu^\top) V_k$.
        explained_variance: ``[k]`` $\sigma_j^2/(R-1)$ (centred) or $\sigma_j^2/R$ (uncentred
            second moment).
        explained_variance_ratio: ``[k]`` $\sigma_j^2 / \sum_i \sigma_i^2$ over all singular
            values (sums to 1 at full k; NaN when the stack has no variance).
        mean: ``[D]`` the row mean μ (zeros when ``center=False``).
        singular_values: ``[k]`` $\sigma_j$ of the centred stack.
        shape: the item shape (``unflatten`` reshapes ``[..., D]`` to ``[..., *shape]``).
    """

    components: Tensor
    scores: Tensor
    explained_variance: Tensor
    explained_variance_ratio: Tensor
    mean: Tensor
    singular_values: Tensor
    shape: tuple[int, ...]

    def unflatten(self, V: Tensor) -> Tensor:
        """``[..., D]`` → ``[..., *shape]`` (e.g. components back to matrices)."""
        return V.reshape(*V.shape[:-1], *self.shape)

    def transform(self, stack) -> Tensor:
        """Scores ``[R', k]`` of new items (same item shape) in these components."""
        X, shape, _ = _as_stack(stack, "PCAResult.transform")
        if shape != self.shape:
            raise ValueError(f"PCAResult.transform: expected items of shape {self.shape}, got {shape}.")
        V = self.components.to(X.dtype)
        return ((X - self.mean.to(X.dtype)) @ V.T).to(self.scores.dtype)

    def reconstruct(self, scores: Tensor | None = None) -> Tensor:
        """``mean + scores @ components`` as ``[R, *shape]`` (the rank-k approximation of the stack)."""
        scores = self.scores if scores is None else scores
        return self.unflatten(self.mean + scores @ self.components)


def pca(stack, k: int | None = None, *, center: bool = True) -> PCAResult:
    r"""Principal component analysis of a stack of items (spectra, diagonals, flattened blocks).

    With the row mean $\mu$ (``center=True``) and the thin SVD
    $X - \mathbf 1 \mu^\top = U \Sigma V^\top$ ($\sigma_1 \ge \sigma_2 \ge \dots$):

    .. math:: \text{components} = V_k^\top,\quad \text{scores} = U_k \Sigma_k,\quad
              \text{explained variance}_j = \frac{\sigma_j^2}{R - 1},\quad
              \text{ratio}_j = \frac{\sigma_j^2}{\sum_i \sigma_i^2}.

    The rank-k reconstruction ``mean + scores @ components`` is the best rank-k approximation
    of the centred stack in the Frobenius norm (Eckart–Young).

    **Cost**: one dense SVD of ``[R, D]``: $O(RD\min(R, D))$ flops in float64.

    Args:
        stack: a tensor/array ``[R, D]`` or ``[R, *shape]``, or a list of R tensors of one shape.
        k: components kept, ``1 <= k <= min(R, D)``; default all ``min(R, D)``.
        center: subtract the row mean first (needs R ≥ 2); without it the components are those
            of the uncentred second moment.

    Returns:
        :class:`PCAResult`.

    Raises:
        TypeError: a stack of the wrong kind, a non-integer k.
        ValueError: an empty or non-finite stack, items of different shapes, k out of range,
            ``center=True`` with a single item.

    Example:
        >>> stack = torch.randn(20, 2, dtype=torch.float64) @ torch.randn(2, 6, dtype=torch.float64)
        >>> res = pca(stack)
        >>> float(res.explained_variance_ratio[:2].sum()) > 1 - 1e-12   # rank 2 (plus the mean)
        True
    """
    api = "pca"
    X, shape, out_dtype = _as_stack(stack, api)
    R, D = X.shape
    k = min(R, D) if k is None else _check_k(k, min(R, D), api, "the smaller dimension of the stack")
    if center and R < 2:
        raise ValueError(f"{api}: centring needs at least 2 items, got {R}; pass center=False.")
    mean = X.mean(0) if center else torch.zeros(D, dtype=X.dtype, device=X.device)
    U, S, Vh = torch.linalg.svd(X - mean, full_matrices=False)
    U, S, Vh = U[:, :k], S, Vh[:k]
    pivot = Vh.abs().argmax(dim=1)
    signs = torch.sign(Vh[torch.arange(k, device=X.device), pivot])
    signs[signs == 0] = 1
    Vh, U = Vh * signs[:, None], U * signs[None]
    total = (S**2).sum()
    ratio = (S[:k] ** 2) / total if float(total) > 0 else torch.full((k,), float("nan"), dtype=X.dtype, device=X.device)
    cast = lambda t: t.to(out_dtype)  # noqa: E731
    return PCAResult(
        components=cast(Vh), scores=cast(U * S[:k]), explained_variance=cast(S[:k] ** 2 / (R - 1 if center else R)),
        explained_variance_ratio=cast(ratio), mean=cast(mean), singular_values=cast(S[:k]), shape=shape,
    )


# ---- NMF --------------------------------------------------------------------------------------
@dataclass
class NMFResult:
    r"""A non-negative factorization $X \approx W H$.

    Attributes:
        W: ``[R, k]`` ≥ 0, the weight of each component in each item.
        H: ``[k, D]`` ≥ 0, the components (rows of unit Euclidean norm, unless zero), ordered by
            the size of their contribution $\|W_{:j} H_{j:}\|_F$.
        reconstruction_error: $\|X - WH\|_F$.
        relative_error: $\|X - WH\|_F / \|X\|_F$.
        converged: whether the stopping rule was met before ``max_iters``.
        iterations: sweeps done (each updates every column of W and row of H once).
        history: ``[iterations]`` relative error after each sweep (non-increasing up to rounding).
        shape: the item shape (``unflatten(H)`` gives ``[k, *shape]``).
    """

    W: Tensor
    H: Tensor
    reconstruction_error: float
    relative_error: float
    converged: bool
    iterations: int
    history: Tensor
    shape: tuple[int, ...]

    def unflatten(self, V: Tensor) -> Tensor:
        """``[..., D]`` → ``[..., *shape]``."""
        return V.reshape(*V.shape[:-1], *self.shape)


def _nndsvd(X: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """NNDSVD start (Boutsidis & Gallopoulos 2008): the dominant non-negative part of each
    singular triplet's outer product."""
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    R, D = X.shape
    W = torch.zeros(R, k, dtype=X.dtype, device=X.device)
    H = torch.zeros(k, D, dtype=X.dtype, device=X.device)
    W[:, 0] = S[0].sqrt() * U[:, 0].abs()
    H[0] = S[0].sqrt() * Vh[0].abs()
    for j in range(1, k):
        x, y = U[:, j], Vh[j]
        xp, xn, yp, yn = x.clamp(min=0), (-x).clamp(min=0), y.clamp(min=0), (-y).clamp(min=0)
        nxp, nxn, nyp, nyn = (float(torch.linalg.vector_norm(v)) for v in (xp, xn, yp, yn))
        mp, mn = nxp * nyp, nxn * nyn
        u, v, sigma, nu, nv = (xp, yp, mp, nxp, nyp) if mp >= mn else (xn, yn, mn, nxn, nyn)
        if sigma > 0:
            c = math.sqrt(float(S[j]) * sigma)
            W[:, j] = c * u / nu
            H[j] = c * v / nv
    return W, H


def _hals_sweep(X: Tensor, W: Tensor, H: Tensor) -> None:
    """One HALS sweep, in place: each column of W, then each row of H, set to its exact
    non-negative least-squares minimizer with the others fixed (so ‖X − WH‖ never increases)."""
    XHt, HHt = X @ H.T, H @ H.T
    for j in range(W.shape[1]):
        d = HHt[j, j]
        if d > 0:
            W[:, j] = (W[:, j] + (XHt[:, j] - W @ HHt[:, j]) / d).clamp_(min=0)
    WtX, WtW = W.T @ X, W.T @ W
    for j in range(H.shape[0]):
        d = WtW[j, j]
        if d > 0:
            H[j] = (H[j] + (WtX[j] - WtW[j] @ H) / d).clamp_(min=0)


def nmf(stack, k: int, *, max_iters: int = 500, tol: float = 1e-6, generator: torch.Generator | None = None,
        init: str = "nndsvd") -> NMFResult:
    r"""Non-negative matrix factorization of a non-negative stack by HALS.

    .. math:: \min_{W \ge 0,\ H \ge 0}\ \|X - W H\|_F^2,\qquad X \in \mathbb{R}_{\ge 0}^{R\times D},\
              W \in \mathbb{R}^{R\times k},\ H \in \mathbb{R}^{k\times D}.

    Hierarchical alternating least squares (block coordinate descent): each sweep sets every
    column $W_{:j}$ and then every row $H_{j:}$ to its exact minimizer with the rest fixed,

    .. math:: H_{j:} \leftarrow \max\Big(0,\ H_{j:} + \frac{(W^\top X)_{j:} - (W^\top W)_{j:} H}{(W^\top W)_{jj}}\Big)

    (and symmetrically for W), so the error never increases.  Started from NNDSVD (deterministic,
    from the SVD) or from uniform random factors scaled to $\sqrt{\bar X / k}$.  Stops when the
    relative error $e_t = \|X - WH\|_F / \|X\|_F$ falls to ``tol`` or stops improving:
    $e_{t-1} - e_t \le \text{tol}\cdot e_{t-1}$.  At the end the rows of H are scaled to unit
    norm (W absorbs the scale) and the components are sorted by contribution.

    **Cost**: per sweep $O(RDk + (R + D)k^2)$ flops (four small matrix products, plus one for the
    error); the SVD for NNDSVD, $O(RD\min(R, D))$.

    Args:
        stack: non-negative tensor/array ``[R, D]`` or ``[R, *shape]``, or a list of R tensors.
        k: components, ``1 <= k <= min(R, D)``.
        max_iters: maximum sweeps.
        tol: stopping tolerance on the relative error and its relative improvement (≥ 0).
        generator: random source for ``init="random"``.
        init: ``"nndsvd"`` or ``"random"``.

    Returns:
        :class:`NMFResult` (W, H, errors, convergence, history).

    Raises:
        TypeError: a stack of the wrong kind, a non-integer k.
        ValueError: negative entries (with the minimum and where), an all-zero or non-finite
            stack, k out of range, bad ``max_iters``, ``tol`` or ``init``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> X = torch.rand(30, 3, generator=g, dtype=torch.float64) @ torch.rand(3, 12, generator=g,
        ...                                                                     dtype=torch.float64)
        >>> res = nmf(X, 3, tol=1e-10, max_iters=3000)
        >>> res.relative_error < 1e-4
        True

    References:
        Cichocki, Phan (2009). *Fast Local Algorithms for Large Scale Nonnegative Matrix and
        Tensor Factorizations*.
        Gillis, Glineur (2012). *Accelerated Multiplicative Updates and Hierarchical ALS Algorithms
        for Nonnegative Matrix Factorization*.
        Boutsidis, Gallopoulos (2008). *SVD Based Initialization: A Head Start for Nonnegative
        Matrix Factorization*.
    """
    api = "nmf"
    X, shape, out_dtype = _as_stack(stack, api)
    R, D = X.shape
    k = _check_k(k, min(R, D), api, "the smaller dimension of the stack")
    if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1:
        raise ValueError(f"{api}: expected a positive integer max_iters, got {max_iters!r}.")
    if not (isinstance(tol, (int, float)) and tol >= 0 and math.isfinite(tol)):
        raise ValueError(f"{api}: expected a finite tol ≥ 0, got {tol!r}.")
    if init not in ("nndsvd", "random"):
        raise ValueError(f"{api}: expected init 'nndsvd' or 'random', got {init!r}.")
    lo = float(X.min())
    if lo < 0:
        where = np.unravel_index(int(X.argmin()), (R, D))
        raise ValueError(f"{api}: expected a non-negative stack, got a minimum entry of {lo:.4g} (item {where[0]}, "
                         f"entry {where[1]}). NMF needs X ≥ 0: use pca() for signed data (e.g. indefinite "
                         f"spectra), or shift/split the data.")
    norm_x = float(torch.linalg.matrix_norm(X))
    if norm_x == 0:
        raise ValueError(f"{api}: the stack is all zeros; there is nothing to factorize.")
    if init == "nndsvd":
        W, H = _nndsvd(X, k)
    else:
        gdev = generator.device if generator is not None else X.device
        scale = math.sqrt(float(X.mean()) / k)
        W = (scale * torch.rand(R, k, generator=generator, dtype=X.dtype, device=gdev)).to(X.device)
        H = (scale * torch.rand(k, D, generator=generator, dtype=X.dtype, device=gdev)).to(X.device)
    history, converged = [], False
    prev = float(torch.linalg.matrix_norm(X - W @ H)) / norm_x
    for _ in range(max_iters):
        _hals_sweep(X, W, H)
        err = float(torch.linalg.matrix_norm(X - W @ H)) / norm_x
        history.append(err)
        if err <= tol or prev - err <= tol * prev:
            converged = True
            break
        prev = err
    # unit-norm rows of H (W absorbs the scale), components sorted by contribution ‖W_j‖‖H_j‖
    hn = torch.linalg.vector_norm(H, dim=1)
    nz = hn > 0
    W[:, nz] = W[:, nz] * hn[nz]
    H[nz] = H[nz] / hn[nz, None]
    order = torch.argsort(torch.linalg.vector_norm(W, dim=0) * torch.linalg.vector_norm(H, dim=1), descending=True)
    W, H = W[:, order], H[order]
    err_abs = float(torch.linalg.matrix_norm(X - W @ H))
    return NMFResult(W=W.to(out_dtype), H=H.to(out_dtype), reconstruction_error=err_abs,
                     relative_error=err_abs / norm_x, converged=converged, iterations=len(history),
                     history=torch.tensor(history, dtype=torch.float64), shape=shape)
