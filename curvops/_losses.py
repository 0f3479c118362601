r"""Loss adaptation of the objective: the user's loss, its reduction, its targets and its mean.

The whole-data loss is exactly the loss torch computes on the concatenated data (contract
rule 11).  For a ``"mean"`` loss torch divides the sum of the loss terms by a *denominator*
``d`` that depends on the targets:

* MSE, BCE-with-logits: the number of elements;
* cross-entropy with class indices: the number of targets that are not ``ignore_index``
  (-100 by default), or, with ``weight=``, the sum of the class weights of those targets
  (label smoothing does not change it);
* cross-entropy with class probabilities: the number of elements divided by ``C``;
* any other callable (``reduction="mean"``): the number of samples of the batch.

With ``ℓ_b = S_b / d_b`` the mean of batch b, the whole-data loss is

.. math:: L = \frac{\sum_b d_b\, \ell_b}{\sum_b d_b} = \frac{\sum_b S_b}{\sum_b d_b},

which is torch's loss on all the data at once, whatever the batch split and however many
targets each batch ignores.  A batch whose targets are all ignored (``d_b = 0``) contributes
nothing (torch would give 0/0 on it alone).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

LOSSES = {
    "mse": nn.MSELoss,
    "cross_entropy": nn.CrossEntropyLoss,
    "bce_with_logits": nn.BCEWithLogitsLoss,
}
_KIND_OF = {nn.MSELoss: "mse", nn.CrossEntropyLoss: "cross_entropy", nn.BCEWithLogitsLoss: "bce_with_logits"}


#: token-level losses of language models: cross-entropy over [B, T, V] logits, -100 ignored;
#: "causal_lm" predicts token t+1 from position t (logits[:, :-1] against labels[:, 1:]),
#: "token_cross_entropy" (masked LM, token classification) every position against its own label.
TOKEN_LOSSES = {"causal_lm": True, "token_cross_entropy": False}


def logits_of(out):
    """The prediction tensor of a model output: the tensor itself, or ``.logits`` / ``["logits"]``
    of a HuggingFace ``ModelOutput`` (or any object or dict that has logits)."""
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, dict):
        logits = out.get("logits")
    if isinstance(logits, Tensor):
        return logits
    raise TypeError(
        f"Objective: the model returned {type(out).__name__}, expected a tensor or an output with .logits; pass "
        f"output= to pick the prediction (e.g. output=lambda o: o.last_hidden_state)."
    )


def token_layout(shift: bool):
    """[B, T, V] logits → [B, V, T'] for torch's cross_entropy (T' = T − 1 with the causal shift)."""
    def layout(out):
        logits = logits_of(out)
        if logits.dim() != 3:
            raise ValueError(f"Objective: a token-level loss needs logits [batch, tokens, vocabulary], got shape "
                             f"{tuple(logits.shape)}.")
        return (logits[:, :-1] if shift else logits).transpose(1, 2)
    return layout


def token_targets(shift: bool):
    def targets(y):
        if not isinstance(y, Tensor) or y.dim() != 2 or y.is_floating_point():
            raise ValueError(f"Objective: a token-level loss needs integer labels [batch, tokens] (-100 where "
                             f"ignored), got {getattr(y, 'shape', type(y).__name__)}.")
        return y[:, 1:] if shift else y
    return targets


def resolve_loss(loss, reduction: str | None) -> tuple[Callable | None, str, str | None, nn.Module | None]:
    """→ (callable, reduction, kind, module); ``loss=None`` for loss-free quantities (Jacobians, NTK)."""
    if loss is None:
        return None, reduction or "sum", None, None
    if isinstance(loss, type) and issubclass(loss, nn.Module):
        raise TypeError(
            f"Objective: expected a loss instance, got the class {loss.__name__}. "
            f"Pass {loss.__name__}() (with reduction='mean' or 'sum'), or a name such as 'cross_entropy'."
        )
    if isinstance(loss, str):
        if loss in TOKEN_LOSSES:
            loss = nn.CrossEntropyLoss(reduction=reduction or "mean", ignore_index=-100)
        elif loss not in LOSSES:
            raise ValueError(f"Objective: unknown loss name {loss!r}; expected one of "
                             f"{sorted(LOSSES) + sorted(TOKEN_LOSSES)} or a callable.")
        else:
            loss = LOSSES[loss](reduction=reduction or "mean")
    if isinstance(loss, nn.Module) and hasattr(loss, "reduction"):
        red = loss.reduction
        if reduction is not None and reduction != red:
            raise ValueError(
                f"Objective: reduction={reduction!r} contradicts the loss module's reduction={red!r}; "
                f"set it on the module only."
            )
        if red not in ("mean", "sum"):
            raise ValueError(
                f"Objective: expected a loss with reduction 'mean' or 'sum', got reduction={red!r}. "
                f"Construct the loss with reduction='mean' or 'sum'."
            )
        return loss, red, _KIND_OF.get(type(loss)), loss
    if not callable(loss):
        raise TypeError(f"Objective: expected a loss name, a torch loss module or a callable, got {type(loss).__name__}.")
    if reduction not in ("mean", "sum"):
        raise ValueError(
            "Objective: the reduction of this loss can't be known; pass reduction='mean' if it averages "
            "over samples or reduction='sum' if it sums them (got "
            f"reduction={reduction!r})."
        )
    return loss, reduction, None, None


def ignore_index(module: nn.Module | None) -> int | None:
    return getattr(module, "ignore_index", None) if isinstance(module, nn.CrossEntropyLoss) else None


def kept_targets(kind: str | None, module: nn.Module | None, y) -> Tensor | None:
    """Boolean mask of the class-index targets that count (not ``ignore_index``), or None."""
    if kind != "cross_entropy" or not isinstance(y, Tensor) or y.is_floating_point():
        return None
    return y != ignore_index(module)


def denominator(kind: str | None, module: nn.Module | None, y, n: int) -> float:
    """``d_b``: what torch's ``reduction='mean'`` divides this batch's summed loss by."""
    if kind in ("mse", "bce_with_logits"):
        return float(y.numel())
    if kind == "cross_entropy":
        if y.is_floating_point():  # class probabilities [n, C, ...]
            return float(y.numel() // y.shape[1])
        keep = y != ignore_index(module)
        weight = getattr(module, "weight", None)
        if weight is not None:
            return float(weight.to(y.device)[y[keep]].sum())
        return float(keep.sum())
    return float(n)


def sample_denominators(kind: str | None, module: nn.Module | None, y, n: int) -> Tensor | None:
    """``d_i`` per sample (the mean of sample i alone divides by it); None when uniform per sample."""
    if kind != "cross_entropy" or y.is_floating_point():
        return None
    keep = y != ignore_index(module)
    weight = getattr(module, "weight", None)
    if weight is not None:
        w = torch.where(keep, weight.to(y.device)[y.clamp(min=0, max=weight.numel() - 1)], 0.0)
    else:
        w = keep.to(torch.float64)
    return w.reshape(n, -1).sum(1)


def check_target(kind: str | None, module: nn.Module | None, out, y, index: int) -> None:
    """Shapes and ranges of the targets against the outputs, naming the batch."""
    if not isinstance(out, Tensor):
        raise TypeError(
            f"Objective: the model returned {type(out).__name__}, expected a tensor; pass output= to pick "
            f"the prediction (e.g. output=lambda o: o.logits)."
        )
    if kind in ("mse", "bce_with_logits"):
        if not isinstance(y, Tensor) or y.shape != out.shape:
            raise ValueError(
                f"Objective: targets do not match outputs on batch {index}: output shape {tuple(out.shape)}, "
                f"target shape {tuple(getattr(y, 'shape', ()))}; {kind} needs equal shapes."
            )
    elif kind == "cross_entropy":
        if not isinstance(y, Tensor):
            raise TypeError(f"Objective: cross_entropy needs tensor targets, got {type(y).__name__} on batch {index}.")
        if out.dim() < 2:
            raise ValueError(
                f"Objective: cross_entropy needs outputs [n, C, ...], got shape {tuple(out.shape)} on batch {index}."
            )
        want = (out.shape[0],) + tuple(out.shape[2:])
        if y.is_floating_point():
            ok = y.shape == out.shape
        else:
            ok = tuple(y.shape) == want
            if ok and y.numel():
                ign = ignore_index(module)
                counted = y[y != ign]
                if counted.numel() and (int(counted.min()) < 0 or int(counted.max()) >= out.shape[1]):
                    raise ValueError(
                        f"Objective: class targets on batch {index} must lie in [0, {out.shape[1]}) or equal "
                        f"ignore_index={ign}, got range [{int(counted.min())}, {int(counted.max())}]."
                    )
        if not ok:
            hint = ""
            if out.dim() >= 3 and tuple(y.shape) == tuple(out.shape[:-1]):
                hint = (" The outputs look like a sequence [n, T, C]: torch's cross_entropy wants the classes in "
                        "dimension 1, so pass output=lambda o: o.transpose(1, 2) (or flatten outputs and targets).")
            raise ValueError(
                f"Objective: targets do not match outputs on batch {index}: output shape {tuple(out.shape)}, "
                f"target shape {tuple(y.shape)}; expected class indices of shape {want} or probabilities "
                f"of shape {tuple(out.shape)}.{hint}"
            )
