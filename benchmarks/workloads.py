"""The benchmark workloads: a model, a mean-reduced loss and the data as a list of batches.

Two workloads, float32, seeded, built in a couple of seconds:

* ``mlp``: MLP 784-256-256-10 (tanh), 269 322 parameters, 2048 random inputs with random
  class labels, batches of 256, cross-entropy.
* ``seed002``: the 1-35-35-35-35-35-1 tanh MLP of ``seeds/002`` (5146 parameters), 10 000
  points on [-1, 1] of ``sin(3x) + 0.3 x²``, batches of 1000, MSE; briefly trained with Adam
  so that the curvature is measured near a minimum, as in the study (the cost of a product
  does not depend on where it is taken).

``BENCH_SCALE`` (environment, default 1) multiplies the number of samples, e.g.
``BENCH_SCALE=0.1`` for a quick CI smoke run; batch sizes stay the same.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn

NAMES = ("mlp", "seed002")


@dataclass
class Workload:
    """A model with its loss (reduction ``"mean"``) and data as ``[(X, y), ...]`` batches."""

    name: str
    model: nn.Module
    loss: nn.Module
    batches: list[tuple[Tensor, Tensor]]
    description: str

    @property
    def num_data(self) -> int:
        return sum(int(X.shape[0]) for X, _ in self.batches)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]


def scale_from_env() -> float:
    return float(os.environ.get("BENCH_SCALE", "1"))


def _split(X: Tensor, y: Tensor, batch_size: int) -> list[tuple[Tensor, Tensor]]:
    return list(zip(X.split(batch_size), y.split(batch_size)))


def _tanh_mlp(widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def build_mlp(scale: float = 1.0, seed: int = 0) -> Workload:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # parameter initialization
    n = max(256, int(2048 * scale))
    model = _tanh_mlp([784, 256, 256, 10])
    X = torch.randn(n, 784, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    return Workload("mlp", model, nn.CrossEntropyLoss(), _split(X, y, 256),
                    f"MLP 784-256-256-10 tanh, cross-entropy, N={n}, batches of 256")


def build_seed002(scale: float = 1.0, seed: int = 0, train_steps: int = 500) -> Workload:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    n = max(1000, int(10_000 * scale))
    model = _tanh_mlp([1, 35, 35, 35, 35, 35, 1])
    X = torch.rand(n, 1, generator=gen) * 2 - 1
    y = torch.sin(3 * X) + 0.3 * X**2
    loss = nn.MSELoss()
    batches = _split(X, y, 1000)
    _train(model, loss, batches, train_steps)
    return Workload("seed002", model, loss, batches,
                    f"MLP 1-35-35-35-35-35-1 tanh, MSE, N={n}, batches of 1000, {train_steps} Adam steps")


def _train(model: nn.Module, loss: nn.Module, batches, steps: int) -> None:
    """Adam over the batches in turn, on one thread (the model is tiny; OpenMP only adds
    overhead, and on a busy machine its spinning threads make each step ~100x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for step in range(steps):
            Xb, yb = batches[step % len(batches)]
            opt.zero_grad(set_to_none=True)
            loss(model(Xb), yb).backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
        model.zero_grad(set_to_none=True)


def build(name: str, *, scale: float | None = None, device: str | torch.device = "cpu",
          train: bool = True) -> Workload:
    """Build workload ``name`` (float32) and move it to ``device``.

    ``train=False`` skips seed002's Adam steps (for runs where parameter values don't matter).
    """
    scale = scale_from_env() if scale is None else scale
    if name == "mlp":
        w = build_mlp(scale)
    elif name == "seed002":
        w = build_seed002(scale, train_steps=500 if train else 0)
    else:
        raise ValueError(f"benchmarks.workloads.build: unknown workload {name!r}; expected one of {NAMES}.")
    device = torch.device(device)
    w.model.to(device).eval()
    w.batches = [(X.to(device), y.to(device)) for X, y in w.batches]
    return w
