"""examples/transformer_curvature.py runs at a reduced size and its numbers are right."""

import pathlib
import runpy

import numpy as np
import pytest
import scipy.sparse.linalg as spla
import torch

pytest.importorskip("transformers")

import curvops  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_transformer_curvature_example(tmp_path, capsys):
    mod = runpy.run_path(str(ROOT / "examples" / "transformer_curvature.py"), run_name="example")
    res = mod["cli"](["--quick", "--out", str(tmp_path / "tc.png")])  # as a user types it
    assert (tmp_path / "tc.png").stat().st_size > 20_000
    H, model, batch = res["H"], res["model"], res["batch"]
    assert res["P"] == sum(p.numel() for p in model.parameters())  # tied lm_head counted once
    # the loss is the model's own (HuggingFace upcasts the logits to float32 for it)
    assert abs(res["loss"] - float(model(**batch).loss)) < 1e-6
    # top eigenvalues: curvops' Lanczos against ARPACK on the same operator
    eig = res["eig"]
    assert eig.converged
    ref = np.sort(spla.eigsh(H, k=3, which="LA", tol=1e-10, return_eigenvectors=False))
    np.testing.assert_allclose(eig.eigenvalues.numpy(), ref, rtol=1e-6)
    assert float(res["lowest"].eigenvalues[0]) < 0 < float(eig.eigenvalues[-1])  # not a minimum yet
    # the density is a probability density on its grid
    d = res["density"]
    assert abs(float(torch.trapezoid(d.density, d.grid)) - 1) < 1e-2
    # per-layer traces: the final LayerNorm's block (32 parameters, so a budget of 33 gives its exact
    # trace) against its dense trace, and its top eigenvalue lies below H's (a diagonal block of a
    # symmetric matrix interlaces); the big blocks are Hutch++ estimates
    ln_f = curvops.restrict(H, res["groups"]["ln_f"]).to_dense()
    t = res["traces"]["ln_f"]
    assert t.method == "exact" and abs(t.value - float(ln_f.trace())) < 1e-10 * abs(t.value)
    assert res["traces"]["block 0"].method == "hutch++" and res["traces"]["block 0"].stderr > 0
    assert float(torch.linalg.eigvalsh(ln_f)[-1]) <= float(eig.eigenvalues[-1]) + 1e-9
    assert list(res["traces"]) == ["embeddings", "block 0", "block 1", "ln_f"]
    out = capsys.readouterr().out
    assert "top-3 Hessian eigenvalues" in out and "trace of the block 1 block" in out
