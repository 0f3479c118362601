"""Low-precision models (issue 11, item 4): a bf16 / fp16 model's products come back in its dtype,
each batch term computed in that precision and the sum over batches accumulated in float32, so
the error stays at the format's rounding level however many batches there are."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvops

OPS = [curvops.Hessian, curvops.GGN, curvops.Fisher, curvops.EmpiricalFisher]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("Op", OPS, ids=lambda o: o.__name__)
def test_half_precision_products_are_accurate_to_the_format(dtype, Op):
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(128, 6, generator=g), torch.randint(0, 3, (128,), generator=g)
    v = torch.randn(sum(p.numel() for p in _model().parameters()), generator=g)
    ref = Op(_model().double(), "cross_entropy", (X.double(), y), batch_size=4) @ v.double()
    out = Op(_model().to(dtype), "cross_entropy", (X, y), batch_size=4) @ v.to(dtype)  # 32 batches
    assert out.dtype == dtype
    # Error analysis: the model's weights and data are rounded to the format (relative u each), and
    # each batch term is computed in it through a few layers (a few u); the float32 sum over the 32
    # batches adds nothing at this level, where a bf16/fp16 running sum would add up to 32 u.
    # Measured: 0.7–1.0 u (1.3–2.1 u with a running sum in the format). Bound: 6 u.
    u = torch.finfo(dtype).eps / 2
    err = float((out.double() - ref).norm() / ref.norm())
    assert err <= 6 * u, f"relative error {err:.3g} > 6u = {6 * u:.3g}"
