"""The hyper-parameters of a run (:class:`TrainConfig`) and what may change when it resumes.

A run folder's ``last/training_state.pt`` holds the config the run was started with. On resume
:func:`resume_changes` compares it with the new one, field by field:

- fields in :data:`FREE_ON_RESUME` (workers, evaluation cadence and batch size, progress bars,
  where the files go) may change: they do not change what is learned;
- ``epochs`` may change (an *extension*, usually): the schedule is recomputed so that the
  remaining epochs train as if the run had been planned that long from the start (the steps
  already taken keep the learning rates they had); it may not go below the epochs already
  trained;
- any other difference (batch size, learning rate, schedule, clipping, precision, mining, seed,
  ...) is refused with one line that names every differing field, old and new value.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Any, Literal

__all__ = ["FREE_ON_RESUME", "ResumeError", "TrainConfig", "resume_changes"]

Mining = Literal["none", "gps", "embedding", "gps+embedding"]
MINING = ("none", "gps", "embedding", "gps+embedding")
MiningFrom = Literal["reference", "query"]


@dataclass
class TrainConfig:
    """Hyper-parameters of a run (defaults: Sample4Geo's recipe, DESIGN section 7).

    Attributes:
        epochs: training epochs.
        batch_size: pairs per optimizer step over all processes (split evenly over the ranks).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay (torch's default 0.01).
        schedule: ``"cosine"``, ``"linear"`` or ``"constant"``, after the warmup.
        warmup_epochs: linear warmup length in epochs (may be fractional, 0 = none).
        schedule_length: the schedule's length as a multiple of the run's steps T (>= 1): the
            schedule is sized for ``int(schedule_length * T)`` steps, so with 1.0 it decays to 0
            at the last step, and with LRFR's 1.05 (``get_linear_schedule_with_warmup(
            num_training_steps=int(1.05 T))``) a linear schedule ends at ~4.8% of the peak.
        clip_value: clip every gradient element to [-clip_value, clip_value] (``None``: off;
            must be > 0 otherwise).
        clip_norm: clip the total gradient norm (``None``: off; must be > 0 otherwise).
        precision: ``"auto"`` (float16 + GradScaler on CUDA, float32 on CPU), ``"amp"``
            (float16 + GradScaler on CUDA, bfloat16 on CPU), ``"bf16"``, ``"fp16"`` or
            ``"fp32"`` (see :mod:`gsra_salad.training.precision`).
        scaler_init_scale: the float16 GradScaler's initial scale (torch's 2**16; LRFR's
            2**10); unused by the other precisions.
        grad_checkpointing: recompute the backbone's activations in backward.
        eval_every: evaluate every this many epochs (and after the last).
        eval_batch_size: images per batch when embedding for evaluation.
        mining: batch construction: ``"none"`` (distinct locations in random order), ``"gps"``
            (GPS neighbours, needs the training set's ``positions``), ``"embedding"``
            (neighbours in the last embeddings, rebuilt after each evaluation; random order
            before the first) or ``"gps+embedding"`` (GPS until the first evaluation).
        mining_neighbours: neighbours kept per sample for mining (Sample4Geo: pool 128).
        neighbours_per_anchor: how many of an anchor's neighbours join its batch (at most).
        mining_nearest: ``None``: an anchor's neighbours join in order of nearness until
            ``neighbours_per_anchor`` have joined; a number n (Sample4Geo: 32 of 64): the
            candidates are the n nearest plus ``neighbours_per_anchor - n`` drawn at random
            from the rest of the ``mining_neighbours`` pool, each tried once (the unused
            ones join).
        mining_from: whose embeddings give an anchor's neighbours: ``"reference"`` (the
            references most similar to its reference) or ``"query"`` (the references most
            similar to its query: Sample4Geo's ground->satellite neighbours).
        best_metric: the metric that decides ``best/``: ``"R@1"`` (the first task's), or
            ``"<task>/<metric>"`` (e.g. ``"drone->satellite/AP"``). Higher is better, except
            for metrics whose name starts with ``"median_error"`` or ``"mean_error"``.
        seed: seeds everything random in :func:`~gsra_salad.training.fit`: torch's, NumPy's
            and Python's global generators at the start of a fresh run (dropout, DataLoader
            workers), the batch order and the data-loading workers' seeds. The model's
            initialisation happens before ``fit``: seed it yourself
            (:func:`~gsra_salad.training.seed_everything`) before building the model.
        workers: DataLoader worker processes.
        output_dir: where ``last/``, ``best/`` and ``metrics.jsonl`` go (``None``: no files).
        progress: tqdm progress bars (rank 0, needs the ``progress`` extra).

    Example:
        >>> TrainConfig(epochs=2, batch_size=8).lr
        0.001
        >>> TrainConfig(clip_value=0)
        Traceback (most recent call last):
        ...
        ValueError: clip_value must be > 0 (or None to disable clipping), got 0
    """

    epochs: int = 40
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.01
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_epochs: float = 1.0
    schedule_length: float = 1.0
    clip_value: float | None = 100.0
    clip_norm: float | None = None
    precision: str = "auto"
    scaler_init_scale: float = 65536.0
    grad_checkpointing: bool = False
    eval_every: int = 4
    eval_batch_size: int = 128
    mining: Mining = "none"
    mining_neighbours: int = 64
    neighbours_per_anchor: int = 3
    mining_nearest: int | None = None
    mining_from: MiningFrom = "reference"
    best_metric: str = "R@1"
    seed: int = 1
    workers: int = 4
    output_dir: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_every", "eval_batch_size", "mining_neighbours"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_epochs < 0 or self.warmup_epochs > self.epochs:
            raise ValueError(
                f"warmup_epochs must be in [0, epochs={self.epochs}], got {self.warmup_epochs}"
            )
        for name in ("clip_value", "clip_norm"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0 (or None to disable clipping), got {value}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(
                f"schedule must be 'cosine', 'linear' or 'constant', got {self.schedule!r}"
            )
        if self.mining not in MINING:
            raise ValueError(
                f"mining must be 'none', 'gps', 'embedding' or 'gps+embedding', got {self.mining!r}"
            )
        if self.neighbours_per_anchor < 0:
            raise ValueError(
                f"neighbours_per_anchor must be >= 0, got {self.neighbours_per_anchor}"
            )
        if self.mining_nearest is not None and not (
            0 <= self.mining_nearest <= self.neighbours_per_anchor
        ):
            raise ValueError(
                f"mining_nearest must be None or in [0, neighbours_per_anchor="
                f"{self.neighbours_per_anchor}], got {self.mining_nearest}"
            )
        if self.mining_from not in ("reference", "query"):
            raise ValueError(
                f"mining_from must be 'reference' or 'query', got {self.mining_from!r}"
            )
        if self.schedule_length < 1:
            raise ValueError(
                f"schedule_length must be >= 1 (a multiple of the run's steps), got "
                f"{self.schedule_length}"
            )
        if self.scaler_init_scale <= 0:
            raise ValueError(f"scaler_init_scale must be > 0, got {self.scaler_init_scale}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if not self.best_metric or self.best_metric.count("/") > 1:
            raise ValueError(
                f"best_metric must be a metric name ('R@1') or '<task>/<metric>', got "
                f"{self.best_metric!r}"
            )

    def as_dict(self) -> dict[str, Any]:
        """A plain dict (JSON-able), the form saved in checkpoints and run folders."""
        return asdict(self)


# fields that do not change what a run learns: they may differ on resume
FREE_ON_RESUME = frozenset(
    {"workers", "eval_every", "eval_batch_size", "progress", "output_dir", "best_metric"}
)


class ResumeError(ValueError):
    """A resume refused because the run's settings changed (the message names each field)."""


def resume_changes(saved: dict[str, Any], config: TrainConfig, *, trained_epochs: int) -> bool:
    """Checks that ``config`` may continue a run saved with ``saved``; True for an extension.

    Args:
        saved: the saved config (:meth:`TrainConfig.as_dict` of the run being resumed).
        config: the config of the resumed run.
        trained_epochs: the epochs the saved run has finished.

    Returns:
        Whether ``config.epochs`` differs from the saved run's (then the schedule is recomputed
        for the new length).

    Raises:
        ResumeError: naming every field that may not change, with its old and new value; or
            when ``epochs`` is below ``trained_epochs``.

    Example:
        >>> old = TrainConfig(epochs=4).as_dict()
        >>> resume_changes(old, TrainConfig(epochs=4, workers=0), trained_epochs=2)
        False
        >>> resume_changes(old, TrainConfig(epochs=8), trained_epochs=4)
        True
        >>> resume_changes(old, TrainConfig(epochs=4, lr=1e-4, batch_size=64), trained_epochs=2)
        Traceback (most recent call last):
        ...
        gsra_salad.training.config.ResumeError: cannot resume: batch_size was 128, now 64; ...
    """
    new = config.as_dict()
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    changed = []
    for name, value in new.items():
        old = saved.get(name, defaults[name])  # a field added since the run was saved
        if name in FREE_ON_RESUME or name == "epochs" or _same(old, value):
            continue
        changed.append(f"{name} was {old!r}, now {value!r}")
    if changed:
        raise ResumeError(
            "cannot resume: " + "; ".join(changed) + " (a resumed run must keep the settings "
            "it was started with; only " + ", ".join(sorted(FREE_ON_RESUME)) + " may change, "
            "and epochs; start a new run in another output folder, or overwrite this one)"
        )
    old_epochs = int(saved.get("epochs", config.epochs))
    if config.epochs < trained_epochs:
        raise ResumeError(
            f"cannot resume: epochs {config.epochs} is fewer than the {trained_epochs} the run "
            "has already trained (epochs may only grow on resume)"
        )
    return config.epochs != old_epochs


def _same(old: Any, new: Any) -> bool:
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        return list(old) == list(new)
    return old == new
