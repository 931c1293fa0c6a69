"""The training loop the examples share: :func:`fit`, :func:`train_one_epoch`, :func:`evaluate`.

One epoch: batches of distinct locations (or of hard negatives), autocast forward, the loss in
float32, backward (through a GradScaler for float16), clipping, AdamW step, schedule step. Every
``eval_every`` epochs (and after the last) the retrieval tasks are evaluated with
:func:`~gsra_salad.evaluation.evaluate_retrieval`; hard-negative batches can then be rebuilt from
the new embeddings. After every epoch rank 0 appends a line to ``<output-dir>/metrics.jsonl`` and
writes ``<output-dir>/last/`` (and ``best/`` on a better R@1).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    NeighbourBatchSampler,
    PreloadedPairs,
    UniqueLabelBatchSampler,
)
from ..data._base import load_rgb
from ..data.preload import normalize
from ..evaluation import embed, evaluate_retrieval
from . import checkpoint as ckpt
from .distributed import DistributedContext, barrier, get_context
from .optim import build_optimizer, build_scheduler, clip_gradients
from .precision import AUTOCAST_DTYPES, autocast, grad_scaler, resolve_precision
from .state import TrainState, get_rng_state, set_rng_state

__all__ = [
    "ContrastivePair",
    "FitResult",
    "PairView",
    "RetrievalTask",
    "TrainConfig",
    "evaluate",
    "fit",
    "train_one_epoch",
]

logger = logging.getLogger(__name__)

Mining = Literal["none", "gps", "embedding", "gps+embedding"]


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
        clip_value: clip every gradient element to [-clip_value, clip_value] (``None``: off).
        clip_norm: clip the total gradient norm (``None``: off).
        precision: ``"auto"`` (float16 + GradScaler on CUDA, float32 on CPU), ``"amp"``
            (float16 + GradScaler on CUDA, bfloat16 on CPU), ``"bf16"``, ``"fp16"`` or
            ``"fp32"``.
        grad_checkpointing: recompute the backbone's activations in backward.
        eval_every: evaluate every this many epochs (and after the last).
        eval_batch_size: images per batch when embedding for evaluation.
        mining: batch construction: ``"none"`` (distinct locations in random order), ``"gps"``
            (GPS neighbours, needs the training set's ``positions``), ``"embedding"``
            (neighbours in the last embeddings, rebuilt after each evaluation; random order
            before the first) or ``"gps+embedding"`` (GPS until the first evaluation).
        mining_neighbours: neighbours kept per sample for mining (Sample4Geo: pool 128).
        neighbours_per_anchor: how many of an anchor's neighbours join its batch.
        seed: seeds the model's initialisation, the batch order and the augmentations.
        workers: DataLoader worker processes.
        output_dir: where ``last/``, ``best/`` and ``metrics.jsonl`` go (``None``: no files).
        progress: tqdm progress bars (rank 0, needs the ``progress`` extra).
    """

    epochs: int = 40
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.01
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_epochs: float = 1.0
    clip_value: float | None = 100.0
    clip_norm: float | None = None
    precision: str = "auto"
    grad_checkpointing: bool = False
    eval_every: int = 4
    eval_batch_size: int = 128
    mining: Mining = "none"
    mining_neighbours: int = 64
    neighbours_per_anchor: int = 3
    seed: int = 1
    workers: int = 4
    output_dir: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.eval_every < 1:
            raise ValueError(
                "epochs, batch_size and eval_every must be >= 1, got "
                f"{self.epochs}, {self.batch_size}, {self.eval_every}"
            )
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.mining not in ("none", "gps", "embedding", "gps+embedding"):
            raise ValueError(
                f"mining must be 'none', 'gps', 'embedding' or 'gps+embedding', got {self.mining!r}"
            )


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
    """

    name: str
    queries: Dataset
    references: Dataset
    query_view: str = "query"
    reference_view: str = "reference"
    protocol: str = "cvusa"


class PairView(Dataset):
    """``(image, label)`` items of one side of a pair dataset (``view=0`` query, ``1`` reference).

    For the library's pair datasets (which list ``query_paths`` / ``reference_paths``) only that
    side's image is decoded, with that side's transform (the pair transform is skipped); for any
    other dataset of ``(query, reference, label)`` items the item is built and one side kept.

    Example:
        >>> pairs = [(torch.zeros(1), torch.ones(1), 7)]
        >>> PairView(pairs, 1)[0]
        (tensor([1.]), 7)
    """

    def __init__(self, pairs: Dataset, view: int) -> None:
        if view not in (0, 1):
            raise ValueError(f"view must be 0 (query) or 1 (reference), got {view!r}")
        self.pairs, self.view = pairs, view
        side = "query" if view == 0 else "reference"
        self._paths = getattr(pairs, f"{side}_paths", None)
        self._transform = getattr(pairs, f"{side}_transform", None)
        self.labels = getattr(pairs, "labels", None)

    def __len__(self) -> int:
        return len(self.pairs)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        if self._paths is not None and self.labels is not None:
            image = load_rgb(self._paths[index])
            if self._transform is not None:
                image = self._transform(image)
            return image, int(self.labels[index])
        item = self.pairs[index]
        return item[self.view], int(item[2])


class ContrastivePair(nn.Module):
    """The model and the loss in one module, so that DistributedDataParallel synchronises the
    loss's learnable temperature too. The loss runs in float32 outside autocast.

    Shape:
        - Input: query (B, 3, H, W), reference (B, 3, H', W'), labels (B,)
        - Output: scalar loss
    """

    def __init__(self, model: nn.Module, loss: nn.Module) -> None:
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, query: Tensor, reference: Tensor, labels: Tensor) -> Tensor:
        q, r = self.model(query, reference)
        with torch.autocast(q.device.type, enabled=False):
            return self.loss(q.float(), r.float(), labels=labels)


@dataclass
class FitResult:
    """What :func:`fit` returns: the last evaluation's metrics per task and the final state."""

    metrics: dict[str, dict[str, Any]]
    state: TrainState
    history: list[dict[str, Any]] = field(default_factory=list)


def _progress(iterable, total: int, enabled: bool, desc: str):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def train_one_epoch(
    module: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor, Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    config: TrainConfig,
    state: TrainState,
    context: DistributedContext,
    *,
    epoch: int = 0,
) -> dict[str, float]:
    """One pass over ``loader``; returns ``{"loss", "lr", "images_per_s"}`` (this rank's).

    ``loader`` yields ``(query, reference, labels)`` batches and has a ``len()``.

    ``module`` maps ``(query, reference, labels)`` to a scalar loss (:class:`ContrastivePair`,
    possibly wrapped in DistributedDataParallel); ``state.step`` counts optimizer steps.
    """
    device = context.device
    precision = resolve_precision(config.precision, device)
    module.train()
    batches, images = 0, 0
    start = time.perf_counter()
    bar = _progress(loader, len(loader), config.progress and context.is_main, f"epoch {epoch + 1}")
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
        total += loss.detach()
        batches += 1
        images += query.shape[0] + reference.shape[0]
        if batches % check_every == 0 or batches == len(loader):
            mean = total.item() / batches  # one sync every few steps
            _check_finite(mean, state.step, epoch)
            if bar is not loader:
                rate = images * context.world_size / max(time.perf_counter() - start, 1e-9)
                lr = scheduler.get_last_lr()[0]
                bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}")
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


def _embed(
    model: nn.Module,
    dataset: Dataset,
    view: str,
    config: TrainConfig,
    context: DistributedContext,
) -> tuple[Tensor, Tensor]:
    """(N, D) descriptors (CPU) and (N,) labels of ``dataset`` through ``model.embed(view=)``;
    under a process group every rank embeds its share and gets all of them, in order."""
    precision = resolve_precision(config.precision, context.device)
    descriptors, labels = embed(
        functools.partial(model.embed, view=view),
        dataset,
        batch_size=config.eval_batch_size,
        device=context.device,
        amp=None if precision == "fp32" else AUTOCAST_DTYPES[precision],
        progress=config.progress and context.is_main,
        num_workers=config.workers,
    )
    return descriptors.cpu(), labels.cpu()


RECALL_KS = (1, 5, 10)


def _beyond(key: str, gallery: int) -> bool:
    """A clipped R@k key that is not one of RECALL_KS (e.g. R@3 on a gallery of 3)."""
    if not key.startswith("R@") or key == "R@1%":
        return False
    return int(key[2:]) not in RECALL_KS and int(key[2:]) >= gallery


def evaluate(
    model: nn.Module,
    tasks: Sequence[RetrievalTask],
    config: TrainConfig,
    context: DistributedContext | None = None,
) -> dict[str, dict[str, Any]]:
    """Recall@k (and AP) of every task; each rank embeds a share, every rank gets the result.

    Returns:
        ``{task.name: {"R@1", "R@5", "R@10", "R@1%", ["AP"], "queries", "references"}}``.
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
            # R@k for k beyond the gallery equals R@(gallery size): every match is in the top k
            ks = {k: min(k, len(r)) for k in RECALL_KS}
            metrics = evaluate_retrieval(
                q, r, ql, rl, ks=tuple(sorted(set(ks.values()))), protocol=task.protocol
            )
            metrics.update({f"R@{k}": metrics[f"R@{clipped}"] for k, clipped in ks.items()})
            results[task.name] = {
                **{k: float(v) for k, v in metrics.items() if not _beyond(k, len(r))},
                "queries": len(q),
                "references": len(r),
            }
    finally:
        model.train(was_training)
    return results


class _Batches:
    """An epoch's batches with a length (for the progress bar)."""

    def __init__(self, batches: Iterable, length: int) -> None:
        self.batches, self.length = batches, length

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return self.length


def _epoch_batches(train_set, sampler, augmentation, config, epoch, context, stats=None):
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


def _augmentation_generator(augmentation) -> torch.Generator | None:
    generator = getattr(augmentation, "generator", None)
    return generator if isinstance(generator, torch.Generator) else None


def _build_sampler(labels, positions, config: TrainConfig, per_rank: int, saved=None):
    kwargs = {"seed": config.seed, "drop_last": True}
    neighbours = None if saved is None else saved.get("neighbours")
    if neighbours is None and saved is None and config.mining in ("gps", "gps+embedding"):
        if positions is None:
            raise ValueError(
                f"mining={config.mining!r} needs the training set's GPS positions "
                "(dataset.positions), but it has none; use mining='none' or 'embedding'"
            )
        return NeighbourBatchSampler.from_positions(
            labels,
            np.asarray(positions),
            per_rank,
            metric="euclidean",
            k=config.mining_neighbours,
            neighbours_per_anchor=config.neighbours_per_anchor,
            **kwargs,
        )
    if neighbours is not None:
        return NeighbourBatchSampler(
            labels,
            neighbours.numpy(),
            per_rank,
            neighbours_per_anchor=config.neighbours_per_anchor,
            **kwargs,
        )
    return UniqueLabelBatchSampler(labels, per_rank, **kwargs)


def _sampler_state(sampler) -> dict[str, Any]:
    neighbours = getattr(sampler, "neighbours", None)
    return {
        "epoch": sampler.epoch,
        "neighbours": None if neighbours is None else torch.from_numpy(np.asarray(neighbours)),
    }


def _gather_objects(value: Any, context: DistributedContext) -> list[Any]:
    if not context.distributed:
        return [value]
    values: list[Any] = [None] * context.world_size
    torch.distributed.all_gather_object(values, value)
    return values


def _all_rng_states(context: DistributedContext) -> list[dict[str, Any]]:
    return _gather_objects(get_rng_state(), context)


def _write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(record) + "\n" for record in history))
    os.replace(tmp, path)


def _unwrap(module: nn.Module) -> nn.Module:
    return module.module if hasattr(module, "module") else module


def fit(
    model: nn.Module,
    loss: nn.Module,
    train_set: Dataset,
    tasks: Sequence[RetrievalTask],
    config: TrainConfig,
    *,
    context: DistributedContext | None = None,
    resume: bool = False,
    mining_set: Dataset | None = None,
    augmentation: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
) -> FitResult:
    """Trains ``model`` with ``loss`` on ``train_set`` and evaluates on ``tasks``.

    Args:
        model: a :class:`~gsra_salad.CrossViewGeoLocalizer`, or any module with
            ``forward(query, reference) -> (q, r)`` and ``embed(images, view)`` (checkpoints
            then hold its state dict); moved to the context's device.
        loss: maps ``(q (B, D), r (B, D), labels=(B,))`` to a scalar; with several processes
            build it with ``gather=True`` so that negatives come from every rank.
        train_set: pair dataset, items ``(query, reference, label)``, with ``labels`` (and
            ``positions`` for GPS mining).
        tasks: evaluations; the first task's R@1 decides ``best/``.
        config: the hyper-parameters.
        context: from :func:`~gsra_salad.training.init_distributed` (default: current).
        resume: continue from ``<output-dir>/last/`` exactly where it stopped.
        mining_set: ``(image, label)`` items aligned with ``train_set`` (usually its
            references with the evaluation transform) for embedding-neighbour mining.
        augmentation: applied to every training batch ``(query, reference)``, e.g.
            :class:`~gsra_salad.data.PairedBatchAugmentation` (its ``generator`` state, if it
            has one, is checkpointed too), before the normalisation: uint8 batches (from
            :class:`~gsra_salad.data.PreloadedPairs`, or from a DataLoader over a dataset
            whose transforms return pixels, e.g. ``create_transform(model, view,
            normalize=False)``) are augmented, then normalised with the mean and std of the
            model's ``input_config`` (ImageNet's when it records none); float batches are
            passed to the model as they come. The two paths give identical batches for the
            same data and seed. A ``train_set`` with its own ``batches(sampler,
            augmentation)`` method serves its own batches; any other goes through a
            DataLoader.

    Returns:
        :class:`FitResult` with the final metrics of every task.
    """
    context = context or get_context()
    device = context.device
    _check_fit_arguments(loss, config, context, mining_set)
    output = Path(config.output_dir) if config.output_dir else None
    model.to(device)
    loss.to(device)
    if config.grad_checkpointing:
        model.set_grad_checkpointing(True)
    module: nn.Module = ContrastivePair(model, loss)
    if context.distributed:
        module = nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None
        )

    labels = np.asarray(train_set.labels)  # type: ignore[attr-defined]
    positions = getattr(train_set, "positions", None)
    per_rank = config.batch_size // context.world_size
    saved = None
    if resume:
        if output is None:
            raise ValueError("resume=True needs config.output_dir (where last/ was written)")
        saved = ckpt.load_training_state(output / "last")
        ckpt.load_model_weights(output / "last", model)
    sampler = _build_sampler(
        labels, positions, config, per_rank, None if saved is None else saved["sampler"]
    )
    steps_per_epoch = len(sampler)
    if steps_per_epoch == 0:
        raise ValueError(
            f"no full batch of {config.batch_size} distinct locations in {len(labels)} pairs; "
            "use a smaller batch size"
        )
    pixel_stats = _normalisation(model, train_set)  # mean / std of uint8 training batches
    optimizer = build_optimizer(module, config.lr, config.weight_decay)
    scheduler = build_scheduler(
        optimizer,
        config.schedule,
        config.epochs * steps_per_epoch,
        round(config.warmup_epochs * steps_per_epoch),
    )
    scaler = grad_scaler(device, config.precision)
    state = TrainState()
    if saved is not None:
        state = _restore(saved, optimizer, scheduler, scaler, loss, augmentation, context, output)

    last_metrics: dict[str, dict[str, Any]] = {}
    evaluated_at = -1
    for epoch in range(state.next_epoch, config.epochs):
        sampler.set_epoch(epoch)
        loader = _epoch_batches(
            train_set, sampler, augmentation, config, epoch, context, pixel_stats
        )
        stats = train_one_epoch(
            module, loader, optimizer, scheduler, scaler, config, state, context, epoch=epoch
        )
        record: dict[str, Any] = {"epoch": epoch + 1, "step": state.step, **stats}
        improved = False
        if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
            last_metrics = evaluate(model, tasks, config, context)
            evaluated_at = epoch
            record["metrics"] = last_metrics
            r1 = next(iter(last_metrics.values()))["R@1"] if last_metrics else None
            if r1 is not None and (state.best_metric is None or r1 > state.best_metric):
                state.best_metric, state.best_epoch, improved = r1, epoch, True
            if "embedding" in config.mining and mining_set is not None:
                sampler = _refresh_neighbours(model, mining_set, labels, config, context, per_rank)
        state.next_epoch = epoch + 1
        state.history.append(record)
        logger.info("%s", _summary(record))
        _save_epoch(
            output, model, record, improved, state, config, context,
            {"optimizer": optimizer, "scheduler": scheduler, "scaler": scaler, "loss": loss},
            sampler, augmentation,
        )  # fmt: skip
        barrier()
    if evaluated_at != config.epochs - 1 or not last_metrics:
        last_metrics = evaluate(model, tasks, config, context)
    return FitResult(last_metrics, state, state.history)


def _check_fit_arguments(loss, config: TrainConfig, context, mining_set) -> None:
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
    if "embedding" in config.mining and mining_set is None:
        raise ValueError(f"mining={config.mining!r} needs mining_set (the images to embed)")


def _restore(saved, optimizer, scheduler, scaler, loss, augmentation, context, output):
    """Loads a ``last/`` training state into the live objects; returns its :class:`TrainState`."""
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    scaler.load_state_dict(saved["scaler"])
    loss.load_state_dict(saved["loss"])
    state = TrainState(**saved["state"])
    rng = saved["rng"]
    if len(rng) != context.world_size:
        logger.warning(
            "resuming on %d processes a run saved on %d: RNG streams are not restored exactly",
            context.world_size,
            len(rng),
        )
    set_rng_state(rng[context.rank % len(rng)])
    generator = _augmentation_generator(augmentation)
    if generator is not None and saved.get("augmentation_rng") is not None:
        generator.set_state(saved["augmentation_rng"][context.rank % len(rng)])
    if context.is_main:  # drop lines of epochs after the checkpoint (a kill in between)
        _write_metrics(output / "metrics.jsonl", state.history)
    logger.info(
        "resumed from %s at epoch %d (step %d)", output / "last", state.next_epoch, state.step
    )
    return state


def _save_epoch(
    output, model, record, improved, state, config, context, stateful, sampler, augmentation
) -> None:
    """Appends the epoch to ``metrics.jsonl`` and writes ``last/`` (and ``best/``) on rank 0.

    Every rank must call it: the RNG states of all ranks are gathered to rank 0.
    """
    rng_states = _all_rng_states(context)
    generator = _augmentation_generator(augmentation)
    augmentation_rng = None
    if generator is not None:
        augmentation_rng = _gather_objects(generator.get_state(), context)
    if output is None or not context.is_main:
        return
    output.mkdir(parents=True, exist_ok=True)
    with (output / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")
    training_state = {
        "format": 1,
        "state": state.as_dict(),
        "config": asdict(config),
        **{name: obj.state_dict() for name, obj in stateful.items()},
        "sampler": _sampler_state(sampler),
        "rng": rng_states,
        "augmentation_rng": augmentation_rng,
    }
    ckpt.save_checkpoint(output / "last", _unwrap(model), training_state)
    if improved:
        ckpt.save_checkpoint(output / "best", _unwrap(model), copy_from=output / "last")


def _refresh_neighbours(model, mining_set, labels, config, context, per_rank):
    descriptors, _ = _embed(model, mining_set, "reference", config, context)
    k = min(config.mining_neighbours, len(descriptors) - 1)
    sampler = NeighbourBatchSampler.from_embeddings(
        labels,
        descriptors.numpy(),
        per_rank,
        k=k,
        neighbours_per_anchor=config.neighbours_per_anchor,
        seed=config.seed,
        drop_last=True,
    )
    logger.info("hard negatives: rebuilt batches from %d embedding neighbours", k)
    return sampler


def _summary(record: dict[str, Any]) -> str:
    text = (
        f"epoch {record['epoch']}: loss {record['loss']:.4f}, lr {record['lr']:.2e}, "
        f"{record['images_per_s']:.3g} images/s"
    )
    for name, metrics in record.get("metrics", {}).items():
        text += f"; {name} R@1 {metrics['R@1']:.2f}"
        if "AP" in metrics:
            text += f" AP {metrics['AP']:.2f}"
    return text
