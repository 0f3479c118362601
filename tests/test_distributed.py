"""Data parallelism on torch.distributed (docs/distributed.md): 2 processes, gloo, CPU.

One spawn runs every check on both ranks (a process group is slow to set up) and writes its
results to a file per rank; the tests below compare them with the single-process full-data
results computed here.  37 samples are split 19/18 into uneven batches, with ignored targets
spread unevenly over the shards.  Every collective has a timeout, and the spawn a join timeout,
so a hang fails fast instead of stalling the suite.
"""

from __future__ import annotations

import datetime
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import curvops

WORLD = 2
N, D, C = 37, 4, 3
SPLIT = 19  # rank 0: samples 0..18, rank 1: 19..36
JOIN_TIMEOUT = 120


def _data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=g)
    y[[1, 2, 5, 8, 11, 30]] = -100  # five ignored targets on rank 0, one on rank 1
    return X, y


def _model(hidden: int = 6):
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(D, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, C)).double()


def _operators(obj):
    return {
        "hessian": curvops.Hessian(obj),
        "ggn": curvops.GGN(obj),
        "fisher": curvops.Fisher(obj),
        "empirical_fisher": curvops.EmpiricalFisher(obj),
        "covariance": curvops.GradientCovariance(obj),
        "covariance_centred": curvops.GradientCovariance(obj, center=True),
        "residual": curvops.HessianResidual(obj),
    }


def _results(obj, V):
    out = {name: A @ V for name, A in _operators(obj).items()}
    out["gradient"] = obj.gradient()
    out["loss"] = torch.tensor(obj.loss_value())
    H = curvops.Hessian(obj)
    out["eigsh"] = curvops.eigsh(H, k=3, tol=1e-10, generator=0).eigenvalues
    out["trace_seeded"] = torch.tensor(curvops.trace(H, method="hutchinson", num_matvecs=6, generator=0).value)
    out["trace_unseeded"] = torch.tensor(curvops.trace(H, method="hutchinson", num_matvecs=6).value)
    out["eigsh_unseeded"] = curvops.eigsh(H, k=3, tol=1e-10).eigenvalues
    b = torch.linspace(-1, 1, obj.num_params, dtype=torch.float64)
    out["cg"] = curvops.solve(curvops.GGN(obj), b, method="cg", damping=0.1, rtol=1e-12).x
    return out


def _catch(fn) -> str:
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - the message is the result
        return f"{type(err).__name__}: {err}"
    return "no error"


def join_group(rank: int, port: int, world: int = WORLD) -> None:
    """A spawned test worker joins the gloo group on 127.0.0.1:port (one torch thread, 60 s timeout)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))


def _worker(rank: int, port: int, outdir: str) -> None:
    join_group(rank, port)
    result: dict = {}
    try:
        X, y = _data()
        shard = slice(0, SPLIT) if rank == 0 else slice(SPLIT, N)
        V = torch.randn(sum(p.numel() for p in _model().parameters()), 3,
                        generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        obj = curvops.Objective(_model(), "cross_entropy", (X[shard], y[shard]), batch_size=5, distributed=True)
        result["main"] = _results(obj, V)
        result["fisher_mc"] = curvops.Fisher(obj, mc_samples=4, seed=3) @ V
        # a DDP-wrapped model: unwrapped for the products
        ddp = torch.nn.parallel.DistributedDataParallel(_model())
        obj_ddp = curvops.Objective(ddp, "cross_entropy", (X[shard], y[shard]), batch_size=7, distributed=True)
        result["ddp"] = curvops.GGN(obj_ddp) @ V
        # a DistributedSampler(shuffle=False) loader (37 = 2·18 + 1: it pads one sample, and says so)
        ds = torch.utils.data.TensorDataset(X, y)
        sampler = torch.utils.data.distributed.DistributedSampler(ds, num_replicas=WORLD, rank=rank, shuffle=False)
        loader = torch.utils.data.DataLoader(ds, batch_size=4, sampler=sampler)
        with pytest.warns(UserWarning, match="pads 37 samples to 38"):
            obj_loader = curvops.Objective(_model(), "cross_entropy", loader, distributed=True)
        result["sampler"] = curvops.GGN(obj_loader) @ V
        # an empty shard on rank 1 contributes nothing
        empty = slice(0, SPLIT) if rank == 0 else slice(0, 0)
        obj_empty = curvops.Objective(_model(), "cross_entropy", (X[empty], y[empty]), batch_size=5, distributed=True)
        result["empty_shard"] = curvops.GGN(obj_empty) @ V
        result["empty_gradient"] = obj_empty.gradient()
        # a local error (NaN inputs on rank 1) stops every rank
        Xbad = X[shard].clone()
        if rank == 1:
            Xbad[0, 0] = float("nan")
        obj_bad = curvops.Objective(_model(), "cross_entropy", (Xbad, y[shard]), batch_size=5, distributed=True)
        result["local_error"] = _catch(lambda: curvops.GGN(obj_bad) @ V)
        # parameter counts that differ across ranks: a clear error on every rank
        obj_mismatch = curvops.Objective(_model(6 if rank == 0 else 7), "cross_entropy", (X[shard], y[shard]),
                                         distributed=True)
        result["mismatch"] = _catch(lambda: curvops.Hessian(obj_mismatch) @ torch.ones(obj_mismatch.num_params,
                                                                                          dtype=torch.float64))
        result["dtype_mismatch"] = _catch(lambda: curvops.Objective(
            _model() if rank == 0 else _model().float(), "cross_entropy", (X[shard], y[shard]),
            distributed=True).gradient())
        _fsdp(result, X[shard], y[shard], V)
    except Exception:  # noqa: BLE001 - reported through the file
        result["crash"] = traceback.format_exc()
    finally:
        torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def _fsdp(result: dict, X, y, V) -> None:
    """An FSDP2-sharded model is refused with what to do; doing it (full weights into a plain copy) works."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    sharded = _model()
    fully_shard(sharded, mesh=init_device_mesh("cpu", (WORLD,)))
    result["fsdp_error"] = _catch(lambda: curvops.GGN(sharded, "cross_entropy", (X, y), distributed=True))
    plain = _model()
    with torch.no_grad():
        for p in plain.parameters():
            p.zero_()
    plain.load_state_dict(get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True)))
    obj = curvops.Objective(plain, "cross_entropy", (X, y), batch_size=5, distributed=True)
    result["fsdp_gathered_ggn"] = curvops.GGN(obj) @ V
    result["fsdp_gathered_hessian"] = curvops.Hessian(obj) @ V


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(worker, outdir: str) -> list[dict]:
    """Run ``worker(rank, port, outdir)`` on WORLD processes; each saves ``rank{r}.pt`` (a dict, with
    "crash" holding a traceback if it failed). Hung workers are killed after JOIN_TIMEOUT."""
    ctx = mp.spawn(worker, args=(_free_port(), outdir), nprocs=WORLD, join=False)
    for p in ctx.processes:
        p.join(JOIN_TIMEOUT)
    alive = [p for p in ctx.processes if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, f"distributed workers hung for more than {JOIN_TIMEOUT} s"
    out = [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]
    for r, res in enumerate(out):
        assert "crash" not in res, f"rank {r} crashed:\n{res['crash']}"
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return spawn_ranks(_worker, str(tmp_path_factory.mktemp("distributed")))


@pytest.fixture(scope="module")
def reference():
    X, y = _data()
    V = torch.randn(sum(p.numel() for p in _model().parameters()), 3,
                    generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    obj = curvops.Objective(_model(), "cross_entropy", (X, y), batch_size=8)
    return _results(obj, V), V, obj


EXACT = ["hessian", "ggn", "fisher", "empirical_fisher", "covariance", "covariance_centred", "residual",
         "gradient", "loss", "trace_seeded", "cg"]


@pytest.mark.parametrize("name", EXACT)
def test_distributed_equals_one_process_on_every_rank(ranks, reference, name):
    ref = reference[0][name]
    for r in range(WORLD):
        torch.testing.assert_close(ranks[r]["main"][name], ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["eigsh", "eigsh_unseeded"])
def test_eigsh_agrees_across_ranks_and_with_one_process(ranks, reference, name):
    torch.testing.assert_close(ranks[0]["main"][name], ranks[1]["main"][name], rtol=0, atol=0)
    torch.testing.assert_close(ranks[0]["main"][name], reference[0]["eigsh"], rtol=1e-8, atol=1e-10)


def test_unseeded_probes_are_the_same_on_every_rank(ranks):
    # generator=None: rank 0 broadcasts the seed, so both ranks draw the same probes
    assert float(ranks[0]["main"]["trace_unseeded"]) == float(ranks[1]["main"]["trace_unseeded"])


def test_monte_carlo_fisher_is_one_matrix_on_every_rank(ranks):
    torch.testing.assert_close(ranks[0]["fisher_mc"], ranks[1]["fisher_mc"], rtol=0, atol=0)


def test_ddp_wrapped_model_is_unwrapped(ranks, reference):
    for r in range(WORLD):
        torch.testing.assert_close(ranks[r]["ddp"], reference[0]["ggn"], rtol=1e-10, atol=1e-10)


def test_distributed_sampler_loader(ranks, reference):
    X, y = _data()
    Xp, yp = torch.cat([X, X[:1]]), torch.cat([y, y[:1]])  # the sampler's padding repeats sample 0
    ref = curvops.GGN(_model(), "cross_entropy", (Xp, yp)) @ reference[1]
    for r in range(WORLD):
        torch.testing.assert_close(ranks[r]["sampler"], ref, rtol=1e-10, atol=1e-10)


def test_empty_shard_contributes_nothing(ranks, reference):
    X, y = _data()
    obj = curvops.Objective(_model(), "cross_entropy", (X[:SPLIT], y[:SPLIT]))
    ref = curvops.GGN(obj) @ reference[1]
    for r in range(WORLD):
        torch.testing.assert_close(ranks[r]["empty_shard"], ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(ranks[r]["empty_gradient"], obj.gradient(), rtol=1e-10, atol=1e-10)


def test_local_error_stops_every_rank(ranks):
    assert "NaN" in ranks[1]["local_error"]
    assert ranks[0]["local_error"].startswith("RuntimeError: GGN: another rank failed")


@pytest.mark.parametrize("key, what", [("mismatch", "rank 0: 51 parameters (float64), rank 1: 59 parameters"),
                                       ("dtype_mismatch", "rank 0: 51 parameters (float64), rank 1: 51 parameters "
                                                          "(float32)")])
def test_mismatched_parameters_error_on_every_rank(ranks, key, what):
    for r in range(WORLD):
        assert ranks[r][key].startswith("ValueError:"), ranks[r][key]
        assert what in ranks[r][key]
        assert "same selected parameters" in ranks[r][key]


def test_fsdp_sharded_model_is_refused_with_what_to_do(ranks):
    for r in range(WORLD):
        msg = ranks[r]["fsdp_error"]
        assert msg.startswith("ValueError: Objective: the model has FSDP-wrapped modules ['<root>']"), msg
        assert "get_model_state_dict" in msg and "DistributedDataParallel" in msg


@pytest.mark.parametrize("name", ["ggn", "hessian"])
def test_fsdp_full_weights_in_a_plain_copy_give_the_one_process_products(ranks, reference, name):
    for r in range(WORLD):
        torch.testing.assert_close(ranks[r][f"fsdp_gathered_{name}"], reference[0][name], rtol=1e-10, atol=1e-10)


def test_distributed_needs_an_initialized_process_group():
    X, y = _data()
    with pytest.raises(RuntimeError, match=r"Objective: distributed=True needs an initialized torch.distributed.*"
                                           r"init_process_group"):
        curvops.Objective(_model(), "cross_entropy", (X, y), distributed=True)


def test_activation_hessian_refuses_a_process_group(monkeypatch):
    X, y = _data()
    obj = curvops.Objective(_model(), "cross_entropy", (X, y))
    obj.process_group = object()  # stands for a group; the refusal comes before any collective
    with pytest.raises(ValueError, match="ActivationHessian: expected an objective without process_group="):
        curvops.ActivationHessian(obj, layer="1")


def test_operators_and_composites_carry_the_group():
    X, y = _data()
    obj = curvops.Objective(_model(), "cross_entropy", (X, y))
    H = curvops.Hessian(obj)
    assert H.process_group is None and (2 * H + H).process_group is None
    obj.process_group = group = object()
    G = curvops.GGN(obj)
    assert G.process_group is group
    for composite in (2 * G, G + curvops.Hessian(curvops.Objective(_model(), "cross_entropy", (X, y))), G.T, G @ G):
        assert composite.process_group is group
