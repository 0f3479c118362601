"""How a flat parameter vector splits into named tensors (shared by objective and operators)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class ParamLayout:
    """How a flat vector splits into named parameter tensors."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(int(np.prod(s, dtype=np.int64)) for s in self.shapes)

    @property
    def size(self) -> int:
        return sum(self.numels)

    def offsets(self) -> dict[str, tuple[int, int]]:
        out, start = {}, 0
        for n, k in zip(self.names, self.numels):
            out[n] = (start, start + k)
            start += k
        return out

    def subset(self, names: Sequence[str]) -> "ParamLayout":
        index = {n: i for i, n in enumerate(self.names)}
        missing = [n for n in names if n not in index]
        if missing:
            raise ValueError(
                f"restrict: unknown parameter names {missing}; expected names among {list(self.names)}."
            )
        keep = sorted(set(names), key=index.__getitem__)
        return ParamLayout(tuple(keep), tuple(self.shapes[index[n]] for n in keep))

    def flatten(self, values: Mapping[str, Tensor] | Sequence[Tensor], api: str) -> Tensor:
        """Dict (or list in layout order) of tensors → flat vector [P] or block [P, K].

        A trailing extra dimension on every entry is read as K columns.
        """
        if isinstance(values, Mapping):
            missing = [n for n in self.names if n not in values]
            extra = [n for n in values if n not in self.names]
            if missing or extra:
                raise ValueError(
                    f"{api}: parameter dict does not match the operator's parameters: "
                    f"missing {missing}, unexpected {extra}. Pass exactly {list(self.names)}."
                )
            seq = [values[n] for n in self.names]
        else:
            seq = list(values)
            if len(seq) != len(self.names):
                raise ValueError(
                    f"{api}: expected a list of {len(self.names)} tensors (one per parameter), got {len(seq)}."
                )
        flat, ncols = [], None
        for name, shape, t in zip(self.names, self.shapes, seq):
            if not isinstance(t, Tensor):
                raise TypeError(f"{api}: entry {name!r} must be a torch.Tensor, got {type(t).__name__}.")
            if t.shape == shape:
                k = None
            elif t.dim() == len(shape) + 1 and t.shape[:-1] == shape:
                k = t.shape[-1]
            else:
                raise ValueError(
                    f"{api}: entry {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)} "
                    f"(or {tuple(shape)} + (K,) for K columns)."
                )
            if ncols is None:
                ncols = k if k is not None else -1
            elif ncols != (k if k is not None else -1):
                raise ValueError(f"{api}: entries of the parameter dict have different numbers of columns.")
            flat.append(t.reshape(-1) if k is None else t.reshape(-1, k))
        return torch.cat(flat, dim=0)

    def unflatten(self, v: Tensor, as_dict: bool = True) -> dict[str, Tensor] | list[Tensor]:
        """Flat [P] or [P, K] → dict (or list) of parameter-shaped tensors (with trailing K)."""
        tail = v.shape[1:]
        parts = torch.split(v, list(self.numels), dim=0)
        out = [p.reshape(tuple(s) + tuple(tail)) for p, s in zip(parts, self.shapes)]  # 0-dim entries too
        return dict(zip(self.names, out)) if as_dict else out
