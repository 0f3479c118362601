"""A tiny model zoo for tests: float64, seeded, a few hundred parameters at most.

Each :class:`ZooCase` builds a fresh :class:`Problem` (model, loss, data, reduction) on
every call, so a test may change the model without affecting other tests.  Building never
touches the global RNG.

Example:
    >>> p = CASES["mlp_ce"].build("mean")                       # doctest: +SKIP
    >>> H = curvops.Hessian(p.model, p.loss_arg(), p.data, **p.kwargs())  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

DTYPE = torch.float64
LOSSES = ("mse", "cross_entropy", "bce_with_logits")
_MODULES = {"mse": nn.MSELoss, "cross_entropy": nn.CrossEntropyLoss, "bce_with_logits": nn.BCEWithLogitsLoss}


@dataclass
class Problem:
    """One model + loss + data set, as a curvops user would pass them.

    ``model`` is an ``nn.Module`` or a plain function ``f(params, x)`` (then ``params`` holds
    its parameter dict).  ``X`` is a tensor or a dict of tensors (keyword inputs).
    """

    name: str
    model: nn.Module | Callable
    X: Tensor | dict
    y: Tensor
    loss: str
    reduction: str
    params: dict[str, Tensor] | None = None
    loss_as_module: bool = False

    @property
    def N(self) -> int:  # noqa: N802 - number of samples
        return int(self.y.shape[0])

    @property
    def data(self) -> tuple:
        return (self.X, self.y)

    def loss_arg(self):
        """The loss as the user passes it: a name, or a torch loss module with the reduction."""
        return _MODULES[self.loss](reduction=self.reduction) if self.loss_as_module else self.loss

    def kwargs(self, **extra) -> dict:
        """Keyword arguments for an operator / Objective (reduction, and params for a function)."""
        kw = {"reduction": self.reduction}
        if self.params is not None:
            kw["params"] = self.params
        kw.update(extra)
        return kw

    def build(self, op_cls, data=None, **extra):
        """``op_cls(model, loss, data, **kwargs)`` on this problem (data defaults to (X, y))."""
        return op_cls(self.model, self.loss_arg(), self.data if data is None else data, **self.kwargs(**extra))

    def slice_inputs(self, index) -> Tensor | dict:
        """The inputs of the samples ``index`` (a slice or index tensor)."""
        if isinstance(self.X, dict):
            return {k: v[index] for k, v in self.X.items()}
        return self.X[index]

    def batches(self, size: int) -> list[tuple]:
        """The data as a list of (x, y) batches of ``size`` samples (last one shorter)."""
        return [(self.slice_inputs(slice(s, s + size)), self.y[s:s + size]) for s in range(0, self.N, size)]


@dataclass(frozen=True)
class ZooCase:
    """A named recipe for a :class:`Problem`; ``build(reduction)`` gives a fresh copy."""

    name: str
    loss: str
    make: Callable[[torch.Generator], tuple]  # gen -> (model, X, y, params or None)
    seed: int = 0
    loss_as_module: bool = False

    def build(self, reduction: str = "mean") -> Problem:
        if reduction not in ("mean", "sum"):
            raise ValueError(f"ZooCase.build: expected reduction 'mean' or 'sum', got {reduction!r}.")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)  # nn.Module initializers use the global RNG
            gen = torch.Generator().manual_seed(self.seed)
            model, X, y, params = self.make(gen)
        return Problem(self.name, model, X, y, self.loss, reduction, params, self.loss_as_module)

    def __str__(self) -> str:
        return self.name


# ---- data helpers --------------------------------------------------------------------
def _randn(gen, *shape) -> Tensor:
    return torch.randn(*shape, generator=gen, dtype=DTYPE)


def _classes(gen, n: int, C: int) -> Tensor:
    return torch.randint(0, C, (n,), generator=gen)


# ---- the models ----------------------------------------------------------------------
LINEAR_N, LINEAR_D, LINEAR_C = 16, 4, 2


def _linear(gen):
    model = nn.Linear(LINEAR_D, LINEAR_C).to(DTYPE)
    X = _randn(gen, LINEAR_N, LINEAR_D)
    return model, X, _randn(gen, LINEAR_N, LINEAR_C), None


def _mlp(gen):
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DTYPE)
    return model, _randn(gen, 16, 4), _classes(gen, 16, 3), None


def _conv(gen):
    model = nn.Sequential(
        nn.Conv2d(1, 2, kernel_size=3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 3 * 3, 3),
    ).to(DTYPE)
    return model, _randn(gen, 12, 1, 5, 5), _classes(gen, 12, 3), None


class TwoInputs(nn.Module):
    """A model with keyword inputs: ``forward(a, b)``."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(2, 4, bias=False)
        self.head = nn.Linear(4, 2)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return self.head(torch.tanh(self.a(a) + self.b(b)))


def _dict_inputs(gen):
    model = TwoInputs().to(DTYPE)
    X = {"a": _randn(gen, 14, 3), "b": _randn(gen, 14, 2)}
    return model, X, _randn(gen, 14, 2), None


def _batchnorm_eval(gen):
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 2)).to(DTYPE)
    bn = model[1]
    with torch.no_grad():  # nontrivial running statistics and affine parameters
        bn.running_mean.copy_(_randn(gen, 5))
        bn.running_var.copy_(0.5 + torch.rand(5, generator=gen, dtype=DTYPE))
        bn.weight.copy_(1.0 + 0.3 * _randn(gen, 5))
        bn.bias.copy_(0.3 * _randn(gen, 5))
    model.eval()
    return model, _randn(gen, 15, 4), _randn(gen, 15, 2), None


def mlp_function(params: dict[str, Tensor], x: Tensor) -> Tensor:
    """A plain-function model ``f(params, x)``: softplus MLP with 3 outputs."""
    return torch.nn.functional.softplus(x @ params["w1"] + params["b1"]) @ params["w2"]


def _function(gen):
    params = {"w1": 0.7 * _randn(gen, 3, 5), "b1": 0.3 * _randn(gen, 5), "w2": 0.7 * _randn(gen, 5, 3)}
    return mlp_function, _randn(gen, 13, 3), _classes(gen, 13, 3), params


def _mlp_bce(gen):
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(DTYPE)
    y = torch.bernoulli(torch.full((17, 2), 0.5, dtype=DTYPE), generator=gen)
    return model, _randn(gen, 17, 3), y, None


CASES: dict[str, ZooCase] = {c.name: c for c in [
    ZooCase("linear_mse", "mse", _linear, seed=1),
    ZooCase("mlp_ce", "cross_entropy", _mlp, seed=2),
    ZooCase("conv_ce", "cross_entropy", _conv, seed=3, loss_as_module=True),
    ZooCase("dict_mse", "mse", _dict_inputs, seed=4),
    ZooCase("bn_eval_mse", "mse", _batchnorm_eval, seed=5, loss_as_module=True),
    ZooCase("function_ce", "cross_entropy", _function, seed=6),
    ZooCase("mlp_bce", "bce_with_logits", _mlp_bce, seed=7),
]}


def linear_mse_hessian(problem: Problem) -> Tensor:
    r"""Closed-form Hessian (= GGN = Fisher) of the linear + MSE case, in the layout (W row-major, b).

    With ``f_i = W x_i + b`` and :math:`L = s \sum_{i,c} (f_{ic} - y_{ic})^2`, where
    :math:`s = 1/(N C)` for 'mean' (MSELoss averages over all N·C elements) and 1 for 'sum',

    .. math:: H = 2s \begin{pmatrix} I_C \otimes X^\top X & I_C \otimes X^\top 1 \\
              I_C \otimes 1^\top X & N I_C \end{pmatrix}.
    """
    X = problem.X
    N, C = X.shape[0], problem.y.shape[1]
    s = 1.0 / (N * C) if problem.reduction == "mean" else 1.0
    eye = torch.eye(C, dtype=X.dtype)
    ones = torch.ones(N, 1, dtype=X.dtype)
    top = torch.cat([torch.kron(eye, X.T @ X), torch.kron(eye, X.T @ ones)], dim=1)
    bottom = torch.cat([torch.kron(eye, ones.T @ X), N * eye], dim=1)
    return 2 * s * torch.cat([top, bottom], dim=0)


class _SampleDataset(torch.utils.data.Dataset):
    def __init__(self, problem: Problem):
        self.problem = problem

    def __len__(self) -> int:
        return self.problem.N

    def __getitem__(self, i: int):
        return self.problem.slice_inputs(i), self.problem.y[i]


def as_dataloader(problem: Problem, batch_size: int) -> torch.utils.data.DataLoader:
    """The problem's data as an unshuffled DataLoader (dict inputs are collated as dicts)."""
    return torch.utils.data.DataLoader(_SampleDataset(problem), batch_size=batch_size, shuffle=False)
