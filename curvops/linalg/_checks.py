"""Argument validation shared by every algorithm in :mod:`curvops.linalg`.

Each check raises before the algorithm touches the operator, in the library's style
``"<api>: expected <what>, got <actual>. <how to fix>"``: :class:`TypeError` for a value of
the wrong kind (a float where a count is needed, a string for a generator), :class:`ValueError`
for a value of the right kind out of range.

* :func:`check_int` — integer budgets and sizes (``k``, ``num_matvecs``, ``max_iters``, …):
  Python ``int`` or a numpy integer; ``bool`` is refused (``True`` is not a count), and so is a
  float even when integral (``k=5.0``: the message says to pass ``k=5``).
* :func:`check_real` — real scalars (``tol``, ``damping``, ``sigma``): ``int``/``float``/numpy
  reals or a one-element real tensor; NaN refused, ±Inf refused unless allowed.
* :func:`check_generator` — ``None``, a :class:`torch.Generator`, or an int seed (a new
  generator on the operator's device, seeded with it: ``generator=0`` is shorthand for
  ``torch.Generator(device=A.device).manual_seed(0)``).
* :func:`check_choice`, :func:`check_flag` — one of a few strings; a ``bool``.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from torch import Tensor

#: seeds a torch.Generator accepts without wrapping
_SEED_MAX = 2**64 - 1


def _describe(value) -> str:
    """``type value`` for a message, the value shortened."""
    text = str(value) if isinstance(value, np.generic) else repr(value)  # numpy 2: "3.0", not "np.float64(3.0)"
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def is_int(value) -> bool:
    """An integer count: ``int`` or a numpy integer, not a ``bool``."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_int(value, name: str, api: str, *, minimum: int | None = None, maximum: int | None = None,
              expected: str | None = None, fix: str = "", named: bool = False) -> int:
    """``value`` as a Python ``int`` in ``[minimum, maximum]`` (bounds optional, inclusive).

    Args:
        value: the argument as given.
        name: its name in the signature (``"k"``, ``"num_matvecs"``).
        api: the public function (``"eigsh"``), the prefix of the message.
        minimum, maximum: inclusive bounds (None: unbounded).
        expected: the range in words for the ValueError (default ``"name ≥ minimum"`` …).
        fix: a sentence on how to fix a value out of range.
        named: say ``got k=20`` rather than ``got 20``.

    Raises:
        TypeError: not an integer (``bool`` and integral floats included).
        ValueError: out of range.
    """
    if not is_int(value):
        if isinstance(value, (float, np.floating)) and math.isfinite(value):
            hint = f"Pass {name}={int(value)}." if float(value).is_integer() else \
                f"Pass a whole number as an int, e.g. {name}={max(round(float(value)), minimum or 0)}."
        elif isinstance(value, (bool, np.bool_)):
            hint = f"Pass a count, e.g. {name}={minimum if minimum is not None else 1}."
        else:
            hint = f"Pass a Python int, e.g. {name}={minimum if minimum is not None else 1}."
        raise TypeError(f"{api}: expected an integer {name}, got {_describe(value)}. {hint}")
    value = int(value)
    low_bad = minimum is not None and value < minimum
    high_bad = maximum is not None and value > maximum
    if low_bad or high_bad:
        if expected is None:
            if minimum is not None and maximum is not None:
                expected = f"{minimum} ≤ {name} ≤ {maximum}"
            elif minimum is not None:
                expected = f"{name} ≥ {minimum}"
            else:
                expected = f"{name} ≤ {maximum}"
        got = f"{name}={value}" if named else f"{value}"
        raise ValueError(f"{api}: expected {expected}, got {got}." + (f" {fix}" if fix else ""))
    return value


def check_optional_int(value, name: str, api: str, **kw) -> int | None:
    """:func:`check_int`, with ``None`` passed through (meaning "the default")."""
    return None if value is None else check_int(value, name, api, **kw)


def check_real(value, name: str, api: str, *, minimum: float | None = None, strict: bool = False,
               allow_inf: bool = False, expected: str | None = None, fix: str = "") -> float:
    """``value`` as a Python ``float``: ``≥ minimum`` (``> minimum`` when ``strict``), not NaN.

    Accepts ``int``, ``float``, numpy reals and one-element real tensors.

    Raises:
        TypeError: not a real number (a string, ``None``, a complex, a ``bool``, a tensor of
            several elements).
        ValueError: NaN, an infinity (unless ``allow_inf``), or below the bound.
    """
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool:
        number = float(value.detach().reshape(()).cpu())
    elif isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
        number = float(value)
    else:
        raise TypeError(f"{api}: expected a real number for {name}, got {_describe(value)}. "
                        f"Pass a Python float (e.g. {name}={minimum if minimum is not None else 0.0}).")
    if expected is None:
        op = ">" if strict else "≥"
        expected = f"a finite {name} {op} {minimum:g}" if minimum is not None else f"a finite {name}"
    if math.isnan(number) or (math.isinf(number) and not allow_inf) or (
            minimum is not None and (number <= minimum if strict else number < minimum)):
        raise ValueError(f"{api}: expected {expected}, got {value!r}." + (f" {fix}" if fix else ""))
    return number


def check_choice(value, name: str, choices: tuple, api: str, *, fix: str = ""):
    """``value`` if it is one of ``choices`` (compared by equality), else ValueError."""
    try:
        ok = isinstance(value, str) and value in choices
    except TypeError:  # unhashable, uncomparable
        ok = False
    if not ok and not isinstance(value, str):
        ok = any(value is c for c in choices)
    if not ok:
        raise ValueError(f"{api}: expected {name} in {choices}, got {value!r}." + (f" {fix}" if fix else ""))
    return value


def check_flag(value, name: str, api: str) -> bool:
    """``value`` as a ``bool`` (Python or numpy); anything else (``"False"``, ``0``) is a TypeError."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{api}: expected True or False for {name}, got {_describe(value)}. "
                        f"Pass {name}=True or {name}=False.")
    return bool(value)


def check_generator(generator, api: str, device: torch.device | str | None = None, *,
                    operator=None) -> torch.Generator | None:
    """``None``, a :class:`torch.Generator`, or an int seed turned into a seeded generator.

    ``None`` for a distributed operator (``operator``, which every algorithm passes, has a
    ``process_group``) gives a new generator
    seeded from rank 0 (one small broadcast), so every rank draws the same probes and every rank's
    algorithm sees the same numbers; ``None`` otherwise stays None (torch's default generator).

    An int seed (a Python or numpy integer in ``[0, 2**64 − 1]``) gives a new generator on
    ``device`` (the operator's; a CPU generator where the device has none, e.g. ``meta``),
    seeded with it, so ``generator=0`` gives the same draws as
    ``torch.Generator(device=A.device).manual_seed(0)``.

    Raises:
        TypeError: anything else (a float, a string, numpy's ``Generator``/``RandomState``).
        ValueError: a negative or too large seed.
    """
    if generator is None:
        return _rank_consistent(operator, device)
    if isinstance(generator, torch.Generator):
        return generator
    if is_int(generator):
        seed = int(generator)
        if not 0 <= seed <= _SEED_MAX:
            raise ValueError(f"{api}: expected an int seed for generator in [0, 2**64 - 1], got {seed}. "
                             f"Pass a non-negative seed, or a torch.Generator.")
        dev = torch.device(device) if device is not None else torch.device("cpu")
        try:
            gen = torch.Generator(device=dev)
        except RuntimeError:  # devices without generators (meta): draw on the CPU, moved afterwards
            gen = torch.Generator()
        return gen.manual_seed(seed)
    raise TypeError(
        f"{api}: expected a torch.Generator, an int seed or None for generator, got {_describe(generator)}. "
        f"Pass generator=torch.Generator().manual_seed(0) or simply generator=0."
    )


def _rank_consistent(A, device) -> torch.Generator | None:
    """A generator seeded identically on every rank of ``A.process_group`` (None without one)."""
    group = getattr(A, "process_group", None)
    if group is None:
        return None
    from .._distributed import broadcast_seed

    dev = torch.device(device) if device is not None else torch.device(getattr(A, "device", "cpu"))
    seed = broadcast_seed(group, dev)
    try:
        gen = torch.Generator(device=dev)
    except RuntimeError:
        gen = torch.Generator()
    return gen.manual_seed(seed)
