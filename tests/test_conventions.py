r"""Normalization conventions of the curvature operators, against curvlinops and a dense oracle.

docs/conventions.md states the conventions; these tests pin them down.  Write ``s_i`` for the
loss of sample i in its *sum* form (all its output elements added up), ``m`` for the number of
loss elements per sample that a ``"mean"`` loss averages over (``m = C`` for MSE and
BCE-with-logits on outputs [N, C]; ``m = 1`` for cross-entropy, which has one term per sample)
and ``ℓ_i`` for the loss of sample i alone with the loss's own reduction (``ℓ_i = s_i / m`` for
``"mean"``, ``ℓ_i = s_i`` for ``"sum"``).  Then

* curvops:     EF = (1/N) Σ_i ∇ℓ_i ∇ℓ_iᵀ = 1/(N m²) Σ_i ∇s_i ∇s_iᵀ   ("mean"),  Σ_i ∇s_i ∇s_iᵀ ("sum");
* curvlinops:  EF = 1/(N m)  Σ_i ∇s_i ∇s_iᵀ                          ("mean"),  Σ_i ∇s_i ∇s_iᵀ ("sum");

so **EF_curvlinops = κ · EF_curvops with κ = m for "mean" and κ = 1 for "sum"** (κ = C for
MSE/BCE-with-logits "mean", 1 for cross-entropy).  The GGN, the Hessian and the exact Fisher
agree with factor 1 (both libraries differentiate the same whole-data loss).

For sequence outputs ([N, T, C]; cross-entropy [N, C, T] with targets [N, T]) curvlinops' EF
treats every position t as a sample of its own (per-token outer products), while curvops' EF
takes one outer product per sample (sequence): the two differ by more than a constant.  The
curvlinops EF on sequences equals κ times curvops' EF on the token-flattened data
([N·T, D] → [N·T, C]).  GGN and Hessian agree with factor 1 on sequences too.

Matrices are compared dense in float64: ‖A − κB‖_F ≤ 1e-10 ‖A‖_F.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import curvops

DT = torch.float64
RTOL = 1e-10
N, D, H, C = 8, 4, 6, 3  # flat MLP: P = 4·6 + 6 + 6·3 + 3 = 51
NS, T, DS, HS = 6, 4, 3, 4  # sequence MLP: P = 3·4 + 4 + 4·3 + 3 = 31

LOSSES = {"mse": nn.MSELoss, "bce_with_logits": nn.BCEWithLogitsLoss, "cross_entropy": nn.CrossEntropyLoss}
CASES = [(kind, red) for kind in LOSSES for red in ("mean", "sum")]
CASE_IDS = [f"{k}-{r}" for k, r in CASES]


def _needs_curvlinops():
    """curvlinops, or a skip — an error in CI, where .ci/run installs it (CURVOPS_REQUIRE_CURVLINOPS=1)."""
    recipe = ("curvlinops-for-pytorch==3.0.1 not installed; install it without replacing torch: "
              "pip install --no-deps curvlinops-for-pytorch==3.0.1 einops einconv opt-einsum")
    if os.environ.get("CURVOPS_REQUIRE_CURVLINOPS") == "1":
        import curvlinops  # noqa: F401 - CI installed it: a failed import is a failure, not a skip
        return curvlinops
    return pytest.importorskip("curvlinops", reason=recipe)


def kappa(kind: str, reduction: str, m: int) -> float:
    """EF_curvlinops = κ · EF_curvops: κ = m (loss elements per sample) for an elementwise 'mean' loss, else 1."""
    return float(m) if (reduction == "mean" and kind != "cross_entropy") else 1.0


def mlp(d_in: int, hidden: int, seed: int = 1) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, C)).to(DT)


class ClassesFirst(nn.Module):
    """[n, T, C] → [n, C, T], the layout torch's cross-entropy wants for sequences."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x).movedim(-1, 1)


def targets(kind: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Targets for outputs [n, *rest, C] (class indices [n, *rest] for cross-entropy)."""
    if kind == "mse":
        return torch.randn(*shape, C, generator=gen, dtype=DT)
    if kind == "bce_with_logits":
        return torch.rand(*shape, C, generator=gen, dtype=DT)  # soft labels in [0, 1]
    return torch.randint(0, C, shape, generator=gen)


def flat_problem(kind: str, reduction: str):
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(N, D, generator=gen, dtype=DT)
    y = targets(kind, (N,), gen)
    return mlp(D, H), LOSSES[kind](reduction=reduction), X, y


def sequence_problem(kind: str, reduction: str):
    gen = torch.Generator().manual_seed(2)
    X = torch.randn(NS, T, DS, generator=gen, dtype=DT)
    y = targets(kind, (NS, T), gen)
    net = mlp(DS, HS)
    model = ClassesFirst(net) if kind == "cross_entropy" else net
    return net, model, LOSSES[kind](reduction=reduction), X, y


def assert_rel_close(A: torch.Tensor, B: torch.Tensor, rtol: float = RTOL):
    err = float(torch.linalg.matrix_norm(A - B) / torch.linalg.matrix_norm(A))
    assert err <= rtol, f"relative Frobenius error {err:.3e} > {rtol:.0e}"


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- curvlinops ------------------------------------------------------------------------------
def curvlinops_dense(name: str, model, loss, batches) -> torch.Tensor:
    cl = _needs_curvlinops()
    cls = {"ef": cl.EFLinearOperator, "ggn": cl.GGNLinearOperator, "hessian": cl.HessianLinearOperator}[name]
    A = cls(model, loss, list(model.parameters()), batches, check_deterministic=False)
    return A @ torch.eye(num_params(model), dtype=DT)


CURVOPS = {"ef": curvops.EmpiricalFisher, "ggn": curvops.GGN, "hessian": curvops.Hessian}


@pytest.mark.parametrize("name", ["ef", "ggn", "hessian"])
@pytest.mark.parametrize("kind,reduction", CASES, ids=CASE_IDS)
def test_matches_curvlinops_up_to_the_documented_factor(kind, reduction, name):
    model, loss, X, y = flat_problem(kind, reduction)
    # Different batch splits on purpose: both libraries normalize over the whole data set.
    A = curvlinops_dense(name, model, loss, [(X[:4], y[:4]), (X[4:], y[4:])])
    B = CURVOPS[name](model, loss, (X, y), batch_size=3).to_dense()
    factor = kappa(kind, reduction, m=C) if name == "ef" else 1.0
    assert_rel_close(A, factor * B)
    if name == "ef" and factor != 1.0:  # the factor is real, not a tolerance artefact
        assert float(torch.linalg.matrix_norm(A - B) / torch.linalg.matrix_norm(A)) > 0.5


@pytest.mark.parametrize("kind,reduction", CASES, ids=CASE_IDS)
def test_exact_fisher_matches_curvlinops_ggn(kind, reduction):
    model, loss, X, y = flat_problem(kind, reduction)
    A = curvlinops_dense("ggn", model, loss, [(X[:5], y[:5]), (X[5:], y[5:])])
    F = curvops.Fisher(model, loss, (X, y), batch_size=4).to_dense()
    assert_rel_close(A, F)


@pytest.mark.parametrize("kind,reduction", CASES, ids=CASE_IDS)
def test_sequence_outputs_against_curvlinops(kind, reduction):
    net, model, loss, X, y = sequence_problem(kind, reduction)
    batches = [(X[:3], y[:3]), (X[3:], y[3:])]
    for name in ("ggn", "hessian"):  # the same whole-data loss: factor 1
        A = curvlinops_dense(name, model, loss, batches)
        assert_rel_close(A, CURVOPS[name](model, loss, (X, y), batch_size=4).to_dense())
    # curvlinops' EF takes one outer product per position: it is κ · curvops' EF of the tokens as samples.
    A = curvlinops_dense("ef", model, loss, batches)
    tokens = (X.reshape(NS * T, DS), y.reshape(NS * T, *y.shape[2:]))
    B_tokens = curvops.EmpiricalFisher(net, loss, tokens, batch_size=5).to_dense()
    assert_rel_close(A, kappa(kind, reduction, m=C) * B_tokens)
    # curvops' EF on the sequences (one outer product per sequence) is another matrix, not a multiple.
    B_seq = curvops.EmpiricalFisher(model, loss, (X, y), batch_size=4).to_dense()
    c = float((A * B_seq).sum() / (B_seq * B_seq).sum())  # best scalar fit
    assert float(torch.linalg.matrix_norm(A - c * B_seq) / torch.linalg.matrix_norm(A)) > 0.1


# ---- dense oracle (no curvlinops, no curvops code) -------------------------------------------
def per_sample_gradients(model: nn.Module, loss_fn, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Rows ∇_θ loss_fn(model(x_i), y_i), one torch.autograd.grad call per sample: [n, P]."""
    params = list(model.parameters())
    rows = []
    for i in range(X.shape[0]):
        value = loss_fn(model(X[i:i + 1]), y[i:i + 1])
        grads = torch.autograd.grad(value, params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def oracle_ef(model, loss: nn.Module, X, y, convention: str) -> torch.Tensor:
    """EF from explicit per-sample gradients.

    ``"curvops"``:    (1/N) Σ_i ∇ℓ_i ∇ℓ_iᵀ, ℓ_i = the loss of sample i with the loss's reduction
                      (Σ_i for "sum");
    ``"curvlinops"``: 1/(N·m) Σ_r ∇s_r ∇s_rᵀ over *rows* r (a sample, or a position of a sequence),
                      s_r the row's sum-form loss, m its number of loss elements (1 for cross-entropy,
                      N·m = number of rows · m); for "sum": Σ_r ∇s_r ∇s_rᵀ.
    """
    kind = {nn.MSELoss: "mse", nn.BCEWithLogitsLoss: "bce_with_logits", nn.CrossEntropyLoss: "cross_entropy"}[
        type(loss)]
    mean = loss.reduction == "mean"
    if convention == "curvops":
        G = per_sample_gradients(model, loss, X, y)
        return G.T @ G / (G.shape[0] if mean else 1)
    summed = type(loss)(reduction="sum")
    if y.dim() > (1 if kind == "cross_entropy" else 2):  # sequences: every position is a row

        def at(pos: int):
            def row_loss(out, target):  # the sum-form loss of one position of one sequence
                row = out[..., pos] if kind == "cross_entropy" else out[:, pos]  # CE outputs are [1, C, T]
                return summed(row, target[:, pos])
            return row_loss

        G = torch.cat([per_sample_gradients(model, at(pos), X, y) for pos in range(y.shape[1])])
    else:
        G = per_sample_gradients(model, summed, X, y)
    m = 1 if kind == "cross_entropy" else C
    return G.T @ G / (G.shape[0] * m if mean else 1)


@pytest.mark.parametrize("kind,reduction", CASES, ids=CASE_IDS)
def test_empirical_fisher_matches_per_sample_gradient_oracle(kind, reduction):
    model, loss, X, y = flat_problem(kind, reduction)
    B = curvops.EmpiricalFisher(model, loss, (X, y), batch_size=3).to_dense()
    assert_rel_close(oracle_ef(model, loss, X, y, "curvops"), B)
    # The conversion to curvlinops' convention, checked on the oracle alone.
    assert_rel_close(oracle_ef(model, loss, X, y, "curvlinops"), kappa(kind, reduction, m=C) * B)


@pytest.mark.parametrize("kind,reduction", CASES, ids=CASE_IDS)
def test_sequence_empirical_fisher_is_per_sequence(kind, reduction):
    net, model, loss, X, y = sequence_problem(kind, reduction)
    B = curvops.EmpiricalFisher(model, loss, (X, y), batch_size=4).to_dense()
    assert_rel_close(oracle_ef(model, loss, X, y, "curvops"), B)
    # curvlinops' per-position convention, from the oracle: κ · curvops' EF of the tokens as samples.
    tokens = (X.reshape(NS * T, DS), y.reshape(NS * T, *y.shape[2:]))
    B_tokens = curvops.EmpiricalFisher(net, loss, tokens, batch_size=5).to_dense()
    assert_rel_close(oracle_ef(model, loss, X, y, "curvlinops"), kappa(kind, reduction, m=C) * B_tokens)


def test_oracle_matches_curvlinops_ef():
    """The oracle's curvlinops convention is curvlinops' own (so the oracle tests above convert correctly)."""
    _needs_curvlinops()
    for kind, reduction in CASES:
        model, loss, X, y = flat_problem(kind, reduction)
        A = curvlinops_dense("ef", model, loss, [(X[:4], y[:4]), (X[4:], y[4:])])
        assert_rel_close(A, oracle_ef(model, loss, X, y, "curvlinops"))
        net, model, loss, X, y = sequence_problem(kind, reduction)
        A = curvlinops_dense("ef", model, loss, [(X[:3], y[:3]), (X[3:], y[3:])])
        assert_rel_close(A, oracle_ef(model, loss, X, y, "curvlinops"))
