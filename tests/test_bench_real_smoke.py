"""benchmarks/bench_real.py runs end to end at toy sizes (the benchmark itself is not run in CI)."""

import importlib.util
import json
import math
import pathlib
import sys

import pytest
import torch

pytest.importorskip("transformers")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_real", ROOT / "benchmarks" / "bench_real.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_real"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_bench_real_gpt2_tiny(capsys, tmp_path):
    B = _bench()
    threads = torch.get_num_threads()
    try:
        out = B.main(["--tiny", "--workload", "gpt2", "--repeats", "1", "--no-memory", "--threads", "1",
                      "--no-compile"])
    finally:
        torch.set_num_threads(threads)
    res = out["results"]["gpt2"]
    rows = res["rows"]
    for key in ("grad", "H", "GGN", "EF", "H16", "eig"):
        assert "error" not in rows[key], rows[key]
        assert math.isfinite(rows[key]["ratio"]) and rows[key]["ratio"] > 0
    assert rows["eig"]["converged"] and rows["eig"]["products"] >= 10 and len(rows["eig"]["top"]) == 10
    assert not any(key.endswith(".c") for key in rows)  # --no-compile
    if importlib.util.find_spec("pyhessian") is not None:
        # PyHessian's product is the same matrix times the same vector (its own plain double backward)
        assert rows["ph.H"]["rel_err_vs_curvops"] < 1e-4
        assert "error" not in rows["ph.eig"] and rows["ph.eig"]["products"] > 0
    assert res["num_params"] == sum(p.numel() for p in B.build("gpt2", B.SIZES["tiny"]["gpt2"], "cpu").model.parameters())
    if importlib.util.find_spec("curvlinops") is not None:
        # the same matrix in both libraries: the GGN products and the top eigenvalues agree
        assert "error" not in rows["cl.GGN"], rows["cl.GGN"]
        assert rows["GGN"]["rel_err_vs_curvlinops"] < 1e-4
        assert rows["eig"]["rel_err_vs_curvlinops"] < 1e-2
    table = capsys.readouterr().out
    assert "GPT-2 (1 layers, n_embd 16" in table and "| curvops Hessian @ v |" in table
    assert out["table"] in table
    # the plot of the table (benchmarks/plot_real.py) from the same results
    spec = importlib.util.spec_from_file_location("plot_real", ROOT / "benchmarks" / "plot_real.py")
    plot_real = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot_real)
    png = plot_real.plot(json.loads(json.dumps({"meta": out["meta"], "results": out["results"]}, default=str)),
                         str(tmp_path / "real.png"))
    assert pathlib.Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_real_memory_child_and_resnet_size(capsys):
    B = _bench()
    # ResNet-18 at full width has the torchvision model's 11 689 512 parameters
    assert sum(p.numel() for p in B.ResNet18().parameters()) == 11_689_512
    # one memory measurement, in this process (the script runs it in a fresh one)
    sizes = B.SIZES["tiny"]["resnet"]
    threads = torch.get_num_threads()
    try:
        B.child_memory("resnet", "H", sizes)
    finally:
        torch.set_num_threads(threads)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["mem_mb"] >= 0
    res = {"rows": {"grad": {"mem_mb": 10.0}, "H": {"mem_mb": 25.0}}}
    B.memory_ratios(res)
    assert res["rows"]["H"]["mem_ratio"] == 2.5 and B._mem_cell(res["rows"]["H"], "H") == "25 MB (2.5× ✓)"


@pytest.mark.slow
def test_bench_real_compiled_column_tiny(capsys):
    """The compiled rows at toy size: the compiled Hessian of GPT-2 (attention, LayerNorm, tied
    embeddings) equals the eager one; its compilation is timed apart."""
    import shutil

    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        pytest.skip("torch.compile's CPU backend needs a C++ compiler")
    B = _bench()
    threads = torch.get_num_threads()
    try:
        out = B.main(["--tiny", "--workload", "gpt2", "--repeats", "1", "--no-memory", "--threads", "1",
                      "--methods", "H,H.c"])
    finally:
        torch.set_num_threads(threads)
    rows = out["results"]["gpt2"]["rows"]
    assert set(rows) == {"grad", "H", "H.c"}
    assert "error" not in rows["H.c"], rows["H.c"]
    assert math.isfinite(rows["H.c"]["ratio"]) and rows["H.c"]["ratio"] > 0 and rows["H.c"]["compile_s"] > 0
    assert rows["H.c"]["rel_err_vs_eager"] < 1e-5  # float32
    assert "| curvops Hessian @ v, compiled |" in capsys.readouterr().out
