"""``summary.json``: the report's numbers as standard JSON, the environment, and the writer.

:func:`write_summary` writes ``summary.json`` and ``index.html`` from the summary of the sections
run so far; the driver (:func:`curvops.report.build_report`) calls it after every section, so a
run stopped part-way (Ctrl-C, a killed job, a failing section under ``strict``) leaves the
finished sections on disk, marked incomplete.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform

import numpy as np
import torch
from torch import Tensor

from .._version import __version__
from .consistency import reconcile
from .html import write_html

SUMMARY_FILE = "summary.json"
HTML_FILE = "index.html"


def to_jsonable(obj):
    """Tensors/arrays → lists, numpy scalars → Python numbers, tuples → lists, non-finite floats →
    the strings ``"inf"``, ``"-inf"``, ``"nan"`` (so the file is standard JSON)."""
    if isinstance(obj, Tensor):
        return to_jsonable(obj.detach().cpu().tolist() if obj.dim() else obj.item())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return to_jsonable(obj.item())
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else ("nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf"))
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (torch.dtype, torch.device, torch.Size)):
        return str(obj) if not isinstance(obj, torch.Size) else list(obj)
    raise TypeError(f"to_jsonable: cannot store a {type(obj).__name__} in the summary.")


def floats(t) -> list[float]:
    return [float(v) for v in torch.as_tensor(t).detach().to("cpu", torch.float64).reshape(-1)]


def format_traceback(err: BaseException, limit: int = 4000) -> str:
    """The error's traceback (its last ``limit`` characters), for the report."""
    import traceback

    text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    return text if len(text) <= limit else "…" + text[-limit:]


def environment(device: torch.device, dtype: torch.dtype, ranks=None) -> dict:
    """Library versions, platform, device and dtype of a report (recorded in the summary); under
    torch.distributed (``ranks``, a :class:`curvops.report.ranks.Ranks`) also the backend, the number
    of ranks and the shard sizes."""
    env = {"curvops_version": __version__, "torch_version": torch.__version__, "numpy_version": np.__version__,
           "python_version": platform.python_version(), "platform": platform.platform(),
           "device": str(device), "dtype": str(dtype).replace("torch.", ""),
           "num_threads": torch.get_num_threads()}
    if ranks is not None:
        env["torch.distributed"] = ranks.describe()
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    return env


def finish_summary(summary: dict, figures: dict, *, complete: bool, note: str | None = None) -> dict:
    """The summary as written: condition numbers reconciled with ranks, the figures and their
    warnings, ``complete`` (False for a partial report, with ``note`` first among the warnings),
    JSON-native.  ``summary`` itself is left as it is (the driver goes on adding sections)."""
    out = copy.deepcopy(summary)
    reconcile(out["sections"])
    out["figures"] = copy.deepcopy(figures)
    for key, fig in figures.items():
        if fig.get("status") == "error":
            out["warnings"].append(f"The figure {key} was not drawn: {fig.get('message')}")
    if note is not None:
        out["warnings"].insert(0, note)
    out["complete"] = complete
    return to_jsonable(out)


def write_summary(summary: dict, outdir) -> None:
    """Write ``summary.json`` and ``index.html`` (rendered from the summary alone) into ``outdir``.

    Each file is written to a temporary name and renamed, so a run killed while writing leaves
    the previous complete file, never a truncated one."""
    path = os.path.join(outdir, SUMMARY_FILE)
    with open(path + ".tmp", "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=1, allow_nan=False)
    os.replace(path + ".tmp", path)
    write_html(summary, outdir)
