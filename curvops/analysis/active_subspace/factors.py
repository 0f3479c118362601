r"""Factors F with FᵀF = C of the active-subspace matrix: per-sample gradients held in memory
(:class:`_DenseRows`), C accumulated chunk by chunk (:class:`_Streamed`), or the matrix-free
:class:`~curvops.operators.covariance.GradientFactor` (:class:`_Matfree`); and the factor a plan
asks for (:func:`_factor_for`)."""

from __future__ import annotations

import time

import torch
from torch import Tensor

from ...operators.covariance import GradientCovariance
from .plan import _Plan


class _RowStore:
    """Per-sample gradients as row blocks in order, joined into one tensor on first need (shared by
    the reweighted copies of a factor, so it is joined at most once)."""

    def __init__(self, G: Tensor | list[Tensor]):
        self.joined = G if isinstance(G, Tensor) else None
        self.blocks = [G] if isinstance(G, Tensor) else list(G)
        self.shape = (sum(int(b.shape[0]) for b in self.blocks), int(self.blocks[0].shape[1]))
        self.dtype, self.device = self.blocks[0].dtype, self.blocks[0].device

    def whole(self) -> Tensor:
        """G as one tensor (each block released once copied: peak N·P plus one block)."""
        if self.joined is None:
            G = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            row = 0
            for i in range(len(self.blocks)):
                n = self.blocks[i].shape[0]
                G[row:row + n] = self.blocks[i]
                self.blocks[i] = G[row:row + n]
                row += n
            self.joined, self.blocks = G, [G]
        return self.joined

    def row_chunks(self, rows: int):
        """``(first row, G rows)`` in chunks of at most ``rows`` rows, block by block."""
        start = 0
        for B in self.blocks:
            for a in range(0, B.shape[0], rows):
                yield start + a, B[a:a + rows]
            start += B.shape[0]


class _DenseRows:
    """F = D (G − 1μᵀ) from per-sample gradients G held in memory (never copied for products).

    ``G``: one ``[N, P]`` tensor, or a list of row blocks in order (the chunks of a gradient pass,
    not copied into one tensor: the Gram products and diag(C) read the blocks as they are; products
    that need G whole join them once, block by block).
    """

    def __init__(self, G: Tensor | list[Tensor] | _RowStore, w: Tensor, center: bool,
                 multipliers: Tensor | None = None):
        self._store = G if isinstance(G, _RowStore) else _RowStore(G)
        self.w, self.center = w, center
        ww = w if multipliers is None else w * multipliers
        self.total = float(ww.sum())
        self.p = ww / self.total
        self.d = self.p.sqrt()
        self.shape = self._store.shape
        self.dtype, self.device = self._store.dtype, self._store.device
        self.mu = (self.p @ self.G) if center else None
        self.num_matvecs = 0
        self.num_passes = 0

    @property
    def G(self) -> Tensor:
        return self._store.whole()

    def reweight(self, multipliers: Tensor) -> "_DenseRows":
        return _DenseRows(self._store, self.w, self.center, multipliers)

    def matmat(self, V: Tensor) -> Tensor:  # [P, b] -> [N, b]
        self.num_matvecs += V.shape[1]
        Y = (V.T @ self.G.T).T  # measured ~1.8× faster than G @ V for a tall row-major G (MKL)
        if self.mu is not None:
            Y -= (self.mu @ V)[None]
        return Y.mul_(self.d[:, None])

    def rmatmat(self, U: Tensor) -> Tensor:  # [N, b] -> [P, b]
        self.num_matvecs += U.shape[1]
        Us = U * self.d[:, None]
        Z = (Us.T @ self.G).T  # row-major G: faster than G.T @ Us
        if self.mu is not None:
            Z = Z - self.mu[:, None] * Us.sum(0)[None]
        return Z

    def gram_matmat(self, X: Tensor, rows: int = 128) -> Tensor:
        """``FᵀF X`` (= C X) with one read of G: row chunks of G stay in cache for both products.

        Two separate products F X and Fᵀ(·) read the N×P G twice, and for the few columns of a
        Krylov block that read, not the flops, bounds them (float64 GEMM with 30 columns runs at
        about a quarter of the machine's rate on the 2-core CPU).  Chunks of 128 rows (5 MB at
        P = 5146) stay in the L3 cache between the two products: top-20 Lanczos at the seed's size
        1.00 s against 1.13 s with 1024 rows.
        """
        self.num_matvecs += 2 * X.shape[1]
        out = torch.zeros(self.shape[1], X.shape[1], dtype=X.dtype, device=X.device)
        muX = (self.mu @ X) if self.mu is not None else None
        colsum = X.new_zeros(X.shape[1]) if self.mu is not None else None
        d2 = self.d.square()
        for r0, Gc in self._store.row_chunks(rows):
            Y = Gc @ X
            if muX is not None:
                Y -= muX[None]
            Y.mul_(d2[r0:r0 + Gc.shape[0], None])
            out.addmm_(Gc.T, Y)
            if colsum is not None:
                colsum += Y.sum(0)
        if colsum is not None:
            out -= self.mu[:, None] * colsum[None]
        return out

    def gram_diagonal(self, rows: int = 1024) -> Tensor:
        """diag(FᵀF) = diag(C) in row chunks (no N×P temporary)."""
        out = torch.zeros(self.shape[1], dtype=self.dtype, device=self.device)
        d2 = self.d.square()
        for r0, Gc in self._store.row_chunks(rows):
            out.addmv_(Gc.square().T, d2[r0:r0 + Gc.shape[0]])
        if self.mu is not None:
            out.sub_(self.mu.square()).clamp_min_(0)
        return out

    def dense(self) -> Tensor:
        """F explicitly, without its zero rows (a copy)."""
        nz = self.d > 0
        G, d = (self.G, self.d) if bool(nz.all()) else (self.G[nz], self.d[nz])
        F = G - self.mu[None] if self.mu is not None else G.clone()
        return F.mul_(d[:, None])

    def covariance(self) -> Tensor:
        C = torch.zeros(self.shape[1], self.shape[1], dtype=self.G.dtype, device=self.G.device)
        step = max(1, 2**22 // max(1, self.shape[1]))
        for s in range(0, self.shape[0], step):
            _add_gram(C, self.G[s:s + step] * self.d[s:s + step, None])
        return _finish_gram(C, self.mu)


class _Streamed:
    """C accumulated from chunks of per-sample gradients, recomputed on every call (G never held)."""

    def __init__(self, cov: GradientCovariance, w: Tensor, chunk_size: int | None,
                 multipliers: Tensor | None = None):
        self.cov, self.w, self.chunk_size, self.multipliers = cov, w, chunk_size, multipliers
        ww = w if multipliers is None else w * multipliers
        self.total = float(ww.sum())
        self.p = ww / self.total
        self.shape = (int(w.shape[0]), cov.shape[1])
        self.dtype, self.device = cov.torch_dtype, cov.device
        self.num_matvecs = 0
        self.num_passes = 0
        self.gradient_seconds = 0.0  # of the passes, the time not spent accumulating C

    def reweight(self, multipliers: Tensor) -> "_Streamed":
        return _Streamed(self.cov, self.w, self.chunk_size, multipliers)

    def covariance(self) -> Tensor:
        P = self.shape[1]
        C = torch.zeros(P, P, dtype=self.cov.torch_dtype, device=self.cov.device)
        mu = torch.zeros(P, dtype=C.dtype, device=C.device) if self.cov.center else None
        row, gram = [0], [0.0]

        def consume(G, _w):
            start = time.perf_counter()
            p = self.p[row[0]:row[0] + G.shape[0]]
            row[0] += G.shape[0]
            _add_gram(C, G * p.sqrt()[:, None])
            if mu is not None:
                mu.add_(p @ G)
            gram[0] += time.perf_counter() - start

        start = time.perf_counter()
        self.cov.sample_gradient_pass(consume, self.chunk_size)
        self.gradient_seconds += time.perf_counter() - start - gram[0]
        self.num_passes += 1
        return _finish_gram(C, mu)


class _Matfree:
    """F matrix-free: :class:`~curvops.operators.covariance.GradientFactor` products (one pass each)."""

    def __init__(self, cov: GradientCovariance, w: Tensor, multipliers: Tensor | None = None):
        self.cov, self.w, self.multipliers = cov, w, multipliers
        self.F = cov.factor(multipliers, kept_weights=w)
        self.shape = tuple(self.F.shape)
        self.dtype, self.device = cov.torch_dtype, cov.device
        self.total = self.F.total_weight
        self.num_matvecs = 0
        self.num_passes = 0

    def reweight(self, multipliers: Tensor) -> "_Matfree":
        return _Matfree(self.cov, self.w, multipliers)

    def _mean_passes(self) -> None:
        if self.cov.center and self.F._mu is None:
            self.num_passes += 1

    def matmat(self, V: Tensor) -> Tensor:
        self._mean_passes()
        self.num_matvecs += V.shape[1]
        self.num_passes += 1
        return self.F @ V

    def rmatmat(self, U: Tensor) -> Tensor:
        self._mean_passes()
        self.num_matvecs += U.shape[1]
        self.num_passes += 1
        return self.F.T @ U

    def covariance(self) -> Tensor:
        """C densely from products: ``C @ I`` in blocks (P columns; one pass per block of the
        covariance operator, or two with the factor when reweighted)."""
        P, step = self.shape[1], self.cov.max_columns
        C = torch.empty(P, P, dtype=self.cov.torch_dtype, device=self.cov.device)
        for s in range(0, P, step):
            E = torch.zeros(P, min(step, P - s), dtype=C.dtype, device=C.device)
            E[torch.arange(s, s + E.shape[1]), torch.arange(E.shape[1])] = 1
            if self.multipliers is None:
                C[:, s:s + E.shape[1]] = self.cov @ E
                self.num_passes += 1
                self.num_matvecs += 2 * E.shape[1]
            else:
                C[:, s:s + E.shape[1]] = self.rmatmat(self.matmat(E))
        if self.cov.center and self.multipliers is None:
            self.num_passes += 1  # μ
        return C  # symmetric to rounding; eigh reads one triangle


def _gram_edges(P: int, blocks: int = 4) -> list[int]:
    return [0, P] if P < 512 else [round(P * i / blocks) for i in range(blocks + 1)]


def _syrk(dtype: torch.dtype):
    """scipy's BLAS ``?syrk`` for a CPU float32/float64 C, else None (then blocked GEMMs)."""
    try:
        from scipy.linalg import blas
    except ImportError:  # pragma: no cover - scipy is a runtime dependency
        return None
    return {torch.float64: blas.dsyrk, torch.float32: blas.ssyrk}.get(dtype)


def _add_gram(C: Tensor, A: Tensor) -> None:
    """C += AᵀA on the upper triangle of C (and possibly more; :func:`_finish_gram` mirrors it).

    On the CPU one BLAS ``syrk`` (N·P² flops, half a full product; measured 2.9 s against 5.7 s
    for ``Gᵀ @ G`` at N = 10 000, P = 5146 on 2 cores); elsewhere GEMMs on the diagonal blocks and
    the blocks above them (about 5/8 of a full product).
    """
    syrk = _syrk(C.dtype) if C.device.type == "cpu" and A.dtype == C.dtype and C.is_contiguous() else None
    if syrk is not None and A.shape[0] > 0:
        # row-major C is the column-major Cᵀ = C: syrk's lower triangle of (column-major) AᵀA is the
        # upper triangle of the row-major C; a row-major A [n, P] is the column-major Aᵀ [P, n]
        Cf = C.numpy().T
        out = syrk(1.0, A.detach().contiguous().numpy().T, beta=1.0, c=Cf, trans=0, lower=1, overwrite_c=1)
        if out.ctypes.data != Cf.ctypes.data:  # pragma: no cover - f2py copied (it does not for an F-contiguous C)
            Cf[...] = out
        return
    edges = _gram_edges(C.shape[0])
    for a, b in zip(edges[:-1], edges[1:]):
        C[a:b, a:].addmm_(A[:, a:b].T, A[:, a:])


def _finish_gram(C: Tensor, mu: Tensor | None, rows: int = 256) -> Tensor:
    """Mirror the upper triangle onto the lower one (in place, a band of rows at a time); subtract
    μμᵀ for a centred C."""
    P = C.shape[0]
    for a in range(0, P, rows):
        b = min(P, a + rows)
        D = C[a:b, a:b]
        D.copy_(D.triu() + D.triu(1).T)
        C[b:, a:b] = C[a:b, b:].T
    if mu is not None:
        C.addr_(mu, mu, alpha=-1)
    return C


def _factor_for(plan: _Plan, cov: GradientCovariance, w: Tensor, chunk_size, timings: dict):
    start = time.perf_counter()
    if plan.path == "stored":
        G = torch.empty(w.shape[0], cov.shape[1], dtype=cov.torch_dtype, device=cov.device)
        row = [0]

        changed = ValueError("active_subspace: the number of kept samples changed between passes over the data; "
                             "the data must be the same on every pass (no shuffling).")

        def write(Gc, _w):  # in place: no second copy of G
            if row[0] + Gc.shape[0] > G.shape[0]:
                raise changed
            G[row[0]:row[0] + Gc.shape[0]] = Gc
            row[0] += Gc.shape[0]

        if cov.sample_gradient_pass(write, chunk_size) != G.shape[0]:
            raise changed
        factor = _DenseRows(G, w, cov.center)
        factor.num_passes = 1
    elif plan.path == "streamed":
        factor = _Streamed(cov, w, chunk_size)
    else:
        factor = _Matfree(cov, w)
    timings["gradients"] = time.perf_counter() - start
    return factor
