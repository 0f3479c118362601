r"""Checkpoints of a training run: loaded as state dicts (a dict, a module or a file), checked against
the model's architecture, and put into a copy of the model (:func:`model_at`)."""

from __future__ import annotations

import copy
import os
from typing import Iterable, Mapping

import torch
from torch import Tensor, nn


def _describe(checkpoint, i: int) -> str:
    if isinstance(checkpoint, (str, os.PathLike)):
        return f"checkpoint {i} ({os.fspath(checkpoint)!r})"
    return f"checkpoint {i}"


def _model_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def load_state(checkpoint, i: int, api: str, *, map_location=None, mmap: bool = False) -> dict[str, Tensor]:
    """A state dict from a checkpoint: a state dict itself, an ``nn.Module``, or a file path
    (``torch.load(path, weights_only=True, map_location=…)``)."""
    what = _describe(checkpoint, i)
    if isinstance(checkpoint, nn.Module):
        return checkpoint.state_dict()
    if isinstance(checkpoint, (str, os.PathLike)):
        path = os.fspath(checkpoint)
        if not os.path.isfile(path):
            raise ValueError(f"{api}: {what}: no such file.")
        try:
            try:
                sd = torch.load(path, weights_only=True, map_location=map_location, mmap=mmap)
            except RuntimeError:
                if not mmap:
                    raise
                sd = torch.load(path, weights_only=True, map_location=map_location)  # legacy format: no mmap
        except Exception as err:  # noqa: BLE001 - re-raised with the file named
            first = (str(err).strip().splitlines() or [""])[0]
            raise ValueError(f"{api}: could not load {what} with torch.load(weights_only=True) "
                             f"({type(err).__name__}: {first}). Save the model's state dict "
                             f"(torch.save(model.state_dict(), path)), not the model; the full error is chained "
                             f"above.") from err
        checkpoint = sd
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"{api}: expected {what} as a state dict, a file path or an nn.Module, "
                        f"got {type(checkpoint).__name__}.")
    bad = [k for k, v in checkpoint.items() if not isinstance(v, Tensor)]
    if bad:
        raise TypeError(f"{api}: {what} holds entries that are not tensors ({bad[:5]}); expected a model "
                        f"state dict. If it wraps one, pass the state dict itself (e.g. ckpt['model']).")
    return dict(checkpoint)


def check_state(reference: Mapping[str, Tensor], state: Mapping[str, Tensor], i: int, checkpoint, api: str) -> None:
    """Raise unless ``state`` has exactly the keys and shapes of ``reference`` (a model's state dict)."""
    what = _describe(checkpoint, i)
    missing = [k for k in reference if k not in state]
    unexpected = [k for k in state if k not in reference]
    shapes = [f"{k}: {tuple(state[k].shape)} vs model {tuple(reference[k].shape)}"
              for k in reference if k in state and state[k].shape != reference[k].shape]
    if missing or unexpected:
        raise ValueError(f"{api}: {what} does not match the model's state dict: missing keys {missing[:5]}"
                         f"{' …' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
                         f"{' …' if len(unexpected) > 5 else ''}. Checkpoints must come from this architecture.")
    if shapes:
        raise ValueError(f"{api}: {what} has tensors of the wrong shape: {shapes[:5]}"
                         f"{' …' if len(shapes) > 5 else ''}. Checkpoints must come from this architecture.")


def validate_checkpoints(model: nn.Module, checkpoints, api: str) -> list:
    """Check every checkpoint against ``model`` (keys and shapes) before any heavy work.

    Files are opened memory-mapped on the CPU for the check and read again when used, so a long
    list of checkpoints is never held in memory at once.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{api}: expected the model as an nn.Module (checkpoints are loaded into a copy of it), "
                        f"got {type(model).__name__}.")
    if isinstance(checkpoints, (str, os.PathLike, Mapping, nn.Module)) or not isinstance(checkpoints, Iterable):
        raise TypeError(f"{api}: expected a sequence of checkpoints (state dicts, file paths or modules), "
                        f"got {type(checkpoints).__name__}. Wrap a single one in a list.")
    checkpoints = list(checkpoints)
    if not checkpoints:
        raise ValueError(f"{api}: expected at least one checkpoint, got none.")
    reference = model.state_dict()
    for i, ck in enumerate(checkpoints):
        state = load_state(ck, i, api, map_location="cpu", mmap=True)
        check_state(reference, state, i, ck, api)
        del state
    return checkpoints


def model_at(model: nn.Module, checkpoint, i: int, api: str) -> nn.Module:
    """A deep copy of ``model`` holding the checkpoint's state (the user's model is not touched)."""
    state = load_state(checkpoint, i, api, map_location=_model_device(model))
    check_state(model.state_dict(), state, i, checkpoint, api)
    try:
        twin = copy.deepcopy(model)
    except Exception as err:  # noqa: BLE001
        raise TypeError(f"{api}: could not deep-copy the model ({err}); checkpoints are loaded into a copy so "
                        f"that the model stays untouched.") from err
    for p in twin.parameters():
        p.grad = None
    with torch.no_grad():
        twin.load_state_dict(state, strict=True)
    return twin
