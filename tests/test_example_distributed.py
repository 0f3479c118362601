"""examples/distributed_spectrum.py under torchrun with 2 processes (gloo, CPU)."""

import json
import os
import pathlib
import socket
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_distributed_spectrum_under_torchrun(tmp_path):
    out = tmp_path / "spectrum.json"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(port),
           str(ROOT / "examples" / "distributed_spectrum.py"), "--quick", "--check", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["world_size"] == 2 and res["num_samples"] == 256
    for a, b in zip(res["top_eigenvalues"], res["one_process_top_eigenvalues"]):
        assert abs(a - b) <= 1e-8 * abs(b)
    assert res["top_eigenvalues"][0] >= res["top_eigenvalues"][1] >= res["top_eigenvalues"][2] > 0
