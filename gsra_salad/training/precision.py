"""Mixed precision: one place that turns a precision name into an autocast context and a scaler.

``"amp"`` is mixed precision wherever the run goes: float16 autocast with a
:class:`torch.amp.GradScaler` on CUDA, bfloat16 autocast on CPU. ``"auto"`` (the default) is
``"amp"`` on CUDA and float32 on CPU (where bfloat16 is only faster on processors with native
bfloat16 units). ``"bf16"`` is bfloat16 autocast (CPU or CUDA, no scaler needed); ``"fp16"``
needs CUDA; ``"fp32"`` turns autocast off. Only ``torch.amp`` is used (never the deprecated
``torch.cuda.amp``).
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch

__all__ = [
    "AUTOCAST_DTYPES",
    "PRECISIONS",
    "Precision",
    "autocast",
    "grad_scaler",
    "resolve_precision",
]

Precision = Literal["auto", "amp", "fp32", "bf16", "fp16"]
PRECISIONS = ("auto", "amp", "fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # precision -> dtype


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """The concrete precision (``"fp32"``, ``"bf16"`` or ``"fp16"``) for ``device``.

    Example:
        >>> resolve_precision("auto", "cpu"), resolve_precision("amp", "cpu")
        ('fp32', 'bf16')
        >>> resolve_precision("auto", "cuda"), resolve_precision("amp", "cuda")
        ('fp16', 'fp16')
    """
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision in ("auto", "amp") and device.type == "cuda":
        return "fp16"
    if precision in ("auto", "amp"):
        return "fp32" if precision == "auto" else "bf16"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(
            f"precision 'fp16' needs a CUDA device (it trains with a GradScaler), got {device}; "
            "use 'bf16' for mixed precision on CPU"
        )
    return precision


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for a resolved precision (a no-op context for ``"fp32"``).

    Example:
        >>> with autocast("cpu", "bf16"):
        ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
        torch.bfloat16
    """
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


def grad_scaler(device: torch.device | str, precision: str) -> torch.amp.GradScaler:
    """A ``torch.amp.GradScaler``, enabled only for float16 (bfloat16 and float32 need none).

    Example:
        >>> grad_scaler("cpu", "fp32").is_enabled()
        False
    """
    device = torch.device(device)
    enabled = resolve_precision(precision, device) == "fp16"
    return torch.amp.GradScaler(device.type, enabled=enabled)
