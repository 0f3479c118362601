"""Objective(compile=True): compiled products against the eager ones, the model left untouched,
parameter updates followed, the caller's context ignored, and a clean fallback to eager.

torch.compile on CPU takes seconds per graph, so the compiled objective is built once per module
and every test reuses its three graphs (one column of Hessian and GGN, the gradient); the vmapped
blocks are traced without inductor (and marked slow).
"""

import shutil
import warnings

import pytest
import torch
from torch import nn

import curvops
from curvops._compile import compile_options

pytestmark = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
    reason="torch.compile's CPU backend (inductor) needs a C++ compiler (g++ or clang++) on PATH; none found")

TOL = dict(rtol=1e-12, atol=1e-13)


def tiny_model():
    """Linear, BatchNorm (eval: buffers), tanh, LayerNorm, linear: 5 → 6 → 3, float64."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.LayerNorm(6), nn.Linear(6, 3))
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 1.5)
    return model.double().eval()


def tiny_data():
    g = torch.Generator().manual_seed(4)
    return torch.randn(12, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g)


@pytest.fixture(scope="module")
def setup():
    model, data = tiny_model(), tiny_data()
    obj = curvops.Objective(model, "cross_entropy", data, batch_size=4, compile=True)
    eager = curvops.Objective(model, "cross_entropy", data, batch_size=4)
    return model, obj, eager


def probes(P, K=1, seed=5):
    return torch.randn(P, K, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def eager_products(eager, v):
    return {"hessian": curvops.Hessian(eager) @ v, "ggn": curvops.GGN(eager) @ v, "gradient": eager.gradient()}


def compiled_products(obj, v):
    out = {kind: obj.compiled.matmat(kind, v) for kind in ("hessian", "ggn")}
    out["gradient"] = obj.gradient()
    return out


def check_all(obj, eager, v):
    got, want = compiled_products(obj, v), eager_products(eager, v)
    for kind in want:
        assert got[kind] is not None, kind
        torch.testing.assert_close(got[kind], want[kind], **TOL, msg=kind)
    assert obj.compiled.failure is None
    return got


def test_compiled_products_match_eager(setup):
    model, obj, eager = setup
    v = probes(obj.num_params)
    got = check_all(obj, eager, v)
    assert obj.compiled.last_path.startswith("compiled gradient")
    # the eager Hessian itself against reverse-over-reverse autograd on the whole data (independent)
    X, y = tiny_data()
    theta = [p.detach().requires_grad_() for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    loss = nn.functional.cross_entropy(torch.func.functional_call(model, dict(zip(names, theta)), (X,)), y)
    g = torch.autograd.grad(loss, theta, create_graph=True)
    vs = torch.split(v[:, 0], [t.numel() for t in theta])
    Hv = torch.autograd.grad(g, theta, [u.reshape(t.shape) for u, t in zip(vs, theta)])
    torch.testing.assert_close(got["hessian"][:, 0], torch.cat([h.reshape(-1) for h in Hv]), **TOL)


@pytest.mark.slow
def test_compiled_block_of_columns(setup):
    model, obj, eager = setup
    V = probes(obj.num_params, K=3, seed=6)
    # chunks of max_columns=1 reuse the one-column graphs of the inductor objective
    for kind, Op in (("hessian", curvops.Hessian), ("ggn", curvops.GGN)):
        torch.testing.assert_close(obj.compiled.matmat(kind, V, max_columns=1), Op(eager) @ V, **TOL)
    # the vmapped block kernels (traced by dynamo + AOTAutograd; inductor's code generation is
    # the same as for one column and costs seconds per graph, so it is left out here)
    traced = curvops.Objective(model, "cross_entropy", tiny_data(), batch_size=4, compile={"backend": "aot_eager"})
    for kind, Op in (("hessian", curvops.Hessian), ("ggn", curvops.GGN)):
        torch.testing.assert_close(traced.compiled.matmat(kind, V), Op(eager) @ V, **TOL)


def _state(model):
    return ({n: (p, p.detach().clone(), p.requires_grad, p.grad) for n, p in model.named_parameters()},
            {n: (b, b.clone()) for n, b in model.named_buffers()},
            [m.training for m in model.modules()], torch.random.get_rng_state())


def _assert_same_state(model, before):
    params, buffers, modes, rng = before
    for n, p in model.named_parameters():
        obj_, value, flag, grad = params[n]
        assert p is obj_ and torch.equal(p.detach(), value) and p.requires_grad == flag and p.grad is grad
    for n, b in model.named_buffers():
        assert b is buffers[n][0] and torch.equal(b, buffers[n][1])
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(torch.random.get_rng_state(), rng)


def test_model_left_untouched(setup):
    model, obj, _ = setup
    before = _state(model)
    compiled_products(obj, probes(obj.num_params))
    _assert_same_state(model, before)


def test_follows_parameter_and_buffer_updates(setup):
    model, obj, eager = setup
    v = probes(obj.num_params, seed=7)
    first = compiled_products(obj, v)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    saved = {k: t.clone() for k, t in model.state_dict().items()}
    updates = [
        lambda: model[0].weight.data.mul_(1.5),                                   # in place through .data
        lambda: setattr(model[4].weight, "data", torch.randn_like(model[4].weight)),  # a new tensor
        lambda: model.load_state_dict({k: t + 0.1 if t.is_floating_point() else t for k, t in saved.items()}),
        lambda: model[1].running_var.mul_(2.0),                                   # a buffer
    ]
    try:
        for update in updates:
            before = compiled_products(obj, v)
            update()
            got = check_all(obj, eager, v)  # equal to the eager products of the updated model
            assert not torch.allclose(got["hessian"], before["hessian"])  # and the update mattered
    finally:
        model.load_state_dict(saved)
    torch.testing.assert_close(compiled_products(obj, v)["ggn"], first["ggn"], **TOL)
    # parameters and buffers are inputs of the graphs: no recompilation was needed
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "autocast"])
def test_caller_context_does_not_change_the_product(setup, context):
    _, obj, eager = setup
    want = eager_products(eager, probes(obj.num_params))
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
           "autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}[context]
    with ctx():
        v = probes(obj.num_params)  # an inference tensor under inference_mode
        got = compiled_products(obj, v)
    for kind in want:
        torch.testing.assert_close(got[kind], want[kind], **TOL, msg=kind)


class Branching(nn.Module):
    """Python control flow on a tensor's value: fullgraph tracing refuses it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        out = self.fc(x)
        return out * 2 if bool(out.sum() > 0) else out


def test_falls_back_to_eager_with_one_warning():
    torch.manual_seed(0)
    model = Branching().double()
    data = (torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,)))
    loss = "cross_entropy"
    before = _state(model)
    H = curvops.Hessian(model, loss, data, compile=True)
    v = probes(H.shape[0])
    with pytest.warns(RuntimeWarning, match="torch.compile failed on this model"):
        assert H.objective.compiled.matmat("hessian", v) is None
    assert H.objective.compiled.failure
    _assert_same_state(model, before)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: later passes go straight to eager
        assert H.objective.compiled.matmat("ggn", v) is None
        torch.testing.assert_close(H @ v, curvops.Hessian(model, loss, data) @ v, **TOL)
        torch.testing.assert_close(H.objective.gradient(), curvops.Objective(model, loss, data).gradient(), **TOL)


def test_validation_errors_are_not_swallowed():
    model = tiny_model()
    X, y = tiny_data()
    obj = curvops.Objective(model, "cross_entropy", (X, y.clamp(max=2) + 1), compile=True)  # class 3 of 3
    with pytest.raises(ValueError, match="class"):
        obj.compiled.matmat("hessian", probes(obj.num_params))
    assert obj.compiled.failure is None


def test_compile_argument():
    assert compile_options(False) is None and compile_options(None) is None
    assert compile_options(True) == {"fullgraph": True, "dynamic": False}
    assert compile_options("reduce-overhead") == {"fullgraph": True, "dynamic": False, "mode": "reduce-overhead"}
    assert compile_options({"backend": "aot_eager", "fullgraph": False}) == {"backend": "aot_eager",
                                                                               "fullgraph": False, "dynamic": False}
    model, data = tiny_model(), tiny_data()
    with pytest.raises(ValueError, match="compile mode 'fast' is not one of"):
        curvops.Objective(model, "cross_entropy", data, compile="fast")
    with pytest.raises(ValueError, match="unknown torch.compile keywords"):
        curvops.Objective(model, "cross_entropy", data, compile={"modes": "default"})
    with pytest.raises(TypeError, match="compile= expected"):
        curvops.Objective(model, "cross_entropy", data, compile=1.5)
    assert curvops.Objective(model, "cross_entropy", data).compiled is None
    # operators pass compile= to their objective
    assert curvops.GGN(model, "cross_entropy", data, compile="default").objective.compiled.mode == "default"


def test_stochastic_model_stays_eager():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)).double()
    data = (torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,)))
    with pytest.warns(RuntimeWarning, match="dropout or train-mode BatchNorm"):
        obj = curvops.Objective(model, "cross_entropy", data, allow_stochastic=True, compile=True)
    assert obj.compiled is None


def test_operators_run_the_compiled_pass(setup):
    model, _, eager = setup
    X, y = tiny_data()
    v = probes(sum(p.numel() for p in model.parameters()))
    for Op in (curvops.Hessian, curvops.GGN):
        A = Op(model, "cross_entropy", (X, y), batch_size=4, compile=True)
        torch.testing.assert_close(A @ v, Op(eager) @ v, **TOL)
        assert A.last_path.startswith("compiled"), A.last_path


def test_compile_refuses_a_process_group(tmp_path):
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed without a default group")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="compile=True does not combine with a process group"):
            curvops.Objective(tiny_model(), "cross_entropy", tiny_data(), distributed=True, compile=True)
    finally:
        dist.destroy_process_group()
