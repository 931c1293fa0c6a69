"""The precision vocabulary of the whole package: ``"auto"``, ``"amp"``, ``"fp32"``, ``"bf16"``,
``"fp16"`` (see :mod:`gsra_salad.training.precision`). Private bottom-layer module, so that
``gsra_salad.evaluation.embed(precision=...)`` and ``TrainConfig.precision`` speak the same words.
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["AUTOCAST_DTYPES", "PRECISIONS", "Precision", "resolve_precision"]

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
