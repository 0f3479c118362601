r"""Planning an active-subspace estimate: which path (G stored, streamed, matrix-free) and algorithm,
and the memory each needs, checked against ``memory_budget``."""

from __future__ import annotations

import math
from dataclasses import dataclass

#: default ``memory_budget`` in bytes (1 GiB)
DEFAULT_MEMORY_BUDGET = 2**30
#: all eigenpairs: thin SVD of F (accurate to ε·σ₁ in σ) when min(N, P) is at most this
DENSE_SVD_MAX = 2048
#: top-k eigenpairs: dense SVD instead of the block Krylov SVD when min(N, P) is at most this
DENSE_TOPK_MAX = 256

METHODS = ("auto", "snapshot", "operator")


@dataclass
class _Plan:
    path: str  # "stored" | "streamed" | "matfree"
    algorithm: str  # "svd" | "eigh" | "gram" | "krylov" | "operator-eigh"
    memory: int

    @property
    def method(self) -> str:
        return "operator" if self.path == "matfree" else "snapshot"

    @property
    def description(self) -> str:
        return {
            ("stored", "svd"): "thin SVD of F (G in memory)",
            ("stored", "krylov"): "block Krylov on F (G in memory; N ≥ P and small k: Lanczos on FᵀF, one read of G "
                                  "per product)",
            ("stored", "eigh"): "eigh of C = FᵀF (G in memory)",
            ("stored", "gram"): "eigh of the sample Gram matrix FFᵀ (G in memory)",
            ("streamed", "eigh"): "eigh of C accumulated chunk by chunk (G not kept)",
            ("streamed", "gram-krylov"): "block Krylov on C accumulated chunk by chunk (G not kept)",
            ("matfree", "krylov"): "block Krylov SVD of the matrix-free factor F",
            ("matfree", "operator-eigh"): "eigh of C formed from GradientCovariance products",
        }[(self.path, self.algorithm)]


def _krylov_basis(k: int, n: int) -> int:
    b = min(n, k + max(4, math.ceil(k / 2)))
    return min(n, max(4 * b, k + 2 * b))


def _candidates(k: int | None, N: int, P: int, item: int, chunk: int, bootstrap: int, vectors: bool,
                gram_topk: bool = False, chunk_bytes: int | None = None):
    """Plans in order of preference, with their memory estimates (bytes).

    ``gram_topk``: the top-k may also come from C accumulated chunk by chunk (one pass, memory P²
    instead of N·P; eigenvalues accurate to about ε·λ₁ absolutely, so only for spectra whose top-k
    stay within a few decades of λ₁ — the prior estimator's), after keeping G: forming C costs about
    N·P² flops against the Krylov SVD's few hundred products with G (measured 3.5× slower at the seed's
    size, docs/active-subspace-prior.md)."""
    r, big = min(N, P), max(N, P)
    chunk = min(chunk, N)
    G = N * P * item
    # one vmapped chunk and its workspace: measured by the caller (the prior estimator), else 3 P-vectors a row
    grads = 3 * chunk * P * item if chunk_bytes is None else int(chunk_bytes)
    eig = (4 if vectors else 2) * P * P * item
    snap, oper = [], []
    if k is None:
        if r <= DENSE_SVD_MAX:
            snap.append(_Plan("stored", "svd", G + grads + (N * P + N * r + r * P + 2 * r * r) * item))
        if N >= P or r > DENSE_SVD_MAX:
            if bootstrap:
                snap.append(_Plan("stored", "eigh", G + grads + eig))
            if N < P:
                snap.append(_Plan("stored", "gram", G + grads + (N * P + 4 * N * N + (P * N if vectors else 0)) * item))
            snap.append(_Plan("streamed", "eigh", grads + eig))
        oper.append(_Plan("matfree", "operator-eigh", eig + 3 * P * 64 * item))
    else:
        m = _krylov_basis(k, r)
        work = (2 * big + 4 * r) * m * item
        if r <= DENSE_TOPK_MAX:
            snap.append(_Plan("stored", "svd", G + grads + (N * P + N * r + r * P + 2 * r * r) * item))
        snap.append(_Plan("stored", "krylov", G + grads + work))
        if gram_topk:  # when G does not fit: one pass, memory P² + chunks
            snap.append(_Plan("streamed", "gram-krylov", grads + (P * P + 3 * P * _krylov_basis(k, P)) * item))
        oper.append(_Plan("matfree", "krylov", work))
    return snap, oper


def _choose(method: str, budget: int, k, N, P, item, chunk, bootstrap, vectors, api: str,
            gram_topk: bool = False, chunk_bytes: int | None = None) -> _Plan:
    snap, oper = _candidates(k, N, P, item, chunk, bootstrap, vectors, gram_topk, chunk_bytes)
    pool = {"auto": snap + oper, "snapshot": snap, "operator": oper}[method]
    for plan in pool:
        if plan.memory <= budget:
            return plan
    need = min(p.memory for p in pool)
    hint = ("pass k= for the top eigenpairs" if k is None else
            "use method='operator' (matrix-free)" if method == "snapshot" else "reduce the number of samples")
    raise ValueError(f"{api}: expected the {method} path to fit memory_budget={budget:,} bytes, but it "
                     f"needs about {need:,} bytes (N={N}, P={P}, k={k}). Raise memory_budget or {hint}.")
