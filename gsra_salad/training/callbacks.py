"""Callbacks: code of your own at fixed points of :func:`~gsra_salad.training.fit`.

Subclass :class:`Callback` and override the events you need (Lightning's and
pytorch-metric-learning's hooks work the same way); pass instances with
``fit(..., callbacks=[...])``. Every event receives the :class:`~gsra_salad.training.TrainState`
(``state.step``, ``state.next_epoch``, ``state.model``, ``state.optimizer``, ...). Callbacks run
on every process; guard file writes with ``torch.distributed.get_rank() == 0`` (or
:func:`~gsra_salad.training.get_context`) under ``torchrun``. A callback that keeps state of its
own across a resume should save it itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

__all__ = ["Callback", "CallbackList"]


class Callback:
    """Base class of :func:`~gsra_salad.training.fit`'s callbacks; every event does nothing.

    Events, in the order they happen:

    - ``on_fit_start(state)``: after the state is built (and restored, on resume);
    - ``on_step_end(state, loss)``: after every optimizer step; ``loss`` is this step's loss, a
      detached 0-dim tensor on the training device (``loss.item()`` synchronises CUDA);
    - ``on_evaluate_end(state, metrics)``: after each evaluation, ``metrics`` as returned by
      :func:`~gsra_salad.training.evaluate` (``{task: {"R@1": ..., ...}}``);
    - ``on_epoch_end(state, record)``: after the epoch's checkpoint is written; ``record`` is
      its line of ``metrics.jsonl``;
    - ``on_fit_end(state, result)``: with the :class:`~gsra_salad.training.FitResult`.

    Example:
        >>> import torch
        >>> class LossCurve(Callback):
        ...     def __init__(self): self.losses = []
        ...     def on_step_end(self, state, loss): self.losses.append((state.step, float(loss)))
        >>> curve = LossCurve()
        >>> curve.on_step_end(type("S", (), {"step": 1})(), torch.tensor(0.5)); curve.losses
        [(1, 0.5)]
    """

    def on_fit_start(self, state: Any) -> None:
        """After the run state is built (and restored, on resume)."""

    def on_step_end(self, state: Any, loss: Tensor) -> None:
        """After every optimizer step."""

    def on_evaluate_end(self, state: Any, metrics: dict[str, dict[str, Any]]) -> None:
        """After each evaluation."""

    def on_epoch_end(self, state: Any, record: dict[str, Any]) -> None:
        """After every epoch (its checkpoint written)."""

    def on_fit_end(self, state: Any, result: Any) -> None:
        """At the end of :func:`~gsra_salad.training.fit`."""


class CallbackList(Callback):
    """Calls each event on every callback, in order.

    Example:
        >>> CallbackList([Callback(), Callback()]).on_fit_start(None)
    """

    def __init__(self, callbacks: Iterable[Callback] = ()) -> None:
        self.callbacks = list(callbacks)
        for callback in self.callbacks:
            if not isinstance(callback, Callback):
                raise TypeError(
                    f"callbacks must be gsra_salad.training.Callback instances, got "
                    f"{type(callback).__name__}; subclass Callback and override its events"
                )

    def on_fit_start(self, state: Any) -> None:
        for callback in self.callbacks:
            callback.on_fit_start(state)

    def on_step_end(self, state: Any, loss: Tensor) -> None:
        for callback in self.callbacks:
            callback.on_step_end(state, loss)

    def on_evaluate_end(self, state: Any, metrics: dict[str, dict[str, Any]]) -> None:
        for callback in self.callbacks:
            callback.on_evaluate_end(state, metrics)

    def on_epoch_end(self, state: Any, record: dict[str, Any]) -> None:
        for callback in self.callbacks:
            callback.on_epoch_end(state, record)

    def on_fit_end(self, state: Any, result: Any) -> None:
        for callback in self.callbacks:
            callback.on_fit_end(state, result)
