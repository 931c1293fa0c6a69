"""Optimizer, learning-rate schedules and gradient clipping (no ``transformers`` dependency).

Schedules are sized in optimizer steps from a fixed length (``epochs x batches per epoch``; the
samplers keep the number of batches per epoch constant), and are :class:`LambdaLR` objects, so
their state goes into a checkpoint with ``state_dict()``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import torch
from torch import nn

__all__ = ["WarmupSchedule", "build_optimizer", "build_scheduler", "clip_gradients"]

Schedule = Literal["cosine", "linear", "constant"]


def build_optimizer(
    modules: nn.Module | Iterable[nn.Module], lr: float, weight_decay: float = 0.01
) -> torch.optim.AdamW:
    """AdamW over every trainable parameter of ``modules`` (e.g. the model and a loss with a
    learnable temperature). ``weight_decay=0.01`` is torch's default, as in LRFR.

    Example:
        >>> build_optimizer(nn.Linear(2, 2), lr=1e-3).defaults["lr"]
        0.001
    """
    if isinstance(modules, nn.Module):
        modules = [modules]
    params, seen = [], set()
    for module in modules:
        for p in module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    if not params:
        raise ValueError("build_optimizer: the modules have no trainable parameters")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


class WarmupSchedule:
    """The learning-rate factor at a step: linear warmup, then cosine or linear decay to 0.

    Args:
        kind: ``"cosine"`` (Sample4Geo), ``"linear"`` (LRFR) or ``"constant"``.
        total_steps: steps of the whole run.
        warmup_steps: steps of the linear warmup from 0 (0 = none).

    Example:
        >>> f = WarmupSchedule("linear", total_steps=10, warmup_steps=2)
        >>> [round(f(s), 3) for s in (0, 1, 2, 6, 10)]
        [0.0, 0.5, 1.0, 0.5, 0.0]
    """

    def __init__(self, kind: Schedule, total_steps: int, warmup_steps: int = 0) -> None:
        if kind not in ("cosine", "linear", "constant"):
            raise ValueError(f"schedule must be 'cosine', 'linear' or 'constant', got {kind!r}")
        if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
            raise ValueError(
                f"need total_steps >= 1 and 0 <= warmup_steps <= total_steps, got "
                f"total_steps={total_steps}, warmup_steps={warmup_steps}"
            )
        self.kind, self.total_steps, self.warmup_steps = kind, total_steps, warmup_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        if self.kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    kind: Schedule,
    total_steps: int,
    warmup_steps: int = 0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step :class:`LambdaLR` following :class:`WarmupSchedule`; call ``step()`` after
    every optimizer step.

    Example:
        >>> opt = build_optimizer(nn.Linear(2, 2), lr=1.0)
        >>> sched = build_scheduler(opt, "cosine", total_steps=4)
        >>> lrs = []
        >>> for _ in range(3):
        ...     opt.step()
        ...     sched.step()
        ...     lrs.append(round(sched.get_last_lr()[0], 3))
        >>> lrs
        [0.854, 0.5, 0.146]
    """
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupSchedule(kind, total_steps, warmup_steps)
    )


def clip_gradients(
    parameters: Iterable[torch.Tensor], *, value: float | None = None, norm: float | None = None
) -> None:
    """Clips gradients in place by value (each element to [-value, value], as LRFR and
    Sample4Geo do with 100) and/or by total L2 norm. With a float16 ``GradScaler``, call
    ``scaler.unscale_(optimizer)`` first.

    Example:
        >>> p = nn.Parameter(torch.zeros(2)); p.grad = torch.tensor([3.0, -200.0])
        >>> clip_gradients([p], value=100.0); p.grad
        tensor([   3., -100.])
    """
    parameters = [p for p in parameters if p.grad is not None]
    if value is not None:
        if value <= 0:
            raise ValueError(f"clip value must be > 0, got {value}")
        torch.nn.utils.clip_grad_value_(parameters, value)
    if norm is not None:
        if norm <= 0:
            raise ValueError(f"clip norm must be > 0, got {norm}")
        torch.nn.utils.clip_grad_norm_(parameters, norm)
