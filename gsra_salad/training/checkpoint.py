"""Checkpoints: ``<output-dir>/last/`` after every epoch, ``<output-dir>/best/`` on a better R@1.

Each is a :meth:`~gsra_salad.CrossViewGeoLocalizer.save_pretrained` directory (``config.json``
plus the weights, loadable with ``from_pretrained``) with one more file, ``training_state.pt``:
optimizer, scheduler, scaler, loss (its learnable temperature), sampler, every RNG state and the
:class:`~gsra_salad.training.TrainState` with its explicit ``next_epoch``.

Writes are atomic: a checkpoint is written into a temporary sibling directory, then swapped in
with two renames (``last`` -> ``.last.old``, temporary -> ``last``). A run killed at any moment
leaves either the new or the previous checkpoint; if it died between the two renames,
:func:`recover` (called by every save and load) moves ``.last.old`` back.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "RUN_FILES",
    "STATE_DICT_FILE",
    "TRAINING_STATE_FILE",
    "CheckpointError",
    "clean_leftovers",
    "clear_run",
    "holds_run",
    "load_model_weights",
    "load_training_state",
    "recover",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

TRAINING_STATE_FILE = "training_state.pt"
STATE_DICT_FILE = "model_state.pt"
# what a run writes in its output folder (besides hidden temporaries)
RUN_FILES = ("last", "best", "metrics.jsonl", "run.json")


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated or corrupt (the message names the file)."""


def _old(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def recover(target: str | os.PathLike) -> Path:
    """Completes or undoes a swap that a killed run left half done; returns ``target``.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> (root / ".last.old").mkdir()   # killed between the two renames
        >>> recover(root / "last").is_dir()
        True
    """
    target = Path(target)
    old = _old(target)
    if old.is_dir():
        if target.is_dir():
            shutil.rmtree(old, ignore_errors=True)  # the swap had finished: stale copy
        else:
            os.replace(old, target)
            logger.warning("recovered %s from %s (a run was killed while saving)", target, old)
    return target


def _swap_in(new: Path, target: Path) -> None:
    recover(target)
    old = _old(target)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(directory: Path) -> None:
    for path in directory.iterdir():
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())


def save_checkpoint(
    target: str | os.PathLike,
    model: torch.nn.Module,
    training_state: dict[str, Any] | None = None,
    *,
    copy_from: str | os.PathLike | None = None,
) -> Path:
    """Atomically writes ``model.save_pretrained`` plus ``training_state.pt`` to ``target``.

    Args:
        target: the checkpoint directory (e.g. ``<output-dir>/last``).
        model: the model (unwrap DistributedDataParallel first); written with its
            ``save_pretrained`` if it has one, else as ``model_state.pt`` (its state dict).
        training_state: what :func:`load_training_state` returns on resume (tensors and plain
            Python values only, so that it loads with ``weights_only=True``).
        copy_from: copy this finished checkpoint directory instead of writing anew (``best``
            from ``last`` without serialising twice).

    Returns:
        ``target``.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a checkpoint is not
        if copy_from is not None:
            shutil.rmtree(tmp)
            shutil.copytree(copy_from, tmp)
            os.chmod(tmp, 0o777 & ~umask)
        else:
            if hasattr(model, "save_pretrained"):
                model.save_pretrained(tmp)
            else:  # a model of your own: its state dict (rebuild the module in code)
                torch.save(model.state_dict(), tmp / STATE_DICT_FILE)
            if training_state is not None:
                torch.save(training_state, tmp / TRAINING_STATE_FILE)
        _fsync_tree(tmp)
        _swap_in(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_training_state(directory: str | os.PathLike) -> dict[str, Any]:
    """Reads ``training_state.pt`` of a checkpoint directory (``weights_only=True``: no code
    runs while loading).

    Raises:
        FileNotFoundError: naming the file, when there is no checkpoint to resume from.
        CheckpointError: naming the file, when it is truncated or corrupt.
    """
    directory = recover(directory)
    path = directory / TRAINING_STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint to resume from: {path} not found (a run writes it after its first "
            "epoch)"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, bad pickle, I/O error: all mean "unusable"
        raise CheckpointError(
            f"{path} is truncated or corrupt ({type(err).__name__}: "
            f"{' '.join(str(err).split())[:200]}); the run cannot resume from it. Fine-tune "
            f"from {directory.parent / 'best'} (if it exists) in a new output folder, or start "
            "afresh with overwrite"
        ) from err


def load_model_weights(directory: str | os.PathLike, model: torch.nn.Module) -> None:
    """Loads a checkpoint's weights into ``model`` (strictly), whichever way they were saved.

    Raises:
        FileNotFoundError: when the directory holds neither form.
        CheckpointError: naming the directory, when the weights are corrupt or do not fit.
    """
    directory = recover(directory)
    try:
        if (directory / STATE_DICT_FILE).is_file():
            state = torch.load(directory / STATE_DICT_FILE, map_location="cpu", weights_only=True)
        elif hasattr(type(model), "from_pretrained"):
            state = type(model).from_pretrained(directory).state_dict()
        else:
            raise FileNotFoundError(f"no model weights in {directory}")
        model.load_state_dict(state)
    except FileNotFoundError:
        raise
    except Exception as err:
        raise CheckpointError(
            f"the weights in {directory} cannot be loaded ({' '.join(str(err).split())[:300]})"
        ) from err


def holds_run(directory: str | os.PathLike) -> list[str]:
    """The names of a run's files that ``directory`` holds (empty: no run there).

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp()); (root / "metrics.jsonl").write_text("")
        0
        >>> holds_run(root)
        ['metrics.jsonl']
    """
    directory = Path(directory)
    # run.json alone is no run: it is written before the first epoch
    names = ["last", "best", "metrics.jsonl", ".last.old", ".best.old"]
    return [name for name in names if (directory / name).exists()]


def clear_run(directory: str | os.PathLike) -> None:
    """Deletes a run's files (``last/``, ``best/``, ``metrics.jsonl``, ``run.json`` and the
    temporaries of interrupted saves) from ``directory``; other files stay."""
    directory = Path(directory)
    clean_leftovers(directory)
    for name in [*holds_run(directory), "run.json"]:
        path = directory / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def clean_leftovers(directory: str | os.PathLike) -> list[Path]:
    """Removes the temporary copies (``.last.tmp-*``, ``.best.tmp-*``) that a run killed while
    saving left in ``directory``; returns what was removed. Completes an interrupted swap
    first (:func:`recover`)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    for name in ("last", "best"):
        recover(directory / name)
    removed = []
    for path in directory.glob(".*.tmp-*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
        removed.append(path)
    if removed:
        logger.info("removed %d temporary checkpoint(s) left by an interrupted run", len(removed))
    return removed
