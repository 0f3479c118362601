"""A small built-in problem (model + synthetic data) for examples, the quick start and reports."""

from __future__ import annotations

import torch
from torch import nn


def demo_problem(num_samples: int = 512, hidden: int = 16, steps: int = 300, seed: int = 0,
                 dtype: torch.dtype = torch.float64):
    """Train a 2-16-16-3 tanh MLP on three Gaussian blobs with cross-entropy (about a second).

    Returns:
        ``(model, X, y)``: the trained model in eval mode and its training data.
    """
    gen = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[0.0, 1.5], [-1.3, -0.75], [1.3, -0.75]], dtype=dtype)
    y = torch.randint(0, 3, (num_samples,), generator=gen)
    X = centers[y] + 0.6 * torch.randn(num_samples, 2, generator=gen, dtype=dtype)
    model = nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                          nn.Linear(hidden, 3)).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) / max(1, p.shape[-1]) ** 0.5)
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model.eval(), X, y
