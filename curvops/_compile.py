r"""The ``torch.compile`` path of an :class:`~curvops.Objective` (opt-in: ``compile=True``).

What is compiled: one **whole per-batch product** as a pure function of the parameters, the data
and the probe columns, written with :mod:`torch.func` so that a single graph holds the forward,
the loss and every derivative of the product:

* ``"gradient"``: ``grad(ℓ_b)(θ)``;
* ``"hessian"``: ``H_b V``, reverse-over-reverse: the pullback of ``grad(ℓ_b)`` applied to the
  K columns (vmapped).  Forward-over-reverse (``jvp(grad)``) is not used: in torch 2.13 it is
  wrong through LayerNorm;
* ``"ggn"``: ``J_bᵀ H_ℓ J_b V``: ``jvp`` of the forward for ``J V`` (vmapped over the columns),
  the loss Hessian in output space by ``vjp(grad)`` of the loss (exact for every loss), and the
  forward's pullback for ``Jᵀ``.

``ℓ_b`` is the user's loss on batch ``b`` exactly as :meth:`Objective.forward` and the loss
compute it; the batch loop, the weights ``w_b`` and the whole-data normalization stay in eager
Python (:meth:`Objective.accumulate`), so the compiled graph sees one batch and does not depend
on the number of batches.

Why not compile ``Objective.forward`` alone: autograd's double backward (the eager Hessian's
kernel) does not run through an AOT-compiled graph ("torch.compile with aot_autograd does not
currently support double backward"), and forward-mode dual tensors do not pass into one either.
A product compiled as one torch.func function has neither problem.

Graph breaks: with its validation off, ``Objective.forward`` + the loss trace as one graph for
MLPs, conv nets with BatchNorm and HuggingFace GPT-2 (``torch._dynamo.explain``: 1 graph, 0
breaks).  The validation (target shapes and class ranges: ``nonzero`` and ``.item()``, five
breaks) runs eagerly, only on the passes that validate (the first over fixed data), on one extra
forward without gradients.

Every input of the graph — the selected parameters, the other parameters, the buffers, the
batch and the columns — is an argument of the compiled function, re-read from the model before
every pass, so in-place updates, ``p.data = …`` and ``load_state_dict`` reach the graph without
a recompilation (contract rule 9).  Each objective compiles its own copy of the kernels (its
own code objects), so the compile caches of different objectives do not share dynamo's
recompilation limit.

Fallback: when dynamo, the compiler or torch.func fails on the model (a legacy
``autograd.Function``, data-dependent control flow, no C compiler), a warning names the reason
once and every later product of the objective runs on the eager path.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Mapping
from typing import Callable

import torch
from torch import Tensor

from ._modes import usable

_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_KEYS = ("mode", "backend", "fullgraph", "dynamic", "options")
KINDS = ("gradient", "hessian", "ggn")


def compile_options(value) -> dict | None:
    """``compile=`` of an Objective → keyword arguments of ``torch.compile`` (None: eager).

    ``False``/``None``: eager; ``True``: ``torch.compile`` defaults with ``fullgraph=True`` and
    ``dynamic=False`` (one static graph per shape: the dynamic-shape recompilation of a product's
    graph failed in torch 2.13 when the number of columns changed, e.g. 1 → 16); a mode
    name (``"reduce-overhead"``: CUDA graphs, for small models on a GPU); or a dict of
    ``torch.compile`` keywords (``mode``, ``backend``, ``fullgraph``, ``dynamic``, ``options``).
    """
    if value is None or value is False:
        return None
    if value is True:
        opts = {}
    elif isinstance(value, str):
        opts = {"mode": value}
    elif isinstance(value, Mapping):
        unknown = sorted(set(value) - set(_KEYS))
        if unknown:
            raise ValueError(f"Objective: compile= got unknown torch.compile keywords {unknown}; expected some of "
                             f"{list(_KEYS)}.")
        opts = dict(value)
    else:
        raise TypeError(f"Objective: compile= expected True/False, a mode name or a dict of torch.compile "
                        f"keywords, got {type(value).__name__}.")
    mode = opts.get("mode")
    if mode is not None and mode not in _MODES:
        raise ValueError(f"Objective: compile mode {mode!r} is not one of {list(_MODES)}.")
    return {"fullgraph": True, "dynamic": False, **opts}


def _fresh(fn: Callable) -> Callable:
    """``fn`` with its own code object: dynamo keeps compiled graphs (and counts recompilations)
    per code object, so each objective gets its own cache."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__,
                              fn.__closure__)


def _kernels(obj) -> dict[str, Callable]:
    """The pure per-batch kernels of an objective (θ a tuple in layout order, ``rest`` the other
    parameters and the buffers, ``Vs`` per-parameter columns ``[K, *shape]``)."""
    from torch.func import grad, jvp, vjp, vmap

    names = obj.layout.names
    loss_fn = obj.loss_fn

    def forward(theta, rest, x):
        p = dict(zip(names, theta))
        p.update(rest)
        return obj._call_model(p, x)

    def batch_loss(theta, rest, x, y):
        return loss_fn(forward(theta, rest, x), y).reshape(())

    def gradient(theta, rest, x, y):
        return grad(batch_loss)(theta, rest, x, y)

    def hessian(theta, rest, x, y, Vs):
        _, pull = vjp(lambda th: grad(batch_loss)(th, rest, x, y), theta)
        return vmap(lambda *v: pull(v)[0])(*Vs)

    def ggn(theta, rest, x, y, Vs):
        def f(th):
            return forward(th, rest, x)

        def column(*v):
            out, jv = jvp(f, (theta,), (v,))
            # H_ℓ (J v) reverse-over-reverse (jvp(grad(mse_loss)) fails on torch 2.13: "ZeroTensors are
            # immutable"; under torch.compile it crashed)
            mjv = vjp(grad(lambda o: loss_fn(o, y).reshape(())), out)[1](jv)[0]
            return vjp(f, theta)[1](mjv)[0]

        if Vs[0].shape[0] == 1:  # one column without vmap (inductor crashed on a vmap of one)
            return tuple(r[None] for r in column(*(v[0] for v in Vs)))
        return vmap(column)(*Vs)

    return {"gradient": gradient, "hessian": hessian, "ggn": ggn}


class CompiledPasses:
    """Compiled whole-data passes of one objective (``objective.compiled``).

    :meth:`gradient` and :meth:`matmat` return None when the compiled path is not available (it
    failed once on this model: ``failure`` says why, and a warning said so), and the caller then
    runs its eager path.  ``last_path`` names the kernel of the last compiled pass.
    """

    def __init__(self, objective, options: dict):
        self.objective = objective
        self.options = options
        self.failure: str | None = None
        self.last_path: str | None = None
        self._compiled: dict[str, Callable] = {}

    @property
    def mode(self) -> str:
        return self.options.get("mode") or "default"

    def _kernel(self, kind: str) -> Callable:
        fn = self._compiled.get(kind)
        if fn is None:
            fn = torch.compile(_fresh(_kernels(self.objective)[kind]), **self.options)
            self._compiled[kind] = fn
        return fn

    def _call(self, kind: str, *args):
        if self.mode == "reduce-overhead" and self.objective.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # outputs are copied (joined) before the next call
        try:
            return self._kernel(kind)(*args)
        except Exception as err:  # dynamo / the compiler / torch.func refused the model
            raise _CompileFailed(err) from err

    def _validate(self, theta, batch) -> None:
        """The checks the compiled graph leaves out (they break graphs): eagerly, without gradients,
        on the passes that validate."""
        obj = self.objective
        if obj._checking:
            with torch.no_grad():
                obj.loss(obj.forward(theta, batch.x), batch.y, batch.index)

    def _rest(self) -> dict[str, Tensor]:
        obj = self.objective
        rest = dict(obj._constants)
        if obj._source is None:
            rest.update(obj._buffers)
        return rest

    def _run(self, kind: str, shape: tuple, per_batch: Callable) -> Tensor | None:
        """One compiled pass (None: not available; the caller runs its eager path)."""
        if self.failure is not None:
            return None
        obj = self.objective
        if obj.loss_fn is None:
            return None
        try:
            with obj.session():
                theta = tuple(obj.theta())
                rest = self._rest()

                def step(batch):
                    self._validate(theta, batch)
                    return per_batch(theta, rest, batch)

                out = obj.accumulate(step, shape)
        except _CompileFailed as failed:  # (errors of the eager validation propagate as they are)
            err = failed.__cause__
            text = str(err).strip()
            self.failure = f"{type(err).__name__}: {text.splitlines()[0][:300] if text else ''}"
            warnings.warn(f"curvops: compile=True: torch.compile failed on this model ({self.failure}); this "
                          f"objective's products run eagerly from now on.", RuntimeWarning, stacklevel=4)
            return None
        self.last_path = f"compiled {kind} (torch.func + torch.compile, mode {self.mode!r})"
        return out

    def gradient(self) -> Tensor | None:
        """∇L(θ) (flat) from the compiled per-batch gradient, or None (run the eager one)."""
        def per_batch(theta, rest, batch):
            g = self._call("gradient", theta, rest, batch.x, batch.y)
            return torch.cat([t.reshape(-1) for t in g])

        return self._run("gradient", (self.objective.num_params,), per_batch)

    def matmat(self, kind: str, V: Tensor, max_columns: int = 64) -> Tensor | None:
        """``A @ V`` for ``kind`` in ``"hessian"``, ``"ggn"`` (``V``: [P, K]), normalized like the
        loss; columns in chunks of ``max_columns``; or None (run the eager product)."""
        if kind not in ("hessian", "ggn"):
            raise ValueError(f"CompiledPasses.matmat: kind must be 'hessian' or 'ggn', got {kind!r}.")
        obj = self.objective
        V = usable(V)  # an inference tensor of the caller: a normal copy (else a recompilation)
        P, K = V.shape
        layout = obj.layout

        def per_batch(theta, rest, batch):
            cols = []
            for s in range(0, K, max_columns):
                block = V[:, s:s + max_columns]
                k = block.shape[1]
                Vs = tuple(p.T.reshape(k, *shape)
                           for p, shape in zip(torch.split(block, list(layout.numels)), layout.shapes))
                res = self._call(kind, theta, rest, batch.x, batch.y, Vs)
                cols.append(torch.cat([r.reshape(k, -1) for r in res], dim=1).T)
            return cols[0] if len(cols) == 1 else torch.cat(cols, dim=1)

        return self._run(kind, (P, K), per_batch)


class _CompileFailed(Exception):
    """A compiled kernel failed (the cause is chained); the pass falls back to eager."""


class Compilable:
    """Mixin of :class:`~curvops.Objective`: ``compile=`` and ``self.compiled``."""

    def _init_compile(self, value) -> None:
        options = compile_options(value)
        self.compiled: CompiledPasses | None = None
        if options is None:
            return
        if getattr(self, "process_group", None) is not None:
            raise ValueError("Objective: compile=True does not combine with a process group (data parallelism) "
                             "yet; pass compile=False.")
        if self.stochastic_modules():
            warnings.warn("curvops: compile=True is ignored for a model with dropout or train-mode BatchNorm "
                          "(compiled random numbers differ from eager ones); products run eagerly.",
                          RuntimeWarning, stacklevel=3)
            return
        self.compiled = CompiledPasses(self, options)
