"""The run state (:class:`TrainState`), seeding and the random-number-generator states a resume
restores."""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["TrainState", "get_rng_state", "seed_everything", "set_rng_state"]


@dataclass(eq=False)
class TrainState:
    """Everything stateful in a run, with one :meth:`state_dict` / :meth:`load_state_dict`.

    :func:`~gsra_salad.training.fit` builds it (:func:`~gsra_salad.training.build_train_state`
    builds one for a loop of your own), saves its state dict in every checkpoint and loads it on
    resume. The counters say where the run stands; the objects are the live ones the loop uses.

    Attributes:
        config: the run's :class:`~gsra_salad.training.TrainConfig`.
        model: the model being trained (unwrapped, never DistributedDataParallel).
        loss: the loss module (its learnable temperature is state too).
        optimizer, scheduler, scaler: AdamW, its per-step schedule, the GradScaler.
        sampler: the batch sampler (``state_dict()`` holds its epoch and mined neighbours).
        augmentation: the batch augmentation, or ``None``; its state is its ``state_dict()``
            if it has one, else the state of its ``generator`` attribute (a
            ``torch.Generator``), if it has one.
        next_epoch: the epoch a resumed run starts with (explicit, so that resuming never
            depends on an ``epoch + 1`` convention).
        step: optimizer steps taken so far.
        best_metric: the best value of ``config.best_metric`` seen (``None`` before the first
            evaluation).
        best_epoch: the epoch (0-based) that reached it.
        history: the record of every epoch, as appended to ``metrics.jsonl``.
        stop_requested: set by :meth:`request_stop` (not saved).

    Example:
        >>> from torch import nn
        >>> from gsra_salad.training import TrainConfig, build_train_state
        >>> from gsra_salad.data import UniqueLabelBatchSampler
        >>> state = build_train_state(
        ...     nn.Linear(2, 2), nn.Identity(), UniqueLabelBatchSampler(list(range(8)), 4),
        ...     TrainConfig(epochs=2, batch_size=4))
        >>> state.next_epoch, sorted(state.state_dict())[:4]
        (0, ['augmentation', 'config', 'format', 'loss'])
    """

    config: Any
    model: torch.nn.Module
    loss: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    sampler: Any
    augmentation: Any = None
    next_epoch: int = 0
    step: int = 0
    best_metric: float | None = None
    best_epoch: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    stop_requested: bool = field(default=False, repr=False)

    COUNTERS = ("next_epoch", "step", "best_metric", "best_epoch", "history")
    FORMAT = 2

    def request_stop(self) -> None:
        """Ends the run after the current step (from a callback): the epoch is cut short, then
        evaluated and checkpointed as the last one (a resume would start at the next epoch)."""
        self.stop_requested = True

    def progress(self) -> dict[str, Any]:
        """The counters (``next_epoch``, ``step``, ``best_metric``, ``best_epoch``,
        ``history``) as a plain dict (JSON-able)."""
        return {name: copy.deepcopy(getattr(self, name)) for name in self.COUNTERS}

    def state_dict(self, *, include_model: bool = True) -> dict[str, Any]:
        """Everything needed to continue the run exactly, as tensors and plain Python values
        (loads with ``torch.load(weights_only=True)``). ``rng`` holds this process's global
        generators; checkpoints store one per rank.

        Args:
            include_model: include ``"model"`` (the model's state dict); checkpoints leave it
                out and store the weights with ``save_pretrained`` beside it.
        """
        state: dict[str, Any] = {
            "format": self.FORMAT,
            "config": self.config.as_dict(),
            "progress": self.progress(),
            "loss": self.loss.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "augmentation": _augmentation_state(self.augmentation),
            "rng": get_rng_state(),
        }
        if include_model:
            state["model"] = self.model.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any], *, rank: int = 0) -> None:
        """Restores :meth:`state_dict` (``"model"`` only if present). Per-rank entries
        (``rng``, ``augmentation`` saved as one per rank) are taken at ``rank`` (modulo their
        count). The config is not restored: compare it first
        (:func:`~gsra_salad.training.resume_changes`)."""
        if "model" in state:
            self.model.load_state_dict(state["model"])
        self.loss.load_state_dict(state["loss"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.sampler.load_state_dict(state["sampler"])
        for name, value in state["progress"].items():
            setattr(self, name, copy.deepcopy(value))
        augmentation = _per_rank(state.get("augmentation"), rank)
        if augmentation is not None and self.augmentation is not None:
            _load_augmentation_state(self.augmentation, augmentation)
        if state.get("rng") is not None:
            set_rng_state(_per_rank(state["rng"], rank))


def _per_rank(value: Any, rank: int) -> Any:
    """A checkpoint stores per-process states as one list entry per rank."""
    if isinstance(value, list):
        return value[rank % len(value)] if value else None
    return value


def _augmentation_state(augmentation: Any) -> Any:
    if augmentation is None:
        return None
    if hasattr(augmentation, "state_dict"):
        return augmentation.state_dict()
    generator = getattr(augmentation, "generator", None)
    if isinstance(generator, torch.Generator):
        return {"generator": generator.get_state()}
    return None


def _load_augmentation_state(augmentation: Any, state: Any) -> None:
    if hasattr(augmentation, "load_state_dict"):
        augmentation.load_state_dict(state)
        return
    generator = getattr(augmentation, "generator", None)
    if isinstance(generator, torch.Generator) and state.get("generator") is not None:
        generator.set_state(state["generator"])


def seed_everything(seed: int) -> None:
    """Seeds Python's, NumPy's and torch's (CPU and every CUDA device) generators.

    Example:
        >>> seed_everything(1); a = torch.rand(1); seed_everything(1); bool(a == torch.rand(1))
        True
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (code that uses the legacy global state)
    torch.manual_seed(seed)


def get_rng_state() -> dict[str, Any]:
    """Every global RNG state (Python, NumPy, torch CPU, each CUDA device), as tensors and
    plain values so that it loads with ``torch.load(weights_only=True)``.

    Example:
        >>> state = get_rng_state(); a = torch.rand(1); set_rng_state(state)
        >>> bool(a == torch.rand(1))
        True
    """
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    state: dict[str, Any] = {
        "python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores what :func:`get_rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    legacy = (kind, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), cached)
    np.random.set_state(legacy)  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
