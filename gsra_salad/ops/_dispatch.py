"""How an ``impl="auto"`` call finds out what autograd and tracing need. Private."""

from __future__ import annotations

import sys

import torch
from torch import Tensor

__all__ = ["checks_enabled", "has_forward_grad", "is_tracing"]


def is_tracing() -> bool:
    if torch.jit.is_scripting() or torch.jit.is_tracing():
        return True
    onnx = sys.modules.get("torch.onnx")  # importing torch.onnx costs time and warnings
    if onnx is not None and onnx.is_in_onnx_export():
        return True
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting is not None and is_exporting())


def checks_enabled() -> bool:
    return not (is_tracing() or torch.compiler.is_compiling())


def has_forward_grad(*tensors: Tensor) -> bool:
    from torch.autograd import forward_ad

    return any(
        isinstance(t, Tensor) and forward_ad.unpack_dual(t).tangent is not None for t in tensors
    )
