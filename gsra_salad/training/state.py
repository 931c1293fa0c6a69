"""The training state, seeding and the random-number-generator states a resume restores."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["TrainState", "get_rng_state", "seed_everything", "set_rng_state"]


@dataclass
class TrainState:
    """Where a run stands; saved in every checkpoint.

    Attributes:
        next_epoch: the epoch a resumed run starts with (explicit, so that resuming never
            depends on an ``epoch + 1`` convention).
        step: optimizer steps taken so far.
        best_metric: the best R@1 seen at an evaluation (``None`` before the first).
        best_epoch: the epoch (0-based) that reached it.
        history: the metrics of every evaluation, as appended to ``metrics.jsonl``.

    Example:
        >>> TrainState(next_epoch=3, step=30).as_dict()["next_epoch"]
        3
    """

    next_epoch: int = 0
    step: int = 0
    best_metric: float | None = None
    best_epoch: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """A plain dict (JSON-able)."""
        return asdict(self)


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
