"""The ``curvops`` command.

``curvops report [OUTDIR]`` writes a curvature report of a model: ``index.html`` (opens offline),
PNG figures and ``summary.json``.  Without model arguments it trains the small built-in demo
model (a tanh MLP on three Gaussian blobs, a second or two) and reports on it; with

.. code-block:: text

    curvops report out/ --model pkg.module:factory --checkpoint model.pt \\
        --data pkg.module:loader --loss cross_entropy [--params name,...] \\
        [--device cpu|cuda] [--dtype float32|float64] [--batch-size N] [--top-k K]

it reports on a user's model: ``factory()`` returns an ``nn.Module``, the checkpoint is a state
dict saved with ``torch.save`` (or a dict holding one under ``"state_dict"`` / ``"model"``), and
``loader()`` returns ``(X, y)`` or a ``DataLoader``.  Without ``--checkpoint`` the report is on the
weights the factory returns (usually random initial ones) and says so at its top (console, page,
``summary.json``).  Specs, imports, checkpoint keys and shapes,
and the fit of data and loss to the model are checked before any heavy work; a problem is
printed as one line (no traceback) and the command exits with status 2.  Exit status 1 means
the report was written but a section failed (its error and traceback are in the report and in
``summary.json``, and the console lists it).  The report is written after every section: a run
interrupted with Ctrl-C keeps the sections done (marked incomplete) and exits with status 130.

Under ``torchrun --nproc-per-node N -m curvops report ...`` the command joins the process group
torchrun describes (gloo on the CPU, NCCL with ``--device cuda``, one GPU per rank), shards the
data over the ranks and runs the data-parallel sections on every rank; rank 0 writes the report
and prints, the other ranks write nothing, and every rank exits with the same status
(:mod:`curvops.report.ranks`, docs/distributed.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

_DEFAULT_OUTDIR = "curvops-report"

#: one line per report section for ``curvops report --help`` (the keys are the section names)
SECTION_HELP = {
    "overview": "parameters, loss, gradient norm (per tensor); always runs",
    "eigenvalues": "top and most negative Hessian eigenvalues, top GGN eigenvalues (Lanczos)",
    "hessian_matrix": "the Hessian as a heat map (models up to 1000 parameters; 400 with --quick)",
    "density": "spectral densities of the Hessian and the GGN (stochastic Lanczos quadrature)",
    "trace": "traces of the Hessian and the GGN (XTrace, ± one standard error)",
    "condition": "condition numbers of the GGN and the Hessian",
    "rank": "numerical ranks of the GGN and the Hessian (cutoff, gap)",
    "stationary": "minimum / maximum / saddle verdict at the current point",
    "ntk": "spectrum of the empirical NTK on the first inputs",
    "active_subspace": "active subspace of the per-sample loss gradients (bootstrap, per layer)",
    "active_subspace_prior": "active subspace over parameter draws θ ~ prior (off unless --active-subspace-prior)",
    "landscape": "the loss along the top Hessian eigenvectors and on the plane of the top two",
    "architecture": "the network drawn as strips and blocks, with a table of its layers",
}

_REPORT_EPILOG = """\
sections (run in this order; pick some with --sections NAME,...):
{sections}

your own model, e.g. with mymodel.py in the current directory:
  # mymodel.py
  import torch
  def factory():                 # returns the nn.Module
      return torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
  def loader():                  # returns (X, y) or a DataLoader
      return torch.randn(512, 10), torch.randint(0, 3, (512,))

  curvops report out/ --model mymodel:factory --data mymodel:loader --loss cross_entropy \\
      --checkpoint model.pt --quick

  (--checkpoint: a state dict saved with torch.save(model.state_dict(), "model.pt"); without it
  the report is on the factory's weights and says so.  A spec may also name a file:
  --model path/to/mymodel.py:factory.)

progress: a bar over the sections and one inside the running section (its products).  The
report is written after every section, so an interrupted run (Ctrl-C) keeps the sections done.

data parallel: torchrun --nproc-per-node 2 -m curvops report out/ --model ... --data ... --loss ...
  shards the data over the ranks (the Hessian/GGN sections equal one process's; NTK, active
  subspace and architecture run on rank 0; the landscape is skipped); rank 0 writes the report."""


def _parser() -> argparse.ArgumentParser:
    from ._version import __version__

    parser = argparse.ArgumentParser(prog="curvops", description="Curvature of PyTorch models as lazy operators.")
    parser.add_argument("--version", action="version", version=f"curvops {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    width = max(map(len, SECTION_HELP))
    rep = sub.add_parser(
        "report", help="write an HTML curvature report of a model",
        description="Write a curvature report (index.html, PNG figures, summary.json) of the built-in demo "
                    "model, or of your model with --model/--data/--loss.",
        epilog=_REPORT_EPILOG.format(sections="\n".join(f"  {k:<{width}}  {v}" for k, v in SECTION_HELP.items())),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    rep.add_argument("outdir", nargs="?", default=_DEFAULT_OUTDIR, metavar="OUTDIR",
                     help=f"report directory (default: {_DEFAULT_OUTDIR}/)")
    rep.add_argument("--model", metavar="MODULE:FACTORY", help="callable returning the nn.Module")
    rep.add_argument("--checkpoint", metavar="FILE", help="state dict saved with torch.save (weights_only load)")
    rep.add_argument("--data", metavar="MODULE:LOADER", help="callable returning (X, y) or a DataLoader")
    rep.add_argument("--loss", metavar="NAME", help="mse, cross_entropy or bce_with_logits")
    rep.add_argument("--params", metavar="NAMES", help="comma-separated parameter names (default: all trainable)")
    rep.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    rep.add_argument("--dtype", default=None, help="float32 or float64 (default: the model's own)")
    rep.add_argument("--batch-size", type=int, default=None, metavar="N", help="batch size for (X, y) data")
    rep.add_argument("--top-k", type=int, default=None, metavar="K", help="eigenpairs per spectrum (default 10)")
    rep.add_argument("--quick", action="store_true", help="a fast pass: fewer eigenpairs, coarser grids")
    rep.add_argument("--active-subspace-prior", metavar="PRIOR", default="off",
                     help="the active subspace over parameter draws: standard_normal or around:<sigma> "
                          "(default: off)")
    rep.add_argument("--seed", type=int, default=0, help="seed of every randomized step (default 0)")
    rep.add_argument("--sections", metavar="NAMES", help="comma-separated sections to run (default: all)")
    rep.add_argument("--threads", type=int, default=None, metavar="N",
                     help="CPU threads for torch (default: 1 for the built-in demo model, torch's default otherwise)")
    rep.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    rep.add_argument("--strict", action="store_true", help="stop at the first failing section, with a traceback")
    rep.add_argument("--dist-timeout", type=float, default=None, metavar="SECONDS",
                     help="under torchrun: how long a rank waits for the others in a collective before it gives "
                          "up (default 1800)")
    return parser


def _error(message: str, rank: int = 0) -> int:
    if rank == 0:  # under torchrun only rank 0 speaks
        print(f"curvops report: error: {message}", file=sys.stderr)
    return 2


def _problem(args):
    """(model, loss, data, params, batch_size, source, warnings) for the demo or the user's model."""
    from .report.loading import load_problem, resolve_device, resolve_dtype

    if args.model is None:
        for option in ("data", "checkpoint", "loss"):
            if getattr(args, option) is not None:
                raise ValueError(f"--{option}: given without --model. Pass --model MODULE:FACTORY (with --data "
                                 f"and --loss), or drop --{option} to report on the built-in demo model.")
        import torch

        from .demo import demo_problem

        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype) or torch.float64
        model, X, y = demo_problem(seed=args.seed, dtype=dtype)
        model.to(device)
        params = None if args.params is None else [p.strip() for p in args.params.split(",") if p.strip()]
        if params is not None:
            names = [n for n, _ in model.named_parameters()]
            unknown = [p for p in params if p not in names]
            if unknown or not params:
                raise ValueError(f"--params: expected names of the model's parameters, got {params}. The model has "
                                 f"{names}.")
        source = {"model": "built-in demo: tanh MLP trained on three Gaussian blobs (curvops.demo.demo_problem)",
                  "data": "built-in synthetic blobs", "loss": "cross_entropy"}
        return model, "cross_entropy", (X.to(device), y.to(device)), params, args.batch_size, source, []
    missing = [f"--{o}" for o in ("data", "loss") if getattr(args, o) is None]
    if missing:
        raise ValueError(f"--model: expected {' and '.join(missing)} as well (the data and the loss to measure "
                         f"the model on).")
    if os.getcwd() not in sys.path:  # specs name modules relative to where the command runs
        sys.path.insert(0, os.getcwd())
    p = load_problem(model=args.model, data=args.data, loss=args.loss, checkpoint=args.checkpoint,
                     params=args.params, device=args.device, dtype=args.dtype, batch_size=args.batch_size)
    return p.model, p.loss, p.data, p.params, p.batch_size, p.source, p.warnings


def _report(args) -> int:
    if args.top_k is not None and args.top_k < 1:
        return _error(f"--top-k: expected a positive integer, got {args.top_k}.")
    if args.batch_size is not None and args.batch_size < 1:
        return _error(f"--batch-size: expected a positive integer, got {args.batch_size}.")
    if args.threads is not None and args.threads < 1:
        return _error(f"--threads: expected a positive integer, got {args.threads}.")
    if args.dist_timeout is not None and not args.dist_timeout > 0:
        return _error(f"--dist-timeout: expected a positive number of seconds, got {args.dist_timeout}.")
    from .report.build import SECTIONS
    from .report.sections_prior import parse_prior_option

    try:
        parse_prior_option(args.active_subspace_prior)
    except ValueError as err:
        return _error(f"--active-subspace-prior: {err}")
    sections = None
    if args.sections is not None:
        sections = [s.strip() for s in args.sections.split(",") if s.strip()]
        unknown = [s for s in sections if s not in SECTIONS]
        if unknown or not sections:
            return _error(f"--sections: expected names among {', '.join(SECTIONS)}, got {args.sections!r}.")
    threads = args.threads or (1 if args.model is None else None)  # the demo model is tiny: one thread is fastest
    before = torch_threads()
    try:
        if threads is not None:
            set_torch_threads(threads)
        return _run(args, sections)
    finally:
        set_torch_threads(before)


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def set_torch_threads(n: int) -> None:
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def _run(args, sections) -> int:
    """The report, on one process or, under torchrun (its environment variables) or inside an initialized
    process group, on every rank: data sharded, rank 0 writes and prints, every rank exits alike."""
    from .report import ranks as _ranks

    owned = False
    if _ranks.launched_by_torchrun():
        try:
            owned, args.device = _ranks.init_from_env(args.device, args.dist_timeout or _ranks.DEFAULT_TIMEOUT)
        except (ValueError, RuntimeError) as err:
            return _error(str(err))
    if not owned:
        ranks = _ranks.setup(None, True) if _distributed_world() > 1 else None
        return _run_ranks(args, sections, ranks)
    code = 1
    try:
        code = _run_ranks(args, sections, _ranks.setup(None, True) if _distributed_world() > 1 else None)
    except KeyboardInterrupt:
        code = 130
    except BaseException:  # noqa: BLE001 - printed here: the process ends below without unwinding further
        import traceback

        traceback.print_exc()
    finally:
        _end_torchrun_process(code)
    return code  # not reached


def _end_torchrun_process(code: int) -> None:
    """The end of a ``curvops`` process that torchrun launched and that created the process group.

    Every rank passes a barrier (all done with their last collective), destroys the group and ends
    with ``os._exit`` after flushing its output.  A normal interpreter exit can abort the process
    (SIGABRT, "terminate called without an active exception"): gloo's worker threads may still hold
    work that references Python objects while the interpreter is being torn down.  Seen in the
    torchrun test on a loaded machine in about one run in four, on rank 0 or rank 1, after the
    report was complete.
    """
    import gc

    import torch.distributed as dist

    try:  # every rank done with its last collective before any tears the group down
        dist.barrier()
    except RuntimeError:
        pass  # a rank already failed: its error is what the user sees
    dist.destroy_process_group()
    gc.collect()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _distributed_world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _run_ranks(args, sections, ranks) -> int:
    start = time.perf_counter()
    rank = 0 if ranks is None else ranks.rank
    problem, message = None, None
    try:
        problem = _problem(args)
    except (ValueError, TypeError, ImportError, OSError) as err:
        message = str(err)
    if ranks is not None:  # every rank stops when one could not load its model or data
        failed = [(r, m) for r, m in enumerate(ranks.gather(message)) if m is not None]
        if failed:
            r, m = failed[0]
            return _error(m if r == 0 else f"on rank {r}: {m}", rank)
    elif message is not None:
        return _error(message)
    model, loss, data, params, batch_size, source, warnings = problem
    if ranks is not None:  # the model is ours: every rank measures rank 0's weights, as DDP does
        from .report.ranks import broadcast_model

        broadcast_model(model, ranks.group)
        source = {**source, "ranks": f"{ranks.world} ranks (torch.distributed); the weights broadcast from rank 0"}
    from .report.build import build_report

    try:
        summary = build_report(model, loss, data, args.outdir, quick=args.quick, top_k=args.top_k, params=params,
                               progress=not args.no_progress, seed=args.seed, batch_size=batch_size,
                               strict=args.strict, source=source, sections=sections, warnings=warnings,
                               distributed=ranks is not None, active_subspace_prior=args.active_subspace_prior)
    except (ValueError, TypeError) as err:  # bad settings, raised before any heavy work (or strict)
        if args.strict:
            raise
        return _error(str(err), rank)
    except KeyboardInterrupt:
        if rank == 0:
            print(f"curvops report: interrupted; the sections done are in "
                  f"{os.path.join(args.outdir, 'index.html')} (marked incomplete)", file=sys.stderr)
        return 130
    failed = [n for n, s in summary["sections"].items() if s.get("status") == "error"]
    if rank == 0:
        _print_summary(summary, args.outdir, time.perf_counter() - start)
        if failed:
            print(f"curvops report: sections failed: {', '.join(failed)} (see the report)", file=sys.stderr)
    return 1 if failed else 0


def _print_summary(summary: dict, outdir: str, seconds: float) -> None:
    """The console summary: warnings first, then the headline figures, each with its status."""
    for line in _summary_lines(summary, outdir, seconds):
        print(line)


def _summary_lines(summary: dict, outdir: str, seconds: float) -> list[str]:
    """The lines :func:`_print_summary` prints (every figure with its caveat, as in the HTML)."""
    from .report.html import fmt

    secs = {k: v for k, v in summary["sections"].items() if v.get("status") == "ok"}
    figs = sum(1 for f in summary["figures"].values() if f.get("file"))
    out = [f"curvops report: wrote {os.path.join(outdir, 'index.html')} ({figs} figures, summary.json) "
           f"in {seconds:.1f} s"]
    out += [f"  WARNING: {w}" for w in summary.get("warnings", [])]
    lines = []
    if "overview" in secs:
        o = secs["overview"]
        lines.append(f"model: {o['model_class']}, {o['num_params']} parameters, {fmt(o['num_samples'])} samples; "
                     f"loss {fmt(o['loss'])}, gradient norm {fmt(o['grad_norm'])}")
    if "eigenvalues" in secs:
        e = secs["eigenvalues"]
        for label, key in (("Hessian top eigenvalues: ", "hessian_top"), ("Hessian most negative:   ", "hessian_bottom"),
                           ("GGN top eigenvalues:     ", "ggn_top")):
            caveat = "" if e[key]["converged"] else f" (not converged in {e[key]['num_matvecs']} products)"
            lines.append(label + " ".join(fmt(v) for v in e[key]["eigenvalues"]) + caveat)
    if "trace" in secs:
        t = secs["trace"]
        lines.append(f"trace: Hessian {fmt(t['hessian']['value'])} ± {fmt(t['hessian']['stderr'])}, "
                     f"GGN {fmt(t['ggn']['value'])} ± {fmt(t['ggn']['stderr'])} (± one standard error)")
    for key, name in (("ggn", "GGN"), ("hessian", "Hessian")):
        if "condition" in secs:
            c = secs["condition"][key]
            lines.append(f"{name}: condition number {c['display']} ({c['caveat']})")
        if "rank" in secs:
            r = secs["rank"][key]
            lines.append(f"{name}: rank {r['display']} ({r['caveat']})")
    if "stationary" in secs:
        s = secs["stationary"]
        caveat = "" if s["converged"] else " (eigensolver not converged)"
        lines.append(f"point: {s['kind'].replace('_', ' ')} (curvature: {s['curvature']}){caveat}")
    if "ntk" in secs:
        n = secs["ntk"]
        how = "all eigenvalues, dense" if n["complete"] else n["method"]
        lines.append(f"NTK ({n['size']}×{n['size']}): largest eigenvalue {fmt(n['largest'])} ({how})")
    for name, s in summary["sections"].items():
        if s.get("status") == "error":
            lines.append(f"{name}: FAILED ({s.get('message')}) — details in the report")
        elif s.get("status") != "ok":
            lines.append(f"{name}: {s['status']} ({s.get('message')})")
    return out + ["  " + line for line in lines]


def main(argv: list[str] | None = None) -> int:
    """Run the ``curvops`` command with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse: --help / --version (0) or a usage error (2)
        return int(exit_.code or 0)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return _report(args)


if __name__ == "__main__":
    raise SystemExit(main())
