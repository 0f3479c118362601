"""The operator contract as plain check functions (each raises AssertionError on a breach).

Every check compares values: an operator against its dense matrix, against its own adjoint,
or against the same operator built another way.  ``tests/test_contract.py`` runs them over
the zoo; anyone writing an operator can run them on theirs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse.linalg as spla
import torch
from torch import Tensor, nn

RTOL = 1e-9


def assert_matches(actual, expected, rtol: float = RTOL, what: str = "") -> None:
    """``actual ≈ expected`` entrywise, with an absolute floor scaled to the size of ``expected``."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    atol = rtol * (1.0 + float(expected.abs().max())) if expected.numel() else rtol
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def probes(n: int, k: int, seed: int = 0, dtype=torch.float64) -> Tensor:
    """k seeded Gaussian columns [n, k] (global RNG untouched)."""
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---- products -----------------------------------------------------------------------
def check_products(A, dense: Tensor, seed: int = 0) -> None:
    """A @ v (torch vector), A @ V (3 columns), numpy via scipy (matvec, matmat, @ ndarray)."""
    V = probes(A.shape[1], 3, seed)
    out = A @ V[:, 0]
    assert isinstance(out, Tensor) and out.shape == (A.shape[0],)
    assert_matches(out, dense @ V[:, 0], what="A @ v")
    assert_matches(A @ V, dense @ V, what="A @ V")
    x = V[:, 1].numpy()
    for name, res in [("A.matvec", A.matvec(x)), ("A @ ndarray", A @ x), ("A.matmat", A.matmat(V.numpy()))]:
        assert isinstance(res, np.ndarray), f"{name} returned {type(res).__name__}, expected ndarray"
    assert_matches(torch.from_numpy(A.matvec(x)), dense @ V[:, 1], what="A.matvec")
    assert_matches(torch.from_numpy(A @ x), dense @ V[:, 1], what="A @ ndarray")
    assert_matches(torch.from_numpy(A.matmat(V.numpy())), dense @ V, what="A.matmat")


def check_dict_products(A, dense: Tensor, slices: dict[str, slice], shapes: dict[str, torch.Size],
                        seed: int = 0) -> None:
    """A @ {name: tensor} returns a dict of parameter-shaped tensors (also with K trailing columns)."""
    v = probes(A.shape[1], 2, seed)
    expected = dense @ v
    for cols in (None, 2):
        vin = {n: (v[s, 0].reshape(shapes[n]) if cols is None else v[s].reshape(*shapes[n], 2))
               for n, s in slices.items()}
        out = A @ vin
        assert isinstance(out, dict) and list(out) == list(slices), f"dict keys {list(out)} != {list(slices)}"
        for n, s in slices.items():
            want = expected[s, 0].reshape(shapes[n]) if cols is None else expected[s].reshape(*shapes[n], 2)
            assert_matches(out[n], want, what=f"(A @ dict)[{n!r}]")
    out = A @ [v[s, 0].reshape(shapes[n]) for n, s in slices.items()]
    assert isinstance(out, list)
    assert_matches(torch.cat([o.reshape(-1) for o in out]), expected[:, 0], what="A @ list")


def check_adjoint(A, seed: int = 0) -> None:
    """⟨w, A v⟩ = ⟨Aᵀ w, v⟩ for torch blocks and through scipy's rmatvec."""
    V = probes(A.shape[1], 2, seed)
    W = probes(A.shape[0], 2, seed + 1)
    lhs = W.T @ (A @ V)
    rhs = (A.T @ W).T @ V
    assert_matches(lhs, rhs, what="<w, A v> vs <A^T w, v>")
    assert_matches(torch.from_numpy(A.rmatvec(W[:, 0].numpy())), A.T @ W[:, 0], what="A.rmatvec")


def check_tags(A, seed: int = 0, num_probes: int = 6) -> None:
    """Symmetric: ⟨w, A v⟩ = ⟨A w, v⟩; PSD: vᵀ A v ≥ 0 on random probes."""
    if not (A.is_symmetric or A.is_psd):
        return
    V = probes(A.shape[1], num_probes, seed)
    AV = A @ V
    G = V.T @ AV  # [k, k]
    assert_matches(G, G.T, what="symmetry  V^T A V")
    if A.is_psd:
        quad = torch.diagonal(G)
        floor = -1e-10 * float(AV.norm(dim=0).max()) * float(V.norm(dim=0).max())
        assert bool((quad >= floor).all()), f"psd-tagged operator has v^T A v = {quad.min().item():.3g} < 0"


def check_dense_tags(A, dense: Tensor) -> None:
    """The tags as promises about the dense matrix: symmetric → A = Aᵀ; psd → λ_min ≥ 0."""
    if A.is_symmetric:
        assert_matches(dense, dense.T, what="dense symmetry")
    if A.is_psd:
        lam = torch.linalg.eigvalsh((dense + dense.T) / 2)
        assert float(lam.min()) >= -1e-9 * (1 + float(lam.abs().max())), f"psd-tagged, λ_min = {lam.min():.3g}"


def check_eigsh(A, dense: Tensor, k: int = 3, seed: int = 0) -> None:
    """scipy's eigsh (largest magnitude, seeded start) equals the dense spectrum's top-k by magnitude."""
    v0 = probes(A.shape[1], 1, seed)[:, 0].numpy()
    vals = np.sort(spla.eigsh(A, k=k, which="LM", v0=v0, return_eigenvectors=False, tol=1e-12))
    lam = torch.linalg.eigvalsh(dense)
    want = np.sort(lam[lam.abs().argsort(descending=True)[:k]].numpy())
    np.testing.assert_allclose(vals, want, rtol=1e-8, atol=1e-10 * float(lam.abs().max()))


# ---- the model is left exactly as found -------------------------------------------------
@dataclass
class Snapshot:
    tensors: dict[str, Tensor]
    versions: dict[str, int]
    requires_grad: dict[str, bool]
    grads: dict[str, Tensor | None]
    training: dict[str, bool]
    ids: dict[str, int]
    rng: Tensor


def snapshot(model: nn.Module | None = None, params: dict[str, Tensor] | None = None) -> Snapshot:
    """Everything an operator must not change: values, flags, .grad, modes, the global RNG."""
    if model is not None and isinstance(model, nn.Module):
        named = dict(model.named_parameters())
        named.update({f"buffer:{n}": b for n, b in model.named_buffers()})
        training = {n or "<root>": m.training for n, m in model.named_modules()}
    else:
        named, training = dict(params or {}), {}
    return Snapshot(
        tensors={n: t.detach().clone() for n, t in named.items()},
        versions={n: t._version for n, t in named.items()},
        requires_grad={n: t.requires_grad for n, t in named.items()},
        grads={n: (None if t.grad is None else t.grad.clone()) for n, t in named.items()},
        training=training,
        ids={n: id(t) for n, t in named.items()},
        rng=torch.get_rng_state(),
    )


def assert_unchanged(before: Snapshot, after: Snapshot) -> None:
    assert after.ids == before.ids, "parameters or buffers were replaced"
    for n, t in before.tensors.items():
        assert torch.equal(after.tensors[n], t), f"{n} changed value"
    assert after.versions == before.versions, "a parameter or buffer was written in place"
    assert after.requires_grad == before.requires_grad, "requires_grad flags changed"
    for n, g in before.grads.items():
        g2 = after.grads[n]
        assert (g is None) == (g2 is None) and (g is None or torch.equal(g, g2)), f"{n}.grad changed"
    assert after.training == before.training, "train/eval modes changed"
    assert torch.equal(after.rng, before.rng), "the global RNG state changed"


def exercise(A, seed: int = 0) -> Any:
    """A few products of every kind (for the untouched-model check)."""
    V = probes(A.shape[1], 3, seed)
    return A @ V[:, 0], A @ V, A.matvec(V[:, 0].numpy()), A.T @ V


@contextlib.contextmanager
def single_thread():
    """Run with one intra-op thread: on tiny models threading only adds overhead (and stalls on
    a loaded machine).  The previous setting is restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
