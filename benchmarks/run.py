"""Time curvature products against one full-data gradient, in one process, and print a table.

    python benchmarks/run.py [--workload mlp|seed002|all] [--repeats N] [--quick]
                             [--device cpu|cuda] [--json PATH] [--no-memory]

Timing.  Every method of ``methods.METHODS`` is prepared (operators built, caches warmed), run
once as a warm-up (its result is kept for the correctness check), then timed ``--repeats``
times.  The rounds are interleaved, method after method, and each round also times the
baseline gradient three times, so slow drift of the machine (other processes, frequency
changes) hits every row alike.  A cell is the median time of the method divided by the median
time of one full-data gradient (a loop of ``loss.backward()`` over the batches) measured in
the same process; for 16-column blocks it is that ratio divided by 16, the cost per column.

Correctness.  Each curvops product is compared with curvlinops' product of the same probe
(same model, loss module and batches; both normalize by ``n_b / N`` per batch):
``‖a − b‖ / ‖b‖`` in float32.

Memory.  On CPU each method runs again in a fresh subprocess that builds the workload, records
its peak resident set size (``VmHWM``), prepares and runs the method once, and reports how far
the peak rose: the extra memory the method needed at its peak beyond the model and data (kept
caches included).  Memory the allocator freed during the build can be reused without
raising the peak, so small figures are lower bounds to within a few MB.  On CUDA the same
quantity (set-up and one product of a fresh instance) comes from
``torch.cuda.max_memory_allocated`` in this process.
"""

from __future__ import annotations

import argparse
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

import torch

import methods as M
import workloads as W

HERE = os.path.dirname(os.path.abspath(__file__))
QUICK_SCALE = 0.1
BASELINE_PER_ROUND = 3

# PyHessian calls backward(create_graph=True) and warns about the reference cycle it makes.
warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def make_timer(device: torch.device):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(fn) -> float:
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    return timed


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def measure_workload(name: str, args, device: torch.device) -> dict:
    """Time every method on one workload; check it against its reference; CUDA memory."""
    w = W.build(name, scale=args.scale, device=device)
    v, V = M.probes(w)
    print(f"# {name}: {w.description}; P={w.num_params}", file=sys.stderr, flush=True)
    rows = {m.key: {"label": m.label, "columns": m.columns, "target": m.target, "times": []}
            for m in M.METHODS}
    ready = prepare_and_check(w, v, V, rows)
    grad_s = time_rounds(ready, rows, args.repeats, make_timer(device))
    if device.type == "cuda":
        cuda_memory(w, v, V, ready, rows)
    return {"description": w.description, "num_params": w.num_params, "num_data": w.num_data,
            "gradient_s": grad_s, "methods": rows}


def prepare_and_check(w, v, V, rows: dict) -> dict[str, M.Prepared]:
    """Prepare every method and run it once (warm-up); compare results with the reference rows."""
    ready: dict[str, M.Prepared] = {}
    outputs: dict[str, torch.Tensor] = {}
    for m in M.METHODS:
        try:
            prep = m.prepare(w, M.probe_for(m, v, V))
            out = prep.run()
        except Exception as err:  # a library missing or failing: report it, keep going
            rows[m.key]["error"] = f"{type(err).__name__}: {err}"
            print(f"  {m.key}: {rows[m.key]['error']}", file=sys.stderr, flush=True)
            continue
        ready[m.key] = prep
        if isinstance(out, torch.Tensor):
            outputs[m.key] = out.detach()
    for m in M.METHODS:
        if m.reference in outputs and m.key in outputs:
            rows[m.key]["reference"] = m.reference
            rows[m.key]["rel_err"] = rel_err(outputs[m.key], outputs[m.reference])
    return ready


def time_rounds(ready: dict[str, M.Prepared], rows: dict, repeats: int, timed) -> float:
    """Interleaved rounds; fills times, medians and ratios; returns the baseline's median."""
    for r in range(repeats):
        for key, prep in ready.items():
            runs = BASELINE_PER_ROUND if key == "gradient" else 1
            rows[key]["times"] += [timed(prep.run) for _ in range(runs)]
        print(f"  round {r + 1}/{repeats} done", file=sys.stderr, flush=True)
    grad_s = statistics.median(rows["gradient"]["times"])
    for key, prep in ready.items():
        row = rows[key]
        row["median_s"] = statistics.median(row["times"])
        row["ratio"] = row["median_s"] / grad_s / max(row["columns"], 1)
        row.update(prep.info())
    return grad_s


def cuda_memory(w, v, V, ready: dict, rows: dict) -> None:
    """Like the CPU figure: the peak of set-up (kept caches) and one product of a fresh instance."""
    for m in M.METHODS:
        if m.key not in ready:
            continue
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        m.prepare(w, M.probe_for(m, v, V)).run()
        torch.cuda.synchronize()
        rows[m.key]["mem_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20


# ---- memory on CPU: one fresh process per (workload, method) ------------------------------------
def peak_rss_mb() -> float:
    """Peak resident set size of this process so far.

    Linux: ``VmHWM`` of the process's own address space.  (``ru_maxrss`` would do, except that
    Linux carries it over fork + exec, so a child of a big parent starts at the parent's peak.)
    """
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        scale = 2**20 if sys.platform == "darwin" else 2**10  # bytes on macOS, KiB elsewhere
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def child_memory(name: str, key: str, scale: float) -> None:
    """Runs in the subprocess: print the rise of peak RSS (MB) caused by one method."""
    torch.set_num_threads(1)  # several children run side by side; memory does not depend on it
    w = W.build(name, scale=scale, train=False)  # parameter values do not change memory
    v, V = M.probes(w)
    m = M.BY_KEY[key]
    before = peak_rss_mb()
    m.prepare(w, M.probe_for(m, v, V)).run()
    print(json.dumps({"mem_mb": peak_rss_mb() - before}))


def measure_memory_cpu(results: dict, scale: float) -> None:
    jobs = [(name, key) for name, res in results.items()
            for key, row in res["methods"].items() if "error" not in row]

    def run_child(job):
        name, key = job
        cmd = [sys.executable, os.path.join(HERE, "run.py"), "--child-memory", name, key, "--scale", str(scale)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE)
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            return job, {"mem_error": proc.stderr.strip().splitlines()[-1:] or ["no output"]}
        return job, json.loads(lines[-1])

    print(f"# memory: {len(jobs)} subprocesses", file=sys.stderr, flush=True)
    with ThreadPoolExecutor(max_workers=cores()) as pool:
        for (name, key), found in pool.map(run_child, jobs):
            results[name]["methods"][key].update(found)


# ---- report ---------------------------------------------------------------------------------------
def _cell(row: dict) -> str:
    if "error" in row:
        return "error"
    if "ratio" not in row:
        return "—"
    text = f"{row['ratio']:.2f}"
    if row.get("target") is not None:
        text += " ✓" if row["ratio"] <= row["target"] else " ✗"
    return text


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def markdown(results: dict, meta: dict) -> str:
    names = list(results)
    rows_of = {n: results[n]["methods"] for n in names}
    out = [f"curvops benchmarks — {meta['date']}, {meta['cpu']}, torch {meta['torch']} on {meta['device']}, "
           f"{meta['threads']} threads, load average before the run {meta['loadavg']}", "",
           "Median time / median time of one full-data gradient in the same run "
           "(16-column rows: per column). ✓/✗: the issue's target.", ""]
    ratios = [["one full-data gradient (absolute)", ""] + [f"{1e3 * results[n]['gradient_s']:.1f} ms" for n in names]]
    ratios += [[m.label, f"≤ {m.target}" if m.target is not None else ""] + [_cell(rows_of[n][m.key]) for n in names]
               for m in M.METHODS]
    out += _table(["method", "target", *names], ratios)

    rivals = [m for m in M.METHODS if m.key.startswith("curvops.") and (m.reference or "").startswith("curvlinops.")]
    speedups = []
    for m in rivals:
        times = [(rows_of[n][m.key].get("median_s"), rows_of[n][m.reference].get("median_s")) for n in names]
        speedups.append([m.label] + [f"{b / a:.2f}" if a and b else "—" for a, b in times])
    out += ["", "curvops speed-up over curvlinops (same product; > 1 means curvops is faster)", ""]
    out += _table(["product", *names], speedups)

    errors = [[f"{m.label} vs {m.reference}"] + [f"{rows_of[n][m.key]['rel_err']:.1e}"
                                                 if "rel_err" in rows_of[n][m.key] else "—" for n in names]
              for m in M.METHODS if m.reference]
    out += ["", "Relative error ‖a − b‖/‖b‖ against the reference row (float32)", ""]
    out += _table(["product", *names], errors)

    if any("mem_mb" in r for n in names for r in rows_of[n].values()):
        memory = [[m.label] + [f"{rows_of[n][m.key]['mem_mb']:.0f}" if "mem_mb" in rows_of[n][m.key] else "—"
                               for n in names] for m in M.METHODS]
        out += ["", f"Peak memory beyond model and data, MB ({meta['memory_method']})", ""]
        out += _table(["method", *names], memory)

    paths = {m.key: rows_of[names[0]][m.key].get("path") for m in M.METHODS}
    kept = [f"{n}: {rows_of[n]['curvops.H.keep'].get('cache_mb', 0):.0f} MB" for n in names]
    out += ["", "curvops kernels: " + "; ".join(f"{k} → {p}" for k, p in paths.items() if p),
            "Kept gradient graphs (keep_graphs=True): " + ", ".join(kept)]
    return "\n".join(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=[*W.NAMES, "all"], default="all")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per method (default 5)")
    parser.add_argument("--quick", action="store_true", help=f"N × {QUICK_SCALE}, 2 rounds: a smoke run")
    parser.add_argument("--scale", type=float, default=None, help="multiply N (default: $BENCH_SCALE or 1)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--child-memory", nargs=2, metavar=("WORKLOAD", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.scale is None:
        args.scale = QUICK_SCALE if args.quick else W.scale_from_env()
    if args.child_memory:
        child_memory(*args.child_memory, args.scale)
        return
    if args.quick:
        args.repeats = min(args.repeats, 2)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available.")
    torch.set_num_threads(cores())
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "repeats": args.repeats,
        "scale": args.scale,
        "memory_method": "torch.cuda.max_memory_allocated minus allocated before set-up and product"
        if device.type == "cuda" else "rise of peak RSS in a fresh process after building the workload",
    }
    names = list(W.NAMES) if args.workload == "all" else [args.workload]
    results = {name: measure_workload(name, args, device) for name in names}
    if device.type == "cpu" and not args.no_memory:
        measure_memory_cpu(results, args.scale)
    print(markdown(results, meta))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "workloads": results}, fh, indent=1)


if __name__ == "__main__":
    main()
