"""``curvops report`` on torch.distributed (docs/distributed.md): 2 processes, gloo, CPU, float64.

Two runs: ``torchrun --nproc-per-node 2 -m curvops report`` (the launch path: torchrun's
environment, the process group the command joins and leaves), and one ``torch.multiprocessing``
spawn that calls the command inside an initialized group with a different output directory per
rank (so that what rank 1 writes can be seen), a data loader that fails on rank 1 only, and
build_report with weights that differ across ranks.  37 samples with ignored targets are split
19/18.  The distributed report's numbers are compared with the one-process report's.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORLD = 2
JOIN_TIMEOUT = 120
SECTIONS = "overview,eigenvalues,hessian_matrix,density,trace,rank,stationary,ntk,landscape"
PROBLEM = textwrap.dedent("""
    import os
    import torch

    def factory():
        torch.manual_seed(1)
        return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()

    def loader():
        g = torch.Generator().manual_seed(0)
        X = torch.randn(37, 4, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (37,), generator=g)
        y[[1, 2, 5, 30]] = -100  # ignored targets, three on rank 0's shard and one on rank 1's
        return X, y

    def loader_fails_on_rank_1():
        if os.environ.get("CURVOPS_TEST_RANK") == "1":
            raise OSError("no such file on this node")
        return loader()
""")


def _args(outdir, sections: str = SECTIONS) -> list[str]:
    return ["report", str(outdir), "--model", "tinyproblem:factory", "--data", "tinyproblem:loader", "--loss",
            "cross_entropy", "--quick", "--top-k", "3", "--batch-size", "10", "--sections", sections, "--threads", "1",
            "--no-progress"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, workdir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), CURVOPS_TEST_RANK=str(rank))
    torch.set_num_threads(1)
    os.chdir(workdir)
    sys.path.insert(0, workdir)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    from curvops import cli
    from curvops.report import build_report

    out: dict = {}
    try:
        out["report_rc"] = cli.main(_args(f"out_rank{rank}", "overview,ntk,landscape"))
        bad = _args(f"bad_rank{rank}")
        bad[bad.index("tinyproblem:loader")] = "tinyproblem:loader_fails_on_rank_1"
        out["load_error_rc"] = cli.main(bad)
        import tinyproblem

        model = tinyproblem.factory()
        if rank == 1:
            with torch.no_grad():
                model[0].bias[0] += 1e-3
        try:
            build_report(model, "cross_entropy", tinyproblem.loader(), f"weights_rank{rank}", quick=True,
                         sections=["overview"], progress=False, distributed=True)
            out["weights_error"] = "no error"
        except ValueError as err:
            out["weights_error"] = str(err)
    except Exception:  # noqa: BLE001 - reported through the file
        import traceback

        out["crash"] = traceback.format_exc()
    finally:
        with open(os.path.join(workdir, f"rank{rank}.json"), "w") as fh:
            json.dump(out, fh)
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("report_distributed")
    (path / "tinyproblem.py").write_text(PROBLEM)
    return path


@pytest.fixture(scope="module")
def one_process(workdir):
    """The one-process report (in this process) on the same problem."""
    from curvops import cli

    sys.path.insert(0, str(workdir))
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        assert cli.main(_args("out_one")) == 0
    finally:
        os.chdir(cwd)
        sys.path.remove(str(workdir))
    return json.loads((workdir / "out_one" / "summary.json").read_text())


@pytest.fixture(scope="module")
def spawned(workdir):
    ctx = mp.spawn(_worker, args=(_free_port(), str(workdir)), nprocs=WORLD, join=False)
    for p in ctx.processes:
        p.join(JOIN_TIMEOUT)
    alive = [p for p in ctx.processes if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, f"distributed workers hung for more than {JOIN_TIMEOUT} s"
    out = [json.loads((workdir / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for r, res in enumerate(out):
        assert "crash" not in res, f"rank {r} crashed:\n{res['crash']}"
    return out


@pytest.fixture(scope="module")
def torchrun(workdir):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(workdir)] + [os.environ.get("PYTHONPATH", "")])}
    logs = workdir / "torchrun_logs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "--log-dir", str(logs), "--redirects", "3",
           "-m", "curvops", *_args("out_torchrun"), "--dist-timeout", "60"]
    run = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=JOIN_TIMEOUT)
    # each rank's own stdout and stderr, which torchrun writes to <log-dir>/<run>/attempt_0/<rank>/
    out = {(int(f.parent.name), f.stem): f.read_text() for f in logs.rglob("*.log") if f.parent.name.isdigit()}
    if run.returncode != 0:
        per_rank = "\n".join(f"--- rank {r} {name} ---\n{text[-3000:]}" for (r, name), text in sorted(out.items()) if text)
        pytest.fail(f"torchrun exited {run.returncode}\n{run.stderr[-2000:]}\n{per_rank}")
    run.rank_output = out
    return run, json.loads((workdir / "out_torchrun" / "summary.json").read_text())


def _close(a, b, rtol, path="") -> None:
    """Every number of ``a`` within ``rtol`` of ``b`` (relative to the largest magnitude of the list)."""
    if isinstance(a, dict):
        for k in a:
            _close(a[k], b[k], rtol, f"{path}/{k}")
    elif isinstance(a, list) and a and all(isinstance(v, (int, float)) for v in a):
        scale = max(abs(v) for v in a + b) or 1.0
        assert len(a) == len(b) and all(abs(u - v) <= rtol * scale for u, v in zip(a, b)), path
    elif isinstance(a, float):
        assert abs(a - b) <= rtol * max(abs(a), abs(b), 1e-300), (path, a, b)
    else:
        assert a == b, (path, a, b)


# what is compared to rounding: the converged Hessian/GGN figures (relative error of a converged
# eigenvalue ~ 1e-16 · condition of the Lanczos basis; eigenvalues below the rank cutoff are noise)
FIGURES = [("overview", ["loss", "grad_norm", "num_samples", "num_params"], 1e-12),
           ("eigenvalues/hessian_top", ["eigenvalues", "converged"], 1e-9),
           ("eigenvalues/hessian_bottom", ["eigenvalues", "converged"], 1e-9),
           ("eigenvalues/ggn_top", ["eigenvalues", "converged"], 1e-9),
           ("hessian_matrix", ["max_abs_entry", "frobenius_norm"], 1e-12),
           ("density/hessian", ["grid", "density", "node_min", "node_max"], 1e-8),
           ("density/ggn", ["grid", "density", "node_min", "node_max"], 1e-8),
           ("trace/hessian", ["value", "stderr"], 1e-9), ("trace/ggn", ["value", "stderr"], 1e-9),
           ("rank/hessian", ["value", "largest", "status", "well_defined"], 1e-9),
           ("rank/ggn", ["value", "largest", "status", "well_defined"], 1e-9),
           ("stationary", ["kind", "curvature", "lambda_min", "lambda_max", "grad_norm"], 1e-9),
           ("ntk", ["eigenvalues", "num_inputs", "size"], 1e-12)]


def _get(summary, path):
    node = summary["sections"]
    for part in path.split("/"):
        node = node[part]
    return node


@pytest.mark.parametrize("path, keys, rtol", FIGURES, ids=[f[0] for f in FIGURES])
def test_torchrun_report_equals_one_process(torchrun, one_process, path, keys, rtol):
    dist_section, one_section = _get(torchrun[1], path), _get(one_process, path)
    _close({k: dist_section[k] for k in keys}, {k: one_section[k] for k in keys}, rtol, path)


def test_torchrun_report_records_ranks_and_skips(torchrun, one_process):
    run, summary = torchrun
    wrote = [run.rank_output.get((r, "stdout"), "").count("curvops report: wrote") for r in range(2)]
    assert wrote == [1, 0]  # rank 0 prints, rank 1 is silent
    assert summary["distributed"]["world_size"] == 2 and summary["distributed"]["shard_sizes"] == [19, 18]
    assert summary["distributed"]["modes"] == {
        "all ranks (data-parallel)": ["overview", "eigenvalues", "hessian_matrix", "density", "trace", "rank",
                                      "stationary", "landscape"],
        "rank 0 alone (first samples of the whole data)": ["ntk"], "skipped": []}
    assert summary["environment"]["torch.distributed"] == "gloo, 2 ranks, contiguous shards of 19/18 samples"
    land, one = summary["sections"]["landscape"], one_process["sections"]["landscape"]
    assert land["status"] == "ok" and one["status"] == "ok"
    # data-parallel: the whole data's loss along ±v (sign-free: symmetric steps) and on the plane
    _close({k: land[k] for k in ("base_loss", "radius", "steps")}, {k: one[k] for k in ("base_loss", "radius", "steps")},
           1e-9, "landscape")
    for a, b in zip(land["curves"], one["curves"]):
        _close({k: a[k] for k in ("eigenvalue", "loss_min", "loss_max")},
               {k: b[k] for k in ("eigenvalue", "loss_min", "loss_max")}, 1e-8, "landscape curve")
    _close({k: land["plane"][k] for k in ("loss_min", "loss_max")}, {k: one["plane"][k] for k in ("loss_min", "loss_max")},
           1e-8, "landscape plane")
    assert summary["sections"]["ntk"]["computed_on"].startswith("rank 0 alone")
    assert summary["complete"] and not summary["failed_sections"]
    assert not [w for w in summary["warnings"] if "differ" in w]  # every rank computed the same numbers


def test_rank_0_writes_and_rank_1_writes_nothing(spawned, workdir, one_process):
    assert [r["report_rc"] for r in spawned] == [0, 0]
    assert (workdir / "out_rank0" / "summary.json").is_file() and (workdir / "out_rank0" / "index.html").is_file()
    assert not (workdir / "out_rank1").exists()
    assert (workdir / "out_rank0" / "ntk.png").is_file()  # rank 0 draws the figures
    summary = json.loads((workdir / "out_rank0" / "summary.json").read_text())
    _close(summary["sections"]["overview"]["loss"], one_process["sections"]["overview"]["loss"], 1e-12)
    _close(summary["sections"]["ntk"]["eigenvalues"], one_process["sections"]["ntk"]["eigenvalues"], 1e-12)


def test_a_load_error_on_one_rank_stops_every_rank(spawned, workdir):
    assert [r["load_error_rc"] for r in spawned] == [2, 2]
    assert not (workdir / "bad_rank0").exists() and not (workdir / "bad_rank1").exists()


def test_weights_that_differ_across_ranks_are_refused_on_every_rank(spawned):
    for r in spawned:
        assert r["weights_error"].startswith("build_report: expected the same model parameters and buffers on every rank, but ranks [1]"), r


def test_load_error_names_the_rank(workdir, capfd):
    """The message rank 0 prints for a failure on rank 1 (the agreement step, without processes)."""
    from curvops import cli

    class FakeRanks:
        rank, world = 0, 2

        def gather(self, message):
            return [None, "--data: calling loader_fails_on_rank_1() failed: OSError: no such file"]

    args = cli._parser().parse_args(_args(workdir / "unused"))
    sys.path.insert(0, str(workdir))
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        assert cli._run_ranks(args, None, FakeRanks()) == 2
    finally:
        os.chdir(cwd)
        sys.path.remove(str(workdir))
    assert "curvops report: error: on rank 1: --data: calling loader_fails_on_rank_1() failed" in capfd.readouterr().err


# ---- sharding (no processes) ----------------------------------------------------------------------
def _concat(parts):
    return torch.cat(parts) if parts else torch.empty(0)


@pytest.mark.parametrize("world", [2, 3, 5])
def test_contiguous_shards_cover_the_data_once(world):
    from curvops.report.ranks import shard_data

    X, y = torch.arange(37.0).reshape(37, 1), torch.arange(37)
    shards = [shard_data((X, y), r, world) for r in range(world)]
    sizes = shards[0][1]
    assert sizes == [len(s[0][1]) for s in shards] and sum(sizes) == 37 and max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # rank 0 first
    assert torch.equal(_concat([s[0][0] for s in shards]), X) and torch.equal(_concat([s[0][1] for s in shards]), y)
    d = shard_data({"input_ids": X, "labels": y}, 1, world)[0]
    assert torch.equal(d["labels"], shards[1][0][1]) and torch.equal(d["input_ids"], shards[1][0][0])
    batches = [(X[i:i + 8], y[i:i + 8]) for i in range(0, 37, 8)]  # 5 batches
    parts = [shard_data(batches, r, world) for r in range(world)]
    assert parts[0][2] == "batches" and parts[0][1][0] == len(parts[0][0])
    assert [b for p in parts for b in p[0]] == batches


@pytest.mark.parametrize("drop_last", [False, True])
def test_a_dataloader_is_sharded_by_sample_index(drop_last):
    from torch.utils.data import DataLoader, TensorDataset

    from curvops.report.ranks import shard_data

    X, y = torch.arange(37.0).reshape(37, 1), torch.arange(37)
    loader = DataLoader(TensorDataset(X, y), batch_size=8, drop_last=drop_last)
    seen = _concat([t[1] for t in loader])  # what one process passes over (32 samples with drop_last)
    shards = [shard_data(loader, r, 2) for r in range(2)]
    assert [s[1] for s in shards][0] == ([19, 18] if not drop_last else [16, 16])
    assert torch.equal(_concat([t[1] for s in shards for t in s[0]]), seen)
    assert all(s[0].batch_size == 8 for s in shards)


def test_a_loader_that_cannot_be_sharded_is_refused():
    from torch.utils.data import DataLoader, TensorDataset

    from curvops.report.ranks import shard_data

    ds = TensorDataset(torch.zeros(10, 1), torch.zeros(10))
    with pytest.raises(TypeError, match="default sequential sampler and a batch_size.*RandomSampler.*without torchrun"):
        shard_data(DataLoader(ds, batch_size=2, shuffle=True), 0, 2)
    with pytest.raises(TypeError, match="expected data as .X, y., a dict of tensors, a list of batches or a Data"):
        shard_data(iter([]), 0, 2)


# ---- the agreement after each section (no processes: rank 1's answer is made up) --------------------
class _FakeContext:
    def __init__(self, other):
        from curvops.report.ranks import Ranks

        self.ranks = Ranks(group=None, rank=0, world=2, backend="gloo")
        self.ranks.gather = lambda mine: [mine, other(mine)]

    def steps(self, name, unit="product"):
        import contextlib

        return contextlib.nullcontext()


def _agree(monkeypatch, other, strict=False):
    from curvops.report import build

    monkeypatch.setitem(build._SECTION_FUNCS, "trace", lambda ctx: {"hessian": {"value": 1.5}})
    summary = {"failed_sections": [], "warnings": []}
    return build._run_distributed("trace", _FakeContext(other), summary, strict), summary


def test_a_section_that_fails_on_another_rank_fails_on_every_rank(monkeypatch):
    result, summary = _agree(monkeypatch, lambda mine: ("error", "ValueError: boom", None))
    assert result["status"] == "error" and result["message"] == "rank 1: ValueError: boom"
    assert summary["failed_sections"] == ["trace"] and "rank 1: ValueError: boom" in summary["warnings"][0]
    with pytest.raises(RuntimeError, match="The trace section failed on another rank: rank 1: ValueError: boom"):
        _agree(monkeypatch, lambda mine: ("error", "ValueError: boom", None), strict=True)


def test_numbers_that_differ_across_ranks_are_reported(monkeypatch):
    result, summary = _agree(monkeypatch, lambda mine: ("ok", None, "another hash"))
    assert result == {"status": "ok", "hessian": {"value": 1.5}}
    assert summary["warnings"] == ["The trace section's numbers differ on ranks [1] from rank 0's (shown); the "
                                   "ranks' products were not bitwise identical."]
    result, summary = _agree(monkeypatch, lambda mine: mine)  # the same hash: nothing to say
    assert result["status"] == "ok" and not summary["warnings"]
