"""Load and check what ``curvops report`` is asked to measure: a user's model, checkpoint and data.

The command names its inputs by *specs*: ``pkg.module:factory`` (or ``path/to/file.py:factory``)
for a zero-argument callable returning an ``nn.Module``, a checkpoint file saved with
``torch.save``, and ``pkg.module:loader`` for a zero-argument callable returning ``(X, y)`` or a
``DataLoader``.  Everything here is cheap and runs before any curvature computation, so that a
typo costs a second, not a Lanczos run: the spec syntax, the imports, the factory's result, the
checkpoint's keys and shapes, the data's type, the loss name, and one forward pass of the model
on the first sample with the loss on its target.

Every failure raises ``ValueError`` (bad values), ``TypeError`` (wrong kinds), ``ImportError``
(module or attribute not found) or ``FileNotFoundError``, with a message that starts with the
command-line option it is about, says what was expected and how to fix it.  The command prints
that message and exits with status 2.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader

LOSSES = ("mse", "cross_entropy", "bce_with_logits", "causal_lm", "token_cross_entropy")
DTYPES = {"float32": torch.float32, "float64": torch.float64}

_DOTTED = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
_SPEC = re.compile(rf"^(?P<module>{_DOTTED}|[^:]+\.py):(?P<attr>{_DOTTED})$")
_MAX_LISTED = 8  # key names listed in a checkpoint error


class SpecError(ValueError):
    """A malformed ``module:attribute`` spec (also a ``ValueError``)."""


@dataclass
class Problem:
    """A checked model, loss and data set, ready for :func:`curvops.report.build_report`.

    Attributes:
        model: the model (in eval mode, on ``device``, in ``dtype``).
        loss: the loss name.
        data: ``(X, y)`` or a ``DataLoader``.
        params: selected parameter names (``None``: all trainable).
        batch_size: batch size for ``(X, y)`` data (``None``: one batch).
        source: how the problem was specified (recorded in the report).
        warnings: sentences the report shows at its top (e.g. no checkpoint: untrained weights).
    """

    model: nn.Module
    loss: str
    data: Any
    params: list[str] | None = None
    batch_size: int | None = None
    source: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)


# ---- specs and imports -------------------------------------------------------------------------
def parse_spec(spec: str, option: str) -> tuple[str, str]:
    """Split ``"pkg.module:attr"`` (or ``"file.py:attr"``) into its module and attribute parts.

    Raises:
        SpecError: the spec is not of that form.
    """
    if not isinstance(spec, str) or not (m := _SPEC.match(spec.strip())):
        raise SpecError(
            f"{option}: expected a spec of the form 'pkg.module:name' (or 'path/to/file.py:name'), "
            f"got {spec!r}. Name the module, a colon, then the callable in it."
        )
    return m.group("module"), m.group("attr")


def import_object(spec: str, option: str):
    """The object a ``module:attr`` spec names (attributes may be dotted: ``mod:Class.build``).

    Raises:
        SpecError: malformed spec.
        ImportError: the module cannot be imported, or has no such attribute.
        FileNotFoundError: a ``file.py`` spec whose file does not exist.
    """
    module_name, attr = parse_spec(spec, option)
    if module_name.endswith(".py"):
        module = _import_file(module_name, option)
    else:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            raise ImportError(
                f"{option}: expected an importable module, got {module_name!r}: {err}. Check the spelling "
                f"and that its directory is on PYTHONPATH (or run the command from that directory)."
            ) from None
        except Exception as err:  # the module itself raised while importing
            raise ImportError(f"{option}: importing module {module_name!r} failed: "
                              f"{type(err).__name__}: {err}") from err
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ImportError(
                f"{option}: expected module {module_name!r} to define {attr!r}, but it has no attribute "
                f"{part!r}. Available names: {_public_names(module)}."
            )
        obj = getattr(obj, part)
    return obj


def _import_file(path: str, option: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{option}: expected an existing Python file, got {path!r} (not found).")
    name = "_curvops_user_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        sys.modules.pop(name, None)
        raise ImportError(f"{option}: importing file {path!r} failed: {type(err).__name__}: {err}") from err
    return module


def _public_names(module) -> str:
    names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n, None))]
    shown = ", ".join(names[:_MAX_LISTED]) + (", ..." if len(names) > _MAX_LISTED else "")
    return shown or "(no public callables)"


def _call(fn, option: str, what: str):
    if not callable(fn):
        raise TypeError(f"{option}: expected a callable {what}, got {type(fn).__name__}.")
    try:
        return fn()
    except Exception as err:
        raise ValueError(f"{option}: calling {getattr(fn, '__name__', what)}() failed: "
                         f"{type(err).__name__}: {err}") from err


# ---- model and checkpoint ----------------------------------------------------------------------
def load_model(spec: str, checkpoint: str | None = None, *, device: str | torch.device = "cpu",
               dtype: str | torch.dtype | None = None) -> nn.Module:
    """Build the model from its factory, load a checkpoint into it, move it, switch it to eval mode.

    Args:
        spec: ``"pkg.module:factory"``; ``factory()`` returns an ``nn.Module``.
        checkpoint: a file saved with ``torch.save``: a state dict, or a dict holding one under
            ``"state_dict"`` or ``"model"``.  Loaded with ``weights_only=True``.  ``None`` keeps
            the factory's weights.
        device: where the model runs.
        dtype: ``"float32"`` / ``"float64"`` (or a torch dtype); ``None`` keeps the model's.

    Raises:
        SpecError, ImportError: bad spec or import.
        TypeError: the factory is not callable or does not return an ``nn.Module``.
        FileNotFoundError: the checkpoint file does not exist.
        ValueError: an unavailable device, a checkpoint that cannot be read, missing or
            unexpected keys, or tensors whose shapes differ from the model's.
    """
    device = resolve_device(device)
    dtype = resolve_dtype(dtype)
    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"--checkpoint: expected an existing file, got {checkpoint!r} (not found).")
    factory = import_object(spec, "--model")
    model = _call(factory, "--model", "factory")
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"--model: expected {spec!r} to return a torch.nn.Module, got {type(model).__name__}. "
            f"Point --model at a function (or class) that builds the model."
        )
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, device=device)
    model.to(device)
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def read_state_dict(path: str, *, device: str | torch.device = "cpu") -> dict:
    """The state dict stored in a checkpoint file (``weights_only=True``).

    Accepts a state dict itself or a dict with the state dict under ``"state_dict"`` or
    ``"model"``; strips a ``"module."`` prefix left by ``DataParallel``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file cannot be read with ``weights_only=True`` or holds no state dict.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--checkpoint: expected an existing file, got {path!r} (not found).")
    try:
        obj = torch.load(path, weights_only=True, map_location=device)
    except Exception as err:
        raise ValueError(
            f"--checkpoint: expected a file saved with torch.save holding tensors, got {path!r} which "
            f"torch.load(weights_only=True) cannot read: {type(err).__name__}: {_first_line(err)}. Save "
            f"the model's state_dict() (not the pickled model)."
        ) from None
    state = obj
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                state = obj[key]
                break
    if not isinstance(state, Mapping) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ValueError(
            f"--checkpoint: expected a state dict {{name: tensor}} (or a dict with one under 'state_dict' "
            f"or 'model'), got {_describe(obj)} in {path!r}. Save model.state_dict()."
        )
    state = dict(state)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_checkpoint(model: nn.Module, path: str, *, device: str | torch.device = "cpu") -> None:
    """Check a checkpoint's keys and shapes against ``model`` and load it (strict).

    Raises:
        FileNotFoundError, ValueError: see :func:`read_state_dict`; also missing or unexpected
            keys and mismatched shapes, listed by name.
    """
    state = read_state_dict(path, device=device)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_listed(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_listed(unexpected)}")
        raise ValueError(
            f"--checkpoint: expected the keys of the model's state_dict(), got {' and '.join(parts)} in "
            f"{path!r}. Check that --model builds the architecture the checkpoint was saved from."
        )
    bad = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
           for k, v in own.items() if tuple(state[k].shape) != tuple(v.shape)]
    if bad:
        raise ValueError(
            f"--checkpoint: expected tensors shaped like the model's, got mismatched shapes "
            f"({'; '.join(bad[:_MAX_LISTED])}{'; ...' if len(bad) > _MAX_LISTED else ''}) in {path!r}. "
            f"Check the model's configuration (widths, number of classes)."
        )
    model.load_state_dict(state, strict=True)


def _listed(keys: list[str]) -> str:
    return repr(keys[:_MAX_LISTED])[:-1] + (", ...]" if len(keys) > _MAX_LISTED else "]")


def _describe(obj) -> str:
    if isinstance(obj, Mapping):
        keys = list(obj)[:_MAX_LISTED]
        return f"a {type(obj).__name__} with keys {keys}"
    return f"a {type(obj).__name__}"


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


# ---- device, dtype, loss, data -----------------------------------------------------------------
def resolve_device(device) -> torch.device:
    """A torch device, checked to be available."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"--device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r} ({err}).") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device: expected an available device, got {str(dev)!r} but CUDA is not available "
                         f"here. Use --device cpu.")
    return dev


def resolve_dtype(dtype) -> torch.dtype | None:
    """``None``, or the torch dtype named by ``"float32"`` / ``"float64"``."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"--dtype: expected one of {list(DTYPES)}, got {dtype!r}.")
    return DTYPES[dtype]


def check_loss(loss: str) -> str:
    """The loss name, checked against the built-in losses."""
    if loss not in LOSSES:
        raise ValueError(f"--loss: expected one of {list(LOSSES)}, got {loss!r} (unknown loss).")
    return loss


def load_data(spec: str, *, batch_size: int | None = None):
    """Call the data loader named by ``spec`` and check what it returns.

    Returns:
        ``(X, y)`` (a tuple of two tensors, or of inputs given as a tuple/dict of tensors and a
        target tensor) or a ``DataLoader``.

    Raises:
        SpecError, ImportError: bad spec or import.
        TypeError: the loader returns something else.
        ValueError: ``batch_size`` with a DataLoader, or a bad ``batch_size``.
    """
    loader = import_object(spec, "--data")
    data = _call(loader, "--data", "loader")
    if isinstance(data, list) and len(data) == 2 and isinstance(data[1], torch.Tensor):
        data = tuple(data)
    if isinstance(data, DataLoader):
        if batch_size is not None:
            raise ValueError(f"--batch-size: applies to data returned as (X, y); {spec!r} returned a DataLoader, "
                             f"whose own batch_size is used. Drop --batch-size or set it on the DataLoader.")
        return data
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[1], torch.Tensor) and _has_tensor(data[0]):
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"--batch-size: expected a positive integer, got {batch_size!r}.")
        return data
    raise TypeError(
        f"--data: expected {spec!r} to return (X, y) tensors or a torch DataLoader, got {_describe(data)}"
        + (f" of length {len(data)}" if isinstance(data, (tuple, list)) else "") + "."
    )


def _has_tensor(x) -> bool:
    if isinstance(x, torch.Tensor):
        return True
    if isinstance(x, Mapping):
        return any(_has_tensor(v) for v in x.values())
    if isinstance(x, (tuple, list)):
        return any(_has_tensor(v) for v in x)
    return False


def check_compatible(model: nn.Module, loss: str, data, *, params=None, batch_size: int | None = None) -> None:
    """Run the model on the first sample and the loss on its target: a cheap fit check.

    Builds the :class:`~curvops.Objective` (which checks the parameter selection and the model's
    modes), then one forward pass on one sample (converted to the model's dtype and device)
    and one loss evaluation with the target shape checks.  The model is left as found.

    Raises:
        ValueError, TypeError: naming ``--data``, ``--params`` or ``--loss``, with the cause.
    """
    from ..objective import Objective

    try:
        obj = Objective(model, loss, data, params=params, batch_size=batch_size)
    except (ValueError, TypeError) as err:
        raise type(err)(f"--data: {err}") from None
    try:
        sample = obj.first_sample()
    except (ValueError, TypeError) as err:
        raise type(err)(f"--data: the first batch is not usable: {err}") from None
    with obj.session(), torch.no_grad():
        try:
            out = obj.forward(obj.theta(), sample.x)
        except Exception as err:
            raise ValueError(
                f"--data: expected inputs the model accepts, but the model failed on the first sample "
                f"(input {_shape_of(sample.x)}): {type(err).__name__}: {_first_line(err)}. Check that --data "
                f"matches --model."
            ) from None
        try:
            obj.loss(out, sample.y, 0)
        except Exception as err:
            raise ValueError(
                f"--loss: expected targets that fit {loss!r} on the model's outputs, got output "
                f"{_shape_of(out)} and target {_shape_of(sample.y)}: {_first_line(err)}"
            ) from None


def _shape_of(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"shape {tuple(x.shape)} {str(x.dtype).replace('torch.', '')}"
    if isinstance(x, Mapping):
        return "{" + ", ".join(f"{k}: {_shape_of(v)}" for k, v in x.items()) + "}"
    if isinstance(x, (tuple, list)):
        return "(" + ", ".join(_shape_of(v) for v in x) + ")"
    return type(x).__name__


def load_problem(*, model: str, data: str, loss: str, checkpoint: str | None = None, params=None,
                 device: str = "cpu", dtype: str | None = None, batch_size: int | None = None) -> Problem:
    """Everything the command needs for a user's model, checked in order of cost.

    Order: loss name, device and dtype, spec syntax, checkpoint file existence, imports, the
    factory's result, checkpoint keys and shapes, the data's type, the parameter names, and the
    one-sample forward pass.

    Args:
        model: ``"pkg.module:factory"``.
        data: ``"pkg.module:loader"``.
        loss: ``"mse"``, ``"cross_entropy"`` or ``"bce_with_logits"``.
        checkpoint: checkpoint file or ``None``.
        params: parameter names (a list, or a comma-separated string), or ``None`` for all.
        device, dtype, batch_size: as on the command line.

    Returns:
        :class:`Problem`.

    Raises:
        SpecError, ImportError, FileNotFoundError, TypeError, ValueError: see the module docstring.
    """
    check_loss(loss)
    resolve_device(device)
    resolve_dtype(dtype)
    parse_spec(model, "--model")
    parse_spec(data, "--data")
    if isinstance(params, str):
        params = [p.strip() for p in params.split(",") if p.strip()]
        if not params:
            raise ValueError("--params: expected comma-separated parameter names, got an empty list.")
    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"--checkpoint: expected an existing file, got {checkpoint!r} (not found).")
    net = load_model(model, checkpoint, device=device, dtype=dtype)
    dataset = load_data(data, batch_size=batch_size)
    if params is not None:
        names = [n for n, _ in net.named_parameters()]
        unknown = [p for p in params if p not in names]
        if unknown:
            raise ValueError(f"--params: expected names of the model's parameters, got unknown {unknown}. "
                             f"The model has {_listed(names)}.")
    check_compatible(net, loss, dataset, params=params, batch_size=batch_size)
    source = {"model": model, "checkpoint": checkpoint, "data": data, "loss": loss}
    warnings = []
    if checkpoint is None:
        source["weights"] = "as the factory returns them (no --checkpoint)"
        warnings.append(untrained_warning(model))
    return Problem(model=net, loss=loss, data=dataset, params=params, batch_size=batch_size, source=source,
                   warnings=warnings)


def untrained_warning(model: str) -> str:
    """The report's top warning when ``--model`` comes without ``--checkpoint``."""
    return (f"No --checkpoint: this report is on the weights that {model} returns, which are random initial "
            f"(untrained) weights unless the factory loads trained ones. Curvature at initialization says little "
            f"about a trained model: pass --checkpoint FILE to measure trained weights.")
