r"""The empirical neural tangent kernel $K = J J^\top$ and its cross-kernel $J_1 J_2^\top$."""

from __future__ import annotations

import torch
from torch import Tensor

from .._modes import product_mode
from . import tags as _tags
from .base import MAX_DENSE_ENTRIES, Operator
from .jacobian import Jacobian


class NTK(Operator):
    r"""Empirical NTK of a model on inputs X1 (and X2 for the cross-kernel).

    .. math:: K(X_1, X_2) = J(X_1)\, J(X_2)^\top \in \mathbb{R}^{(N_1 C) \times (N_2 C)},
        \qquad J = \partial f / \partial\theta

    Rows/columns are sample-major (``i·C + c``). ``output_reduction="sum"|"mean"`` takes the
    kernel of the per-sample summed / averaged output (N₁×N₂): the C×C structure summed out.

    **Cost**: matrix-free, a product is one VJP pass over X2 (Jᵀ V) and one forward-mode pass over
    X1 (J ·); blocks of columns are vmapped. With ``cache_features=True`` (default) the first
    product (or :meth:`to_dense`) collects per-layer features within ``memory_budget`` bytes (one
    forward and C VJPs per batch, see :meth:`to_dense`); later products are a few small matrix
    products on them, far cheaper than a pass over the data. The cache is dropped when a
    parameter or buffer changes (compared by value before every product); models the features do not fit run matrix-free.

    **Tags**: symmetric, psd when X2 is None (K(X, X)); none for a cross-kernel.

    Args:
        model: an ``nn.Module`` or ``f(params, x)`` (then ``params=`` is its parameter dict).
        X1, X2: inputs (tensor, tuple/dict of tensors, or a list of input batches / DataLoader).
        params: parameter selection as in :class:`~curvops.Objective`.
        output_reduction: ``None``, ``"sum"`` or ``"mean"`` over each sample's outputs.
        batch_size: split tensor inputs into batches of this size.
        memory_budget: bytes the per-layer features (and explicit Jacobian rows) may use.
        cache_features: keep the features between products (see Cost).

    Example:
        >>> import torch, curvops
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
        >>> X, y = torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 2, (16,))
        >>> K = curvops.NTK(model, X)                           # (N·C) × (N·C) = J Jᵀ
        >>> K.shape, K.is_psd
        ((32, 32), True)
        >>> Jd = curvops.Jacobian(model, X).to_dense()
        >>> torch.allclose(K.to_dense(), Jd @ Jd.T)
        True
        >>> curvops.NTK(model, X[:5], X[5:], output_reduction="sum").shape   # a cross-kernel
        (5, 11)
    """

    def __init__(self, model, X1, X2=None, *, params=None, output_reduction: str | None = None,
                 batch_size: int | None = None, output=None, memory_budget: int = 2**28,
                 cache_features: bool = True, max_columns: int = 256, **kwargs):
        common = dict(params=params, batch_size=batch_size, output=output, **kwargs)
        self.J1 = Jacobian(model, X1, output_reduction=output_reduction, max_columns=max_columns, **common)
        self.J2 = self.J1 if X2 is None else Jacobian(model, X2, output_reduction=output_reduction,
                                                       max_columns=max_columns, **common)
        if self.J1.out_shape != self.J2.out_shape:
            raise ValueError(f"NTK: outputs on X1 and X2 differ in shape: {self.J1.out_shape} vs {self.J2.out_shape}.")
        tags = (_tags.PSD,) if X2 is None else ()
        super().__init__((self.J1.shape[0], self.J2.shape[0]), self.J1.torch_dtype, self.J1.device, tags=tags)
        self.memory_budget = int(memory_budget)
        self.cache_features = cache_features
        self._cached = None  # (state versions, feats1, feats2) or (versions, None, None) if unfit
        self._over_budget = False  # the features are factorizable but exceed memory_budget

    @property
    def objective(self):
        return self.J1.objective

    def _features(self):
        """(feats1, feats2) for the current parameters, or (None, None) when not factorizable."""
        from ._autodiff import functorch_ok
        if not functorch_ok(self.objective):
            self._over_budget = False
            return None, None
        obj = self.objective
        if self._cached is not None and obj.state_matches(self._cached[0]):
            return self._cached[1], self._cached[2]
        stamp = obj.state_stamp() if self.cache_features else None
        self._over_budget = False
        try:
            f1 = _features(self.J1, self.memory_budget)
            f2 = f1 if (f1 is None or self.J2 is self.J1) else _features(self.J2, self.memory_budget)
            self._over_budget = f1 is None or f2 is None
        except _NotFactorizable:
            f1 = f2 = None
        except RuntimeError as err:  # torch.func refuses the model (a legacy autograd.Function): matrix-free
            from ._autodiff import note, refuses_functorch
            if not refuses_functorch(err):
                raise
            note(obj, "functorch", False)
            f1 = f2 = None
        if f2 is None:
            f1 = None
        if self.cache_features:
            self._cached = (stamp, f1, f2)
        return f1, f2

    def _matmat_torch(self, V: Tensor) -> Tensor:
        if self.cache_features:
            f1, f2 = self._features()
            if f1 is not None:
                return _apply_features(f1, f2, V, self.J1.C)
        return self.J1._matmat_torch(self.J2._rmatmat_torch(V))

    def _rmatmat_torch(self, W: Tensor) -> Tensor:
        if self.cache_features:
            f1, f2 = self._features()
            if f1 is not None:
                return _apply_features(f2, f1, W, self.J1.C)
        return self.J2._matmat_torch(self.J1._rmatmat_torch(W))

    def to_dense(self, *, max_entries: int = MAX_DENSE_ENTRIES, chunk: int = 256) -> Tensor:
        """The kernel as a dense tensor [N₁C, N₂C], without forming per-sample Jacobians of linear layers.

        For every ``nn.Linear`` whose weight/bias are selected (and used by that module only), the
        Jacobian factorizes per sample: ∂f_ic/∂W = δ_ic a_iᵀ with a_i the layer's input and δ_ic =
        ∂f_ic/∂z_i the output's sensitivity to the layer's output z. So that layer's kernel is
        (a_i·a_j)(δ_ic·δ_jd) (+ δ_ic·δ_jd for the bias): one forward and C VJPs per batch collect
        a and δ (N·(d_in + C·d_out) numbers per layer), and the kernel is two matrix products per
        layer, accumulated into the output slice by slice of rows: the peak memory is the kernel
        plus the features plus 1/16 of the kernel.  Remaining parameters get explicit Jacobian rows
        (N·C·P_rest numbers).

        When the features exceed ``memory_budget`` bytes, they are collected for groups of
        consecutive batches that fit half the budget each, and the kernel is assembled block by
        block (groups I × J; for K(X, X) only J ≥ I, mirrored): about r/2 times the feature cost
        for r groups, the same memory bound.  Only a layer that is not a plain 2-D ``nn.Linear``,
        a weight used outside its module, or a model torch.func refuses, falls back to products
        with identity blocks (``chunk`` columns at a time: two passes each).

        Raises:
            ValueError: if the kernel has more than ``max_entries`` entries (default 2**26, as
                :meth:`Operator.to_dense`); pass a larger ``max_entries`` when it fits in memory.
        """
        M, N = self.shape
        if M * N > max_entries:
            nbytes = M * N * torch.empty((), dtype=self.torch_dtype).element_size()
            raise ValueError(
                f"NTK.to_dense: the kernel has {M}×{N} = {M * N:,} entries ({nbytes / 2**30:.2f} GiB in "
                f"{self.torch_dtype}), above max_entries={max_entries:,}. Use products (K @ v) or matrix-free "
                f"algorithms, or pass max_entries={M * N} if that much memory is free."
            )
        with product_mode():
            feats1, feats2 = self._features()
            if feats1 is not None:
                out = torch.empty(M, N, dtype=self.torch_dtype, device=self.device)
                _kernel_into(out, feats1, feats2, self.J1.C)
                return out
            if self._over_budget:
                try:
                    return self._dense_by_groups()
                except _NotFactorizable:  # found while collecting (a weight used outside its module)
                    self._over_budget = False
                except RuntimeError as err:  # torch.func refuses the model: matrix-free below
                    from ._autodiff import refuses_functorch
                    if not refuses_functorch(err):
                        raise
                    self._over_budget = False
        return super().to_dense(max_entries=M * N, chunk=chunk)

    def _dense_by_groups(self) -> Tensor:
        """The kernel from features of batch groups that fit half of ``memory_budget`` each."""
        C, (M, N) = self.J1.C, self.shape
        symmetric = self.J2 is self.J1
        groups1 = _batch_groups(self.J1, self.memory_budget // 2)
        groups2 = groups1 if symmetric else _batch_groups(self.J2, self.memory_budget // 2)
        out = torch.empty(M, N, dtype=self.torch_dtype, device=self.device)
        for a, (sel1, r0, r1) in enumerate(groups1):
            f1 = _features(self.J1, None, select=sel1)
            for b, (sel2, c0, c1) in enumerate(groups2):
                if symmetric and b < a:
                    continue
                f2 = f1 if (symmetric and a == b) else _features(self.J2, None, select=sel2)
                block = out[r0 * C:r1 * C, c0 * C:c1 * C]
                _kernel_into(block, f1, f2, C)
                if symmetric and b > a:
                    out[c0 * C:c1 * C, r0 * C:r1 * C] = block.T
                del f2
            del f1
        self.last_dense_groups = len(groups1) * len(groups2)  # diagnostics: feature groups paired
        return out


def _kernel_into(out: Tensor, f1: "_Features", f2: "_Features", C: int) -> None:
    """``out [n1·C, n2·C] = J₁ J₂ᵀ`` from features, layer by layer and slice by slice of rows (each
    temporary at most 1/16 of ``out``, at least one sample's rows)."""
    M, N = out.shape
    n1, n2 = M // C, N // C
    if f1.rest is not None:
        out.zero_().addmm_(f1.rest, f2.rest.T)
    else:
        out.zero_()
    step = max(1, n1 // 16)
    for name, (a1, d1, has_w, has_b) in f1.layers.items():
        a2, d2, _, _ = f2.layers[name]
        d2f = d2.reshape(N, -1)  # rows (j, d): δ_jd
        for s in range(0, n1, step):
            e = min(s + step, n1)
            D = d1[s:e].reshape((e - s) * C, -1) @ d2f.T  # [(e−s)·C, n2·C]: δ_ic · δ_jd
            if has_w:
                A = a1[s:e] @ a2.T  # [(e−s), n2]: a_i · a_j
                if has_b:
                    A += 1  # the bias adds δ_ic · δ_jd once more
                D.view(e - s, C, n2, C).mul_(A[:, None, :, None])
            out[s * C:e * C].add_(D)
            del D


def _batch_groups(J: Jacobian, budget: int) -> list:
    """Consecutive batches whose features fit ``budget`` bytes (at least one batch per group):
    ``[(batch indices, first sample, end sample)]``; one pass over the data, reading sizes only."""
    per = _per_sample_bytes(J)
    groups, current, start, count = [], set(), 0, 0
    obj = J.objective
    with obj.session():
        for batch in obj.batches():
            if current and (count + batch.n) * per > budget:
                groups.append((current, start, start + count))
                current, start, count = set(), start + count, 0
            current.add(batch.index)
            count += batch.n
    if current:
        groups.append((current, start, start + count))
    return groups


def _per_sample_bytes(J: Jacobian) -> int:
    """Bytes of features per sample: a and δ of each factorized layer, Jacobian rows of the rest."""
    obj = J.objective
    plan, rest = _linear_plan(J)
    numel = dict(zip(obj.layout.names, obj.layout.numels))
    modules = dict(obj.model.named_modules()) if plan else {}
    per = J.C * sum(numel[n] for n in rest)
    for mname in plan:
        m = modules[mname]
        per += m.in_features + J.C * m.out_features
    return per * torch.empty((), dtype=obj.dtype).element_size()


def _apply_features(f1: "_Features", f2: "_Features", V: Tensor, C: int) -> Tensor:
    """J₁ J₂ᵀ V from features: J₂ᵀ V per layer is Uᵀa (U_j = Σ_d V_jd δ_jd), then J₁ of that."""
    N2 = V.shape[0] // C
    K = V.shape[1]
    Vr = V.reshape(N2, C, K)
    out = None
    for name, (a1, d1, has_w, has_b) in f1.layers.items():
        a2, d2, _, _ = f2.layers[name]
        U = torch.bmm(Vr.transpose(1, 2), d2)  # U_j = Σ_c V_jc δ_jc: [N2, K, d_out]
        term = 0
        if has_w:
            GW = U.permute(1, 2, 0) @ a2  # Jᵂᵀ V as K weight gradients [K, d_out, d_in]
            term = (a1 @ GW.transpose(1, 2)).permute(1, 0, 2)  # G a_i: [N1, K, d_out]
        if has_b:  # bias gradient Σ_j U_j, the same for every sample
            term = term + U.sum(0)[None].expand(d1.shape[0], -1, -1)
        r = torch.bmm(d1, term.transpose(1, 2)).reshape(-1, K)  # δ_ic · (…): [N1·C, K]
        out = r if out is None else out + r
    if f1.rest is not None:
        r = f1.rest @ (f2.rest.T @ V)
        out = r if out is None else out + r
    return out


class _NotFactorizable(Exception):
    """A linear layer runs more than once per forward: its per-sample factorization does not apply."""


class _Features:
    def __init__(self):
        self.layers: dict = {}
        self.rest: Tensor | None = None


def _linear_plan(J: Jacobian):
    """Selected nn.Linear layers whose parameters no other module uses: name -> (w_name, b_name)."""
    from torch import nn

    obj = J.objective
    if not isinstance(obj.model, nn.Module) or J.wrt != "params" or J.of is not None:
        return {}, list(obj.layout.names)
    owners: dict[int, int] = {}
    for m in obj.model.modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    selected = set(obj.layout.names)
    plan, covered = {}, set()
    for mname, m in obj.model.named_modules():
        if type(m) is not nn.Linear:
            continue
        w = f"{mname}.weight" if mname else "weight"
        b = f"{mname}.bias" if mname else "bias"
        use_w = w in selected and owners.get(id(m.weight), 0) == 1
        use_b = m.bias is not None and b in selected and owners.get(id(m.bias), 0) == 1
        if use_w or use_b:
            plan[mname] = (w if use_w else None, b if use_b else None)
            covered.update(n for n in (w if use_w else None, b if use_b else None) if n)
    rest = [n for n in obj.layout.names if n not in covered]
    return plan, rest


def _features(J: Jacobian, budget: int | None, select: set | None = None) -> "_Features | None":
    """Per-layer inputs a [N, d_in] and sensitivities δ [N, C, d_out], plus rest-Jacobian rows; None
    when they would exceed ``budget`` bytes (None: no limit).  ``select``: only the batches with
    these indices (their samples in order)."""
    obj = J.objective
    plan, rest = _linear_plan(J)
    C = J.C
    if budget is not None and J.N * _per_sample_bytes(J) > budget:
        return None
    modules = dict(obj.model.named_modules()) if plan else {}
    from torch.func import vjp, vmap

    feats = _Features()
    store = {name: ([], []) for name in plan}
    rest_rows = []
    index = {n: i for i, n in enumerate(obj.layout.names)}
    with obj.session():
        for batch in obj.batches():
            if select is not None and batch.index not in select:
                continue
            theta = obj.theta()
            inputs: dict = {}
            hooks = [modules[name].register_forward_hook(
                (lambda nm: (lambda mod, inp, out: inputs.__setitem__(nm, inp[0])))(name)) for name in plan]
            try:
                deltas0 = {}
                with torch.no_grad():
                    rec: dict = {}
                    from ._taps import tapped
                    try:
                        with tapped({n: modules[n] for n in plan}, record=rec, api="NTK.to_dense"):
                            obj.forward(theta, batch.x)
                    except ValueError as err:
                        if "more than once" in str(err):
                            raise _NotFactorizable from err
                        raise
            finally:
                for h in hooks:
                    h.remove()
            for name in plan:
                a = inputs[name]
                if a.dim() != 2:  # sequence-shaped inputs: the per-sample factorization differs
                    raise _NotFactorizable(f"{name} sees inputs of shape {tuple(a.shape)}")
                deltas0[name] = torch.zeros_like(rec[name])
            names = list(plan)

            def g(ds, rest_vals):
                th = list(theta)
                for n, v in zip(rest, rest_vals):
                    th[index[n]] = v
                out_rec: dict = {}
                with tapped({n: modules[n] for n in names}, add=dict(zip(names, ds)), record=out_rec,
                            api="NTK.to_dense"):
                    out = obj.forward(th, batch.x)
                return J._reduce_output(out)

            eye = torch.eye(C, dtype=obj.dtype, device=obj.device)
            if names:  # δ_ic: per sample its own variable, so C cotangents give all samples at once
                _, vjp_d = vjp(lambda ds: g(ds, [theta[index[n]] for n in rest]),
                               tuple(deltas0[n] for n in names))
                cot = eye[:, None, :].expand(C, batch.n, C).reshape(C, batch.n, *J.out_shape)
                (d_res,) = vmap(vjp_d)(cot)  # per output component c: [C, n, d_out]
                for name, d in zip(names, d_res):
                    store[name][0].append(inputs[name].detach())
                    store[name][1].append(d.movedim(0, 1).detach())  # [n, C, d_out]
                _check_factorization(J, batch, theta, index, plan, inputs, d_res)
            if rest:  # shared parameters: one cotangent per row (i, c) of the batch
                _, vjp_r = vjp(lambda *rv: g([deltas0[n] for n in names], rv),
                               *[theta[index[n]] for n in rest])
                R = batch.n * C
                eyeR = torch.eye(R, dtype=obj.dtype, device=obj.device).reshape(R, batch.n, *J.out_shape)
                for s in range(0, R, 256):
                    res = vmap(vjp_r)(eyeR[s:s + 256])
                    rest_rows.append(torch.cat([r.reshape(r.shape[0], -1) for r in res], dim=1).detach())
    for name, (w, b) in plan.items():
        a = torch.cat(store[name][0])
        d = torch.cat(store[name][1])
        feats.layers[name] = (a, d, w is not None, b is not None)
    feats.rest = torch.cat(rest_rows) if rest else None
    return feats


def _check_factorization(J: Jacobian, batch, theta, index: dict, plan: dict, inputs: dict, d_res) -> None:
    """One VJP with a seeded random cotangent r confirms that the layers' features give the whole
    gradient of their parameters: Σ_ic r_ic ∂f_ic/∂W = Σ_i (Σ_c r_ic δ_ic) a_iᵀ.  A weight also used
    outside its module (tied transposed, ``F.linear(h, m.weight.t())``) breaks that identity, and
    then the kernel is computed matrix-free instead."""
    from torch.func import vjp

    obj = J.objective
    sel = [p for name in plan for p in plan[name] if p is not None]
    gen = torch.Generator(device=obj.device).manual_seed(0)
    r = torch.randn(batch.n, *J.out_shape, generator=gen, dtype=obj.dtype, device=obj.device)

    def f(*vals):
        th = list(theta)
        for n, v in zip(sel, vals):
            th[index[n]] = v
        return J._reduce_output(obj.forward(th, batch.x))

    _, pull = vjp(f, *[theta[index[n]] for n in sel])
    actual = dict(zip(sel, pull(r)))
    rr = r.reshape(batch.n, -1)  # [n, C]
    tol = torch.finfo(obj.dtype).eps ** 0.5
    for name, d in zip(plan, d_res):
        s = torch.einsum("nc,cnd->nd", rr, d)  # Σ_c r_ic δ_ic: [n, d_out]
        w, b = plan[name]
        pred = {}
        if w is not None:
            pred[w] = s.T @ inputs[name].detach()
        if b is not None:
            pred[b] = s.sum(0)
        for n, want in pred.items():
            got = actual[n]
            if float((got - want).norm()) > tol * (float(got.norm()) + float(want.norm()) + 1e-300):
                raise _NotFactorizable(f"{n} is used outside its module")
