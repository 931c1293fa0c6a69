"""The ``impl`` choice and what an ``impl="auto"`` call needs to know. Private."""

from __future__ import annotations

import sys
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "IMPLS",
    "Impl",
    "autocast_state",
    "check_impl",
    "checks_enabled",
    "has_forward_grad",
    "is_tracing",
    "is_vmapped",
]

Impl = Literal["auto", "fused", "reference"]
IMPLS = ("auto", "fused", "reference")


def check_impl(owner: str, impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"{owner}: impl must be one of {IMPLS}, got {impl!r}")


def autocast_state(device: torch.device) -> tuple[str, bool, torch.dtype]:
    """``(device type, autocast enabled, autocast dtype)`` for ``device``'s type."""
    try:
        enabled = torch.is_autocast_enabled(device.type)
        dtype = torch.get_autocast_dtype(device.type)
    except (RuntimeError, TypeError):
        return device.type, False, torch.float32
    return device.type, enabled, dtype


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


def is_vmapped(*tensors: object) -> bool:
    """True if any tensor is batched by ``torch.func.vmap`` at some level.

    Data-dependent checks (``bool(tensor)``) raise under vmap; callers skip them then.
    """
    from torch._C import _functorch

    for t in tensors:
        while isinstance(t, Tensor) and _functorch.is_functorch_wrapped_tensor(t):
            if _functorch.is_batchedtensor(t):
                return True
            t = _functorch.get_unwrapped(t)
    return False
