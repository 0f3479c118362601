"""Parameter selection and the model's current state, for the objective.

* :func:`_select_params`: which parameters to differentiate (names, submodules, parameter
  objects such as ``model.parameters()``, or a predicate).
* :class:`ModelState`: the selected parameters, the other parameters and the buffers, re-read
  from the model before every pass (contract rule 9: operators follow the model), checked to be
  finite, and stamped by value so caches know when the model changed.
"""

from __future__ import annotations


import torch
from torch import Tensor, nn


def _select_params(model: nn.Module, params) -> list[str]:
    named = [(n, p) for n, p in model.named_parameters()]
    names_all = [n for n, _ in named]
    if params is None:
        chosen = [n for n, p in named if p.requires_grad]
    elif callable(params) and not isinstance(params, nn.Module):
        chosen = [n for n, p in named if params(n, p)]
    else:
        items = [params] if isinstance(params, (str, nn.Module, Tensor)) else list(params)
        by_id = {id(p): n for n, p in named}
        chosen = []
        for item in items:
            if isinstance(item, str):
                if item not in names_all:
                    raise ValueError(
                        f"Objective: unknown parameter name {item!r}; expected one of {names_all}."
                    )
                chosen.append(item)
            elif isinstance(item, nn.Module):
                prefix = next((mn for mn, m in model.named_modules() if m is item), None)
                if prefix is None:
                    raise ValueError("Objective: the module given in params= is not a submodule of the model.")
                ids = {id(p) for p in item.parameters()}
                chosen.extend(n for n, p in named if id(p) in ids)
            elif isinstance(item, Tensor):  # the curvlinops idiom: params=model.parameters() or a list of them
                if id(item) not in by_id:
                    raise ValueError(
                        f"Objective: a tensor of shape {tuple(item.shape)} in params= is not a parameter of the "
                        f"model; pass the model's own parameters (model.parameters()), names or submodules."
                    )
                chosen.append(by_id[id(item)])
            else:
                raise TypeError(
                    f"Objective: params entries must be names, submodules or parameters, got {type(item).__name__}."
                )
        order = {n: i for i, n in enumerate(names_all)}
        chosen = sorted(set(chosen), key=order.__getitem__)
    if not chosen:
        raise ValueError("Objective: no parameters selected; check params= (or requires_grad flags).")
    return chosen


_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


class ModelState:
    """Mixin of :class:`~curvops.Objective`: the tensors the forward reads, always the model's current ones.

    Needs ``self.model``, ``self._source`` (a plain function's parameter dict, or None),
    ``self._names`` (selected names), ``self.layout`` (None before construction ends),
    ``self.dtype`` / ``self.device`` and ``self._depth`` (passes in progress).
    """

    def stochastic_modules(self) -> list[str]:
        """Names of dropout / train-mode BatchNorm modules (empty for plain functions)."""
        if not isinstance(self.model, nn.Module):
            return []
        out = []
        for name, m in self.model.named_modules():
            if not m.training:
                continue
            if isinstance(m, _DROPOUT) and m.p > 0:
                out.append(f"{name or '<root>'} ({type(m).__name__})")
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                out.append(f"{name or '<root>'} ({type(m).__name__} in train mode)")
        return out

    def _refresh(self) -> None:
        """Re-read the selected parameters, the other parameters and the buffers from the model."""
        if self._source is None:
            named = dict(self.model.named_parameters())
            buffers = dict(self.model.named_buffers())
        else:
            named = {n: torch.as_tensor(t) for n, t in self._source.items()}
            buffers = {}
        missing = [n for n in self._names if n not in named]
        if missing:
            raise ValueError(f"Objective: parameter(s) {missing} are no longer in the model; build a new operator "
                             f"for the changed model.")
        values = {n: named[n].detach() for n in self._names}
        if self.layout is not None:
            for n, shape in zip(self.layout.names, self.layout.shapes):
                v = values[n]
                if v.shape != shape or v.dtype != self.dtype or v.device != self.device:
                    raise ValueError(
                        f"Objective: parameter {n!r} changed since the operator was built: expected "
                        f"{tuple(shape)} {self.dtype} on {self.device}, got {tuple(v.shape)} {v.dtype} on "
                        f"{v.device}. Build a new operator for the changed model."
                    )
        self._values = values
        self._constants = {n: p.detach() for n, p in named.items() if n not in values}
        self._buffers = buffers
        self._check_finite()

    def _check_finite(self) -> None:
        """Every floating tensor the forward reads is finite (O(P), one host sync)."""
        items = [(n, t) for n, t in (*self._values.items(), *self._constants.items(), *self._buffers.items())
                 if t.is_floating_point() and not t.is_meta and t.numel()]
        if not items:
            return
        flags = torch.stack([torch.isfinite(t).all().to(items[0][1].device) for _, t in items])
        if not bool(flags.all()):
            bad = [n for (n, _), ok in zip(items, flags.tolist()) if not ok]
            kind = "buffer" if bad[0] in self._buffers else "parameter"
            more = f" (and {len(bad) - 1} more: {bad[1:6]})" if len(bad) > 1 else ""
            raise ValueError(f"Objective: {kind} {bad[0]!r} contains NaN or Inf{more}; fix the model before "
                             f"measuring curvature.")

    def _state_tensors(self) -> list[Tensor]:
        if self._depth == 0:
            self._refresh()
        return [*self._values.values(), *self._constants.values(), *self._buffers.values()]

    def state_stamp(self) -> tuple[Tensor, ...]:
        """Copies of every parameter and buffer the forward reads (keys of caches).

        **Cost**: one copy of the model's parameters and buffers.
        """
        return tuple(t.detach().clone() for t in self._state_tensors())

    def state_matches(self, stamp: tuple[Tensor, ...] | None) -> bool:
        """Whether the model still holds exactly the values of ``stamp`` (O(P), no pass over data).

        Compares values, not version counters: writes through ``p.data`` (``p.data.mul_(…)``) and
        reassignments (``p.data = …``, ``vector_to_parameters``) do not bump ``p._version``.
        """
        if stamp is None:
            return False
        current = self._state_tensors()
        return len(current) == len(stamp) and all(
            a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
            for a, b in zip(stamp, current))
