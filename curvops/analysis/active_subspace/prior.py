r"""The active subspace over a prior on the *parameters* (``seeds/002`` as written).

.. math:: C = \int \nabla L(\theta)\,\nabla L(\theta)^\top \rho(\theta)\,d\theta
          \approx \frac{1}{N}\sum_{j=1}^N \nabla L(\theta_j)\nabla L(\theta_j)^\top = \frac{1}{N} G^\top G,

with L the whole-data loss (normalized like the loss: the mean over the data set for a mean loss)
and θ_j ∼ ρ drawn over the flat selected parameters (layout order).  This is not the data-sample
matrix of :func:`~curvops.analysis.active_subspace.active_subspace` without ``prior=``: there the
parameters are fixed and the average runs over data samples x ∼ ρ (``sampler=`` draws *inputs*);
here the data set is fixed and the average runs over parameter draws θ ∼ ρ (``prior=`` draws
*parameters*).

Priors (the ``prior=`` argument):

* ``"standard_normal"``: θ ∼ N(0, I) (the seed's ρ);
* ``("around", σ)``: θ ∼ N(θ₀, σ²I) with θ₀ the model's current parameters — local
  sensitivity of the loss around a trained point.  For small σ, ∇L(θ₀ + σz) ≈ ∇L(θ₀) + σHz, so
  C ≈ ∇L∇Lᵀ + σ²H² (H the Hessian at θ₀): a rank-one gradient term plus the squared Hessian,
  whereas the data-sample matrix is the empirical Fisher (1/n)Σ∇ℓ_i∇ℓ_iᵀ at θ₀;
* a callable ``sampler(n, generator) -> Tensor[n, P]`` returning flat parameter vectors; it is
  called once, with n = ``num_samples``, and exactly the rows it returns are used (cast to the
  parameters' dtype and device).

Draws of the built-in priors come in fixed blocks of :data:`DRAW_BLOCK` rows, each from its own
seed taken from the caller's generator, so they are regenerated on demand (the matrix-free path
never holds all N×P of them) and do not depend on ``chunk_size``.

Gradients: ``vmap`` over the θ axis of ``grad`` of one batch's loss (``functional_call`` with
the draw's parameters), the data loop inside, summed with the objective's batch weights ``w_b``
and normalized like the loss; ``chunk_size`` draws at a time bound the memory.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor
from torch.func import grad, vmap
from torch.utils._pytree import tree_leaves

from ...objective import Objective
from ...operators import tags as _tags
from ...operators._curvature import make_objective
from ...operators.base import Operator

#: rows per block of built-in prior draws (each block from its own seed)
DRAW_BLOCK = 256
#: at most this many threads generate draw blocks at once
_MAX_DRAW_THREADS = 8
PRIORS = ("standard_normal", ("around", "σ"), "sampler(n, generator) -> Tensor[n, P]")


_POOL: ThreadPoolExecutor | None = None


def _draw_pool() -> ThreadPoolExecutor:
    """The threads that draw prior blocks (made once; a forked child makes its own)."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(_MAX_DRAW_THREADS, thread_name_prefix="curvops-draws")
    return _POOL


def _forget_pool() -> None:
    global _POOL
    _POOL = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


@dataclass(frozen=True)
class _Prior:
    kind: str  # "standard_normal" | "around" | "callable"
    scale: float = 1.0
    sampler: Callable | None = None

    @property
    def description(self) -> str:
        return {"standard_normal": "θ ~ N(0, I)", "around": f"θ ~ N(θ₀, {self.scale:g}² I)",
                "callable": "θ from a callable sampler"}[self.kind]


def _parse_prior(prior, api: str) -> _Prior:
    """``"standard_normal"``, ``("around", σ)`` or a callable → :class:`_Prior` (errors name the spellings)."""
    if isinstance(prior, _Prior):
        return prior
    if isinstance(prior, str):
        if prior == "standard_normal":
            return _Prior("standard_normal")
        if prior == "around":
            raise ValueError(f"{api}: prior='around' needs a scale: pass prior=('around', sigma), e.g. "
                             f"('around', 0.1) for θ ~ N(θ₀, 0.01 I).")
        raise ValueError(f"{api}: expected prior to be 'standard_normal', ('around', sigma) or a callable "
                         f"sampler(n, generator) -> Tensor[n, P], got {prior!r}.")
    if isinstance(prior, tuple) and len(prior) == 2 and prior[0] == "around":
        s = prior[1]
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not (s > 0 and math.isfinite(s)):
            raise ValueError(f"{api}: expected prior=('around', sigma) with a positive, finite sigma, got {prior!r}.")
        return _Prior("around", float(s))
    if callable(prior):
        return _Prior("callable", sampler=prior)
    raise TypeError(f"{api}: expected prior to be 'standard_normal', ('around', sigma) or a callable "
                    f"sampler(n, generator) -> Tensor[n, P], got {type(prior).__name__}: {prior!r}.")


def _check_num_samples(num_samples, api: str) -> int:
    if num_samples is None:
        raise ValueError(f"{api}: prior= needs num_samples (how many parameter draws θ ~ ρ), got None.")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"{api}: expected num_samples to be a positive integer (parameter draws), got "
                         f"{num_samples!r}.")
    return num_samples


def _check_chunk(chunk_size, api: str) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{api}: expected chunk_size to be a positive integer (draws per vmapped chunk) or None, "
                         f"got {chunk_size!r}.")


class _Draws:
    """N parameter draws, fixed once: rows produced on demand (built-in priors) or held (a callable)."""

    def __init__(self, prior: _Prior, num_samples: int, objective: Objective, generator: torch.Generator, api: str):
        self.prior, self.N, self.P = prior, num_samples, objective.num_params
        self.dtype, self.device = objective.dtype, objective.device
        self.objective = objective
        self.held: Tensor | None = None
        self._cache: tuple[int, Tensor] | None = None
        if prior.kind == "callable":
            self.held = self._call_sampler(prior.sampler, generator, api)
        else:
            blocks = -(-num_samples // DRAW_BLOCK)
            self.seeds = torch.randint(0, 2**62, (blocks,), generator=generator).tolist()

    def _call_sampler(self, sampler: Callable, generator, api: str) -> Tensor:
        out = sampler(self.N, generator)
        if not isinstance(out, Tensor):
            raise TypeError(f"{api}: expected prior(n, generator) to return a Tensor[n, P] of flat parameter "
                            f"vectors, got {type(out).__name__}.")
        if tuple(out.shape) != (self.N, self.P):
            raise ValueError(f"{api}: expected prior({self.N}, generator) to return shape ({self.N}, {self.P}) "
                             f"(num_samples × selected parameters, layout order), got {tuple(out.shape)}.")
        if not out.is_floating_point() or not bool(torch.isfinite(out).all()):
            raise ValueError(f"{api}: expected the prior's draws to be finite floating-point values, got "
                             f"{out.dtype}{' with NaN/Inf' if out.is_floating_point() else ''}.")
        return out.detach().to(dtype=self.dtype, device=self.device)

    def _generate(self, b: int, out: Tensor | None = None) -> Tensor:
        """Block b (CPU), into ``out`` (a contiguous ``[rows, P]``) when given."""
        rows = min(DRAW_BLOCK, self.N - b * DRAW_BLOCK)
        gen = torch.Generator().manual_seed(int(self.seeds[b]))
        return torch.randn(rows, self.P, generator=gen, dtype=self.dtype, out=out)

    def rows(self, start: int, stop: int, theta0: Tensor | None = None) -> Tensor:
        """Draws ``start … stop − 1`` as ``[stop − start, P]`` (θ₀ = the model's current flat parameters).

        Whole blocks are drawn straight into the output, several at once on up to
        ``torch.get_num_threads()`` threads (torch's float64 normal sampler runs on one thread: at
        the seed's size 0.9 s of the 3 s of plain gradients); each block has its own generator, so
        the rows are the same whatever the order, the threads or the chunk size.  A block cut by
        ``start``/``stop`` is drawn whole and kept for the next call.
        """
        if self.held is not None:
            return self.held[start:stop]
        Z = torch.empty(stop - start, self.P, dtype=self.dtype)
        whole, cut = [], []
        for b in range(start // DRAW_BLOCK, (stop - 1) // DRAW_BLOCK + 1):
            lo, hi = b * DRAW_BLOCK, min(self.N, (b + 1) * DRAW_BLOCK)
            (whole if start <= lo and hi <= stop else cut).append((b, lo, hi))
        for b, lo, hi in cut:
            if self._cache is None or self._cache[0] != b:
                self._cache = (b, self._generate(b))
            a, e = max(start, lo), min(stop, hi)
            Z[a - start:e - start] = self._cache[1][a - lo:e - lo]
        workers = min(len(whole), torch.get_num_threads(), _MAX_DRAW_THREADS)
        if workers > 1:
            list(_draw_pool().map(lambda t: self._generate(t[0], Z[t[1] - start:t[2] - start]), whole))
        else:
            for b, lo, hi in whole:
                self._generate(b, Z[lo - start:hi - start])
        Z = Z.to(self.device)
        if self.prior.kind == "around":
            return theta0[None] + self.prior.scale * Z
        return Z

    def all(self) -> Tensor:
        """All N draws ``[N, P]`` (N·P memory)."""
        theta0 = _flat_theta(self.objective) if self.prior.kind == "around" else None
        return self.rows(0, self.N, theta0)


def _flat_theta(obj: Objective) -> Tensor:
    return torch.cat([t.reshape(-1) for t in obj.theta()]).detach()


def _whole_blocks(c: int) -> int:
    """``c`` rounded down to a power of two times :data:`DRAW_BLOCK` when that leaves at least one block."""
    if c < DRAW_BLOCK:
        return max(1, c)
    return DRAW_BLOCK * 2 ** int(math.log2(c // DRAW_BLOCK))


def default_chunk_size(P: int) -> int:
    """Draws per vmapped chunk before the workspace is measured: at most 2²² gradient entries and
    1024 draws, in whole draw blocks (a power of two of them, drawn two or four at once).  At the
    seed's size (P = 5146): 512 draws — measured 35 % faster than 815 (the vmapped workspace stays
    in cache) and 10 % faster than 768 (three blocks on two threads wait for the third).
    :meth:`PriorGradientCovariance.resolve_chunk_size` lowers it to fit the memory budget."""
    return _whole_blocks(max(1, min(1024, 2**22 // max(1, P))))


def workspace_per_draw(obj: Objective) -> int:
    """Bytes one draw adds to a vmapped chunk (an estimate, measured once on one batch: the largest
    of a list of batches held in memory, the first of a loader).

    Three times what autograd saves for one draw's loss on that batch (the activations the
    backward reads; counted with saved-tensor hooks on one plain forward, the model's buffers put
    back afterwards), plus three P-vectors (the draw, its gradient, the chunk's copy).  Calibrated
    against the rise of the peak resident memory over one chunk (128–512 draws of 100–5000-point
    batches of tanh MLPs with 1741–40 701 parameters): within −17 % … +3 %.
    """
    from ...operators._graph_cache import SavedBytes

    item = torch.empty((), dtype=obj.dtype).element_size()
    vectors = 3 * obj.num_params * item
    with obj.session():
        batches = iter(obj.batches())
        batch = next(batches, None)
        if batch is None:  # an empty shard (distributed): nothing to run
            return vectors
        if obj._fixed_data:  # batches held in memory: measure on the largest (a loader: on its first)
            for b in batches:
                batch = b if b.n > batch.n else batch
        buffers = [(b, b.detach().clone()) for b in obj.model.buffers()] if isinstance(obj.model, torch.nn.Module) \
            else []
        theta = [t.detach().clone().requires_grad_(True) for t in obj.theta()]
        data = [t for t in tree_leaves((batch.x, batch.y)) if isinstance(t, Tensor)]
        exclude = {t.untyped_storage().data_ptr() for t in [*theta, *data, *obj._state_tensors()]}
        try:
            with SavedBytes(exclude) as saved:
                obj.loss(obj.forward(theta, batch.x), batch.y, batch.index)
        except Exception:  # noqa: BLE001 - a model a plain forward cannot run: the vectors alone (as before
            return vectors  # the measurement); the gradient pass itself reports what is wrong
        finally:
            with torch.no_grad():
                for b, value in buffers:
                    b.copy_(value)
    return 3 * saved.nbytes + vectors


def _batch_gradients(obj: Objective) -> Callable:
    """``(Θ [c, P], batch) -> [c, P]``: the gradient of one batch's loss at each of c draws (vmapped)."""
    numels, shapes = list(obj.layout.numels), list(obj.layout.shapes)

    def batch_loss(flat: Tensor, x, y, index: int) -> Tensor:
        theta = [t.reshape(s) for t, s in zip(torch.split(flat, numels), shapes)]
        return obj.loss(obj.forward(theta, x), y, index)

    fn = vmap(grad(batch_loss), in_dims=(0, None, None, None))
    return lambda Theta, batch: fn(Theta, batch.x, batch.y, batch.index)


def gradient_chunks(obj: Objective, draws: _Draws, chunk_size: int | None) -> Iterator[Tensor]:
    """The whole-data gradients ``∇L(θ_j)`` chunk by chunk, ``[c, P]`` each, in draw order.

    Per chunk one pass over the data (the data loop inside: Σ_b w_b ∇ℓ_b / Σ_b w_b, as the loss).
    """
    chunk = default_chunk_size(draws.P) if chunk_size is None else chunk_size
    with obj.session():
        fn = _batch_gradients(obj)
        theta0 = _flat_theta(obj) if draws.prior.kind == "around" else None
        for s in range(0, draws.N, chunk):
            Theta = draws.rows(s, min(draws.N, s + chunk), theta0)
            # with the shape, a rank whose shard is empty still joins the all-reduce
            yield obj.accumulate(lambda b: fn(Theta, b), (Theta.shape[0], obj.num_params)).detach()


class PriorGradientCovariance(Operator):
    r"""The active-subspace matrix over a parameter prior, matrix-free over a fixed set of draws.

    .. math:: A = \frac{1}{N}\sum_{j=1}^N \nabla L(\theta_j)\,\nabla L(\theta_j)^\top,
              \qquad \theta_j \sim \rho \ \text{(drawn once, at construction)},

    L the whole-data loss of the objective (module docstring: :mod:`.prior`).  The draws are fixed;
    with ``("around", σ)`` they are θ₀ + σz_j with z_j fixed and θ₀ the model's parameters at the
    moment of each product (the operator follows the model).

    **Cost**: a product with K columns computes the N whole-data gradients once (chunks of
    ``chunk_size`` vmapped draws, one data pass each) and multiplies each chunk G_c by V and back:
    N gradients + O(N·P·K); memory O(chunk·P + P·K), never N×P (for the built-in priors; a callable
    prior's N draws are held).  :meth:`gradients` returns G itself.

    **Tags**: symmetric, psd.

    Args:
        model_or_objective, loss, data, **objective_kwargs: as for :class:`~curvops.Hessian`.
        prior: ``"standard_normal"``, ``("around", sigma)`` or a callable ``sampler(n, generator)
            -> Tensor[n, P]`` (flat selected parameters, layout order).
        num_samples: N, the number of parameter draws.
        generator: the random source of the draws (default ``torch.Generator().manual_seed(0)``).
        chunk_size: draws per vmapped chunk (default: :meth:`resolve_chunk_size` — at most 2²²
            gradient entries, whole draw blocks, and a measured workspace within half the memory
            budget).

    Raises:
        ValueError, TypeError: a bad prior, num_samples or chunk_size; a sampler returning the
            wrong shape, kind or non-finite values.

    Example:
        >>> A = PriorGradientCovariance(model, "mse", (X, y), prior="standard_normal",
        ...                             num_samples=1000)                       # doctest: +SKIP
        >>> A @ v                                                                 # doctest: +SKIP
    """

    def __init__(self, model_or_objective, loss=None, data=None, *, prior="standard_normal",
                 num_samples: int | None = None, generator: torch.Generator | None = None,
                 chunk_size: int | None = None, **objective_kwargs):
        api = "PriorGradientCovariance"
        spec = _parse_prior(prior, api)
        N = _check_num_samples(num_samples, api)
        _check_chunk(chunk_size, api)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"{api}: expected a torch.Generator, got {type(generator).__name__}.")
        obj = make_objective(model_or_objective, loss, data, **objective_kwargs)
        if obj.loss_fn is None:
            raise ValueError(f"{api}: the whole-data loss needs a loss; pass loss=.")
        P = obj.num_params
        super().__init__((P, P), obj.dtype, obj.device, tags=(_tags.PSD,), domain=obj.layout, range=obj.layout)
        self.objective, self.prior, self.num_samples, self.chunk_size = obj, spec, N, chunk_size
        self.process_group = obj.process_group  # linalg draws rank-consistent probes on a distributed operator
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        self.draws = _Draws(spec, N, obj, gen, api)
        self._auto_chunk: int | None = None
        self._per_draw: int | None = None

    def resolve_chunk_size(self, memory_budget: int | None = None) -> int:
        """The draws per vmapped chunk every pass uses: ``chunk_size`` when given, else
        :func:`default_chunk_size` lowered until the chunk's measured workspace
        (:func:`workspace_per_draw`) fits half of ``memory_budget`` (default 1 GiB), in whole draw
        blocks.  Decided once (the first call fixes it)."""
        if self.chunk_size is not None:
            return self.chunk_size
        if self._auto_chunk is None:
            from .plan import DEFAULT_MEMORY_BUDGET

            budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else int(memory_budget)
            fits = (budget // 2) // max(1, self.workspace_per_draw())
            self._auto_chunk = min(default_chunk_size(self.shape[0]), _whole_blocks(fits))
        return self._auto_chunk

    def workspace_per_draw(self) -> int:
        """Bytes one draw adds to a vmapped chunk (:func:`workspace_per_draw`, measured once; with a
        process group the largest over the ranks, so that every rank runs the same chunks — each
        chunk's pass ends in one all-reduce)."""
        if self._per_draw is None:
            if self.process_group is None:
                self._per_draw = workspace_per_draw(self.objective)
            else:
                from ..._distributed import max_over_ranks

                self._per_draw = max_over_ranks(self.process_group, lambda: workspace_per_draw(self.objective),
                                                self.device, "PriorGradientCovariance")
        return self._per_draw

    def gradient_chunks(self) -> Iterator[Tensor]:
        """``∇L(θ_j)`` for the fixed draws, ``[c, P]`` per chunk, in draw order (one data pass per chunk)."""
        return gradient_chunks(self.objective, self.draws, self.resolve_chunk_size())

    def gradients(self) -> Tensor:
        """``G [N, P]``: row j = ∇L(θ_j) (N·P memory)."""
        G = torch.empty(self.num_samples, self.shape[0], dtype=self.torch_dtype, device=self.device)
        row = 0
        for Gc in self.gradient_chunks():
            G[row:row + Gc.shape[0]] = Gc
            row += Gc.shape[0]
        return G

    def parameter_draws(self) -> Tensor:
        """The N draws ``[N, P]`` (θ₀ read now for ``("around", σ)``)."""
        return self.draws.all()

    def _matmat_torch(self, V: Tensor) -> Tensor:
        out = torch.zeros(self.shape[0], V.shape[1], dtype=V.dtype, device=V.device)
        for Gc in self.gradient_chunks():
            out.addmm_(Gc.T, Gc @ V)
        return out / self.num_samples


def prior_gradients(model_or_objective, loss=None, data=None, *, prior="standard_normal",
                    num_samples: int | None = None, generator: torch.Generator | None = None,
                    chunk_size: int | None = None, **objective_kwargs) -> tuple[Tensor, Tensor]:
    r"""The whole-data loss gradients at N parameter draws: ``(G [N, P], Θ [N, P])``.

    Row j of G is ∇L(θ_j) (layout order), θ_j row j of Θ; ``G.T @ G / N`` is the prior
    active-subspace matrix.  The same draws as :func:`active_subspace` with the same ``prior``,
    ``num_samples`` and ``generator``.

    **Cost**: N whole-data gradients (chunks of vmapped draws, one data pass per chunk);
    memory 2·N·P.

    Example:
        >>> G, Theta = prior_gradients(model, "mse", (X, y), num_samples=100)    # doctest: +SKIP
    """
    A = PriorGradientCovariance(model_or_objective, loss, data, prior=prior, num_samples=num_samples,
                                generator=generator, chunk_size=chunk_size, **objective_kwargs)
    return A.gradients(), A.parameter_draws()


__all__ = ["PriorGradientCovariance", "prior_gradients", "DRAW_BLOCK"]
