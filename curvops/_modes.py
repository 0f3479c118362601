r"""The autograd mode every curvature product runs in, whatever the caller's mode.

A product differentiates the model, so it needs gradient recording, tensors that autograd may
save, and the operator's own precision.  The caller may be in any context:

* ``torch.no_grad()`` or inside an ``autograd.Function.forward`` (how GPyTorch's
  linear_operator multiplies during its solves): gradient recording is off;
* ``torch.inference_mode()``: tensors created there cannot be saved for backward;
* an ambient ``torch.autocast(...)``: matmuls would silently run in bf16/fp16.

:func:`product_mode` switches to grad mode, leaves inference mode and disables autocast on
every device type for the duration of a product (the caller's modes come back afterwards), and
:func:`usable` turns an inference tensor handed in by the caller into a normal one.  So a
product gives the same matrix in every context (contract rule 8); autocast is never honoured
inside products: curvature in half precision is a different (and, near rounding, a wrong)
matrix — cast the model to the precision you want instead.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor


def _autocast_device_types() -> list[str]:
    types = ["cpu"]
    if torch.cuda.is_available():
        types.append("cuda")
    return types


def _math_attention():
    """``scaled_dot_product_attention`` on its MATH backend (plain ops: every derivative exists)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch without the context manager: nothing to switch
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


@contextlib.contextmanager
def _no_fused_fastpath():
    """``nn.TransformerEncoderLayer`` / ``nn.MultiheadAttention`` without their fused inference
    "fast path" (``aten::_transformer_encoder_layer_fwd`` has no derivatives); restored afterwards.
    The switch is process-wide, so it is flipped only while a product runs."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


@contextlib.contextmanager
def product_mode():
    """Grad mode on, inference mode off, autocast off (all device types), attention on the MATH
    backend (the fused flash / memory-efficient kernels have no double backward and no forward
    mode: contract rule 10) and no fused transformer fast path, for one product; the caller's
    settings come back afterwards, also when the product raises."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        for device_type in _autocast_device_types():
            stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
        stack.enter_context(_math_attention())
        stack.enter_context(_no_fused_fastpath())
        yield


def usable(t: Tensor) -> Tensor:
    """``t`` itself, or a normal copy when it was created under ``torch.inference_mode()``."""
    if t.is_inference():
        with torch.inference_mode(False):
            return t.clone()
    return t
