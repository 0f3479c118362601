r"""curvops as a laplace-torch backend (curvops.interop.laplace), inside laplace-torch 0.3.

For a small classifier and a small regressor (float64, trained near a minimum) the posterior
precision, the log marginal likelihood and the GLM predictive of ``Laplace(..., backend=CurvopsX)``
equal those of laplace-torch's own curvlinops backend and of a dense computation that shares no code
with either (autograd per sample / per output; laplace-torch's conventions: summed loss, factor ½
for regression).  Dense comparisons are to 1e-10 relative (float64 sums of a few hundred terms).

laplace-torch's curvlinops backend multiplies its operator by ``torch.eye(P)`` in the *default*
dtype, so its ``full`` matrices of a float64 model are float32-accurate (relative error ~1e-8)
unless the default dtype is float64: the comparisons with it run under
``torch.set_default_dtype(torch.float64)`` (restored afterwards).

Skipped when laplace-torch is not installed, unless ``CURVOPS_REQUIRE_LAPLACE=1`` (set by .ci/run
when it installed it): then a failed import is an error.
"""

from __future__ import annotations

import contextlib
import math
import os

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

DT = torch.float64
RTOL = 1e-10
N, D, H = 30, 2, 6


def _require_laplace():
    recipe = ("laplace-torch==0.3 not installed; on a CPU torch: pip install --no-deps laplace-torch==0.3 "
              "asdfghjkl==0.1a4 backpack-for-pytorch unfoldNd torchmetrics lightning-utilities (docs/guide/laplace.md)")
    if os.environ.get("CURVOPS_REQUIRE_LAPLACE") == "1":
        import laplace  # noqa: F401 - CI installed it: a failed import is a failure, not a skip
        return laplace
    return pytest.importorskip("laplace", reason=recipe)


laplace = _require_laplace()
from laplace import Laplace  # noqa: E402
from laplace.curvature import CurvlinopsEF, CurvlinopsGGN, CurvlinopsHessian  # noqa: E402

from curvops.interop.laplace import CurvopsEF, CurvopsGGN, CurvopsHessian  # noqa: E402

OURS = {"ggn": CurvopsGGN, "ef": CurvopsEF, "hessian": CurvopsHessian}
THEIRS = {"ggn": CurvlinopsGGN, "ef": CurvlinopsEF, "hessian": CurvlinopsHessian}
FACTOR = {"classification": 1.0, "regression": 0.5}
PRIOR, SIGMA = 2.0, 0.7


@contextlib.contextmanager
def _default_float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _problem(likelihood: str, model: nn.Module | None = None):
    g = torch.Generator().manual_seed(7)
    X = torch.randn(N, D, generator=g, dtype=DT)
    if likelihood == "classification":
        y = (X[:, 0] > 0).long() + (X[:, 1] > 0.5).long()
        out, loss = 3, nn.CrossEntropyLoss(reduction="sum")
    else:
        y = torch.stack([torch.sin(2 * X[:, 0]), X[:, 1] ** 2], 1) + 0.1 * torch.randn(N, 2, generator=g, dtype=DT)
        out, loss = 2, nn.MSELoss(reduction="sum")
    torch.manual_seed(1)
    if model is None:
        model = nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, out)).to(DT)
    opt = torch.optim.LBFGS(model.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure():  # near a minimum of the MAP objective, so the Hessian is positive definite
        opt.zero_grad()
        value = loss(model(X), y) + 0.5 * PRIOR * sum((p ** 2).sum() for p in model.parameters())
        value.backward()
        return value

    opt.step(closure)
    for p in model.parameters():
        p.grad = None
    return model, X, y, loss


def _flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def _dense(kind: str, model, loss, X, y) -> torch.Tensor:
    """``factor``-free curvature of the summed loss, from plain autograd."""
    params = list(model.parameters())
    if kind == "ef":
        G = torch.stack([_flat(torch.autograd.grad(loss(model(X[i:i + 1]), y[i:i + 1]), params)) for i in range(N)])
        return G.T @ G
    if kind == "hessian":
        g = _flat(torch.autograd.grad(loss(model(X), y), params, create_graph=True))
        return torch.stack([_flat(torch.autograd.grad(g[k], params, retain_graph=True)) for k in range(g.numel())])
    out = model(X)
    J = torch.stack([_flat(torch.autograd.grad(out.reshape(-1)[r], params, retain_graph=True)) for r in range(out.numel())])
    f = out.detach().requires_grad_()
    gf = torch.autograd.grad(loss(f, y), f, create_graph=True)[0].reshape(-1)
    Hf = torch.stack([torch.autograd.grad(gf[r], f, retain_graph=True)[0].reshape(-1) for r in range(gf.numel())])
    return J.T @ Hf @ J


def _fit(likelihood, backend, structure, model, X, y, **kw):
    la = Laplace(model, likelihood, subset_of_weights=kw.pop("subset", "all"), hessian_structure=structure,
                 backend=backend, prior_precision=PRIOR, sigma_noise=SIGMA if likelihood == "regression" else 1.0, **kw)
    la.fit(DataLoader(TensorDataset(X, y), batch_size=8))  # batches of 8, 8, 8, 6
    return la


def _precision(la) -> torch.Tensor:
    P = la.posterior_precision
    return P.to_matrix() if hasattr(P, "to_matrix") else P


def _close(a, b, rtol=RTOL):
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    err = float((a - b).norm() / b.norm())
    assert err <= rtol, f"relative error {err:.2e} > {rtol:.0e}"


def _oracle_lml(likelihood, loss_value, post_logdet, P, theta):
    h = 1.0 / SIGMA ** 2 if likelihood == "regression" else 1.0
    loglik = -h * FACTOR[likelihood] * loss_value
    if likelihood == "regression":
        loglik -= N * 2 * math.log(SIGMA * math.sqrt(2 * math.pi))
    return loglik - 0.5 * (post_logdet - P * math.log(PRIOR)) - 0.5 * PRIOR * float(theta @ theta)


CASES = [(lik, kind, s) for lik in ("classification", "regression") for kind in ("ggn", "ef", "hessian")
         for s in ("full", "diag")]


@pytest.mark.parametrize("likelihood,kind,structure", CASES, ids=["-".join(c) for c in CASES])
def test_precision_marglik_and_predictive_match_dense_and_curvlinops(likelihood, kind, structure):
    model, X, y, loss = _problem(likelihood)
    la = _fit(likelihood, OURS[kind], structure, model, X, y)
    h = 1.0 / SIGMA ** 2 if likelihood == "regression" else 1.0
    Cd = FACTOR[likelihood] * _dense(kind, model, loss, X, y)
    P = Cd.shape[0]
    post = h * Cd + PRIOR * torch.eye(P, dtype=DT)
    if structure == "diag":
        post = torch.diagonal(post)
        logdet = float(torch.log(post).sum())
    else:
        logdet = float(torch.linalg.slogdet(post)[1])
    _close(_precision(la), post)
    theta = _flat(model.parameters()).detach()
    lml = _oracle_lml(likelihood, float(loss(model(X), y).detach()), logdet, P, theta)
    assert abs(float(la.log_marginal_likelihood()) - lml) <= RTOL * abs(lml)
    Xt = torch.linspace(-2, 2, 5, dtype=DT)[:, None].repeat(1, D)
    ours = la(Xt, pred_type="glm", link_approx="probit") if likelihood == "classification" else la(Xt, pred_type="glm")
    if likelihood == "regression" and structure == "full":  # the GLM predictive variance J Σ Jᵀ, dense
        out = model(Xt)
        J = torch.stack([_flat(torch.autograd.grad(out.reshape(-1)[r], list(model.parameters()), retain_graph=True))
                         for r in range(out.numel())]).reshape(5, 2, P)
        _close(ours[1], J @ torch.linalg.inv(post) @ J.transpose(1, 2))
    if kind == "hessian" and structure == "diag":
        with pytest.raises(NotImplementedError):  # laplace-torch's curvlinops Hessian has no diagonal
            _fit(likelihood, THEIRS[kind], structure, model, X, y)
        return
    with _default_float64():
        ref = _fit(likelihood, THEIRS[kind], structure, model, X, y)
    _close(_precision(la), _precision(ref))
    assert abs(float(la.log_marginal_likelihood() - ref.log_marginal_likelihood())) <= RTOL * abs(lml)
    theirs = ref(Xt, pred_type="glm", link_approx="probit") if likelihood == "classification" else ref(Xt, pred_type="glm")
    for a, b in zip(ours if isinstance(ours, tuple) else (ours,), theirs if isinstance(theirs, tuple) else (theirs,)):
        _close(a, b)


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("kind", ["ggn", "ef"])
def test_kron_matches_curvlinops(likelihood, kind):
    model, X, y, loss = _problem(likelihood)
    la = _fit(likelihood, OURS[kind], "kron", model, X, y)
    ref = _fit(likelihood, THEIRS[kind], "kron", model, X, y)
    _close(_precision(la), _precision(ref))
    assert abs(float(la.log_marginal_likelihood() - ref.log_marginal_likelihood())) <= RTOL * abs(
        float(ref.log_marginal_likelihood()))
    Xt = torch.randn(4, D, dtype=DT)
    a, b = la(Xt, pred_type="glm"), ref(Xt, pred_type="glm")
    for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        _close(u, v)


def test_kron_of_one_linear_layer_is_the_dense_ggn_blocks():
    """One linear layer with MSE: KFAC is exact, so the Kronecker posterior precision is the dense GGN's
    weight and bias blocks (laplace-torch keeps them separate) plus the prior, summed over 4 batches."""
    model, X, y, loss = _problem("regression", model=nn.Linear(D, 2).to(DT))
    la = _fit("regression", CurvopsGGN, "kron", model, X, y)
    G = 0.5 * _dense("ggn", model, loss, X, y) / SIGMA ** 2
    nw = 2 * D
    G[:nw, nw:] = 0
    G[nw:, :nw] = 0
    _close(_precision(la), G + PRIOR * torch.eye(G.shape[0], dtype=DT))


def test_last_layer_and_subnetwork():
    model, X, y, loss = _problem("classification")
    la = _fit("classification", CurvopsGGN, "full", model, X, y, subset="last_layer")
    with _default_float64():
        ref = _fit("classification", CurvlinopsGGN, "full", model, X, y, subset="last_layer")
    _close(_precision(la), _precision(ref))
    Gd = _dense("ggn", model, loss, X, y)
    nl = H * 3 + 3  # the last layer's weight and bias, last in the parameter vector
    _close(_precision(la), Gd[-nl:, -nl:] + PRIOR * torch.eye(nl, dtype=DT))
    idx = torch.tensor([0, 3, 7, 20, 30, 38])
    sub = Laplace(model, "classification", subset_of_weights="subnetwork", subnetwork_indices=idx,
                  hessian_structure="full", backend=CurvopsGGN, prior_precision=PRIOR)
    sub.fit(DataLoader(TensorDataset(X, y), batch_size=8))
    _close(sub.posterior_precision, Gd[idx][:, idx] + PRIOR * torch.eye(6, dtype=DT))


def test_refusals_and_model_untouched():
    model, X, y, loss = _problem("classification")
    ggn = CurvopsGGN(model, "classification")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss_value, Hm = ggn.full(X, y)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert abs(float(loss_value) - float(loss(model(X), y).detach())) < 1e-12 and Hm.shape == (39, 39)
    with pytest.raises(TypeError, match="expected a dict batch of tensors, got non-tensor entries \\['note'\\]"):
        ggn.full({"input_ids": X, "note": "x"}, y)
    with pytest.raises(NotImplementedError, match="CurvopsHessian: no Kronecker factorization"):
        CurvopsHessian(model, "classification").kron(X, y, N=N)
    norm = nn.Sequential(nn.Linear(D, H), nn.LayerNorm(H), nn.Linear(H, 3)).to(DT)
    with pytest.raises(ValueError, match="1.weight"):  # KFAC names the parameter it cannot factor
        CurvopsGGN(norm, "classification").kron(X, y, N=N)


def test_kron_options_reach_kfac():
    """laplace-torch passes ``asdl_fisher_kwargs`` to ``backend.kron``; ``kfac_approx`` reaches KFAC."""
    import curvops.interop.laplace as backend_module

    seen = []
    real = backend_module.KFAC

    def spy(*args, **kwargs):
        seen.append(kwargs["kfac_approx"])
        return real(*args, **kwargs)

    model, X, y, loss = _problem("classification")
    backend_module.KFAC = spy
    try:
        la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron", backend=CurvopsGGN,
                     prior_precision=PRIOR, asdl_fisher_kwargs={"kfac_approx": "reduce"})
        la.fit(DataLoader(TensorDataset(X, y), batch_size=8))
    finally:
        backend_module.KFAC = real
    assert seen == ["reduce"] * 4  # one KFAC per batch (8, 8, 8, 6 samples)


class _DictNet(nn.Module):
    """A model that takes the whole batch dict (as laplace-torch passes HuggingFace-style batches)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, batch):
        return self.net(batch["input_ids"] * batch["scale"][:, None])


class _Dicts(torch.utils.data.Dataset):
    def __init__(self, X, y):
        self.X, self.y = X, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"input_ids": self.X[i], "scale": torch.tensor(1.5, dtype=DT), "labels": self.y[i]}


@pytest.mark.parametrize("structure", ["full", "diag"])
def test_dict_batches(structure):
    net, X, y, loss = _problem("classification")
    model = _DictNet(net)
    fits = []
    for backend in (CurvopsGGN, CurvlinopsGGN):
        la = Laplace(model, "classification", subset_of_weights="all", hessian_structure=structure, backend=backend,
                     prior_precision=PRIOR)
        with _default_float64():
            la.fit(DataLoader(_Dicts(X, y), batch_size=8))
        fits.append(la)
    _close(_precision(fits[0]), _precision(fits[1]))
    # the same network on plain tensor batches (checked against the dense GGN above)
    ref = _fit("classification", CurvopsGGN, structure, nn.Sequential(_Scale(1.5), net), X, y)
    _close(_precision(fits[0]), _precision(ref))


class _Scale(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c

    def forward(self, x):
        return self.c * x
