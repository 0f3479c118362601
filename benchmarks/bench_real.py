"""Curvature at real size: GPT-2 and a ResNet-18-sized conv net, curvops beside curvlinops.

    python benchmarks/bench_real.py [--full | --quick | --tiny] [--device cuda] [--workload gpt2|resnet|all]
                                    [--repeats N] [--threads N] [--no-memory] [--no-curvlinops]
                                    [--no-compile] [--no-pyhessian] [--pyhessian-eig] [--methods KEY,...]
                                    [--set gpt2.vocab_size=50257 ...] [--json PATH]

Workloads (float32, seeded, random initialization: nothing is downloaded):

* **gpt2**: ``GPT2LMHeadModel`` from a ``GPT2Config`` with its default (``sdpa``) attention, loss
  ``"causal_lm"`` on one dict batch ``{"input_ids", "attention_mask", "labels"}`` of random tokens.
  ``--full``: ``GPT2Config()`` defaults (12 layers, n_embd 768, vocabulary 50 257: 124 M
  parameters) on 8 × 128 tokens.
* **resnet**: a ResNet-18 written here (BasicBlocks [2, 2, 2, 2], widths 64-128-256-512, BatchNorm
  in eval mode, 1000 classes: 11.7 M parameters), cross-entropy on one batch of random images.
  ``--full``: 32 images of 3 × 224 × 224.

Without ``--full`` (the default, for a CPU) the sizes shrink so the script finishes in minutes
on two cores; ``--quick`` shrinks them further (GPT-2 2×128, vocabulary 2048; ResNet-18 at width
16 on 32×32 images) and runs 2 rounds; the table prints the sizes used.  ``--set
workload.key=value`` overrides one size.

Rows: one gradient (``loss.backward()`` of the model's own loss: the baseline), Hessian @ v,
GGN @ v, EmpiricalFisher @ v, a 16-column Hessian block (cost per column), ``eigsh`` top-10 (time
and products), each as a multiple of the gradient measured in the same process (median over
interleaved rounds), and the peak memory of each as a multiple of a gradient step's.  The
**compiled** rows run the same products through ``Objective(compile=True)`` (one torch.func graph
per batch under ``torch.compile``; docs/compile.md); compilation happens in the set-up (its time
is reported apart, ``compile_s``) and every compiled result is checked against the eager one.
curvlinops 3.0.1 runs beside it where it can: ``HessianLinearOperator`` / ``GGNLinearOperator`` /
``EFLinearOperator`` (``check_deterministic=False``) and scipy's ``eigsh`` on ``to_scipy()``;
PyHessian 0.1 (``dataloader_hv_product``; its power-iteration ``eigenvalues(top_n=10)`` with
``--pyhessian-eig``, on by default at ``--quick``/``--tiny`` sizes).  curvlinops and PyHessian fail
on GPT-2 with the default ``sdpa`` attention (no double backward / forward mode for the fused
kernel), so their GPT-2 model is a copy with ``attn_implementation="eager"`` and the same weights;
curvops runs the model as given.

Memory.  On CPU every measurement runs again in a fresh subprocess that builds the workload,
reads its peak resident set size (``VmHWM``; tracemalloc does not see torch's allocations) and
reports how far one run of the method raises it.  On CUDA: ``torch.cuda.max_memory_allocated``
over one run, minus what was allocated before.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

import curvops

HERE = os.path.dirname(os.path.abspath(__file__))
K_EIG, TOL_EIG, BLOCK = 10, 1e-3, 16
TARGETS = {"gpt2": {"H": 3.0, "GGN": 2.0}}  # × one gradient (issue 11); memory: ≤ 3× a gradient step's
MEM_TARGET = 3.0

SIZES = {
    "full": {"gpt2": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, batch=8, tokens=128),
             "resnet": dict(width=64, batch=32, image=224, classes=1000)},
    "cpu": {"gpt2": dict(n_layer=2, n_embd=256, n_head=4, vocab_size=8192, batch=4, tokens=64),
            "resnet": dict(width=64, batch=8, image=64, classes=1000)},
    "quick": {"gpt2": dict(n_layer=2, n_embd=128, n_head=4, vocab_size=2048, batch=2, tokens=64),
              "resnet": dict(width=16, batch=4, image=32, classes=100)},
    "tiny": {"gpt2": dict(n_layer=1, n_embd=16, n_head=2, vocab_size=64, batch=2, tokens=8),
             "resnet": dict(width=4, batch=2, image=16, classes=5)},
}

warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
warnings.filterwarnings("ignore", message=".*loss_type=None.*")


# ---- workloads ------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.down is None else self.down(x)))


class ResNet18(nn.Module):
    """ResNet-18 (He et al. 2016): 7×7 stem, max-pool, four stages of two BasicBlocks, linear head."""

    def __init__(self, width: int = 64, classes: int = 1000):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 7, 2, 3, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        stages, cin = [], w
        for i, cout in enumerate([w, 2 * w, 4 * w, 8 * w]):
            stride = 1 if i == 0 else 2
            stages += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.stages(self.stem(x)), 1), 1))


class LogitsForCurvlinops(nn.Module):
    """A HuggingFace causal LM as curvlinops needs it: dict in, shifted logits [B·(T−1), V] out."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, X):
        logits = self.lm(input_ids=X["input_ids"], attention_mask=X["attention_mask"]).logits
        return logits[:, :-1].reshape(-1, logits.shape[-1])


class IdsForPyHessian(nn.Module):
    """A causal LM as PyHessian needs it: a tensor of token ids in (it calls ``inputs.size(0)``),
    shifted logits out."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, ids):
        logits = self.lm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        return logits[:, :-1].reshape(-1, logits.shape[-1])


@dataclass
class Workload:
    name: str
    sizes: dict
    model: nn.Module
    loss: object            # what curvops takes
    data: list              # curvops' batches
    gradient: Callable[[], None]
    curvlinops: Callable[[], tuple] | None = None  # → (model_func, loss_func, params, data, kwargs)
    notes: list = field(default_factory=list)
    pyhessian: Callable[[], tuple] | None = None   # → (model, criterion, [(inputs, targets)])
    compiled: object = None                       # the shared Objective(compile=True), built on demand
    compile_s: dict = field(default_factory=dict)  # first call (tracing + compilation) per method

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def build(name: str, sizes: dict, device: torch.device) -> Workload:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    if name == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        s = sizes
        cfg_kw = dict(n_layer=s["n_layer"], n_embd=s["n_embd"], n_head=s["n_head"], vocab_size=s["vocab_size"],
                      n_positions=max(1024, s["tokens"]))
        model = GPT2LMHeadModel(GPT2Config(**cfg_kw)).to(device).eval()  # default attention (sdpa)
        ids = torch.randint(0, s["vocab_size"], (s["batch"], s["tokens"]), generator=gen).to(device)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

        def gradient():
            model.zero_grad(set_to_none=True)
            model(**batch).loss.backward()

        def for_curvlinops():
            eager = GPT2LMHeadModel(GPT2Config(**cfg_kw, attn_implementation="eager")).to(device).eval()
            eager.load_state_dict(model.state_dict())
            wrapped = LogitsForCurvlinops(eager)
            X = {"input_ids": ids, "attention_mask": batch["attention_mask"]}
            y = batch["labels"][:, 1:].reshape(-1)
            kw = dict(batch_size_fn=lambda X: X["input_ids"].shape[0], num_data=s["batch"])
            return wrapped, nn.CrossEntropyLoss(), list(eager.parameters()), [(X, y)], kw

        def for_pyhessian():
            eager = GPT2LMHeadModel(GPT2Config(**cfg_kw, attn_implementation="eager")).to(device).eval()
            eager.load_state_dict(model.state_dict())
            return IdsForPyHessian(eager), nn.CrossEntropyLoss(), [(ids, batch["labels"][:, 1:].reshape(-1))]

        return Workload(name, s, model, "causal_lm", [batch], gradient, for_curvlinops,
                        ["curvlinops, PyHessian: a copy with attn_implementation='eager' (they fail on sdpa)"],
                        for_pyhessian)
    if name == "resnet":
        s = sizes
        model = ResNet18(s["width"], s["classes"]).to(device).eval()
        X = torch.randn(s["batch"], 3, s["image"], s["image"], generator=gen).to(device)
        y = torch.randint(0, s["classes"], (s["batch"],), generator=gen).to(device)
        loss = nn.CrossEntropyLoss()

        def gradient():
            model.zero_grad(set_to_none=True)
            loss(model(X), y).backward()

        def for_curvlinops():
            return model, loss, list(model.parameters()), [(X, y)], dict(num_data=s["batch"])

        return Workload(name, s, model, loss, [(X, y)], gradient, for_curvlinops,
                        pyhessian=lambda: (model, loss, [(X, y)]))
    raise ValueError(f"bench_real: unknown workload {name!r}; expected 'gpt2' or 'resnet'.")


# ---- methods: (key, label, columns, prepare(w, v, V) -> run) ---------------------------------------
def _eigsh_curvops(w: Workload, device) -> Callable[[], dict]:
    H = curvops.Hessian(w.model, w.loss, w.data)

    def run():
        r = curvops.eigsh(H, k=K_EIG, tol=TOL_EIG, generator=0)
        return {"products": r.num_matvecs, "converged": bool(r.converged),
                "top": sorted(r.eigenvalues.tolist(), reverse=True)}

    return run


def _curvlinops_op(w: Workload, cls: str):
    import curvlinops

    f, loss, params, data, kw = w.curvlinops()
    return getattr(curvlinops, cls)(f, loss, params, data, check_deterministic=False, **kw)


def _eigsh_curvlinops(w: Workload, device) -> Callable[[], dict]:
    import numpy as np
    import scipy.sparse.linalg as spla

    op = _curvlinops_op(w, "HessianLinearOperator").to_scipy()
    count = [0]

    def matmat(X):
        X = np.asarray(X)
        count[0] += 1 if X.ndim == 1 else X.shape[1]
        return op @ X

    counted = spla.LinearOperator(op.shape, matvec=matmat, matmat=matmat, dtype=op.dtype)
    v0 = np.random.default_rng(0).standard_normal(op.shape[0]).astype(op.dtype)

    def run():
        count[0] = 0
        vals = spla.eigsh(counted, k=K_EIG, which="LA", tol=TOL_EIG, v0=v0, return_eigenvectors=False)
        return {"products": count[0], "converged": True, "top": sorted(vals.tolist(), reverse=True)}

    return run


# ---- the compiled path (Objective(compile=True)) and PyHessian --------------------------------------
class CompiledHessian(curvops.operators.base.Operator):
    """The compiled Hessian pass as an operator (for ``eigsh``)."""

    def __init__(self, objective):
        P = objective.num_params
        super().__init__((P, P), objective.dtype, objective.device, tags=("symmetric",))
        self.objective = objective

    def _matmat_torch(self, V: Tensor) -> Tensor:
        return _must(self.objective, self.objective.compiled.matmat("hessian", V))


def _must(objective, out):
    if out is None:
        raise RuntimeError(f"compile failed: {objective.compiled.failure}")
    return out


def _compiled_objective(w: Workload):
    if w.compiled is None:
        w.compiled = curvops.Objective(w.model, w.loss, w.data, compile=True)
    return w.compiled


def _first_call(w: Workload, key: str, run: Callable):
    """Run once (tracing + compilation), recording how long it took."""
    start = time.perf_counter()
    run()
    w.compile_s[key] = time.perf_counter() - start
    return run


def _compiled_product(kind: str, use_block: bool, key: str):
    def prepare(w, v, V, device):
        obj = _compiled_objective(w)
        X = V if use_block else v[:, None]
        return _first_call(w, key, lambda: _must(obj, obj.compiled.matmat(kind, X)))

    return prepare


def _eigsh_compiled(w: Workload, device) -> Callable[[], dict]:
    op = CompiledHessian(_compiled_objective(w))
    _first_call(w, "eig.c", lambda: op @ torch.ones(op.shape[0], device=device))

    def run():
        r = curvops.eigsh(op, k=K_EIG, tol=TOL_EIG, generator=0)
        return {"products": r.num_matvecs, "converged": bool(r.converged),
                "top": sorted(r.eigenvalues.tolist(), reverse=True)}

    return run


def _pyhessian(w: Workload, device):
    from pyhessian import hessian

    model, criterion, data = w.pyhessian()
    h = hessian(model, criterion, dataloader=data, cuda=device.type == "cuda")
    count = [0]
    product = h.dataloader_hv_product

    def counted(v):
        count[0] += 1
        return product(v)

    h.dataloader_hv_product = counted
    return h, count


def _pyhessian_hv(w, v, V, device):
    h, _ = _pyhessian(w, device)
    vs = [t.view_as(p) for t, p in zip(v.split([p.numel() for p in h.params]), h.params)]

    def run():
        _, Hv = h.dataloader_hv_product(vs)
        return torch.cat([t.reshape(-1) for t in Hv])

    return run


def _pyhessian_eig(w: Workload, device) -> Callable[[], dict]:
    h, count = _pyhessian(w, device)

    def run():
        count[0] = 0
        torch.manual_seed(0)  # PyHessian draws its start vectors from the global generator
        vals, _ = h.eigenvalues(maxIter=100, tol=TOL_EIG, top_n=K_EIG)
        return {"products": count[0], "converged": True, "top": sorted(vals, reverse=True)}

    return run


@dataclass
class Method:
    key: str
    label: str
    columns: int            # 0: not a product (the gradient, eigsh)
    prepare: Callable       # (w, v, V, device) -> run()
    library: str = "curvops"
    target: str | None = None  # key into TARGETS[workload]


def _product(cls_name: str, use_block: bool):
    def prepare(w, v, V, device):
        op = getattr(curvops, cls_name)(w.model, w.loss, w.data)
        X = V if use_block else v
        return lambda: op @ X

    return prepare


def _cl_product(cls_name: str, use_block: bool):
    def prepare(w, v, V, device):
        op = _curvlinops_op(w, cls_name)
        X = V if use_block else v[:, None]
        return lambda: op @ X

    return prepare


METHODS = [
    Method("grad", "one gradient (loss.backward())", 0, lambda w, v, V, d: w.gradient),
    Method("H", "curvops Hessian @ v", 1, _product("Hessian", False), target="H"),
    Method("GGN", "curvops GGN @ v", 1, _product("GGN", False), target="GGN"),
    Method("EF", "curvops EmpiricalFisher @ v", 1, _product("EmpiricalFisher", False)),
    Method("H16", f"curvops Hessian @ V[P,{BLOCK}], per column", BLOCK, _product("Hessian", True)),
    Method("eig", f"curvops eigsh top-{K_EIG} (tol {TOL_EIG:g})", 0, lambda w, v, V, d: _eigsh_curvops(w, d)),
    Method("H.c", "curvops Hessian @ v, compiled", 1, _compiled_product("hessian", False, "H.c"), "compiled"),
    Method("GGN.c", "curvops GGN @ v, compiled", 1, _compiled_product("ggn", False, "GGN.c"), "compiled"),
    Method("H16.c", f"curvops Hessian @ V[P,{BLOCK}], per column, compiled", BLOCK,
           _compiled_product("hessian", True, "H16.c"), "compiled"),
    Method("eig.c", f"curvops eigsh top-{K_EIG} (tol {TOL_EIG:g}), compiled", 0,
           lambda w, v, V, d: _eigsh_compiled(w, d), "compiled"),
    Method("cl.H", "curvlinops HessianLinearOperator @ v", 1, _cl_product("HessianLinearOperator", False),
           "curvlinops"),
    Method("cl.GGN", "curvlinops GGNLinearOperator @ v", 1, _cl_product("GGNLinearOperator", False), "curvlinops"),
    Method("cl.EF", "curvlinops EFLinearOperator @ v", 1, _cl_product("EFLinearOperator", False), "curvlinops"),
    Method("cl.H16", f"curvlinops HessianLinearOperator @ V[P,{BLOCK}], per column", BLOCK,
           _cl_product("HessianLinearOperator", True), "curvlinops"),
    Method("cl.eig", f"curvlinops + scipy eigsh top-{K_EIG} (tol {TOL_EIG:g})", 0,
           lambda w, v, V, d: _eigsh_curvlinops(w, d), "curvlinops"),
    Method("ph.H", "PyHessian dataloader_hv_product(v)", 1, _pyhessian_hv, "pyhessian"),
    Method("ph.eig", f"PyHessian eigenvalues top-{K_EIG} (power iteration, tol {TOL_EIG:g})", 0,
           lambda w, v, V, d: _pyhessian_eig(w, d), "pyhessian"),
]
BY_KEY = {m.key: m for m in METHODS}
ONCE = {"H16", "eig", "H16.c", "eig.c", "cl.H16", "cl.eig", "ph.eig"}  # timed once (a block or a whole eigensolve)
CHECKS = {"H.c": "H", "GGN.c": "GGN", "H16.c": "H16", "eig.c": "eig",  # compiled against eager
          "H": "cl.H", "GGN": "cl.GGN", "EF": "cl.EF", "H16": "cl.H16", "eig": "cl.eig",  # curvops vs curvlinops
          "ph.H": "H", "ph.eig": "eig"}  # PyHessian against curvops


def selected(args) -> list[Method]:
    keys = None if not args.methods else set(args.methods.split(","))
    if keys is not None and not keys <= set(BY_KEY) | {"grad"}:
        raise SystemExit(f"bench_real --methods: unknown keys {sorted(keys - set(BY_KEY))}; expected some of "
                         f"{list(BY_KEY)}.")
    skip = {"curvlinops": args.no_curvlinops, "compiled": args.no_compile, "pyhessian": args.no_pyhessian}
    return [m for m in METHODS if m.key == "grad" or (
        (keys is None or m.key in keys) and not skip.get(m.library, False)
        and (m.key != "ph.eig" or args.pyhessian_eig or keys is not None))]


# ---- measuring ---------------------------------------------------------------------------------
def probes(w: Workload, device) -> tuple[Tensor, Tensor]:
    P = w.num_params
    gen = torch.Generator().manual_seed(2)
    return torch.randn(P, generator=gen).to(device), torch.randn(P, BLOCK, generator=gen).to(device)


def _timer(device):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(fn):
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        return time.perf_counter() - start, out

    return timed


def _flat(x) -> Tensor:
    return (x if isinstance(x, Tensor) else torch.as_tensor(x)).reshape(-1).float()


def rel_err(a, b) -> float:
    a, b = _flat(a).cpu(), _flat(b).cpu()
    return float((a - b).norm() / b.norm())


def measure(name: str, sizes: dict, args, device) -> dict:
    w = build(name, sizes, device)
    v, V = probes(w, device)
    timed = _timer(device)
    methods = selected(args)
    rows: dict[str, dict] = {}
    runs: dict[str, Callable] = {}
    outputs: dict[str, object] = {}
    for m in methods:
        print(f"# {name}: preparing {m.key}", file=sys.stderr, flush=True)
        try:
            run = m.prepare(w, v, V, device)
            if m.key not in ONCE:  # warm-up (its result is kept for the cross-check)
                _, outputs[m.key] = timed(run)
            runs[m.key], rows[m.key] = run, {"times": []}
        except Exception as err:  # a library that cannot run this model: reported, not fatal
            rows[m.key] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"}
    for r in range(args.repeats):
        for m in methods:
            if m.key not in runs or (m.key in ONCE and r > 0):
                continue
            print(f"# {name}: round {r + 1}, {m.key}", file=sys.stderr, flush=True)
            try:
                t, out = timed(runs[m.key])
            except Exception as err:
                rows[m.key] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"}
                runs.pop(m.key)
                continue
            rows[m.key]["times"].append(t)
            if m.key in ONCE:
                outputs[m.key] = out
            if m.key != "grad":  # one more baseline per method: drift hits every row alike
                rows["grad"]["times"].append(timed(w.gradient)[0])
    grad_s = statistics.median(rows["grad"]["times"])
    for m in methods:
        row = rows[m.key]
        if "error" in row:
            continue
        row["seconds"] = statistics.median(row["times"])
        row["ratio"] = row["seconds"] / grad_s / max(m.columns, 1)
        if isinstance(outputs.get(m.key), dict):
            row.update(outputs[m.key])
    for a, b in CHECKS.items():
        if a not in rows or b not in rows:
            continue
        name = "rel_err_vs_" + ("eager" if a.endswith(".c") else BY_KEY[b].library)
        if isinstance(outputs.get(a), Tensor) and isinstance(outputs.get(b), Tensor):
            rows[a][name] = rel_err(outputs[a], outputs[b])
        elif "top" in rows[a] and "top" in rows[b]:
            rows[a][name] = rel_err(rows[a]["top"], rows[b]["top"])
    for key, seconds in w.compile_s.items():
        if key in rows and "error" not in rows[key]:
            rows[key]["compile_s"] = seconds
    return {"sizes": sizes, "num_params": w.num_params, "gradient_s": grad_s, "rows": rows, "notes": w.notes}


# ---- memory ----------------------------------------------------------------------------------------
def peak_rss_mb() -> float:
    """Peak resident set size of this process (``VmHWM``; ``ru_maxrss`` where /proc is missing)."""
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        scale = 2**20 if sys.platform == "darwin" else 2**10
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def child_memory(name: str, key: str, sizes: dict) -> None:
    """In a fresh process: the rise of peak RSS (MB) over one run of one method."""
    torch.set_num_threads(1)  # children run side by side; memory does not depend on threads
    device = torch.device("cpu")
    w = build(name, sizes, device)
    v, V = probes(w, device)
    run = BY_KEY[key].prepare(w, v, V, device)
    before = peak_rss_mb()
    run()
    print(json.dumps({"mem_mb": peak_rss_mb() - before}))


def memory_cpu(name: str, res: dict, workers: int) -> None:
    keys = [k for k, row in res["rows"].items() if "error" not in row]

    def child(key):
        cmd = [sys.executable, os.path.abspath(__file__), "--child-memory", name, key,
               "--sizes-json", json.dumps(res["sizes"])]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE)
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            return key, {"mem_error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
        return key, json.loads(lines[-1])

    print(f"# {name}: memory, {len(keys)} subprocesses", file=sys.stderr, flush=True)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for key, found in pool.map(child, keys):
            res["rows"][key].update(found)


def memory_cuda(name: str, res: dict, device) -> None:
    w = build(name, res["sizes"], device)
    v, V = probes(w, device)
    for key, row in res["rows"].items():
        if "error" in row:
            continue
        run = BY_KEY[key].prepare(w, v, V, device)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        row["mem_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        del run
        w.model.zero_grad(set_to_none=True)


def memory_ratios(res: dict) -> None:
    base = res["rows"].get("grad", {}).get("mem_mb")
    for row in res["rows"].values():
        if base and "mem_mb" in row:
            row["mem_ratio"] = row["mem_mb"] / base


# ---- report ----------------------------------------------------------------------------------------
def describe(name: str, res: dict) -> str:
    s, P = res["sizes"], res["num_params"]
    if name == "gpt2":
        return (f"GPT-2 ({s['n_layer']} layers, n_embd {s['n_embd']}, {s['n_head']} heads, vocabulary "
                f"{s['vocab_size']}; {P / 1e6:.2f} M parameters), {s['batch']}×{s['tokens']} tokens, causal_lm")
    return (f"ResNet-18 (width {s['width']}, {s['classes']} classes, BatchNorm eval; {P / 1e6:.2f} M parameters), "
            f"{s['batch']} images 3×{s['image']}×{s['image']}, cross-entropy")


def _time_cell(row: dict, key: str, name: str) -> str:
    if "error" in row:
        return "fails: " + row["error"].replace("|", "/")
    if key == "grad":
        return f"{row['seconds'] * 1e3:.0f} ms"
    if key in ("eig", "cl.eig", "eig.c", "ph.eig"):
        conv = "" if row.get("converged", True) else ", not converged"
        return f"{row['seconds']:.1f} s, {row['products']} products ({row['ratio']:.0f}×{conv})"
    target = TARGETS.get(name, {}).get(BY_KEY[key].target or "")
    mark = "" if target is None else (" ✓" if row["ratio"] <= target else " ✗") + f" (≤ {target:g})"
    return f"{row['ratio']:.2f}{mark}"


def _mem_cell(row: dict, key: str) -> str:
    if "error" in row:
        return ""
    if "mem_mb" not in row:
        return row.get("mem_error", "")[:80]
    ratio = row.get("mem_ratio")
    if key == "grad" or ratio is None:
        return f"{row['mem_mb']:.0f} MB"
    mark = " ✓" if ratio <= MEM_TARGET else " ✗"
    return f"{row['mem_mb']:.0f} MB ({ratio:.1f}×{mark})"


def markdown(results: dict, meta: dict) -> str:
    names = list(results)
    out = [f"# bench_real — {meta['when']} — {meta['device']}, torch {meta['torch']}, {meta['threads']} threads, "
           f"load average {meta['load']}, sizes: {meta['mode']}", ""]
    for n in names:
        out.append(f"- **{n}**: {describe(n, results[n])}; one gradient {results[n]['gradient_s'] * 1e3:.0f} ms")
        out += [f"  ({note})" for note in results[n]["notes"]]
    out.append("")
    header = ["method"] + [f"{n}: time (× gradient)" for n in names] + [f"{n}: peak memory (× gradient step)"
                                                                         for n in names]
    out += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for m in METHODS:
        if not any(m.key in results[n]["rows"] for n in names):
            continue
        cells = [m.label]
        cells += [_time_cell(results[n]["rows"][m.key], m.key, n) if m.key in results[n]["rows"] else ""
                  for n in names]
        cells += [_mem_cell(results[n]["rows"][m.key], m.key) if m.key in results[n]["rows"] else ""
                  for n in names]
        out.append("| " + " | ".join(cells) + " |")
    for what, field_ in (("curvops vs curvlinops", "rel_err_vs_curvlinops"), ("compiled vs eager", "rel_err_vs_eager"),
                         ("PyHessian vs curvops", "rel_err_vs_curvops")):
        checks = [f"{n} {key}: {row[field_]:.1e}" for n in names for key, row in results[n]["rows"].items()
                  if row.get(field_) is not None]
        if checks:
            out += ["", f"{what}, ‖a − b‖/‖b‖ on the same probes (eigsh: the top-{K_EIG} values): " + "; ".join(checks)]
    compiled = [f"{n} {key}: {row['compile_s']:.1f} s" for n in names for key, row in results[n]["rows"].items()
                if "compile_s" in row]
    if compiled:
        out += ["", "first compiled call (tracing + compilation, not in the times above): " + "; ".join(compiled)]
    return "\n".join(out)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="the issue's sizes (GPT-2 small 8×128, ResNet-18 32×224²)")
    p.add_argument("--tiny", action="store_true", help="toy sizes: a smoke run (numbers meaningless)")
    p.add_argument("--quick", action="store_true", help="small CPU sizes and 2 rounds: minutes on two cores")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workload", default="all", choices=["gpt2", "resnet", "all"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-curvlinops", action="store_true")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled rows")
    p.add_argument("--no-pyhessian", action="store_true")
    p.add_argument("--pyhessian-eig", action="store_true",
                   help="PyHessian's top-10 power iteration (slow; default only with --quick/--tiny)")
    p.add_argument("--methods", default=None, help="comma-separated method keys (default: all)")
    p.add_argument("--set", action="append", default=[], metavar="WORKLOAD.KEY=VALUE",
                   help="override one size, e.g. gpt2.vocab_size=50257")
    p.add_argument("--json", default=None)
    p.add_argument("--child-memory", nargs=2, metavar=("WORKLOAD", "METHOD"), help=argparse.SUPPRESS)
    p.add_argument("--sizes-json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_memory:
        child_memory(*args.child_memory, json.loads(args.sizes_json))
        return {}
    if args.threads:
        torch.set_num_threads(args.threads)
    mode = "full" if args.full else "tiny" if args.tiny else "quick" if args.quick else "cpu"
    if args.quick or args.tiny:
        args.pyhessian_eig = True
    if args.quick:
        args.repeats = min(args.repeats, 2)
    sizes = copy.deepcopy(SIZES[mode])
    for item in args.set:
        key, _, value = item.partition("=")
        wl, _, field_ = key.partition(".")
        if wl not in sizes or field_ not in sizes[wl]:
            raise SystemExit(f"bench_real --set: expected WORKLOAD.KEY=VALUE with a key of {sizes}, got {item!r}.")
        sizes[wl][field_] = int(value)
    device = torch.device(args.device)
    names = ["gpt2", "resnet"] if args.workload == "all" else [args.workload]
    meta = {"when": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "mode": mode + (" + " + ", ".join(args.set) if args.set else ""),
            "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"{platform.processor() or platform.machine()}, {_cores()} cores"}
    results = {}
    for name in names:
        res = measure(name, sizes[name], args, device)
        if not args.no_memory:
            if device.type == "cuda":
                memory_cuda(name, res, device)
            else:
                memory_cpu(name, res, workers=min(2, _cores()))
            memory_ratios(res)
        results[name] = res
    table = markdown(results, meta)
    print(table)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "results": results}, fh, indent=1, default=str)
    return {"meta": meta, "results": results, "table": table}


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
