"""GPU checks: products run on the operator's device and agree with the CPU (skipped without CUDA)."""

import pytest
import torch
from torch import nn

import curvops

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def problem(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double().to(device)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(32, 4, generator=g, dtype=torch.float64)  # data stays on the CPU: batches move one at a time
    y = torch.randint(0, 3, (32,), generator=g)
    return model, (X, y)


@pytest.mark.parametrize("Op", [curvops.Hessian, curvops.GGN, curvops.Fisher, curvops.EmpiricalFisher])
def test_products_on_gpu_match_cpu(Op):
    model_cpu, data = problem("cpu")
    model_gpu, _ = problem("cuda")
    A_cpu = Op(model_cpu, "cross_entropy", data, batch_size=10)
    A_gpu = Op(model_gpu, "cross_entropy", data, batch_size=10)
    assert A_gpu.device.type == "cuda"
    V = torch.randn(A_cpu.shape[0], 5, dtype=torch.float64)
    out = A_gpu @ V.cuda()
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), A_cpu @ V)
    # numpy through scipy still works and comes back to the host
    torch.testing.assert_close(torch.as_tensor(A_gpu.matvec(V[:, 0].numpy())), (A_cpu @ V)[:, 0])


def test_keep_graphs_on_gpu():
    model, data = problem("cuda")
    H = curvops.Hessian(model, "cross_entropy", data, batch_size=10, keep_graphs=True)
    v = torch.randn(H.shape[0], dtype=torch.float64, device="cuda")
    a = H @ v
    assert H.cache_bytes > 0
    torch.testing.assert_close(H @ v, a)


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_products_on_gpu(mode):
    """Objective(compile=mode) on CUDA ("reduce-overhead": CUDA graphs, against launch overhead on
    small models) gives the eager products; outputs are copied before the next replay."""
    import shutil

    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        pytest.skip("torch.compile needs a C++ compiler")
    model, data = problem("cuda")
    obj = curvops.Objective(model, "cross_entropy", data, batch_size=8, compile=mode)
    eager = curvops.Objective(model, "cross_entropy", data, batch_size=8)
    V = torch.randn(obj.num_params, 3, dtype=torch.float64, device="cuda")
    for kind, Op in (("hessian", curvops.Hessian), ("ggn", curvops.GGN)):
        want = Op(eager) @ V
        outs = [obj.compiled.matmat(kind, V) for _ in range(3)]  # warm-up, recording, replay
        for out in outs:
            assert out is not None and out.device.type == "cuda"
            torch.testing.assert_close(out, want)
    torch.testing.assert_close(obj.gradient(), eager.gradient())
    assert obj.compiled.failure is None
