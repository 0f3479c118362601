"""ParamLayout: flattening and unflattening dicts of tensors, including 0-dim entries."""

import torch

from curvops import ParamLayout


def test_round_trip_with_scalar_entry():
    values = {"lam": torch.tensor(0.3, dtype=torch.float64), "W": torch.arange(6.0, dtype=torch.float64).reshape(2, 3)}
    layout = ParamLayout(tuple(values), tuple(v.shape for v in values.values()))
    flat = layout.flatten(values, "test")
    assert flat.tolist() == [0.3, 0, 1, 2, 3, 4, 5]
    back = layout.unflatten(flat)
    assert back["lam"].shape == () and float(back["lam"]) == 0.3
    torch.testing.assert_close(back["W"], values["W"])
    # with trailing columns: [P, K] -> {name: [*shape, K]}
    cols = layout.unflatten(torch.stack([flat, 2 * flat], dim=1))
    assert cols["lam"].shape == (2,) and cols["lam"].tolist() == [0.3, 0.6]
    assert cols["W"].shape == (2, 3, 2)
