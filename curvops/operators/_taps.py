"""Model-agnostic access to any named module's activations through forward hooks.

A *tap* on module ``m`` can (a) add a perturbation ``δ`` to the module's output — the
derivative with respect to ``δ`` at ``δ = 0`` is the derivative with respect to the
activation ``F^(m)`` — and (b) record the output.  Hooks live only for one forward call
and are always removed, so the user's model is never changed.  A tapped module must run
exactly once per forward pass (a module reused inside one forward, e.g. a shared block,
has no single activation to differentiate; we refuse it with a clear error).
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Mapping

from torch import Tensor, nn


def resolve_modules(model, names: Iterable[str], api: str) -> dict[str, nn.Module]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{api}: derivatives with respect to a layer need an nn.Module model, got a plain function.")
    modules = dict(model.named_modules())
    out = {}
    for name in names:
        if name not in modules or name == "":
            some = [n for n in modules if n][:12]
            raise ValueError(f"{api}: unknown module name {name!r}; expected one of {some}"
                             f"{' …' if len(modules) > 13 else ''} (names from model.named_modules()).")
        out[name] = modules[name]
    return out


@contextlib.contextmanager
def tapped(modules: Mapping[str, nn.Module], add: Mapping[str, Tensor] | None = None,
           record: dict | None = None, api: str = "curvops"):
    """Within the block, module outputs get ``add[name]`` added and are stored in ``record[name]``.

    Raises:
        ValueError: when a tapped module runs more than once, or not at all, in the forward pass.
    """
    calls = {name: 0 for name in modules}
    handles = []

    def make_hook(name):
        def hook(mod, inputs, output):
            calls[name] += 1
            if calls[name] > 1:
                raise ValueError(
                    f"{api}: module {name!r} runs more than once in one forward pass; derivatives with respect "
                    f"to its activation are ambiguous. Tap a module that runs exactly once."
                )
            if not isinstance(output, Tensor):
                raise TypeError(f"{api}: module {name!r} returns {type(output).__name__}; only tensor outputs can be tapped.")
            if add is not None and name in add:
                if add[name].shape != output.shape:
                    raise ValueError(f"{api}: perturbation for {name!r} has shape {tuple(add[name].shape)}, the "
                                     f"activation has shape {tuple(output.shape)}.")
                output = output + add[name]
            if record is not None:
                record[name] = output
            return output

        return hook

    try:
        for name, m in modules.items():
            handles.append(m.register_forward_hook(make_hook(name)))
        yield calls
    finally:
        for h in handles:
            h.remove()
    missing = [n for n, c in calls.items() if c == 0]
    if missing:
        raise ValueError(f"{api}: module(s) {missing} never ran in the forward pass; choose a module the model calls.")
