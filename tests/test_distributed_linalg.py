"""Rank-consistent linear algebra on distributed operators (docs/distributed.md): 2 gloo processes, CPU.

The problem of tests/test_distributed.py (37 samples split 19/18, ignored targets spread unevenly,
float64).  One spawn runs SLQ density, log-determinant, the diagonal estimators, randomized SVD,
Nyström, MINRES, LSMR and the active subspace over a parameter prior on both ranks; each result
must be bitwise the same on both ranks (an all-reduced product is bitwise the same on every rank,
so every rank runs the same iteration) and equal to the one-process result on the whole data to
rounding.

Tolerances: a product on shards differs from the one-process product by the order of the sums,
δ ≈ 1e-15 relative.  Lanczos with full reorthogonalization, QR/SVD of sketches and Krylov solvers
are backward stable, so their results move by O(δ · steps · condition); with ≤ 30 steps and the
well-conditioned problems below, 1e-9 relative to the result's scale bounds that with room.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

import curvops
from curvops.analysis import active_subspace
from curvops.analysis.active_subspace import PriorGradientCovariance
from curvops.analysis.active_subspace.prior import workspace_per_draw
from test_distributed import N, SPLIT, WORLD, _data, _model, join_group, spawn_ranks

RTOL = 1e-9


def _results(obj: curvops.Objective, model, data, **kw) -> dict:
    """Every algorithm on the objective's operators (seeded, so one process draws the same probes)."""
    H, G = curvops.Hessian(obj), curvops.GGN(obj)
    P = obj.num_params
    b = torch.linspace(-1, 1, P, dtype=torch.float64)
    V = torch.randn(P, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out = {}
    dens = curvops.spectral_density(H, num_probes=4, num_steps=20, num_points=64, generator=0)
    out.update(density=dens.density, density_nodes=dens.nodes, density_weights=dens.weights)
    out["logdet"] = torch.tensor(curvops.logdet(G, damping=0.1, num_probes=4, num_steps=20, generator=0).value)
    out["diag_xdiag"] = curvops.diagonal(H, method="xdiag", num_matvecs=24, generator=0).value
    out["diag_hutchinson"] = curvops.diagonal(H, method="hutchinson", num_matvecs=12, generator=0).value
    svd = curvops.randomized_svd(G, 5, generator=0)
    out.update(rsvd_S=svd.S, rsvd_low_rank=svd.U @ torch.diag(svd.S) @ svd.V.T)
    ny = curvops.nystrom(G, 5, generator=0)
    out.update(nystrom_S=ny.S, nystrom_low_rank=ny.U @ torch.diag(ny.S) @ ny.U.T)
    out["minres"] = curvops.solve(H, b, method="minres", damping=0.5, rtol=1e-12).x
    out["lsmr"] = curvops.solve(H, b, method="lsmr", damping=0.1, rtol=1e-12).x
    d = torch.randn(P, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    line = curvops.loss_along(obj, direction=d, steps=torch.linspace(-1, 1, 5, dtype=torch.float64),
                              metrics={"accuracy": lambda o, t: (o.argmax(1) == t).double().mean()})
    out.update(landscape_loss=line.values["loss"], landscape_accuracy=line.values["accuracy"])
    prior = PriorGradientCovariance(model, "cross_entropy", data, prior="standard_normal", num_samples=6, **kw)
    out["prior_product"] = prior @ V
    res = active_subspace(model, "cross_entropy", data, prior="standard_normal", num_samples=6, bootstrap=3,
                          **kw)
    out.update(prior_eigenvalues=res.eigenvalues, prior_lower=res.eigenvalue_lower,
               prior_upper=res.eigenvalue_upper)
    return out


def _unseeded(obj: curvops.Objective) -> dict:
    """generator=None: rank 0's seed, broadcast — the same probes on every rank (not one process's)."""
    H = curvops.Hessian(obj)
    return {"density": curvops.spectral_density(H, num_probes=2, num_steps=10, num_points=16).density,
            "diag": curvops.diagonal(H, method="hutchinson", num_matvecs=4).value,
            "nystrom_S": curvops.nystrom(curvops.GGN(obj), 3).S}


def _worker(rank: int, port: int, outdir: str) -> None:
    join_group(rank, port)
    result: dict = {}
    try:
        X, y = _data()
        shard = slice(0, SPLIT) if rank == 0 else slice(SPLIT, N)
        data = (X[shard], y[shard])
        obj = curvops.Objective(_model(), "cross_entropy", data, batch_size=5, distributed=True)
        result["seeded"] = _results(obj, _model(), data, batch_size=5, distributed=True)
        result["unseeded"] = _unseeded(obj)
        try:
            active_subspace(_model(), "cross_entropy", data, k=3, batch_size=5, distributed=True)
            result["data_active_subspace"] = "no error"
        except ValueError as err:
            result["data_active_subspace"] = str(err)
        cov = curvops.GradientCovariance(_model(), "cross_entropy", data, batch_size=5, distributed=True)
        result["data_covariance_eigsh"] = curvops.eigsh(cov, k=3, generator=0).eigenvalues
        result["prior_group"] = PriorGradientCovariance(_model(), "cross_entropy", data, num_samples=2, batch_size=5,
                                                        distributed=True).process_group is not None
        # the chunk follows the measured workspace: the same on every rank (the largest), or the ranks would
        # run different numbers of chunk passes; one batch per shard, 19 and 18 rows, measures differently
        A = PriorGradientCovariance(_model(), "cross_entropy", data, num_samples=12, distributed=True)
        budget = 6 * A.workspace_per_draw() - 2  # half of it holds 2 draws of the largest, ≥ 3 of a smaller one
        result["prior_workspace"] = (workspace_per_draw(A.objective), A.workspace_per_draw(),
                                     A.resolve_chunk_size(budget))
        result["prior_tight"] = active_subspace(_model(), "cross_entropy", data, prior="standard_normal", num_samples=12,
                                                k=2, memory_budget=budget, distributed=True).eigenvalues
    except Exception:  # noqa: BLE001 - reported through the file
        import traceback

        result["crash"] = traceback.format_exc()
    finally:
        torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return spawn_ranks(_worker, str(tmp_path_factory.mktemp("distributed_linalg")))


@pytest.fixture(scope="module")
def reference():
    X, y = _data()
    obj = curvops.Objective(_model(), "cross_entropy", (X, y), batch_size=8)
    return _results(obj, _model(), (X, y), batch_size=8)


NAMES = ["density", "density_nodes", "density_weights", "logdet", "diag_xdiag", "diag_hutchinson", "rsvd_S",
         "rsvd_low_rank", "nystrom_S", "nystrom_low_rank", "minres", "lsmr", "prior_product", "prior_eigenvalues", "landscape_loss",
         "landscape_accuracy",
         "prior_lower", "prior_upper"]


@pytest.mark.parametrize("name", NAMES)
def test_identical_on_every_rank_and_equal_to_one_process(ranks, reference, name):
    torch.testing.assert_close(ranks[0]["seeded"][name], ranks[1]["seeded"][name], rtol=0, atol=0)
    ref = reference[name]
    scale = float(ref.abs().max()) if ref.numel() else 1.0
    torch.testing.assert_close(ranks[0]["seeded"][name], ref, rtol=RTOL, atol=RTOL * scale)


@pytest.mark.parametrize("name", ["density", "diag", "nystrom_S"])
def test_unseeded_algorithms_draw_the_same_probes_on_every_rank(ranks, name):
    torch.testing.assert_close(ranks[0]["unseeded"][name], ranks[1]["unseeded"][name], rtol=0, atol=0)


def test_the_results_are_not_trivial(reference):
    # a zero operator would pass every comparison above
    assert float(reference["rsvd_S"][0]) > 0.1 and float(reference["prior_eigenvalues"][0]) > 0.1
    assert float(reference["density_weights"].sum()) == pytest.approx(4.0, rel=1e-9)  # 4 probes, each weights sum to 1
    assert float(reference["minres"].norm()) > 0.1


def test_prior_covariance_carries_the_process_group(ranks):
    assert ranks[0]["prior_group"] and ranks[1]["prior_group"]


def test_prior_chunk_is_the_same_on_every_rank(ranks):
    """Measured locally the ranks' workspaces differ (19 vs 18 rows); the operator takes the largest, so
    both run chunks of 2 draws under a budget where the smaller rank alone would have taken 3; the
    estimate under that budget equals the one-process spectrum."""
    (local0, used0, chunk0), (local1, used1, chunk1) = ranks[0]["prior_workspace"], ranks[1]["prior_workspace"]
    assert local0 != local1 and used0 == used1 == max(local0, local1)
    assert chunk0 == chunk1 == 2
    X, y = _data()
    ref = active_subspace(_model(), "cross_entropy", (X, y), prior="standard_normal", num_samples=12, k=2)
    for r in range(WORLD):
        torch.testing.assert_close(ranks[r]["prior_tight"], ref.eigenvalues, rtol=RTOL, atol=0)


def test_data_active_subspace_is_refused_on_every_rank_and_the_operator_route_is_exact(ranks):
    """active_subspace over data samples would decompose each rank's shard (measured 0.719 / 0.909 on the
    two ranks against 0.702 for the whole data): it is refused before any pass, on every rank, and the
    route the message names — eigsh on the distributed GradientCovariance — gives the whole data's values."""
    for r in range(WORLD):
        msg = ranks[r]["data_active_subspace"]
        assert msg.startswith("active_subspace: the active subspace over data samples is not data-parallel"), msg
        assert "GradientCovariance(model, loss, data, distributed=True)" in msg
    X, y = _data()
    ref = active_subspace(_model(), "cross_entropy", (X, y), k=3).eigenvalues
    ref = ref.flip(0) if ref[0] > ref[-1] else ref  # eigsh: ascending
    for r in range(WORLD):
        got = ranks[r]["data_covariance_eigsh"]
        torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-8 * float(ref.abs().max()))
    torch.testing.assert_close(ranks[0]["data_covariance_eigsh"], ranks[1]["data_covariance_eigsh"], rtol=0, atol=0)
