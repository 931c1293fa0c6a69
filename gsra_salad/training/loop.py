"""The training loop: :func:`fit`, :func:`train_one_epoch`, :func:`evaluate`.

One epoch: batches of distinct locations (or of hard negatives), autocast forward, the loss in
float32, backward (through a GradScaler for float16), clipping, AdamW step, schedule step. Every
``eval_every`` epochs (and after the last) the retrieval tasks are evaluated with
:func:`~gsra_salad.evaluation.evaluate_retrieval`; hard-negative batches can then be rebuilt from
the new embeddings. After every epoch rank 0 appends a line to ``<output-dir>/metrics.jsonl`` and
writes ``<output-dir>/last/`` (and ``best/`` when ``config.best_metric`` improved).

Everything stateful lives in one :class:`~gsra_salad.training.TrainState`; the run's settings,
model and data size are recorded in ``<output-dir>/run.json`` and compared on resume.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .._progress import progress_bar
from ..data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    NeighbourBatchSampler,
    PreloadedPairs,
    UniqueLabelBatchSampler,
)
from ..data.preload import normalize
from ..evaluation import embed, evaluate_retrieval
from . import checkpoint as ckpt
from .callbacks import Callback, CallbackList
from .config import ResumeError, TrainConfig, resume_changes
from .distributed import DistributedContext, barrier, get_context
from .optim import WarmupSchedule, build_optimizer, build_scheduler, clip_gradients
from .precision import autocast, grad_scaler, resolve_precision
from .state import TrainState, seed_everything

__all__ = [
    "FitResult",
    "RetrievalTask",
    "TrainData",
    "TrainStep",
    "build_train_state",
    "evaluate",
    "fit",
    "train_one_epoch",
]

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"


@dataclass
class RetrievalTask:
    """One evaluation: queries against references, e.g. ground panoramas against satellite tiles.

    Attributes:
        name: the task's name in metrics (e.g. ``"val"``, ``"drone->satellite"``).
        queries: dataset of ``(image, label)``.
        references: dataset of ``(image, label)`` (label -1 = junk).
        query_view: which of the model's views embeds the queries (``"query"``/``"reference"``).
        reference_view: which view embeds the references.
        protocol: ``"cvusa"`` or ``"university1652"`` (see :func:`evaluate_retrieval`).
        distractors: ``"keep"`` (official) or ``"drop"`` (``university1652`` only).
        query_positions, reference_positions: optional (Q, 2) and (R, 2) positions; with them
            the metrics include the top-1 localisation error in metres.
        position_metric: ``"euclidean"`` (planar metres) or ``"haversine"`` (degrees), with
            positions.
        papers_scoring: ``university1652`` only: also score the descriptors the way LRFR's
            and Sample4Geo's code does (distractors dropped, ``R@1%`` as LRFR's
            ``CMC[round(G/100)]``), reported beside the official scoring under the task name
            ``"<name> (papers)"`` (the published University-1652 tables were scored so).
    """

    name: str
    queries: Dataset
    references: Dataset
    query_view: str = "query"
    reference_view: str = "reference"
    protocol: str = "cvusa"
    distractors: str = "keep"
    query_positions: Any = None
    reference_positions: Any = None
    position_metric: str | None = None
    papers_scoring: bool = False


PAPERS_SUFFIX = " (papers)"


@dataclass
class TrainData:
    """What :func:`fit` trains on.

    Attributes:
        pairs: pair dataset, items ``(query, reference, label)``, with ``labels`` (and
            ``positions`` for GPS mining). A dataset with a ``batches(sampler, augmentation)``
            method (:class:`~gsra_salad.data.PreloadedPairs`) serves its own batches; any other
            goes through a DataLoader.
        augmentation: applied to every training batch ``(query, reference)`` before it is
            normalised, e.g. :class:`~gsra_salad.data.PairedBatchAugmentation`; its state is
            checkpointed (see :class:`~gsra_salad.training.TrainState`). uint8 batches (from
            :class:`~gsra_salad.data.PreloadedPairs`, or from a DataLoader over a dataset whose
            transforms return pixels, e.g. ``create_transform(model, view, normalize=False)``)
            are augmented, then normalised with the mean and std of the model's
            ``input_config`` (ImageNet's when it records none); float batches are passed to
            the model as they come. Both paths give identical batches for the same data and
            seed.
        mining_set: ``(image, label)`` items aligned with ``pairs`` (usually its references
            with the evaluation transform) for embedding-neighbour mining.
        mining_queries: ``(image, label)`` items aligned with ``pairs`` (its queries with the
            evaluation transform), for ``config.mining_from="query"`` (Sample4Geo's
            ground->satellite neighbours).

    Example:
        >>> TrainData([(torch.zeros(3, 4, 4), torch.zeros(3, 4, 4), 0)]).augmentation is None
        True
    """

    pairs: Dataset
    augmentation: Any = None
    mining_set: Dataset | None = None
    mining_queries: Dataset | None = None


class TrainStep(nn.Module):
    """The model and the loss in one module: ``(query, reference, labels) -> loss``, so that
    DistributedDataParallel synchronises the loss's learnable temperature too. The loss runs in
    float32 (float64 for float64 models) outside autocast.

    Shape:
        - Input: query (B, 3, H, W), reference (B, 3, H', W'), labels (B,)
        - Output: scalar loss

    Example:
        >>> from gsra_salad.losses import InfoNCELoss
        >>> model = nn.Linear(4, 8)
        >>> step = TrainStep(lambda q, r: (model(q), model(r)), InfoNCELoss())
        >>> step(torch.rand(3, 4), torch.rand(3, 4), torch.arange(3)).shape
        torch.Size([])
    """

    def __init__(self, model: nn.Module, loss: nn.Module) -> None:
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, query: Tensor, reference: Tensor, labels: Tensor) -> Tensor:
        q, r = self.model(query, reference)
        with torch.autocast(q.device.type, enabled=False):
            return self.loss(_at_least_float32(q), _at_least_float32(r), labels=labels)


def _at_least_float32(t: Tensor) -> Tensor:
    """float16 / bfloat16 -> float32; float32 and float64 stay (a float64 check stays exact)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


@dataclass
class FitResult:
    """What :func:`fit` returns: the last evaluation's metrics per task and the run state."""

    metrics: dict[str, dict[str, Any]]
    state: TrainState
    history: list[dict[str, Any]] = field(default_factory=list)


# -- one epoch ---------------------------------------------------------------------------------


def train_one_epoch(
    module: nn.Module,
    state: TrainState,
    loader: Iterable[tuple[Tensor, Tensor, Tensor]],
    context: DistributedContext,
    callbacks: Callback | None = None,
) -> dict[str, float]:
    """One pass over ``loader``; returns ``{"loss", "lr", "images_per_s", "seconds"}`` (this
    rank's), and advances ``state.step``.

    Args:
        module: maps ``(query, reference, labels)`` to a scalar loss (:class:`TrainStep`,
            possibly wrapped in DistributedDataParallel).
        state: the run state (its optimizer, scheduler, scaler and config are used).
        loader: yields ``(query, reference, labels)`` batches and has a ``len()``.
        context: the process group and device.
        callbacks: ``on_step_end`` is called after every optimizer step.
    """
    config, optimizer, scheduler = state.config, state.optimizer, state.scheduler
    scaler = state.scaler
    device = context.device
    precision = resolve_precision(config.precision, device)
    epoch = state.next_epoch
    module.train()
    batches, images = 0, 0
    start = time.perf_counter()
    enabled = config.progress and context.is_main
    bar = progress_bar(loader, total=len(loader), enabled=enabled, desc=f"epoch {epoch + 1}")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    total = torch.zeros((), device=device)  # summed on the device: no sync every step
    check_every = 1 if device.type == "cpu" else _CHECK_EVERY  # a sync is free on CPU
    for query, reference, labels in bar:
        query = query.to(device, non_blocking=True)
        reference = reference.to(device, non_blocking=True)
        labels = torch.as_tensor(labels).to(device, non_blocking=True)
        with autocast(device, precision):
            loss = module(query, reference, labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if config.clip_value is not None or config.clip_norm is not None:
            scaler.unscale_(optimizer)
            clip_gradients(params, value=config.clip_value, norm=config.clip_norm)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        state.step += 1
        loss = loss.detach()
        total += loss
        batches += 1
        images += query.shape[0] + reference.shape[0]
        if callbacks is not None:
            callbacks.on_step_end(state, loss)
        stop = state.stop_requested
        if stop or batches % check_every == 0 or batches == len(loader):
            mean = total.item() / batches  # one sync every few steps
            _check_finite(mean, state.step, epoch)
            if bar is not loader:
                rate = images * context.world_size / max(time.perf_counter() - start, 1e-9)
                lr = scheduler.get_last_lr()[0]
                bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}")
        if stop:
            break
    seconds = time.perf_counter() - start
    mean = total.item() / max(batches, 1)
    _check_finite(mean, state.step, epoch)
    return {
        "loss": mean,
        "lr": scheduler.get_last_lr()[0],
        "images_per_s": images * context.world_size / max(seconds, 1e-9),
        "seconds": seconds,
    }


_CHECK_EVERY = 10


def _check_finite(mean_loss: float, step: int, epoch: int) -> None:
    if not math.isfinite(mean_loss):
        raise FloatingPointError(
            f"the training loss became {mean_loss} by step {step} (epoch {epoch + 1}); lower "
            "the learning rate, or train in 'bf16'/'fp32' instead of 'fp16'"
        )


# -- evaluation --------------------------------------------------------------------------------


def _embed(
    model: nn.Module,
    dataset: Dataset,
    view: str,
    config: TrainConfig,
    context: DistributedContext,
) -> tuple[Tensor, Tensor]:
    """(N, D) descriptors (CPU) and (N,) labels of ``dataset`` through ``model.embed(view=)``;
    under a process group every rank embeds its share and gets all of them, in order."""
    descriptors, labels = embed(
        functools.partial(model.embed, view=view),
        dataset,
        batch_size=config.eval_batch_size,
        device=context.device,
        precision=config.precision,
        progress=config.progress and context.is_main,
        num_workers=config.workers,
    )
    return descriptors.cpu(), labels.cpu()


RECALL_KS = (1, 5, 10)


def evaluate(
    model: nn.Module,
    tasks: Sequence[RetrievalTask],
    config: TrainConfig,
    context: DistributedContext | None = None,
) -> dict[str, dict[str, Any]]:
    """Recall@k (and AP) of every task; each rank embeds a share, every rank gets the result.

    Returns:
        ``{task.name: {"R@1", "R@5", "R@10", "R@1%", ["AP"], ["median_error_m", ...],
        "queries", "references"}}``, and for a task with ``papers_scoring`` also
        ``{task.name + " (papers)": {...}}`` (the same descriptors scored with the
        distractors dropped and LRFR's ``R@1%``; ``references`` counts the gallery kept).
    """
    context = context or get_context()
    if context.distributed:
        # after the last step each rank holds batch-norm statistics of its own batches; DDP
        # would broadcast rank 0's at the next forward, evaluation does it here
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, src=0)
    was_training = model.training
    model.eval()
    results = {}
    try:
        for task in tasks:
            q, ql = _embed(model, task.queries, task.query_view, config, context)
            r, rl = _embed(model, task.references, task.reference_view, config, context)
            positions = {}
            if task.query_positions is not None:
                positions = {
                    "query_positions": torch.as_tensor(np.asarray(task.query_positions)),
                    "reference_positions": torch.as_tensor(np.asarray(task.reference_positions)),
                    "position_metric": task.position_metric,
                }
            metrics = evaluate_retrieval(
                q, r, ql, rl, ks=RECALL_KS, clip_ks=True, protocol=task.protocol,
                distractors=task.distractors, **positions,
            )  # fmt: skip
            results[task.name] = {
                **{k: float(v) for k, v in metrics.items()},
                "queries": len(q),
                "references": len(r),
            }
            if task.papers_scoring:
                if task.protocol != "university1652":
                    raise ValueError(
                        f"task {task.name!r}: papers_scoring applies to the university1652 "
                        f"protocol only, got protocol={task.protocol!r}"
                    )
                papers = evaluate_retrieval(
                    q, r, ql, rl, ks=RECALL_KS, clip_ks=True, protocol=task.protocol,
                    distractors="drop", one_percent="lrfr",
                )  # fmt: skip
                kept = torch.isin(torch.as_tensor(rl), torch.as_tensor(ql))
                results[task.name + PAPERS_SUFFIX] = {
                    **{k: float(v) for k, v in papers.items()},
                    "queries": len(q),
                    "references": int(kept.sum()),
                }
    finally:
        model.train(was_training)
    return results


# -- the run state -----------------------------------------------------------------------------


def _schedule(config: TrainConfig, steps_per_epoch: int) -> WarmupSchedule:
    """The run's schedule: ``int(schedule_length x epochs x steps_per_epoch)`` steps long
    (LRFR's ``num_training_steps=int(1.05 T)`` with ``schedule_length=1.05``)."""
    steps = config.epochs * steps_per_epoch
    return WarmupSchedule(
        config.schedule,
        steps if config.schedule_length == 1 else int(config.schedule_length * steps),
        round(config.warmup_epochs * steps_per_epoch),
    )


def build_train_state(
    model: nn.Module,
    loss: nn.Module,
    sampler: Any,
    config: TrainConfig,
    *,
    augmentation: Any = None,
    device: torch.device | str = "cpu",
) -> TrainState:
    """A fresh :class:`TrainState`: AdamW over the model's and the loss's parameters, the
    schedule sized from ``config.epochs x len(sampler)`` steps (times
    ``config.schedule_length``), a GradScaler for the precision (starting at
    ``config.scaler_init_scale``).

    Args:
        model: the model (not wrapped in DistributedDataParallel).
        loss: the loss module.
        sampler: the batch sampler (``len()`` batches per epoch; ``state_dict()``).
        config: the hyper-parameters.
        augmentation: the batch augmentation, if any.
        device: where training runs (for the GradScaler).

    Raises:
        ValueError: a sampler with no batch per epoch.
    """
    steps_per_epoch = len(sampler)
    if steps_per_epoch == 0:
        raise ValueError(
            f"no full batch of {config.batch_size} distinct locations per epoch; use a smaller "
            "batch size"
        )
    optimizer = build_optimizer([model, loss], config.lr, config.weight_decay)
    schedule = _schedule(config, steps_per_epoch)
    scheduler = build_scheduler(
        optimizer, config.schedule, schedule.total_steps, schedule.warmup_steps
    )
    scaler = grad_scaler(device, config.precision, init_scale=config.scaler_init_scale)
    return TrainState(config, model, loss, optimizer, scheduler, scaler, sampler, augmentation)


def _reschedule(state: TrainState, steps_per_epoch: int) -> None:
    """After a resume with another number of epochs: the schedule of the new length, and the
    learning rate it gives at the current step (the steps taken keep the rates they had)."""
    schedule = _schedule(state.config, steps_per_epoch)
    scheduler = state.scheduler
    scheduler.lr_lambdas = [schedule] * len(scheduler.lr_lambdas)  # type: ignore[attr-defined]
    for group, base in zip(state.optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base * schedule(scheduler.last_epoch)
    logger.info(
        "the run now has %d epochs: schedule recomputed (%d steps in all, lr %.3g at step %d)",
        state.config.epochs,
        schedule.total_steps,
        state.optimizer.param_groups[0]["lr"],
        state.step,
    )


def _build_sampler(labels, pairs, config: TrainConfig, per_rank: int, neighbours=None):
    """The first epoch's batch sampler; GPS neighbours come from ``pairs.positions``, compared
    by ``pairs.position_metric`` ("euclidean" UTM metres, the default, or "haversine")."""
    positions = getattr(pairs, "positions", None)
    metric = getattr(pairs, "position_metric", None) or "euclidean"
    kwargs = {"seed": config.seed, "drop_last": True}
    if neighbours is not None:  # mined neighbours of a resumed run
        return NeighbourBatchSampler(
            labels,
            np.asarray(neighbours),
            per_rank,
            neighbours_per_anchor=config.neighbours_per_anchor,
            nearest=config.mining_nearest,
            **kwargs,
        )
    if config.mining in ("gps", "gps+embedding"):
        if positions is None:
            raise ValueError(
                f"mining={config.mining!r} needs the training set's GPS positions "
                "(dataset.positions), but it has none; use mining='none' or 'embedding' "
                "(--mining embedding), or give the dataset its positions (CVUSA: "
                "split_locations/all.csv of the full release)"
            )
        return NeighbourBatchSampler.from_positions(
            labels,
            np.asarray(positions),
            per_rank,
            metric=metric,
            k=config.mining_neighbours,
            neighbours_per_anchor=config.neighbours_per_anchor,
            nearest=config.mining_nearest,
            **kwargs,
        )
    return UniqueLabelBatchSampler(labels, per_rank, **kwargs)


def _refresh_neighbours(state: TrainState, mining_set, mining_queries, labels, context, per_rank):
    config = state.config
    descriptors, _ = _embed(state.model, mining_set, "reference", config, context)
    queries = None
    if config.mining_from == "query":
        queries, _ = _embed(state.model, mining_queries, "query", config, context)
        queries = queries.numpy()
    k = min(config.mining_neighbours, len(descriptors) - 1)
    sampler = NeighbourBatchSampler.from_embeddings(
        labels,
        descriptors.numpy(),
        per_rank,
        k=k,
        query_embeddings=queries,
        neighbours_per_anchor=config.neighbours_per_anchor,
        nearest=config.mining_nearest,
        seed=config.seed,
        drop_last=True,
    )
    logger.info(
        "hard negatives: rebuilt batches from %d %s->reference embedding neighbours",
        k,
        config.mining_from,
    )
    return sampler


# -- batches -----------------------------------------------------------------------------------


class _Batches:
    """An epoch's batches with a length (for the progress bar)."""

    def __init__(self, batches: Iterable, length: int) -> None:
        self.batches, self.length = batches, length

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return self.length


def _epoch_batches(data: TrainData, state: TrainState, epoch: int, context, stats=None):
    """The training batches of one epoch, augmented then normalised (normalisation last, as in
    timm's PrefetchLoader), the same way on both paths:

    - a :class:`~gsra_salad.data.PreloadedPairs` serves its uint8 batches;
    - any other set with a ``batches(sampler, augmentation)`` method serves its own batches
      (it applies ``augmentation`` itself);
    - any other set goes through a DataLoader (worker seeds derived from the seed, the epoch
      and the rank).

    ``augmentation`` then runs on the batches (on pixels: a
    :class:`~gsra_salad.data.PairedBatchAugmentation` refuses normalised images), and uint8
    batches are moved to the device and normalised with ``stats[view] = (mean, std)`` (see
    :func:`_normalisation`); float batches are passed on as they are.
    """
    config, sampler = state.config, state.sampler
    train_set, augmentation = data.pairs, data.augmentation
    stats = stats or _normalisation(None, train_set)
    if isinstance(train_set, PreloadedPairs):
        batches = train_set.batches(sampler, normalized=False)
    elif hasattr(train_set, "batches"):
        batches, augmentation = train_set.batches(sampler, augmentation), None
    else:
        batches = DataLoader(
            train_set,
            batch_sampler=sampler,
            num_workers=config.workers,
            pin_memory=context.device.type == "cuda",
            generator=torch.Generator().manual_seed(
                config.seed * 1_000_003 + epoch * 1_009 + context.rank
            ),
        )
    return _Batches(_finish(batches, augmentation, stats, context.device), len(sampler))


def _finish(batches, augmentation, stats, device):
    """Augments each (query, reference, labels) batch, then normalises its uint8 views."""
    for query, reference, labels in batches:
        if augmentation is not None:
            query, reference = augmentation(query, reference)
        query = _normalised(query, stats["query"], device)
        yield query, _normalised(reference, stats["reference"], device), labels


def _normalised(images: Tensor, stats, device: torch.device) -> Tensor:
    if images.dtype != torch.uint8:
        return images  # floats: normalised by the dataset's own transforms (or by design)
    return normalize(images.to(device, non_blocking=True), *stats)


def _normalisation(model, train_set) -> dict[str, tuple[Sequence[float], Sequence[float]]]:
    """``{view: (mean, std)}`` for uint8 training batches: the model's ``input_config`` when it
    records one, else the training set's ``query_input`` / ``reference_input``
    (:class:`~gsra_salad.data.PreloadedPairs`), else ImageNet's."""
    recorded = getattr(model, "input_config", None) or {}
    stats = {}
    for view in ("query", "reference"):
        config = recorded.get(view) or getattr(train_set, f"{view}_input", None)
        stats[view] = (IMAGENET_MEAN, IMAGENET_STD) if config is None else (config.mean, config.std)
    return stats


# -- checks before training --------------------------------------------------------------------


def _unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def _model_description(model: nn.Module) -> dict[str, Any] | None:
    """The model's ``describe()`` (what ``save_pretrained`` writes), checked before training so
    that a model that cannot be saved fails now, not after an epoch's work."""
    if not hasattr(model, "describe"):
        return None
    try:
        return model.describe()
    except ValueError as err:
        raise ValueError(
            f"fit: the model cannot be saved as a checkpoint ({err}); checked before training "
            "so that no epoch is lost. Register the component (see docs/custom-models.md), or "
            "pass a model without save_pretrained/describe: its state dict is saved instead"
        ) from err


def _check_output_dir(output: Path | None, resume: bool, overwrite: bool) -> None:
    if output is None:
        if resume:
            raise ValueError("resume=True needs config.output_dir (where last/ was written)")
        return
    if output.exists() and not output.is_dir():
        raise ValueError(f"output_dir {output} exists and is not a directory; pick another path")
    found = ckpt.holds_run(output)
    if found and not resume and not overwrite:
        raise ValueError(
            f"output_dir {output} already holds a run ({', '.join(found)}); continue it with "
            "resume=True (--resume), replace it with overwrite=True (--overwrite), or pick "
            "another output folder. Nothing was changed"
        )
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: pick one")
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ValueError(
            f"output_dir {output} is not writable ({err.strerror or err}); pick another path "
            "or fix its permissions"
        ) from err


def _check_tasks(tasks: Sequence[RetrievalTask]) -> None:
    """Tasks whose queries have no true reference fail here, not at the first evaluation."""
    for task in tasks:
        if not isinstance(task, RetrievalTask):
            raise TypeError(f"tasks must be RetrievalTask objects, got {type(task).__name__}")
        q_labels = getattr(task.queries, "labels", None)
        r_labels = getattr(task.references, "labels", None)
        if q_labels is None or r_labels is None:
            continue  # datasets without a labels list are checked at evaluation
        missing = np.setdiff1d(np.asarray(q_labels), np.asarray(r_labels))
        if task.protocol == "cvusa" and len(missing):
            raise ValueError(
                f"task {task.name!r}: {len(missing)} query label(s) have no reference "
                f"(e.g. {missing[:5].tolist()}); every query needs its true reference under "
                "the 'cvusa' protocol: check the evaluation split"
            )


def _check_fit_arguments(model, loss, data: TrainData, config: TrainConfig, context) -> None:
    """What :func:`fit` refuses (or warns about) before it touches the model."""
    if config.batch_size % context.world_size:
        raise ValueError(
            f"batch_size {config.batch_size} is the global batch; it must divide evenly over "
            f"{context.world_size} processes"
        )
    if context.distributed and getattr(loss, "gather", True) is False:
        logger.warning(
            "training on %d processes with a loss built with gather=False: each rank only "
            "sees its own %d negatives",
            context.world_size,
            config.batch_size // context.world_size,
        )
    if "embedding" in config.mining and data.mining_set is None:
        raise ValueError(
            f"mining={config.mining!r} needs TrainData(mining_set=...) (the images to embed)"
        )
    if "embedding" in config.mining and config.mining_from == "query":
        if data.mining_queries is None:
            raise ValueError(
                "mining_from='query' needs TrainData(mining_queries=...) (the training "
                "queries with the evaluation transform)"
            )
    if not hasattr(data.pairs, "labels"):
        raise ValueError(
            "the training pairs need a `labels` attribute (one location id per pair), as the "
            "library's readers have"
        )
    if config.grad_checkpointing:
        try:
            model.set_grad_checkpointing(True)
        except (NotImplementedError, AttributeError) as err:
            raise ValueError(
                f"grad_checkpointing=True: this model does not support it ({err}); train without it"
            ) from err


# -- fit ---------------------------------------------------------------------------------------


def fit(
    model: nn.Module,
    loss: nn.Module,
    data: TrainData | Dataset,
    tasks: Sequence[RetrievalTask],
    config: TrainConfig,
    *,
    callbacks: Sequence[Callback] = (),
    context: DistributedContext | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> FitResult:
    """Trains ``model`` with ``loss`` on ``data`` and evaluates on ``tasks``.

    A fresh run seeds every global generator with ``config.seed`` (plus the rank) first, so
    two identical calls on identical models give identical weights on the CPU. Everything that
    can be checked is checked before the first step: the output folder (a folder that holds a
    run is refused unless ``resume`` or ``overwrite``), that the model can be saved, the
    tasks' labels, the options. With ``resume`` the saved settings are compared with
    ``config`` (see :func:`~gsra_salad.training.resume_changes`); the model's description, the
    loss and the number of training pairs must be the same too.

    Args:
        model: a :class:`~gsra_salad.CrossViewGeoLocalizer`, or any module with
            ``forward(query, reference) -> (q, r)`` and ``embed(images, view)`` (checkpoints
            then hold its state dict); moved to the context's device.
        loss: maps ``(q (B, D), r (B, D), labels=(B,))`` to a scalar; with several processes
            build it with ``gather=True`` so that negatives come from every rank.
        data: a :class:`TrainData`, or just the pair dataset.
        tasks: evaluations; ``config.best_metric`` picks the one that decides ``best/``.
        config: the hyper-parameters.
        callbacks: :class:`~gsra_salad.training.Callback` objects.
        context: from :func:`~gsra_salad.training.init_distributed` (default: current).
        resume: continue from ``<output-dir>/last/`` exactly where it stopped.
        overwrite: delete the run that ``<output-dir>`` holds and start afresh.

    Returns:
        :class:`FitResult` with the final metrics of every task and the run state.

    Raises:
        ValueError: a bad option or input (named), a folder that holds a run, a model that
            cannot be saved; :class:`~gsra_salad.training.ResumeError` for changed settings;
            :class:`~gsra_salad.training.CheckpointError` for a corrupt ``last/``.
    """
    context = context or get_context()
    data = data if isinstance(data, TrainData) else TrainData(data)
    callback = CallbackList(callbacks)
    output = Path(config.output_dir) if config.output_dir else None
    _check_fit_arguments(model, loss, data, config, context)
    _check_output_dir(output, resume, overwrite)
    _check_tasks(tasks)
    run_info = {
        "config": config.as_dict(),
        "model": None if output is None else _model_description(model),
        "loss": repr(loss),
        "pairs": len(data.pairs),  # type: ignore[arg-type]
    }
    saved = _load_for_resume(output, run_info, config) if resume else None
    if saved is None:
        seed_everything(config.seed + context.rank)

    model.to(context.device)
    loss.to(context.device)
    labels = np.asarray(data.pairs.labels)  # type: ignore[attr-defined]
    per_rank = config.batch_size // context.world_size
    neighbours = None if saved is None else saved["sampler"].get("neighbours")
    sampler = _build_sampler(labels, data.pairs, config, per_rank, neighbours)
    state = build_train_state(
        model, loss, sampler, config, augmentation=data.augmentation, device=context.device
    )
    pixel_stats = _normalisation(model, data.pairs)  # mean / std of uint8 training batches
    barrier()  # every rank has checked the folder before rank 0 changes it
    if output is not None and context.is_main:
        if overwrite:
            ckpt.clear_run(output)
        ckpt.clean_leftovers(output)
        _write_json(output / RUN_FILE, run_info)
    if saved is not None:
        _restore(state, saved, output, context)
    module: nn.Module = TrainStep(model, loss)
    if context.distributed:
        module = nn.parallel.DistributedDataParallel(
            module, device_ids=[context.device.index] if context.device.type == "cuda" else None
        )

    callback.on_fit_start(state)
    last_metrics: dict[str, dict[str, Any]] = {}
    evaluated = False  # after the last step
    for epoch in range(state.next_epoch, config.epochs):
        state.sampler.set_epoch(epoch)
        loader = _epoch_batches(data, state, epoch, context, pixel_stats)
        stats = train_one_epoch(module, state, loader, context, callback)
        record: dict[str, Any] = {"epoch": epoch + 1, "step": state.step, **stats}
        improved = False
        last = epoch + 1 == config.epochs or state.stop_requested
        evaluated = (epoch + 1) % config.eval_every == 0 or last
        if evaluated:
            last_metrics = evaluate(model, tasks, config, context)
            record["metrics"] = last_metrics
            improved = _update_best(state, last_metrics, epoch)
            callback.on_evaluate_end(state, last_metrics)
            if "embedding" in config.mining and data.mining_set is not None:
                state.sampler = _refresh_neighbours(
                    state, data.mining_set, data.mining_queries, labels, context, per_rank
                )
        state.next_epoch = epoch + 1
        state.history.append(record)
        logger.info("%s", _summary(record))
        _save_epoch(output, state, record, improved, context)
        callback.on_epoch_end(state, record)
        barrier()
        if state.stop_requested:
            logger.info("stopped at step %d, as a callback asked", state.step)
            break
    if not evaluated or not last_metrics:
        last_metrics = evaluate(model, tasks, config, context)
    result = FitResult(last_metrics, state, state.history)
    callback.on_fit_end(state, result)
    return result


def _load_for_resume(output: Path, run_info: dict[str, Any], config: TrainConfig):
    """The saved training state, once the new run is known to continue it (else one error)."""
    last = output / "last"
    saved = ckpt.load_training_state(last)
    if saved.get("format", 1) < TrainState.FORMAT:
        saved = _upgrade_format_1(saved)
    trained = int(saved["progress"]["next_epoch"])
    try:
        old_info = json.loads((output / RUN_FILE).read_text())
    except FileNotFoundError:
        old_info = {}  # a run of an older version: only its config is known
    except (OSError, ValueError) as err:
        raise ckpt.CheckpointError(
            f"{output / RUN_FILE} is corrupt ({err}); the run cannot be compared with this one"
        ) from err
    changes = []
    for key, what in (("model", "the model"), ("loss", "the loss"), ("pairs", "training pairs")):
        if key in old_info and old_info[key] != run_info[key]:
            old, new = old_info[key], run_info[key]
            if key == "model":
                old, new = _first_difference(old, new)
            changes.append(f"{what} was {old}, now {new}")
    if changes:
        raise ResumeError(
            "cannot resume: " + "; ".join(changes) + " (a resumed run must train the same "
            "model with the same loss on the same data; start a new run instead)"
        )
    saved["reschedule"] = resume_changes(saved["config"], config, trained_epochs=trained)
    return saved


def _first_difference(old: Any, new: Any, path: str = "") -> tuple[str, str]:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                return _first_difference(old.get(key), new.get(key), f"{path}.{key}".strip("."))
    return f"{path}={old!r}" if path else repr(old), f"{path}={new!r}" if path else repr(new)


def _upgrade_format_1(saved: dict[str, Any]) -> dict[str, Any]:
    """A training state written before the run state had its own state dict."""
    return {
        **saved,
        "format": TrainState.FORMAT,
        "progress": saved["state"],
        "augmentation": [
            None if rng is None else {"generator": rng}
            for rng in (saved.get("augmentation_rng") or [None])
        ],
    }


def _restore(state: TrainState, saved, output: Path, context: DistributedContext) -> None:
    """Loads a ``last/`` checkpoint (weights and training state) into the live run state."""
    ckpt.load_model_weights(output / "last", state.model)
    if len(saved["rng"]) != context.world_size:
        logger.warning(
            "resuming on %d processes a run saved on %d: RNG streams are not restored exactly",
            context.world_size,
            len(saved["rng"]),
        )
    state.load_state_dict(saved, rank=context.rank)
    state.model.to(context.device)
    if saved["reschedule"]:
        _reschedule(state, len(state.sampler))
    if context.is_main:  # drop lines of epochs after the checkpoint (a kill in between)
        _write_metrics(output / "metrics.jsonl", state.history)
    logger.info(
        "resumed from %s at epoch %d (step %d)", output / "last", state.next_epoch, state.step
    )


def _metric_value(metrics: dict[str, dict[str, Any]], name: str) -> tuple[float, bool] | None:
    """``config.best_metric``'s value in an evaluation's metrics, and whether lower is better."""
    if not metrics:
        return None
    task, _, key = name.rpartition("/")
    if task and task not in metrics:
        raise ValueError(f"best_metric {name!r}: no task {task!r} (tasks: {sorted(metrics)})")
    values = metrics[task] if task else next(iter(metrics.values()))
    if key not in values:
        raise ValueError(f"best_metric {name!r}: no metric {key!r} (metrics: {sorted(values)})")
    return float(values[key]), key.startswith(("median_error", "mean_error"))


def _update_best(state: TrainState, metrics: dict[str, dict[str, Any]], epoch: int) -> bool:
    found = _metric_value(metrics, state.config.best_metric)
    if found is None:
        return False
    value, lower_is_better = found
    best = state.best_metric
    if best is None or (value < best if lower_is_better else value > best):
        state.best_metric, state.best_epoch = value, epoch
        return True
    return False


def _gather_objects(value: Any, context: DistributedContext) -> list[Any]:
    if not context.distributed:
        return [value]
    values: list[Any] = [None] * context.world_size
    torch.distributed.all_gather_object(values, value)
    return values


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


def _write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(record) + "\n" for record in history))
    os.replace(tmp, path)


def _save_epoch(output, state: TrainState, record, improved: bool, context) -> None:
    """Appends the epoch to ``metrics.jsonl`` and writes ``last/`` (and ``best/``) on rank 0.

    Every rank must call it: the per-rank states (RNG, augmentation) are gathered to rank 0.
    """
    training_state = state.state_dict(include_model=False)
    training_state["rng"] = _gather_objects(training_state["rng"], context)
    training_state["augmentation"] = _gather_objects(training_state["augmentation"], context)
    if output is None or not context.is_main:
        return
    with (output / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")
    ckpt.save_checkpoint(output / "last", _unwrap(state.model), training_state)
    if improved:
        ckpt.save_checkpoint(output / "best", _unwrap(state.model), copy_from=output / "last")


def _summary(record: dict[str, Any]) -> str:
    text = (
        f"epoch {record['epoch']}: loss {record['loss']:.4f}, lr {record['lr']:.2e}, "
        f"{record['images_per_s']:,.0f} images/s"
    )
    for name, metrics in record.get("metrics", {}).items():
        text += f"; {name} R@1 {metrics['R@1']:.2f}"
        if "AP" in metrics:
            text += f" AP {metrics['AP']:.2f}"
    return text
