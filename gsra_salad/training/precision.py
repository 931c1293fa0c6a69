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

import torch

from .._precision import AUTOCAST_DTYPES, PRECISIONS, Precision, resolve_precision

__all__ = [
    "AUTOCAST_DTYPES",
    "PRECISIONS",
    "Precision",
    "autocast",
    "grad_scaler",
    "resolve_precision",
]


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


def grad_scaler(
    device: torch.device | str, precision: str, init_scale: float = 2.0**16
) -> torch.amp.GradScaler:
    """A ``torch.amp.GradScaler``, enabled only for float16 (bfloat16 and float32 need none).

    Args:
        device: where training runs.
        precision: a precision name (see :func:`resolve_precision`).
        init_scale: the initial loss scale (torch's default 2**16; LRFR starts at 2**10).

    Example:
        >>> grad_scaler("cpu", "fp32").is_enabled()
        False
        >>> grad_scaler("cpu", "fp32", init_scale=2.0**10).get_scale()  # disabled: 1.0
        1.0
    """
    device = torch.device(device)
    enabled = resolve_precision(precision, device) == "fp16"
    return torch.amp.GradScaler(device.type, init_scale=init_scale, enabled=enabled)
